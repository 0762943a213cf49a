"""Validation images: a pipeline built from the training modules (no second copy), fixed seeds, PNG grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image, ImageDraw

from lorakit.atomic import atomic_write_bytes
from lorakit.captions import with_trigger
from lorakit.config import TrainConfig, ValidationArgs
from lorakit.filenames import VALIDATION_DIR, VALIDATION_GRID_FILE
from lorakit.summary import ValidationImage
from lorakit.training import Models


def make_validation_pipeline(
    models: Models, unet: torch.nn.Module, text_encoder: torch.nn.Module, pretrained: str, revision: str | None
) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline sharing the training modules; the sampler is the base model's own."""
    scheduler_config = DiffusionPipeline.load_config(pretrained, revision=revision)
    scheduler_class_name = scheduler_config.get("scheduler", [None, "PNDMScheduler"])[1]
    import diffusers

    scheduler_class = getattr(diffusers, scheduler_class_name, diffusers.PNDMScheduler)
    scheduler = scheduler_class.from_pretrained(pretrained, subfolder="scheduler", revision=revision)
    pipe = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=text_encoder,
        tokenizer=models.tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Images rendered per pipeline call: one batched call instead of one per image (a 6-image grid of the embedded
# default took 3.6 s one by one, the trainer's largest fixed cost), capped so a large model's VAE decode of the
# whole batch stays small next to training memory.
VALIDATION_IMAGES_PER_CALL = 8


@torch.no_grad()
def render_validation_images(
    pipe: StableDiffusionPipeline,
    validation: ValidationArgs,
    resolution: int,
    device: torch.device,
    prompts: list[str] | None = None,
) -> list[list[Image.Image]]:
    """One row per prompt, one image per seed (validation_seed, +1, ...), the same seeds every time; square at
    `resolution` unless --validation_width/--validation_height say otherwise. Each image has its own generator,
    so batching does not change which noise an image starts from."""
    width, height = validation.validation_width or resolution, validation.validation_height or resolution
    prompts = validation.validation_prompt if prompts is None else prompts
    per_prompt = validation.num_validation_images
    jobs = [(prompt, validation.validation_seed + offset) for prompt in prompts for offset in range(per_prompt)]
    images: list[Image.Image] = []
    for start in range(0, len(jobs), VALIDATION_IMAGES_PER_CALL):
        chunk = jobs[start : start + VALIDATION_IMAGES_PER_CALL]
        generators = [torch.Generator(device=device).manual_seed(seed) for _, seed in chunk]
        with torch.autocast(device.type, enabled=pipe.unet.dtype != torch.float32, dtype=pipe.unet.dtype):
            images += pipe(
                [prompt for prompt, _ in chunk],
                num_inference_steps=validation.validation_inference_steps,
                guidance_scale=validation.validation_guidance_scale,
                height=height,
                width=width,
                generator=generators,
            ).images
    return [images[row * per_prompt : (row + 1) * per_prompt] for row in range(len(prompts))]


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, cell: int | None = None) -> Image.Image:
    """Paste images into a grid (rows x columns), optional text label above each row. Each cell keeps the images'
    aspect ratio, its longer side `cell` pixels (default: the images' own, at least 128: small images upscaled)."""
    first = rows[0][0]
    longest = cell or max(first.width, first.height, 128)
    scale = longest / max(first.width, first.height)
    cell_w, cell_h = max(1, round(first.width * scale)), max(1, round(first.height * scale))
    label_height = 14 if labels else 0
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * cell_w, len(rows) * (cell_h + label_height)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        top = r * (cell_h + label_height)
        if labels:
            draw.text((2, top + 1), labels[r][: cell_w * columns // 6], fill="black")
        for c, image in enumerate(row):
            grid.paste(image.resize((cell_w, cell_h), Image.Resampling.NEAREST), (c * cell_w, top + label_height))
    return grid


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def grid_as_array(image: Image.Image) -> np.ndarray:
    """HWC uint8 array (what TensorBoard's add_image with dataformats='HWC' takes)."""
    return np.asarray(image.convert("RGB"))


def run_validation(
    cfg: TrainConfig, accelerator: Accelerator, models: Models, unet, text_encoder, step: int, final: bool
) -> list[ValidationImage]:
    """Render the validation prompts with fixed seeds, save a PNG grid, log it to the trackers."""
    if not cfg.validation.validation_prompt:
        return []
    pipe = make_validation_pipeline(
        models,
        accelerator.unwrap_model(unet),
        accelerator.unwrap_model(text_encoder),
        cfg.model.pretrained_model_name_or_path,
        cfg.model.revision,
    )
    # A trigger word the captions were prefixed with goes in the prompts too: the adapter learned it with them.
    prompts = [with_trigger(prompt, cfg.data.caption_prefix) for prompt in cfg.validation.validation_prompt]
    rows = render_validation_images(pipe, cfg.validation, cfg.data.resolution, accelerator.device, prompts)
    grid = image_grid(rows, labels=prompts)
    out = Path(cfg.output.output_dir)
    save_png(grid, out / VALIDATION_DIR / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid_as_array(grid), step, dataformats="HWC")
    if not final:
        return []
    save_png(grid, out / VALIDATION_GRID_FILE)
    entries = []
    for index, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
        relative = f"{VALIDATION_DIR}/final/{index:02d}.png"
        save_png(row[0], out / relative)
        entries.append(ValidationImage(prompt=prompt, image=relative))
    return entries
