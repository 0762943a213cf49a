"""Pretrain the UNet on the base concepts from a cache of VAE latents and frozen text-tower states.

Latents and text are encoded once (the VAE and the text tower are frozen), so each step costs only the
UNet. Captions are dropped 10% of the time (replaced by the empty prompt) so classifier-free guidance works.

In the second half of training, half of the captioned samples learn the model's own unconditional prediction
instead of the noise (guidance tempering, below), so the stock guidance scale of 7.5 overshoots this narrow world
less.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from lorakit import training

CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0  # min-SNR loss weighting (Hang et al., arXiv 2303.09556): faster, steadier convergence
# Guidance tempering. A caption here fixes colour, shape and background, so the conditional and unconditional
# predictions differ far more than in a photo model, and diffusers' default guidance 7.5 overshoots: shapes swell
# and fill with a complementary tint (docs/notes/2026-12-embedded-experiments.md); guidance 3 to 5 draws them well.
# A captioned sample whose target is the model's own unconditional prediction (stop-gradient, as in model-guidance,
# Tang et al., arXiv 2502.12154, and guidance-free training, Chen et al., arXiv 2501.15420) pulls the conditional
# prediction towards it: with a share s of such samples, eps_c -> eps_u + (1 - s)(eps_c - eps_u), so guidance w
# acts like w(1 - s) on an untempered model once converged: 7.5 like 3.75. Measured, the best guidance moved from
# about 3 to 4-5 (not all the way) and held-out combinations at 7.5 rose 0.792 -> 0.892 (embedded/README.md).
# The price: guidance 1 draws under-conditioned images.
TEMPER_SHARE = 0.5
# tempering starts after this share of the steps: before it the unconditional prediction is no teacher yet
TEMPER_FROM = 0.5


@dataclass
class LatentCache:
    """Posterior means/stds of every image, and text states of every distinct caption (index 0 = empty).

    `caption_index[i]` lists the captions of image i: its dataset caption and more grammar phrasings of its
    concept; each step trains on one of them at random.
    """

    mean: torch.Tensor
    std: torch.Tensor
    caption_index: torch.Tensor  # (images, phrasings per image)
    text_states: torch.Tensor
    scaling_factor: float


@torch.no_grad()
def encode_text(texts: list[str], tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel) -> torch.Tensor:
    """Last hidden states at the pipeline's padding (max_length), as StableDiffusionPipeline encodes prompts."""
    ids = tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def build_cache(
    images: torch.Tensor,
    captions: list[list[str]],
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
) -> LatentCache:
    """Encode images and captions once; the scaling factor is 1/std of the latents, measured here."""
    posteriors = [vae.encode(chunk).latent_dist for chunk in images.split(256)]
    mean = torch.cat([p.mean for p in posteriors])
    std = torch.cat([p.std for p in posteriors])
    scaling_factor = float(1.0 / mean.std())
    distinct = [""] + sorted({caption for phrasings in captions for caption in phrasings})
    index = {caption: i for i, caption in enumerate(distinct)}
    caption_index = torch.tensor([[index[c] for c in phrasings] for phrasings in captions])
    return LatentCache(mean, std, caption_index, encode_text(distinct, tokenizer, text_encoder), scaling_factor)


def tempered_targets(
    noise: torch.Tensor, unconditional: Callable[[torch.Tensor], torch.Tensor], temper: torch.Tensor
) -> torch.Tensor:
    """The noise, except for the rows in `temper`, which get `unconditional(rows)` (no gradient).

    `unconditional` maps row indices to the model's unconditional prediction on those rows' noisy latents.
    """
    if not temper.any():
        return noise
    rows = temper.nonzero().squeeze(1)
    targets = noise.clone()
    with torch.no_grad():
        targets[rows] = unconditional(rows).to(noise.dtype)
    return targets


def diffusion_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    cache: LatentCache,
    batch: torch.Tensor,
    generator: torch.Generator,
    temper_share: float = 0.0,
) -> torch.Tensor:
    """Epsilon-prediction loss on a batch of cached rows, with caption dropout and guidance tempering.

    A share `temper_share` of the captioned rows learns the unconditional prediction instead of the noise.
    """
    latents = cache.mean[batch] + cache.std[batch] * torch.randn(cache.mean[batch].shape, generator=generator)
    latents = latents * cache.scaling_factor
    drop = torch.rand(len(batch), generator=generator) < CAPTION_DROPOUT
    phrasing = torch.randint(cache.caption_index.shape[1], (len(batch),), generator=generator)
    text = cache.text_states[torch.where(drop, 0, cache.caption_index[batch, phrasing])]
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    temper = ~drop & (torch.rand(len(batch), generator=generator) < temper_share)

    def unconditional(rows: torch.Tensor) -> torch.Tensor:
        return unet(noisy[rows], timesteps[rows], cache.text_states[0].expand(len(rows), -1, -1)).sample

    target = tempered_targets(noise, unconditional, temper)
    prediction = unet(noisy, timesteps, text).sample
    return training.diffusion_loss(prediction, target, timesteps, scheduler, snr_gamma=MIN_SNR_GAMMA)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Exponential moving average of the weights: the saved UNet samples cleaner than the last step's."""
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param, 1 - decay)


def train_unet(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    cache: LatentCache,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[UNet2DConditionModel, dict]:
    """Train `unet` on the cache; return its EMA copy and a small log."""
    start = time.time()
    ema = copy.deepcopy(unet).requires_grad_(False)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, min(100, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        batch = torch.randint(len(cache.mean), (batch_size,), generator=generator)
        temper_share = TEMPER_SHARE if step >= TEMPER_FROM * steps else 0.0
        loss = diffusion_loss(unet, scheduler, cache, batch, generator, temper_share)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema_update(ema, unet, min(0.998, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(
                f"unet step {step + 1}/{steps} loss {sum(losses[-100:]) / 100:.4f} {time.time() - start:.0f}s",
                file=sys.stderr,
                flush=True,
            )
    tail = losses[-50:]
    return ema, {
        "steps": steps,
        "batch_size": batch_size,
        "final_loss": sum(tail) / len(tail),
        "temper_share": TEMPER_SHARE,
        "temper_from_step": math.ceil(TEMPER_FROM * steps),
        "seconds": time.time() - start,
    }
