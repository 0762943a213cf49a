"""LoRA configuration and adapter I/O in the diffusers format (Hu et al., 2021, arXiv 2106.09685)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from lorakit.filenames import ADAPTER_FILE

# The attention projections of every UNet transformer block, as in the diffusers LoRA example.
DEFAULT_UNET_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
# The CLIP text encoder's attention projections (used with --train_text_encoder).
DEFAULT_TEXT_ENCODER_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")


def make_lora_config(
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_UNET_TARGET_MODULES,
    init_lora_weights: bool | str = "gaussian",
) -> LoraConfig:
    """A peft `LoraConfig`; alpha defaults to the rank (scale 1), as in the diffusers example."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
        target_modules=list(target_modules),
    )


def lora_state_dicts(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The LoRA weights of the UNet (and text encoder) in the diffusers key format, as fp32 CPU tensors."""

    def to_diffusers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}

    text_state = to_diffusers(text_encoder) if text_encoder is not None else None
    return to_diffusers(unet), text_state


def adapter_metadata(module: torch.nn.Module, adapter_name: str = "default") -> dict:
    """The peft LoraConfig of `module` as a plain dict (rank, alpha, targets), for the adapter file."""
    return module.peft_config[adapter_name].to_dict()


def save_adapter(
    save_directory: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None
) -> Path:
    """Save `pytorch_lora_weights.safetensors`, loadable by `pipe.load_lora_weights(save_directory)`."""
    unet_layers, text_layers = lora_state_dicts(unet, text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        save_directory,
        unet_lora_layers=unet_layers,
        text_encoder_lora_layers=text_layers,
        # The LoRA config travels in the file's metadata, so loaders use the trained alpha, not alpha = rank.
        unet_lora_adapter_metadata=adapter_metadata(unet),
        text_encoder_lora_adapter_metadata=adapter_metadata(text_encoder) if text_encoder is not None else None,
        weight_name=ADAPTER_FILE,
        safe_serialization=True,
    )
    return Path(save_directory) / ADAPTER_FILE
