"""Quality figures of the embedded world: the judge's accuracy and the base pipeline's CLIP R-precision."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

from embedded import world
from lorakit.metrics import clip_r_precision


def to_uint8(images: list) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)


def candidate_captions() -> list[str]:
    """All world captions (canonical template): the candidates every figure ranks against."""
    return [c.caption() for c in world.all_concepts()]


def judge_accuracy(
    model: CLIPModel,
    processor: CLIPProcessor,
    concepts: list[world.Concept],
    count: int,
    seed: int,
    round_trip: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Top-1 of the judge on freshly rendered images of `concepts`, among all world captions.

    `round_trip` maps [-1, 1] images to [-1, 1] images (train_clip.vae_round_trip): the renders as the
    pipeline's decoder would hand them over.
    """
    rows = world.sample(concepts, count, seed)
    images = to_uint8([image for image, _, _ in rows])
    if round_trip is not None:
        pixels = round_trip(images.float() / 127.5 - 1)
        images = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    captions = [c.caption() for _, _, c in rows]
    result = clip_r_precision(images, captions, candidate_captions(), model, processor, world.same_meaning)
    return result.top1


def pipeline_r_precision(
    pipe: StableDiffusionPipeline,
    model: CLIPModel,
    processor: CLIPProcessor,
    prompts: list[str],
    seeds: tuple[int, ...],
    per_seed: int = 48,
    num_inference_steps: int | None = None,
) -> dict:
    """R-precision of the pipeline at its default call settings, `per_seed` images for each seed."""
    per_seed_top1 = []
    for seed in seeds:
        batch = [prompts[i % len(prompts)] for i in range(per_seed)]
        extra = {} if num_inference_steps is None else {"num_inference_steps": num_inference_steps}
        images = pipe(batch, generator=torch.Generator().manual_seed(seed), output_type="pil", **extra).images
        ranking = clip_r_precision(to_uint8(images), batch, candidate_captions(), model, processor, world.same_meaning)
        per_seed_top1.append(ranking.top1)
    return {"top1": float(np.mean(per_seed_top1)), "per_seed": per_seed_top1, "images": per_seed * len(seeds)}
