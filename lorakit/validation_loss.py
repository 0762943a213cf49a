"""Held-out loss: the diffusion loss of rows the run never trains on, at fixed noise and fixed timesteps.

    held_out = HeldOutLoss.prepare(models, rows, image_column, caption_column, cfg, device)
    value = held_out.compute(unet, text_encoder, batch_size, autocast)   # a float, the mean over the rows

Each row gets its own latent sample, noise and timestep once, from a generator seeded by (seed, row): the same
for the whole run and for a resumed one, so the number moves only when the adapter does. The loss is the
training objective (min-SNR weighted when `--snr_gamma` is set), per row, averaged over the rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F

from lorakit.config import TrainConfig
from lorakit.data import CaptionedImageDataset
from lorakit.training import Models, diffusion_target, encode_latents, min_snr_weights


def row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    """The draws of held-out row `row`: a function of (seed, row) alone."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + 7_919 * (row + 1)) % (2**63))
    return generator


@dataclass
class HeldOutLoss:
    """The fixed inputs of the held-out rows; `compute` runs the (adapted) text encoder and UNet on them."""

    models: Models
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    input_ids: torch.Tensor
    snr_gamma: float | None

    @classmethod
    @torch.no_grad()
    def prepare(
        cls,
        models: Models,
        rows: datasets.Dataset,
        image_column: str,
        caption_column: str,
        cfg: TrainConfig,
        device: torch.device,
    ) -> HeldOutLoss:
        """Encode each held-out row once (centre crop, no flip: the same view every time)."""
        dataset = CaptionedImageDataset(
            rows, image_column, caption_column, models.tokenizer, cfg.data.resolution, True, False, cfg.training.seed
        )
        latents, noise, timesteps, input_ids = [], [], [], []
        num_timesteps = models.noise_scheduler.config.num_train_timesteps
        for row in range(len(dataset)):
            example = dataset[row]
            generator = row_generator(cfg.training.seed, row, device)
            latent = encode_latents(models.vae, example["pixel_values"][None].to(device), generator).float()
            latents.append(latent)
            noise.append(torch.randn(latent.shape, generator=generator, device=device))
            timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator, device=device))
            input_ids.append(example["input_ids"][None])
        return cls(
            models,
            torch.cat(latents),
            torch.cat(noise),
            torch.cat(timesteps),
            torch.cat(input_ids).to(device),
            cfg.training.snr_gamma,
        )

    def __len__(self) -> int:
        return len(self.latents)

    @torch.no_grad()
    def per_row(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        batch_size: int,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> torch.Tensor:
        """The loss of each held-out row (modules in eval mode meanwhile: no LoRA dropout)."""
        modes = [(module, module.training) for module in (unet, text_encoder)]
        for module, _ in modes:
            module.eval()
        scheduler = self.models.noise_scheduler
        losses = []
        try:
            for start in range(0, len(self), batch_size):
                part = slice(start, start + batch_size)
                latents, noise, timesteps = self.latents[part], self.noise[part], self.timesteps[part]
                with autocast():
                    states = text_encoder(self.input_ids[part], return_dict=False)[0]
                    noisy = scheduler.add_noise(latents, noise, timesteps)
                    prediction = unet(noisy, timesteps, states, return_dict=False)[0]
                target = diffusion_target(scheduler, latents, noise, timesteps)
                loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if self.snr_gamma is not None:
                    loss = loss * min_snr_weights(scheduler, timesteps, self.snr_gamma)
                losses.append(loss)
        finally:
            for module, was_training in modes:
                module.train(was_training)
        return torch.cat(losses)

    def compute(
        self,
        unet: torch.nn.Module,
        text_encoder: torch.nn.Module,
        batch_size: int,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> float:
        """The mean loss over the held-out rows."""
        return self.per_row(unet, text_encoder, batch_size, autocast).mean().item()
