"""Validation grids: batched rendering draws the same images as one call per image, in fewer calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from lorakit import validation
from lorakit.config import ValidationArgs


@pytest.fixture(scope="module")
def tiny_pipe(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe, args: ValidationArgs) -> list[list[np.ndarray]]:
    rows = validation.render_validation_images(pipe, args, 32, torch.device("cpu"))
    return [[np.asarray(image, dtype=np.int16) for image in row] for row in rows]


def test_batched_validation_matches_one_image_per_call(tiny_pipe, monkeypatch):
    args = ValidationArgs(
        validation_prompt=["a red circle", "a blue square"], num_validation_images=2, validation_inference_steps=2
    )
    calls = []
    original_call = type(tiny_pipe).__call__

    def counting_call(self, prompt, **kwargs):
        calls.append(len(prompt))
        return original_call(self, prompt, **kwargs)

    monkeypatch.setattr(type(tiny_pipe), "__call__", counting_call)
    monkeypatch.setattr(validation, "VALIDATION_IMAGES_PER_CALL", 3)
    batched = _render(tiny_pipe, args)
    assert calls == [3, 1]  # 4 images, at most VALIDATION_IMAGES_PER_CALL per call
    calls.clear()
    monkeypatch.setattr(validation, "VALIDATION_IMAGES_PER_CALL", 1)
    single = _render(tiny_pipe, args)
    assert calls == [1] * 4
    assert [len(row) for row in batched] == [2, 2]
    for batched_row, single_row in zip(batched, single, strict=True):
        for a, b in zip(batched_row, single_row, strict=True):
            assert np.abs(a - b).max() <= 2  # same seed, same image; batched matmuls may round differently
    assert np.abs(batched[0][0] - batched[0][1]).max() > 10  # each seed its own noise, not one image repeated
    # each prompt in its own row: the second row is what that prompt alone draws
    alone = _render(tiny_pipe, ValidationArgs(**{**vars(args), "validation_prompt": ["a blue square"]}))
    assert all(np.abs(a - b).max() <= 2 for a, b in zip(alone[0], batched[1], strict=True))


def test_grid_cells_keep_the_images_aspect_ratio():
    from PIL import Image

    wide = [[Image.new("RGB", (64, 32), "red"), Image.new("RGB", (64, 32), "blue")]] * 3
    grid = validation.image_grid(wide, labels=["a", "b", "c"])
    assert grid.size == (2 * 128, 3 * (64 + 14))  # 2:1 cells, longer side 128 (small images upscaled)
    assert grid.getpixel((127, 14 + 63)) == (255, 0, 0) and grid.getpixel((128, 14)) == (0, 0, 255)
    square = validation.image_grid([[Image.new("RGB", (256, 256), "red")]])
    assert square.size == (256, 256)  # already large: kept at its own size
