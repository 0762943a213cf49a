"""Shared fixtures: a tiny Stable-Diffusion-architecture pipeline and a tiny captioned dataset.

Built from config with fixed seeds (as diffusers' `get_dummy_components`), saved once per session.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Before any Hugging Face import: huggingface_hub reads these once, at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lorakit.tokenizer import build_clip_tokenizer  # noqa: E402

TINY_WORDS = ["a", "red", "green", "blue", "circle", "square", "on", "white", "black", "background"]
TINY_COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}


def make_tiny_pipeline(out_dir: Path) -> Path:
    """Save a seeded tiny SD pipeline (32 px, 4x VAE downsampling) to `out_dir`."""
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    torch.manual_seed(0)
    text_config = CLIPTextConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=16,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_tiny_imagefolder(out_dir: Path, rows: int = 12, size: int = 32, seed: int = 0) -> Path:
    """Write an `imagefolder` of coloured squares/circles with `metadata.jsonl` captions."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = list(TINY_COLOURS)
    with open(out_dir / "metadata.jsonl", "w") as meta:
        for index in range(rows):
            colour = colours[index % len(colours)]
            shape = "square" if index % 2 else "circle"
            image = Image.new("RGB", (size, size), (255, 255, 255))
            pixels = np.array(image)
            centre, radius = size // 2 + rng.integers(-3, 4), size // 4
            ys, xs = np.mgrid[:size, :size]
            if shape == "circle":
                mask = (ys - centre) ** 2 + (xs - centre) ** 2 <= radius**2
            else:
                mask = (abs(ys - centre) <= radius) & (abs(xs - centre) <= radius)
            pixels[mask] = TINY_COLOURS[colour]
            name = f"{index:03d}.png"
            Image.fromarray(pixels).save(out_dir / name)
            meta.write(json.dumps({"file_name": name, "text": f"a {colour} {shape} on a white background"}) + "\n")
    return out_dir


def tiny_train_args(pipeline: Path, data: Path | str, out: Path, *extra: str) -> list[str]:
    """Flags of a short train_lora run on the tiny fixtures (32 px, batch 2, lr 1e-3, no trackers)."""
    return [
        "--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(data), "--resolution", "32",
        "--output_dir", str(out), "--train_batch_size", "2", "--learning_rate", "1e-3", "--report_to", "none",
        *extra,
    ]  # fmt: skip


@pytest.fixture(autouse=True)
def own_probe_cache(tmp_path_factory, monkeypatch):
    """Each test (and the runs it launches) measures `auto`'s probe afresh: no timings kept from another test or
    from the user's own ~/.cache/lorakit."""
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path_factory.mktemp("lorakit_cache")))


@pytest.fixture
def fresh_accelerator_state():
    """In-process runs each build their own Accelerator (precision differs between tests)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_pipeline"))


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    return make_tiny_imagefolder(tmp_path_factory.mktemp("tiny_data"))
