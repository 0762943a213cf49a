"""Image generation with fixed seeds: one generator per (prompt, seed), so batching never changes an image."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lorakit.metrics import to_uint8_images


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that must be identical between the base and the adapter run."""

    seeds: tuple[int, ...] = (0,)
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    batch_size: int = 8


@dataclass(frozen=True)
class Generated:
    """Images (N, 3, H, W) uint8, ordered prompt-major then seed, with the prompt of each and timing."""

    images: torch.Tensor
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    seconds_per_image: float


def native_resolution(pipe) -> int:
    """The pipeline's trained resolution: UNet sample size times the VAE's downsampling."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def generate(pipe, prompts: Sequence[str], settings: GenerationSettings, label: str = "generate") -> Generated:
    """Images for every (prompt, seed), timed per image, with a progress bar."""
    size = native_resolution(pipe)
    height, width = settings.height or size, settings.width or size
    jobs = [(prompt, seed) for prompt in prompts for seed in settings.seeds]
    batches = [jobs[i : i + settings.batch_size] for i in range(0, len(jobs), settings.batch_size)]
    images, seconds = [], 0.0
    device = pipe.device
    with tqdm(total=len(jobs), desc=label, unit="img") as bar:
        for batch in batches:
            # Generators live on the CPU so the same seed gives the same noise on any device.
            generators = [torch.Generator("cpu").manual_seed(seed) for _, seed in batch]
            start = time.perf_counter()
            with torch.no_grad():
                out = pipe(
                    prompt=[prompt for prompt, _ in batch],
                    generator=generators,
                    num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance_scale,
                    height=height,
                    width=width,
                    output_type="pt",
                ).images
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - start
            images.append(to_uint8_images(out.float().cpu()))
            bar.update(len(batch))
    return Generated(
        images=torch.cat(images),
        prompts=tuple(prompt for prompt, _ in jobs),
        seeds=tuple(seed for _, seed in jobs),
        seconds_per_image=seconds / max(len(jobs), 1),
    )


def warm_up(pipe, settings: GenerationSettings) -> None:
    """One untimed one-step call, so one-off start-up cost is not billed to whichever model runs first."""
    size = native_resolution(pipe)
    with torch.no_grad():
        pipe(
            prompt="warm up",
            num_inference_steps=1,
            guidance_scale=settings.guidance_scale,
            height=settings.height or size,
            width=settings.width or size,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
        )
