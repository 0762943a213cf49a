"""`--cache_latents`: encode images (VAE) and captions (text encoder) once, on disk, reused across runs.

What is cached are the VAE posterior's moments (mean and log-variance), not one sample: training still
draws a fresh posterior sample each step with the step's own generator, exactly as without the cache, so a
cached run gives the same loss for the same seed (and the sampling noise the diffusers example relies on is
kept). The key covers the data (datasets fingerprint), columns, model, resolution, augmentation and how the
encoders ran (their weight dtype, which follows the run's precision, and the device type); any change gives a
new key, so a stale cache is never read (a bf16-encoded cache is never reused by an fp32 run). Random
crops/flips are frozen at their first-epoch draw when cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lorakit.config import TrainConfig
from lorakit.data import CaptionedImageDataset, collate_examples
from lorakit.filenames import LEARNED_EMBEDS_FILE
from lorakit.training import Models

DEFAULT_CACHE_DIR = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit")) / "latents"
ENCODE_BATCH_SIZE = 8


def _model_identity(pretrained: str, revision: str | None, variant: str | None) -> dict:
    """A local folder is identified by its weight files' sizes and times, a Hub id by id and revision."""
    identity = {"model": pretrained, "revision": revision, "variant": variant}
    folder = Path(pretrained)
    if folder.is_dir():
        identity["files"] = sorted(
            (str(p.relative_to(folder)), p.stat().st_size, int(p.stat().st_mtime))
            for p in folder.glob("*/*.safetensors")
            if p.parent.name in ("vae", "text_encoder")
        )
    return identity


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of a file, None when absent."""
    return (path.stat().st_size, int(path.stat().st_mtime)) if path.is_file() else None


def encoder_identity(models: Models) -> dict[str, str]:
    """How the frozen encoders compute: their weight dtype (the run's precision) and the device type, whose kernels
    round differently."""
    return {
        "vae_dtype": str(models.vae.dtype),
        "text_encoder_dtype": str(models.text_encoder.dtype),
        "device": models.vae.device.type,
    }


def cache_key(cfg: TrainConfig, data_fingerprint: str, cache_text: bool, encoders: dict[str, str]) -> str:
    """Everything the cached tensors depend on, hashed (`encoders`: `encoder_identity` of the models that encode)."""
    parts = {
        "encoders": encoders,
        "data": data_fingerprint,
        "image_column": cfg.data.image_column,
        "caption_column": cfg.data.caption_column,
        "resolution": cfg.data.resolution,
        "center_crop": cfg.data.center_crop,
        "random_flip": cfg.data.random_flip,
        "seed": cfg.training.seed,
        "text": cache_text,
        # cached text states hold the words an --init_adapter run learned
        "init_words": _file_identity(Path(cfg.lora.init_adapter) / LEARNED_EMBEDS_FILE)
        if cfg.lora.init_adapter
        else None,
        **_model_identity(cfg.model.pretrained_model_name_or_path, cfg.model.revision, cfg.model.variant),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def encode_dataset(models: Models, dataset: CaptionedImageDataset, cache_text: bool) -> dict[str, torch.Tensor]:
    """Posterior moments (and text embeddings) of every sample, in dataset order, as fp32 CPU tensors."""
    device = models.vae.device
    moments, embeddings, input_ids = [], [], []
    for start in tqdm(range(0, len(dataset), ENCODE_BATCH_SIZE), desc="cache latents", unit="batch"):
        batch = collate_examples([dataset[i] for i in range(start, min(start + ENCODE_BATCH_SIZE, len(dataset)))])
        pixels = batch["pixel_values"].to(device, models.vae.dtype)
        moments.append(models.vae.encode(pixels).latent_dist.parameters.float().cpu())
        if cache_text:
            hidden = models.text_encoder(batch["input_ids"].to(device), return_dict=False)[0]
            embeddings.append(hidden.float().cpu())
        else:
            input_ids.append(batch["input_ids"])
    tensors = {"latent_moments": torch.cat(moments)}
    tensors.update(
        {"encoder_hidden_states": torch.cat(embeddings)} if cache_text else {"input_ids": torch.cat(input_ids)}
    )
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


class CachedLatentDataset(torch.utils.data.Dataset):
    """Rows of a cache file: posterior moments plus text embeddings (or token ids when the text encoder trains)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors["latent_moments"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {**{name: t[index] for name, t in self.tensors.items()}, "index": torch.tensor(index)}

    def set_epoch(self, epoch: int) -> None:
        """Cached samples do not change with the epoch (augmentations are frozen)."""


def cached_dataset(
    models: Models, dataset: CaptionedImageDataset, cfg: TrainConfig, data_fingerprint: str, is_main: bool
) -> tuple[CachedLatentDataset, Path, bool]:
    """(dataset, cache file, hit). The main process encodes and writes; call under main_process_first()."""
    cache_text = not cfg.lora.trains_text_side
    folder = Path(cfg.training.latent_cache_dir) if cfg.training.latent_cache_dir else DEFAULT_CACHE_DIR
    path = folder / f"{cache_key(cfg, data_fingerprint, cache_text, encoder_identity(models))}.safetensors"
    hit = path.is_file()
    if not hit and is_main:
        tensors = encode_dataset(models, dataset, cache_text)
        tmp = path.with_suffix(f".partial-{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp))
        os.replace(tmp, path)  # a kill leaves only a .partial file, which is never read
    return CachedLatentDataset(load_file(str(path))), path, hit
