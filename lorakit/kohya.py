"""Export the trained adapter in the kohya/webui key format (AUTOMATIC1111, ComfyUI, SD.Next, InvokeAI).

Usage (the trainer calls this after saving the adapter when `--export_kohya` is set):

    from lorakit.kohya import export_kohya
    path = export_kohya(output_dir, captions)  # -> output_dir / "pytorch_lora_weights_kohya.safetensors"

Keys look like `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`,
`.lora_up.weight` and `.alpha`. The key renaming is diffusers' own `convert_state_dict_to_peft` +
`convert_state_dict_to_kohya`; we only replace the alpha, which diffusers fills with the rank, by the
real `lora_alpha` from `training_config.yaml`, so that kohya loaders apply the trained scale alpha / rank.

Words learned by `--train_token_embeddings` travel in the two forms those UIs load:
- bundled in the LoRA file as `bundle_emb.<word>.string_to_param.*`, shape (vectors, width): AUTOMATIC1111's
  Lora extension (`extensions-builtin/Lora/networks.py`, `load_network`) registers them as textual-inversion
  embeddings named `<word>` while the LoRA is active. Stock diffusers' `load_lora_weights` does not accept such a
  file (its kohya conversion wants every key to start with `lora_`); diffusers users load the diffusers files.
- one file per word, `embeddings/<word>.safetensors` holding `{"emb_params": (vectors, width)}`: A1111's embedding
  folder (`modules/textual_inversion/textual_inversion.py`, a one-tensor file) and ComfyUI's
  (`comfy/sd1_clip.py`, `load_embed`, prompt `embedding:<word>`) both read it.

The file's metadata holds kohya's `ss_*` keys (A1111's Lora extension, `network.py`, reads `ss_output_name`,
`ss_base_model_version` and `ss_v2`; galleries show `ss_tag_frequency`) and the Stability AI model spec's
`modelspec.*` keys (sd-scripts' `library/sai_model_spec.py` writes the same ones for SD1/SD2 LoRAs).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from safetensors import safe_open
from safetensors.torch import load_file, save

from lorakit.atomic import atomic_write_bytes
from lorakit.canonical_safetensors import canonical_safetensors
from lorakit.filenames import (
    ADAPTER_FILE,
    KOHYA_EMBEDDINGS_DIR,
    KOHYA_FILE,
    LEARNED_EMBEDS_FILE,
    SUMMARY_FILE,
    TRAINING_CONFIG_FILE,
)
from lorakit.summary import read_summary

logger = logging.getLogger(__name__)


def read_lora_alpha(output_dir: str | os.PathLike) -> float:
    """The `lora.lora_alpha` recorded in the output folder's `training_config.yaml`."""
    config_path = Path(output_dir) / TRAINING_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} is missing: the kohya export needs the run's lora_alpha. "
            "Point --output_dir at a folder written by train_lora.py."
        )
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    alpha = (config.get("lora") or {}).get("lora_alpha")
    if alpha is None:
        raise ValueError(f"{config_path} has no lora.lora_alpha; add it (the value used in training) and retry.")
    return float(alpha)


def diffusers_to_kohya(state_dict: dict[str, torch.Tensor], lora_alpha: float) -> dict[str, torch.Tensor]:
    """Rename a diffusers-format LoRA state dict to kohya keys, with `alpha` set to `lora_alpha`."""
    # The trainer may save peft keys (`.lora_A`) or diffusers keys (`.lora.down` for the UNet,
    # `.lora_linear_layer.down` for the text encoder); normalise both to peft, which the kohya converter reads.
    peft_state = convert_unet_state_dict_to_peft(dict(state_dict))
    if any(".lora_linear_layer." in key for key in peft_state):
        peft_state = convert_state_dict_to_peft(peft_state, original_type=StateDictType.DIFFUSERS)
    if not any(".lora_A." in key for key in peft_state):
        raise ValueError("Expected a diffusers/peft LoRA state dict (keys with .lora_A/.lora.down); found none.")
    # DoRA magnitudes (`<module>.lora_magnitude_vector`) are renamed beside their module's lora_down key: diffusers'
    # converter renames them only for keys without a unet/text_encoder prefix, and then leaves a dot in the name.
    magnitudes = {key: peft_state.pop(key) for key in [k for k in peft_state if k.endswith(".lora_magnitude_vector")]}
    kohya_state = convert_state_dict_to_kohya(peft_state)
    kohya_state.update(dora_scales(magnitudes))
    # transformers 5 dropped CLIPTextModel's `text_model.` level; webui loaders expect the original CLIP names.
    # A single text encoder is `lora_te_` (what sd-scripts writes for SD1/SD2): diffusers names it `lora_te1_`, which
    # ComfyUI (`comfy/lora.py`) and A1111 take for SD1 too, but A1111's SD2 mapping (`networks.py`,
    # `convert_diffusers_name_to_compvis`) only knows `lora_te_`.
    kohya_state = {
        re.sub(r"^lora_te1?_(?:text_model_)?", "lora_te_text_model_", key): value for key, value in kohya_state.items()
    }
    for key in kohya_state:
        if key.endswith(".alpha"):
            # diffusers writes alpha = rank (scale 1); the trained scale is lora_alpha / rank.
            kohya_state[key] = torch.tensor(float(lora_alpha), dtype=torch.float32)
    return kohya_state


def dora_scales(magnitudes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<kohya module>.dora_scale` tensors from peft's DoRA magnitudes `<module>.lora_magnitude_vector`.

    peft's magnitude is the norm of each output row of the adapted weight, shape (out,); kohya-format loaders
    (ComfyUI's weight_decompose, A1111's network modules) take a `dora_scale` whose first dimension is the output
    size as that same output-axis magnitude and divide it by per-row norms of shape (out, 1), so it is stored (out, 1).
    """
    scales = {}
    for key, magnitude in magnitudes.items():
        module = key.removesuffix(".lora_magnitude_vector")
        probe = convert_state_dict_to_kohya({f"{module}.lora_A.weight": torch.zeros(1, 1)})
        down_key = next(k for k in probe if k.endswith(".lora_down.weight"))
        scales[down_key.removesuffix(".lora_down.weight") + ".dora_scale"] = magnitude.reshape(-1, 1).contiguous()
    return scales


def _warn_on_alpha_mismatch(source_metadata: dict[str, str], lora_alpha: float, ranks: list[int]) -> None:
    # diffusers loads the diffusers-format file with the alpha in its metadata (or alpha = rank without it);
    # if that differs from the trained lora_alpha, the two files would not produce the same images.
    try:
        adapter_meta = json.loads(source_metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        adapter_meta = {}
    recorded = {key: value for key, value in adapter_meta.items() if key.endswith(".lora_alpha")}
    if not recorded and any(rank != lora_alpha for rank in ranks):
        logger.warning(
            "%s carries no lora_adapter_metadata, so diffusers loads it with alpha = rank; the kohya file uses the "
            "trained lora_alpha %g. Save the adapter with unet_lora_adapter_metadata to make them agree.",
            ADAPTER_FILE,
            lora_alpha,
        )
    for key, value in recorded.items():
        if float(value) != lora_alpha:
            logger.warning("%s records %s=%s but training_config.yaml says %g", ADAPTER_FILE, key, value, lora_alpha)


def bundled_embeddings(learned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`bundle_emb.<word>.string_to_param.*` tensors of shape (vectors, width), as A1111 reads them from a LoRA file.

    A1111 (`networks.py`, `load_network`) splits the key at its dots: the first part must be `bundle_emb`, the
    second is the embedding's name (so a word may hold no dot), and `string_to_param.<k>` gives its one tensor;
    `textual_inversion.create_embedding_from_data` then reads the vector count from dim 0 and the width from dim -1,
    so a single vector must be (1, width), not (width,).
    """
    return {f"bundle_emb.{embedding_name(word)}.string_to_param.*": embedding_rows(v) for word, v in learned.items()}


def embedding_name(word: str) -> str:
    """`word`, checked to be usable as an embedding's name: A1111 splits bundled keys at dots, and both UIs name an
    embedding file after the word, so a separator would put it elsewhere."""
    if not word or any(char in word for char in "./\\"):
        raise ValueError(
            f"Learned word {word!r} cannot name a webui embedding: it is empty or holds '.', '/' or '\\'."
        )
    return word


def embedding_rows(vector: torch.Tensor) -> torch.Tensor:
    """A learned vector as a contiguous fp32 (vectors, width) matrix, the shape textual-inversion loaders expect."""
    return vector.detach().to("cpu", torch.float32).reshape(-1, vector.shape[-1]).contiguous()


def embedding_file_tensors(vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of one word's textual-inversion file: `{"emb_params": (vectors, width)}`.

    ComfyUI (`comfy/sd1_clip.py`, `load_embed`) takes the file's first tensor when it has no `string_to_param` or
    `clip_l` entry, one row per vector; A1111 takes a one-tensor safetensors file as a "diffuser concept" and adds a
    vector dim when there is none. `emb_params` is the name sd-scripts gives that tensor.
    """
    return {"emb_params": embedding_rows(vector)}


def caption_strings(values: Iterable[Any]) -> list[str]:
    """Caption column values as strings; a row holding several captions contributes each of them."""
    captions: list[str] = []
    for value in values:
        if isinstance(value, str):
            captions.append(value)
        elif isinstance(value, Iterable):
            captions.extend(str(item) for item in value)
    return captions


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How often each comma-separated tag appears, counted the way sd-scripts fills `ss_tag_frequency`
    (`library/train_util.py`, `set_tag_frequency`: split on commas, strip, drop empty tags, lower-case)."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tag.strip().lower() for tag in caption.split(",") if tag.strip())
    return dict(counts)


@dataclass(frozen=True)
class BaseVersion:
    """How kohya and the model spec name the base architecture."""

    ss_base_model_version: str  # sd-scripts' get_model_version_str_for_sd1_sd2: sd_v1, sd_v2, sd_v2_v
    v2: bool
    architecture: str  # modelspec.architecture without the adapter suffix
    prediction_type: str  # modelspec.prediction_type: epsilon or v


def base_version(cross_attention_dim: int | None, prediction_type: str | None) -> BaseVersion:
    """SD2's UNet attends to a 1024-wide OpenCLIP text encoder, SD1's (and BK-SDM's) to 768-wide CLIP-L; any other
    single-encoder Stable Diffusion UNet is treated as SD1, the layout A1111 assumes when `ss_v2` is not True."""
    v_prediction = prediction_type == "v_prediction"
    if cross_attention_dim == 1024:
        return BaseVersion(
            "sd_v2_v" if v_prediction else "sd_v2",
            True,
            "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512",
            "v" if v_prediction else "epsilon",
        )
    return BaseVersion(
        "sd_v1_v" if v_prediction else "sd_v1", False, "stable-diffusion-v1", "v" if v_prediction else "epsilon"
    )


def read_base_config(model: dict[str, Any], training: dict[str, Any]) -> tuple[int | None, str | None]:
    """(cross_attention_dim, prediction_type) of the run's base, from its configs only (no weights).

    The trainer's `prediction_type` override wins over the base scheduler's. An unreachable base (offline, a moved
    folder) gives (None, ...) with a warning; the export then describes the base as SD1."""
    base, revision = model.get("pretrained_model_name_or_path"), model.get("revision")
    prediction_type = training.get("prediction_type")
    try:
        unet_config = UNet2DConditionModel.load_config(base, subfolder="unet", revision=revision)
        scheduler_config = DiffusionPipeline.load_config(base, subfolder="scheduler", revision=revision)
    except (OSError, ValueError, TypeError) as error:
        logger.warning("Cannot read the base model %s's configs (%s); the kohya metadata calls it SD1.", base, error)
        return None, prediction_type
    cross_attention_dim = unet_config.get("cross_attention_dim")
    if isinstance(cross_attention_dim, (list, tuple)):
        cross_attention_dim = cross_attention_dim[0]
    return cross_attention_dim, prediction_type or scheduler_config.get("prediction_type", "epsilon")


def dataset_label(data: dict[str, Any]) -> str:
    """The dataset's name in `ss_tag_frequency` (kohya puts the image folder's name there)."""
    if data.get("dataset_name"):
        return str(data["dataset_name"])
    return Path(str(data.get("train_data_dir") or "dataset")).name


def read_run_captions(data: dict[str, Any]) -> list[str] | None:
    """The captions of the dataset a run recorded in `training_config.yaml`, for an export made after training;
    None (and a warning) when that dataset cannot be read here. Mixed-in data and `max_train_samples` are not
    replayed: the tags are those of the whole main dataset."""
    from lorakit.config import DataConfig  # data loading is only needed for this fallback
    from lorakit.data import load_raw_dataset, resolve_columns

    fields = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "caption_column", "cache_dir")
    try:
        cfg = DataConfig(**{name: data.get(name) for name in fields})
        dataset = load_raw_dataset(cfg)
        caption_column = resolve_columns(dataset, cfg)[1]
        return caption_strings(dataset[caption_column])
    except (OSError, ValueError) as error:
        logger.warning("Cannot read the run's captions (%s); ss_tag_frequency is left empty.", error)
        return None


def kohya_metadata(
    *,
    ranks: list[int],
    lora_alpha: float,
    version: BaseVersion,
    resolution: int,
    num_train_images: int,
    output_name: str,
    tag_frequency_by_dataset: dict[str, dict[str, int]],
    trigger_phrase: str | None,
    created: datetime,
) -> dict[str, str]:
    """The safetensors metadata of the kohya file; safetensors stores strings only, so every value is one."""
    metadata = {
        # kohya's keys, which A1111's Lora extension (`network.py`: alias from ss_output_name, SD2 when ss_v2 is
        # "True", SDXL when ss_base_model_version starts with "sdxl_") and LoRA galleries read.
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else ",".join(map(str, ranks)),
        "ss_network_alpha": f"{lora_alpha:g}",
        "ss_base_model_version": version.ss_base_model_version,
        "ss_v2": str(version.v2),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_num_train_images": str(num_train_images),
        "ss_output_name": output_name,
        "ss_tag_frequency": json.dumps(tag_frequency_by_dataset, ensure_ascii=False),
        # Stability AI's model metadata spec, as sd-scripts fills it for an SD1/SD2 LoRA.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{version.architecture}/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": version.prediction_type,
        "modelspec.date": created.astimezone(timezone.utc).replace(microsecond=0).isoformat(),
        "format": "pt",
    }
    if trigger_phrase:
        metadata["modelspec.trigger_phrase"] = trigger_phrase
    return metadata


def _read_learned_words(output_dir: Path) -> dict[str, torch.Tensor]:
    path = output_dir / LEARNED_EMBEDS_FILE
    return load_file(path) if path.is_file() else {}


def _trigger_phrase(output_dir: Path, words: Sequence[str]) -> str | None:
    # The learned words are what a prompt must say; without them, the run's instance prompt (if it recorded one).
    if words:
        return ", ".join(words)
    if (output_dir / SUMMARY_FILE).is_file():
        return read_summary(output_dir).instance_prompt
    return None


def write_embedding_files(output_dir: Path, learned: dict[str, torch.Tensor]) -> list[Path]:
    """One `embeddings/<word>.safetensors` per learned word; files of words no longer learned are removed."""
    folder = output_dir / KOHYA_EMBEDDINGS_DIR
    written = []
    for word, vector in learned.items():
        path = folder / f"{embedding_name(word)}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(embedding_file_tensors(vector)))
        written.append(path)
    if folder.is_dir():
        for stale in set(folder.glob("*.safetensors")) - set(written):
            stale.unlink()
    return written


def export_kohya(output_dir: str | os.PathLike, captions: Iterable[Any] | None = None) -> Path:
    """Write `pytorch_lora_weights_kohya.safetensors` (and `embeddings/<word>.safetensors` per learned word) next
    to the diffusers-format adapter.

    `captions` are the training captions (the trainer passes its caption column) for `ss_tag_frequency`; without
    them the run's dataset is read again from `training_config.yaml`.
    """
    output_dir = Path(output_dir)
    adapter_path = output_dir / ADAPTER_FILE
    if not adapter_path.is_file():
        raise FileNotFoundError(f"{adapter_path} is missing: train first (or point --output_dir at a finished run).")
    lora_alpha = read_lora_alpha(output_dir)
    config = yaml.safe_load((output_dir / TRAINING_CONFIG_FILE).read_text(encoding="utf-8")) or {}
    with safe_open(adapter_path, framework="pt") as handle:
        source_metadata = handle.metadata() or {}
    kohya_state = diffusers_to_kohya(load_file(adapter_path), lora_alpha)
    ranks = sorted({int(w.shape[0]) for k, w in kohya_state.items() if k.endswith(".lora_down.weight")})
    _warn_on_alpha_mismatch(source_metadata, lora_alpha, ranks)
    learned = _read_learned_words(output_dir)
    data = config.get("data") or {}
    caption_list = caption_strings(captions) if captions is not None else read_run_captions(data)
    num_samples = read_summary(output_dir).num_samples if (output_dir / SUMMARY_FILE).is_file() else None
    metadata = kohya_metadata(
        ranks=ranks,
        lora_alpha=lora_alpha,
        version=base_version(*read_base_config(config.get("model") or {}, config.get("training") or {})),
        resolution=int(data.get("resolution") or 512),
        num_train_images=num_samples if num_samples is not None else len(caption_list or []),
        output_name=output_dir.resolve().name,
        tag_frequency_by_dataset={dataset_label(data): tag_frequency(caption_list)} if caption_list else {},
        trigger_phrase=_trigger_phrase(output_dir, list(learned)),
        created=datetime.fromtimestamp(adapter_path.stat().st_mtime, tz=timezone.utc),
    )
    tensors = {key: value.contiguous() for key, value in kohya_state.items()} | bundled_embeddings(learned)
    kohya_path = output_dir / KOHYA_FILE
    atomic_write_bytes(kohya_path, canonical_safetensors(save(tensors, metadata=metadata)))
    write_embedding_files(output_dir, learned)
    logger.info(
        "Wrote kohya-format adapter %s (%d tensors, alpha %g, learned words: %s)",
        kohya_path,
        len(tensors),
        lora_alpha,
        ", ".join(learned) or "none",
    )
    return kohya_path
