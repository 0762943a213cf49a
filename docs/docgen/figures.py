"""Figures of the docs, made from the project's own models: sample grids, the denoising strip, the parts diagram."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
from PIL import Image, ImageDraw, ImageFont

from eval.generate import GenerationSettings, generate
from lorakit.token_embeddings import learned_words

CELL = 128  # the world's 32 px images are shown 4x larger so a reader can see them
INK = (30, 30, 30)
PAPER = (255, 255, 255)
ACCENT = (140, 40, 190)  # the adapter's purple
MUTED = (235, 235, 240)


def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans as shipped inside matplotlib, so every machine renders the same glyphs."""
    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def load_pipeline(path: str | Path):
    """The base pipeline in fp32 on the CPU, progress bars off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(path), use_safetensors=True)  # fp32 by default
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) uint8 -> PIL images."""
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]


def base_and_adapter(pipe, adapter: str | Path, prompts: Sequence[str], settings: GenerationSettings):
    """Images of every (prompt, seed) from the base, then from base + adapter; the pipeline is left without it."""
    base = to_pil(generate(pipe, prompts, settings, label="base").images)
    pipe.load_lora_weights(str(adapter), adapter_name="docs")
    try:
        with learned_words(pipe, adapter):
            adapted = to_pil(generate(pipe, prompts, settings, label="base + LoRA").images)
    finally:
        pipe.unload_lora_weights()
    return base, adapted


def _cell(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((CELL, CELL), Image.Resampling.BICUBIC)


def _wrapped(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width_chars: int, size: int) -> None:
    x, y = xy
    for line in textwrap.wrap(text, width_chars):
        draw.text((x, y), line, fill=INK, font=font(size))
        y += size + 3


def grid(
    rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str], label_width: int = 190
) -> Image.Image:
    """A labelled grid: one row per label, cells upscaled to CELL px, column headers on top."""
    pad, header = 6, 44
    width = label_width + len(col_labels) * (CELL + pad) + pad
    height = header + len(rows) * (CELL + pad) + pad
    canvas = Image.new("RGB", (width, height), PAPER)
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(col_labels):
        _wrapped(draw, (label_width + pad + c * (CELL + pad), 6), label, 19, 13)
    for r, (images, label) in enumerate(zip(rows, row_labels, strict=True)):
        top = header + r * (CELL + pad)
        _wrapped(draw, (8, top + CELL // 2 - 18), label, 24, 14)
        for c, image in enumerate(images):
            canvas.paste(_cell(image), (label_width + pad + c * (CELL + pad), top))
    return canvas


def before_after(base: Sequence[Image.Image], adapted: Sequence[Image.Image], prompts: Sequence[str]) -> Image.Image:
    """The README's first picture: prompts as columns, base model above, with the adapter below."""
    return grid([base, adapted], ["base model", "base model + LoRA adapter"], list(prompts), label_width=150)


def sample_grid(
    base: Sequence[Image.Image], adapted: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int]
) -> Image.Image:
    """Rows: prompts; columns: base for each seed, then adapter for each seed (images prompt-major, seed-minor)."""
    n = len(seeds)
    rows = [[*base[i * n : (i + 1) * n], *adapted[i * n : (i + 1) * n]] for i in range(len(prompts))]
    cols = [f"base, seed {s}" for s in seeds] + [f"+ LoRA, seed {s}" for s in seeds]
    return grid(rows, list(prompts), cols)


@torch.no_grad()
def denoising_frames(pipe, prompt: str, seed: int, steps: int, guidance: float, show: Sequence[int]) -> list:
    """(step, image) pairs: the starting noise and the latents after each step in `show`, decoded to pixels."""
    generator = torch.Generator("cpu").manual_seed(seed)
    size = int(pipe.unet.config.sample_size)
    latents = torch.randn((1, pipe.unet.config.in_channels, size, size), generator=generator)
    latents = latents * pipe.scheduler.init_noise_sigma
    decode = pipe.vae.config.scaling_factor

    def picture(tensor: torch.Tensor) -> Image.Image:
        pixels = pipe.vae.decode(tensor / decode).sample
        return to_pil(((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))[0]

    frames = [(0, picture(latents))] if 0 in show else []

    def keep(pipeline, step_index: int, timestep, kwargs: dict) -> dict:
        if step_index + 1 in show:
            frames.append((step_index + 1, picture(kwargs["latents"])))
        return kwargs

    pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents.clone(),
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    return frames


def denoising_strip(frames: Sequence[tuple[int, Image.Image]], steps: int, prompt: str) -> Image.Image:
    """The frames side by side, each captioned with its step."""
    pad, top, bottom = 8, 34, 28
    width = len(frames) * (CELL + pad) + pad
    canvas = Image.new("RGB", (width, top + CELL + bottom), PAPER)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), f'"{prompt}": from pure noise (left) to the picture (right)', fill=INK, font=font(15))
    for i, (step, image) in enumerate(frames):
        x = pad + i * (CELL + pad)
        canvas.paste(_cell(image), (x, top))
        label = "noise" if step == 0 else f"step {step}/{steps}"
        draw.text((x + 4, top + CELL + 6), label, fill=INK, font=font(13))
    return canvas


def _box(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str, body: str, fill, outline) -> None:
    draw.rounded_rectangle(box, radius=14, fill=fill, outline=outline, width=3)
    x0, y0, x1, _ = box
    draw.text((x0 + 12, y0 + 10), title, fill=INK, font=font(17, bold=True))
    _wrapped(draw, (x0 + 12, y0 + 38), body, max(10, (x1 - x0 - 24) // 8), 14)


def _arrow(draw: ImageDraw.ImageDraw, start: tuple[int, int], end: tuple[int, int], colour=INK) -> None:
    draw.line([start, end], fill=colour, width=4)
    (_, y0), (x1, y1) = start, end
    if y0 == y1:  # horizontal: head pointing right
        draw.polygon([(x1, y1), (x1 - 12, y1 - 8), (x1 - 12, y1 + 8)], fill=colour)
    else:  # vertical: head pointing up or down
        d = 1 if y1 > y0 else -1
        draw.polygon([(x1, y1), (x1 - 8, y1 - 12 * d), (x1 + 8, y1 - 12 * d)], fill=colour)


def parts_diagram(prompt: str, noise: Image.Image, picture: Image.Image, steps: int) -> Image.Image:
    """Words -> text understanding -> denoiser (fed noise, steered by the LoRA) -> decoder -> picture."""
    canvas = Image.new("RGB", (1400, 520), PAPER)
    draw = ImageDraw.Draw(canvas)
    y0, y1 = 190, 330
    boxes = [
        ((20, y0, 230, y1), "Your words", f'"{prompt}"'),
        ((290, y0, 540, y1), "Text understanding", "the text encoder turns the words into numbers the model can use"),
        ((600, y0, 880, y1), "Denoiser (UNet)", "removes a little noise at each step, steered by the words"),
        ((940, y0, 1160, y1), "Decoder (VAE)", "turns the cleaned-up result into pixels"),
    ]
    for box, title, body in boxes:
        _box(draw, box, title, body, MUTED, INK)
    for (left, _, _), (right, _, _) in zip(boxes, boxes[1:], strict=False):
        _arrow(draw, (left[2] + 4, (y0 + y1) // 2), (right[0] - 6, (y0 + y1) // 2))
    canvas.paste(_cell(picture), (1240, (y0 + y1) // 2 - CELL // 2))
    _arrow(draw, (1164, (y0 + y1) // 2), (1232, (y0 + y1) // 2))
    draw.text((1240, (y0 + y1) // 2 + CELL // 2 + 6), "the picture", fill=INK, font=font(14))
    # Noise goes in from above; the loop arrow says the denoiser runs many times.
    canvas.paste(_cell(noise), (676, 20))
    draw.text((820, 60), "random noise\n(the starting point)", fill=INK, font=font(14))
    _arrow(draw, (740, 20 + CELL + 2), (740, y0 - 4))
    draw.text((890, y0 - 30), f"repeated {steps} times", fill=INK, font=font(13))
    # The LoRA adapter: a small add-on plugged into the denoiser from below.
    lora = (620, 400, 860, 500)
    _box(draw, lora, "LoRA adapter", "a small add-on that steers the denoiser", (245, 232, 252), ACCENT)
    _arrow(draw, (740, lora[1] - 4), (740, y1 + 6), ACCENT)
    return canvas


def save(image: Image.Image, path: Path) -> Path:
    """Save a PNG, optimized, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path
