"""`--cache_latents`: encode images (VAE) and captions (text encoder) once, on disk, reused across runs.

What is cached are the VAE posterior's moments (mean and log-variance), not one sample: training still
draws a fresh posterior sample each step with the step's own generator, exactly as without the cache, so a
cached run gives the same loss for the same seed (and the sampling noise the diffusers example relies on is
kept). The key covers the data (datasets fingerprint), columns, model, resolution, augmentation and how the
encoders ran (their weight dtype, which follows the run's precision, and the device type); any change gives a
new key, so a stale cache is never read (a bf16-encoded cache is never reused by an fp32 run). Random
crops/flips are frozen at their first-epoch draw when cached.

With `--enable_bucket` the latents of each bucket size are stored together (`latent_moments.WxH`, with the
sample indices they belong to in `indices.WxH`); the bucket flags are part of the data fingerprint, so other
bucket settings give another file. Captions are encoded as trained but never dropped; the empty caption is
encoded once beside them, and `--caption_dropout_rate` swaps it in per (seed, epoch, index) at load time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lorakit.captions import drops_caption
from lorakit.config import TrainConfig
from lorakit.data import IMAGE_DECODING, CaptionedImageDataset, collate_examples
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
        "image_decoding": IMAGE_DECODING,
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


def bucket_groups(dataset: CaptionedImageDataset) -> dict[tuple[int, int] | None, list[int]]:
    """Sample indices by training size (one group, keyed None, without buckets): a batch must be one size."""
    if dataset.sizes is None:
        return {None: list(range(len(dataset)))}
    groups: dict[tuple[int, int] | None, list[int]] = {}
    for index, size in enumerate(dataset.sizes):
        groups.setdefault(tuple(size), []).append(index)
    return groups


@torch.no_grad()
def encode_dataset(models: Models, dataset: CaptionedImageDataset, cache_text: bool) -> dict[str, torch.Tensor]:
    """Posterior moments (per bucket size) and text embeddings (or token ids) of every sample, as fp32 CPU tensors,
    plus those of the empty caption."""
    device = models.vae.device
    tensors: dict[str, torch.Tensor] = {}
    text_rows: list[torch.Tensor | None] = [None] * len(dataset)
    groups = bucket_groups(dataset)
    chunks = [
        (size, indices[start : start + ENCODE_BATCH_SIZE])
        for size, indices in groups.items()
        for start in range(0, len(indices), ENCODE_BATCH_SIZE)
    ]
    moments: dict[tuple[int, int] | None, list[torch.Tensor]] = {size: [] for size in groups}
    for size, chunk in tqdm(chunks, desc="cache latents", unit="batch"):
        batch = collate_examples([dataset[i] for i in chunk])
        pixels = batch["pixel_values"].to(device, models.vae.dtype)
        moments[size].append(models.vae.encode(pixels).latent_dist.parameters.float().cpu())
        text = _encode_text(models, batch["input_ids"]) if cache_text else batch["input_ids"]
        for index, row in zip(chunk, text, strict=True):
            text_rows[index] = row
    for size, parts in moments.items():
        if size is None:
            tensors["latent_moments"] = torch.cat(parts)
        else:
            tensors[f"latent_moments.{size[0]}x{size[1]}"] = torch.cat(parts)
            tensors[f"indices.{size[0]}x{size[1]}"] = torch.tensor(groups[size])
    text_name = "encoder_hidden_states" if cache_text else "input_ids"
    tensors[text_name] = torch.stack(text_rows)
    empty_ids = dataset.tokenizer(
        "", max_length=dataset.tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    tensors[f"empty_{text_name}"] = _encode_text(models, empty_ids) if cache_text else empty_ids
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def _encode_text(models: Models, input_ids: torch.Tensor) -> torch.Tensor:
    return models.text_encoder(input_ids.to(models.vae.device), return_dict=False)[0].float().cpu()


class CachedLatentDataset(torch.utils.data.Dataset):
    """Rows of a cache file: posterior moments plus text embeddings (or token ids when the text encoder trains).

    `dropout_rate` replaces a sample's caption by the cached empty caption with that probability, drawn from
    (seed, epoch, index) as uncached runs draw it."""

    def __init__(self, tensors: dict[str, torch.Tensor], dropout_rate: float = 0.0, seed: int = 0) -> None:
        self.tensors, self.dropout_rate, self.seed = tensors, dropout_rate, seed
        self.text_name = "encoder_hidden_states" if "encoder_hidden_states" in tensors else "input_ids"
        count = tensors[self.text_name].shape[0]
        if "latent_moments" in tensors:
            self.where = [("latent_moments", index) for index in range(count)]
        else:
            self.where = [("", 0)] * count
            for name, indices in tensors.items():
                if name.startswith("indices."):
                    for row, index in enumerate(indices.tolist()):
                        self.where[index] = (f"latent_moments.{name.removeprefix('indices.')}", row)
        # Shared, so persistent workers see the epoch change (as CaptionedImageDataset).
        self._shared_epoch = multiprocessing.Value("i", 0, lock=False)

    def __len__(self) -> int:
        return len(self.where)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        name, row = self.where[index]
        text = self.tensors[self.text_name][index]
        if drops_caption(self.dropout_rate, self.seed, self._shared_epoch.value, int(index)):
            text = self.tensors[f"empty_{self.text_name}"][0]
        return {"latent_moments": self.tensors[name][row], self.text_name: text, "index": torch.tensor(index)}

    def set_epoch(self, epoch: int) -> None:
        """Latents do not change with the epoch (augmentations are frozen); caption dropout does."""
        self._shared_epoch.value = epoch


def cached_dataset(
    models: Models, dataset: CaptionedImageDataset, cfg: TrainConfig, data_fingerprint: str, is_main: bool
) -> tuple[CachedLatentDataset, Path, bool]:
    """(dataset, cache file, hit). The main process encodes and writes; call under main_process_first()."""
    cache_text = not cfg.lora.trains_text_side
    folder = Path(cfg.training.latent_cache_dir) if cfg.training.latent_cache_dir else DEFAULT_CACHE_DIR
    path = folder / f"{cache_key(cfg, data_fingerprint, cache_text, encoder_identity(models))}.safetensors"
    hit = path.is_file()
    if not hit and is_main:
        # Encoded undropped: dropout is drawn anew each epoch at load time.
        undropped = dataclasses.replace(dataset, captions=dataclasses.replace(dataset.captions, dropout_rate=0.0))
        tensors = encode_dataset(models, undropped, cache_text)
        tmp = path.with_suffix(f".partial-{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp))
        os.replace(tmp, path)  # a kill leaves only a .partial file, which is never read
    tensors = load_file(str(path))
    return CachedLatentDataset(tensors, dataset.captions.dropout_rate, cfg.training.seed), path, hit
