"""Captioned image data: loading (Hub id or local folder), checks, picklable transforms, collate."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import yaml
from PIL import Image, ImageOps, UnidentifiedImageError

from lorakit.buckets import BucketSpec, Size, assign_buckets, histogram
from lorakit.captions import CaptionOptions, apply_options
from lorakit.config import ConfigError, DataConfig
from lorakit.sidecar import SidecarError, is_sidecar_folder, scan_folder

# Column names tried, in order, when --image_column / --caption_column are not given.
IMAGE_COLUMN_CANDIDATES = ("image", "img", "images", "pixel_values")
CAPTION_COLUMN_CANDIDATES = ("text", "caption", "captions", "prompt", "prompts", "sentence", "title")


class DataError(ValueError):
    """The training data cannot be used; the message names the problem and the fix."""


@dataclass
class TrainingData:
    """The checked training rows, their column names, and a fingerprint of their content."""

    rows: datasets.Dataset
    image_column: str
    caption_column: str
    # Hash of every row's image (bytes, or path + size + mtime) and caption, in order: the latent cache and resume
    # compare it, so any change of the data (an edited caption, a replaced image, another order) is seen.
    fingerprint: str
    # How the folder was read and what its scan counted (sidecar captions only; None for the other formats).
    source: dict | None = None
    # Each row's training size (width, height) with --enable_bucket; None: every row trains square.
    buckets: list[Size] | None = None
    # Rows of the held-out loss (--validation_split or --validation_data_dir), never trained on, and their hash.
    held_out: datasets.Dataset | None = None
    held_out_fingerprint: str | None = None

    @property
    def bucket_histogram(self) -> dict[str, int] | None:
        """Training size WxH -> samples with --enable_bucket; None when every row trains square."""
        return histogram(self.buckets) if self.buckets is not None else None


def _is_saved_to_disk(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def sidecar_dataset(folder: Path, caption_extension: str) -> tuple[datasets.Dataset, dict]:
    """A folder of images with caption files as rows (`image`, `text`), each image repeated per its folder,
    and the scan's counts."""
    try:
        scan = scan_folder(folder, caption_extension)
    except SidecarError as error:
        raise DataError(str(error)) from error
    rows = {"image": [], "text": []}
    for image, caption, repeats in zip(scan.images, scan.captions, scan.repeats, strict=True):
        rows["image"] += [image] * repeats
        rows["text"] += [caption] * repeats
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features), {"format": "sidecar captions", **scan.report()}


def load_source(cfg: DataConfig) -> tuple[datasets.Dataset, dict | None]:
    """The train split from a Hub id or a local folder, and the sidecar scan's counts (None for other formats).

    A local folder is read as the first of: a `save_to_disk` folder; data files `datasets` reads (an imagefolder
    with `metadata.jsonl`/`.csv`, parquet); images with caption files beside them (`lorakit.sidecar`); an
    imagefolder without captions (which fails with the missing caption column).
    """
    source = cfg.train_data_dir or cfg.dataset_name
    local = Path(source)
    if cfg.train_data_dir is not None or local.exists():
        if not local.is_dir():
            raise DataError(f"Dataset folder {local} does not exist. Check --train_data_dir (or --dataset_name).")
        if _is_saved_to_disk(local):
            loaded = datasets.load_from_disk(str(local))
            return (loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded), None
        if is_sidecar_folder(local, cfg.caption_extension):
            return sidecar_dataset(local, cfg.caption_extension)
        try:
            return datasets.load_dataset(str(local), split="train", cache_dir=cfg.cache_dir), None
        except yaml.YAMLError as error:
            raise DataError(
                f"{local / 'README.md'} has a YAML header that does not parse ({error.problem}); quote values "
                "that contain ':' or remove the header."
            ) from error
        except (FileNotFoundError, ValueError) as error:
            if "corresponds to no data" in str(error) or "Unable to find" in str(error):
                raise DataError(
                    f"The dataset folder {local} is empty: it has no images or rows to train on."
                ) from error
            raise DataError(f"Could not read a dataset from {local}: {error}") from error
    hub = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, split="train", cache_dir=cfg.cache_dir)
    return hub, None


def load_raw_dataset(cfg: DataConfig) -> datasets.Dataset:
    """Load the train split from a Hub id or a local folder (see `load_source` for the formats)."""
    return load_source(cfg)[0]


def _detect(columns: list[str], candidates: tuple[str, ...], features: datasets.Features, want_image: bool) -> str:
    for name in candidates:
        if name in columns:
            return name
    for name in columns:
        feature = features[name]
        if want_image and isinstance(feature, datasets.Image):
            return name
        if not want_image and getattr(feature, "dtype", None) == "string":
            return name
    kind = "image" if want_image else "caption"
    raise DataError(f"No {kind} column found among {columns}. Name it with --{kind}_column.")


def resolve_columns(dataset: datasets.Dataset, cfg: DataConfig) -> tuple[str, str]:
    """The (image, caption) column names: the given ones, checked, or detected."""
    columns = list(dataset.column_names)
    for flag, name in (("image_column", cfg.image_column), ("caption_column", cfg.caption_column)):
        if name is not None and name not in columns:
            raise DataError(f"--{flag} '{name}' is not a column of the dataset. Columns that exist: {columns}.")
    image_column = cfg.image_column or _detect(columns, IMAGE_COLUMN_CANDIDATES, dataset.features, True)
    caption_column = cfg.caption_column or _detect(columns, CAPTION_COLUMN_CANDIDATES, dataset.features, False)
    return image_column, caption_column


def _open_image(value: Any) -> Image.Image:
    """Open an undecoded datasets Image value ({'bytes', 'path'}) or a PIL image."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        return Image.open(value["path"])
    return Image.open(value)


# EXIF orientation values (TIFF tag 274) whose upright picture is the stored one turned a quarter: width and
# height swap. Phone cameras store portrait photos sideways with such a tag.
EXIF_ORIENTATION_TAG = 0x0112
QUARTER_TURN_ORIENTATIONS = frozenset({5, 6, 7, 8})


# How `open_upright` turns a file into pixels; part of the latent cache key, so caches written before EXIF
# orientation was applied (sideways phone photos) are not read as if they held upright images.
IMAGE_DECODING = "rgb, exif orientation applied"


def upright_size(image: Image.Image) -> Size:
    """(width, height) of the picture as viewers show it: the stored size, swapped for a quarter-turn EXIF tag.

    Reads the EXIF block the header parse already holds (`info["exif"]`), never the pixels: `getexif()` would
    decode a whole PNG to look for the tag, and the scan must stay a header read."""
    raw = image.info.get("exif")
    exif = Image.Exif()
    if raw:
        exif.load(raw)
    orientation = exif.get(EXIF_ORIENTATION_TAG)
    width, height = image.size
    return (height, width) if orientation in QUARTER_TURN_ORIENTATIONS else (width, height)


def open_upright(value: Any) -> Image.Image:
    """The image as viewers show it (EXIF orientation applied), in RGB: what every sample is cropped from."""
    with _open_image(value) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def _image_identity(value: Any) -> bytes:
    """What identifies an image's content cheaply: its bytes' hash, or its path with size and modification time."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        return hashlib.sha256(value["bytes"]).digest()
    if isinstance(value, Image.Image):
        return hashlib.sha256(value.tobytes()).digest()
    path = Path(value["path"] if isinstance(value, dict) else value)
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()


def check_images(dataset: datasets.Dataset, image_column: str) -> str:
    """Fail fast on an unreadable image (header check of every row, no full decode); return the images' hash."""
    return scan_images(dataset, image_column)[0]


def scan_images(dataset: datasets.Dataset, image_column: str) -> tuple[str, list[Size]]:
    """`check_images`, also returning each row's (width, height) from its header; a file repeated in several
    rows (repeat folders) is opened once."""
    digest = hashlib.sha256()
    sizes: list[Size] = []
    seen: dict[str, tuple[bytes, Size]] = {}
    raw = (
        dataset.cast_column(image_column, datasets.Image(decode=False))
        if isinstance(dataset.features[image_column], datasets.Image)
        else dataset
    )
    for index, value in enumerate(raw[image_column]):
        path = value.get("path") if isinstance(value, dict) and value.get("bytes") is None else None
        if path is not None and path in seen:
            identity, size = seen[path]
            digest.update(identity)
            sizes.append(size)
            continue
        try:
            with _open_image(value) as image:
                size = upright_size(image)
                image.verify()
            identity = _image_identity(value)
            digest.update(identity)
            sizes.append(size)
            if path is not None:
                seen[path] = (identity, size)
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            where = value.get("path") if isinstance(value, dict) else f"row {index}"
            raise DataError(
                f"Image at row {index} ({where}) cannot be read: {error}. Remove or replace it."
            ) from error
    return digest.hexdigest(), sizes


def data_fingerprint(image_digest: str, captions: list[Any]) -> str:
    """A stable hash of the rows: the images' hash, then every caption in order (and so the row count)."""
    digest = hashlib.sha256(image_digest.encode())
    for caption in captions:
        digest.update(json.dumps(caption, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:20]


def _load_checked(cfg: DataConfig) -> tuple[datasets.Dataset, str, str, dict | None]:
    dataset, source = load_source(cfg)
    if len(dataset) == 0:
        raise DataError(f"The dataset {cfg.train_data_dir or cfg.dataset_name} is empty: it has no rows to train on.")
    image_column, caption_column = resolve_columns(dataset, cfg)
    return dataset, image_column, caption_column, source


def mix_datasets(
    main: datasets.Dataset, image_column: str, caption_column: str, cfg: DataConfig, seed: int
) -> datasets.Dataset:
    """Interleave the main data with `--mix_train_data_dir` folders by `--mix_weights`.

    The epoch ends when the first dataset runs out, so with the new data weighted highest every new
    sample is seen once and older data is replayed at the stated share (no oversampling).
    """
    parts = [main.select_columns([image_column, caption_column])]
    for folder in cfg.mix_train_data_dir:
        extra_cfg = DataConfig(train_data_dir=folder, resolution=cfg.resolution)
        extra, extra_image, extra_caption, _ = _load_checked(extra_cfg)
        extra = extra.select_columns([extra_image, extra_caption])
        extra = extra.rename_columns({extra_image: image_column, extra_caption: caption_column})
        parts.append(extra.cast(parts[0].features))
    total = sum(cfg.mix_weights)
    return datasets.interleave_datasets(
        parts, probabilities=[w / total for w in cfg.mix_weights], seed=seed, stopping_strategy="first_exhausted"
    )


def held_out_indices(num_rows: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows), each in dataset order: a seeded draw of round(share x rows), at least one."""
    count = max(1, round(num_rows * share))
    if count >= num_rows:
        raise DataError(
            f"--validation_split {share} of {num_rows} rows leaves none to train on: use a smaller share, "
            "or --validation_data_dir."
        )
    held = set(np.random.default_rng(seed).permutation(num_rows)[:count].tolist())
    return [i for i in range(num_rows) if i not in held], sorted(held)


def load_held_out(cfg: DataConfig, image_column: str, caption_column: str) -> datasets.Dataset:
    """The `--validation_data_dir` rows, with the training data's column names."""
    held_cfg = DataConfig(train_data_dir=cfg.validation_data_dir, resolution=cfg.resolution)
    held, held_image, held_caption, _ = _load_checked(held_cfg)
    held = held.select_columns([held_image, held_caption])
    return (
        held.rename_columns({held_image: image_column, held_caption: caption_column})
        if held_image != image_column or held_caption != caption_column
        else held
    )


def prepare_dataset(cfg: DataConfig, seed: int) -> TrainingData:
    """Load, check, split off the held-out rows, mix and subsample the training data before any model is loaded."""
    dataset, image_column, caption_column, source = _load_checked(cfg)
    held_out = None
    if cfg.validation_split is not None and source is not None and source["rows"] != source["images"]:
        # A repeat folder puts one image in several rows: a row split would hold out copies of trained images.
        raise DataError(
            f"--validation_split with repeat folders ({source['images']} images in {source['rows']} rows) would hold "
            "out copies of images that are trained on. Use --validation_data_dir with a folder of other images."
        )
    if cfg.validation_split is not None:
        train_rows, held_rows = held_out_indices(len(dataset), cfg.validation_split, seed)
        dataset, held_out = dataset.select(train_rows), dataset.select(held_rows)
    elif cfg.validation_data_dir:
        held_out = load_held_out(cfg, image_column, caption_column)
    if cfg.mix_train_data_dir:
        dataset = mix_datasets(dataset, image_column, caption_column, cfg, seed)
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(cfg.max_train_samples))
    image_digest, sizes = scan_images(dataset, image_column)
    fingerprint = data_fingerprint(image_digest, dataset[caption_column])
    # The caption and bucket flags change what trains on each row: they are part of the data a checkpoint or a
    # latent cache was made from. Left out when unused, so runs without them keep their earlier fingerprints.
    options = training_view(cfg)
    if options:
        fingerprint = data_fingerprint(fingerprint, [options])
    buckets = assign_buckets(sizes, BucketSpec.from_config(cfg)) if cfg.enable_bucket else None
    held_fingerprint = None
    if held_out is not None:
        held_fingerprint = data_fingerprint(check_images(held_out, image_column), held_out[caption_column])
    return TrainingData(
        rows=dataset,
        image_column=image_column,
        caption_column=caption_column,
        fingerprint=fingerprint,
        source=source,
        buckets=buckets,
        held_out=held_out,
        held_out_fingerprint=held_fingerprint,
    )


def training_view(cfg: DataConfig) -> dict:
    """The caption and bucket flags that differ from their defaults."""
    view = {}
    options = CaptionOptions.from_config(cfg)
    if options.changes_captions:
        view["captions"] = dataclasses.asdict(options)
    if cfg.enable_bucket:
        view["buckets"] = dataclasses.asdict(BucketSpec.from_config(cfg))
    return view


def pick_caption(value: Any, rng: random.Random) -> str:
    """A caption string; lists of captions give one at random (as the diffusers example)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 0:
        return str(rng.choice(list(value)))
    raise DataError(f"Caption {value!r} is neither a string nor a non-empty list of strings.")


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool, rng: random.Random) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop a square (center or random)."""
    return resize_and_crop_to(image, (resolution, resolution), center_crop, rng)


def resize_and_crop_to(image: Image.Image, size: Size, center_crop: bool, rng: random.Random) -> Image.Image:
    """Resize to just cover `size` (width, height), then crop the rest (center or random): the least crop that
    keeps the aspect ratio."""
    width, height = image.size
    target_w, target_h = size
    scale = max(target_w / width, target_h / height)
    new_size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    slack_x, slack_y = new_size[0] - target_w, new_size[1] - target_h
    left, top = (slack_x // 2, slack_y // 2) if center_crop else (rng.randint(0, slack_x), rng.randint(0, slack_y))
    return image.crop((left, top, left + target_w, top + target_h))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class CaptionedImageDataset(torch.utils.data.Dataset):
    """Rows -> {pixel_values, input_ids}. Random choices come from (seed, epoch, index) alone,

    so any sample is reproducible in any worker and a resumed run sees exactly the same batches.
    Picklable (no closures), so DataLoader workers work under fork and spawn.
    """

    rows: datasets.Dataset
    image_column: str
    caption_column: str
    tokenizer: Any
    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    seed: int = 0
    epoch: int = 0
    captions: CaptionOptions = CaptionOptions()
    sizes: list[Size] | None = None  # each row's (width, height) with buckets; None: `resolution` squared

    def __post_init__(self) -> None:
        # Shared memory, so persistent DataLoader workers see the new epoch too (they keep their copy
        # of the dataset across epochs, and would otherwise repeat the first epoch's random draws).
        self._shared_epoch = multiprocessing.Value("i", self.epoch, lock=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._shared_epoch.value = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = random.Random(f"{self.seed}/{self._shared_epoch.value}/{index}")
        row = self.rows[int(index)]
        size = tuple(self.sizes[index]) if self.sizes is not None else (self.resolution, self.resolution)
        image = resize_and_crop_to(open_upright(row[self.image_column]), size, self.center_crop, rng)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        caption = pick_caption(row[self.caption_column], rng)
        if self.captions.changes_captions:
            caption = apply_options(caption, self.captions, self.seed, self._shared_epoch.value, int(index))
        input_ids = self.tokenizer(
            caption,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": image_to_tensor(image), "input_ids": input_ids, "index": torch.tensor(index)}


def collate_examples(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch."""
    return {key: torch.stack([example[key] for example in examples]) for key in examples[0]}


def check_resolution(resolution: int, vae_scale_factor: int) -> None:
    """The VAE downsamples by `vae_scale_factor`; the resolution must divide evenly."""
    if resolution % vae_scale_factor != 0:
        lower = resolution // vae_scale_factor * vae_scale_factor
        raise ConfigError(
            f"--resolution {resolution} is not a multiple of the VAE factor {vae_scale_factor}: "
            f"use {max(lower, vae_scale_factor)} or {lower + vae_scale_factor}."
        )
