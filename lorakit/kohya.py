"""Export the trained adapter in the kohya/webui key format (AUTOMATIC1111, ComfyUI, SD.Next, InvokeAI).

Usage (the trainer calls this after saving the adapter when `--export_kohya` is set):

    from lorakit.kohya import export_kohya
    path = export_kohya(output_dir)  # -> output_dir / "pytorch_lora_weights_kohya.safetensors"

Keys look like `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`,
`.lora_up.weight` and `.alpha`. The key renaming is diffusers' own `convert_state_dict_to_peft` +
`convert_state_dict_to_kohya`; we only replace the alpha, which diffusers fills with the rank, by the
real `lora_alpha` from `training_config.yaml`, so that kohya loaders apply the trained scale alpha / rank.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
import yaml
from diffusers.utils.state_dict_utils import (
    StateDictType,
    convert_state_dict_to_kohya,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from safetensors import safe_open
from safetensors.torch import load_file, save

from lorakit.atomic import atomic_write_bytes
from lorakit.filenames import ADAPTER_FILE, KOHYA_FILE, TRAINING_CONFIG_FILE

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
    kohya_state = convert_state_dict_to_kohya(peft_state)
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


def export_kohya(output_dir: str | os.PathLike) -> Path:
    """Write `pytorch_lora_weights_kohya.safetensors` next to the diffusers-format adapter."""
    output_dir = Path(output_dir)
    adapter_path = output_dir / ADAPTER_FILE
    if not adapter_path.is_file():
        raise FileNotFoundError(f"{adapter_path} is missing: train first (or point --output_dir at a finished run).")
    lora_alpha = read_lora_alpha(output_dir)
    with safe_open(adapter_path, framework="pt") as handle:
        source_metadata = handle.metadata() or {}
    state_dict = load_file(adapter_path)
    kohya_state = diffusers_to_kohya(state_dict, lora_alpha)
    ranks = sorted({int(w.shape[0]) for k, w in kohya_state.items() if k.endswith(".lora_down.weight")})
    # kohya's own metadata keys, which webui front-ends display; values must be strings in safetensors.
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else ",".join(map(str, ranks)),
        "ss_network_alpha": f"{lora_alpha:g}",
        "format": "pt",
    }
    _warn_on_alpha_mismatch(source_metadata, lora_alpha, ranks)
    kohya_path = output_dir / KOHYA_FILE
    contiguous = {key: value.contiguous() for key, value in kohya_state.items()}
    atomic_write_bytes(kohya_path, save(contiguous, metadata=metadata))
    logger.info("Wrote kohya-format adapter %s (%d tensors, alpha %g)", kohya_path, len(contiguous), lora_alpha)
    return kohya_path
