"""Train the tiny AutoencoderKL on the world's images (32 px <-> 4x8x8 latents)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from embedded import world
from embedded.models import make_vae

KL_WEIGHT = 1e-6  # as in SD's VAE: just enough to keep the latent scale tame, not a real prior


def vae_loss(vae: torch.nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reconstruction MSE on a sampled latent plus a tiny KL term."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    return F.mse_loss(recon, images) + KL_WEIGHT * posterior.kl().mean()


@torch.no_grad()
def validation_mse(vae: torch.nn.Module, images: torch.Tensor) -> float:
    """Reconstruction MSE from the posterior mean on [-1, 1] images."""
    return float(F.mse_loss(vae.decode(vae.encode(images).latent_dist.mode()).sample, images))


def train_vae(
    out_dir: Path, steps: int, pool_size: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0
) -> dict:
    """Train and save the VAE to `out_dir`; return a small log with validation MSE."""
    start = time.time()
    vae = make_vae(seed)
    concepts = world.base_concepts() + world.heldout_concepts() + world.adapter_concepts()
    images = torch.from_numpy(world.to_array([im for im, _, _ in world.sample(concepts, pool_size, seed=seed + 202)]))
    val = torch.from_numpy(
        world.to_array([im for im, _, _ in world.sample(concepts, min(256, pool_size), seed=seed + 203)])
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        loss = vae_loss(vae, batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    vae.eval()
    vae.save_pretrained(out_dir, safe_serialization=True)
    return {
        "steps": steps,
        "final_loss": float(np.mean(losses[-20:])),
        "val_mse": validation_mse(vae, val),
        "seconds": time.time() - start,
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: train the VAE into --out with one thread (it runs beside the CLIP)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--pool_size", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(train_vae(args.out, args.steps, args.pool_size, seed=args.seed))


if __name__ == "__main__":
    main()
