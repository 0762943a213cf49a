"""Parameter counting, kept pure so trainer, eval and tests agree on one definition.

Counts work on real modules and on modules built from configs on the meta device (no weights,
no download), so a pipeline's size is known from its `config.json` files alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# One folder layout per source: a saved diffusers pipeline (`unet/config.json`) or flat reference
# configs as in configs/architectures/bk-sdm-tiny (`unet_config.json`).
_COMPONENTS = ("unet", "text_encoder", "vae")


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters in `module` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for param in module.parameters():
        if trainable_only and not param.requires_grad:
            continue
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


@dataclass(frozen=True)
class PipelineParameterCounts:
    """Parameters per component of a Stable-Diffusion-architecture pipeline."""

    text_encoder: int
    unet: int
    vae_encoder: int
    vae_decoder: int
    vae: int
    pipeline: int

    def to_dict(self) -> dict[str, int]:
        """Plain dict for JSON reports."""
        return asdict(self)


def vae_parameter_split(vae: torch.nn.Module) -> tuple[int, int]:
    """(encoder, decoder) parameters of an AutoencoderKL; quant convs go with their side, so they sum to the VAE."""
    encoder = count_parameters(vae.encoder)
    decoder = count_parameters(vae.decoder)
    # quant_conv maps encoder moments to the latent; post_quant_conv feeds the decoder (either may be None).
    if getattr(vae, "quant_conv", None) is not None:
        encoder += count_parameters(vae.quant_conv)
    if getattr(vae, "post_quant_conv", None) is not None:
        decoder += count_parameters(vae.post_quant_conv)
    return encoder, decoder


def pipeline_parameter_counts(
    unet: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module
) -> PipelineParameterCounts:
    """Per-component counts; LoRA layers, if attached, are excluded so the figures describe the base."""
    unet_count = _count_without_lora(unet)
    text_count = _count_without_lora(text_encoder)
    encoder, decoder = vae_parameter_split(vae)
    vae_count = count_parameters(vae)
    return PipelineParameterCounts(
        text_encoder=text_count,
        unet=unet_count,
        vae_encoder=encoder,
        vae_decoder=decoder,
        vae=vae_count,
        pipeline=unet_count + text_count + vae_count,
    )


def _count_without_lora(module: torch.nn.Module) -> int:
    """Parameters of `module` that are not LoRA adapter weights."""
    seen: set[int] = set()
    total = 0
    for name, param in module.named_parameters():
        if "lora_" in name or id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
    return total


def _component_config(folder: Path, component: str) -> dict:
    """Read a component config from a pipeline folder or a flat reference folder."""
    for candidate in (folder / component / "config.json", folder / f"{component}_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(
        f"No config for '{component}' in {folder}: expected {component}/config.json (a saved pipeline) "
        f"or {component}_config.json (flat reference configs)."
    )


def meta_models_from_configs(folder: str | Path) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(unet, text_encoder, vae) built from config files on the meta device: shapes only, no weights."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    configs = {name: _component_config(folder, name) for name in _COMPONENTS}
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"]))
    return unet, text_encoder, vae


def parameter_counts_from_configs(folder: str | Path) -> PipelineParameterCounts:
    """Per-component counts of the pipeline described by the configs in `folder`, with no weights loaded."""
    unet, text_encoder, vae = meta_models_from_configs(folder)
    return pipeline_parameter_counts(unet, text_encoder, vae)


def lora_parameter_count(unet: torch.nn.Module, rank: int, target_modules: Sequence[str] | None = None) -> int:
    """LoRA parameters that `make_lora_config(rank, target_modules=...)` adds to `unet` (which is left untouched)."""
    from accelerate import init_empty_weights

    from lorakit.lora import DEFAULT_UNET_TARGET_MODULES, make_lora_config

    targets = tuple(target_modules) if target_modules is not None else DEFAULT_UNET_TARGET_MODULES
    # Attach to a meta-device twin built from the config: exact shapes, no memory, no change to the caller's UNet.
    with init_empty_weights():
        twin = type(unet).from_config(unet.config)
    twin.add_adapter(make_lora_config(rank, target_modules=targets))
    return sum(param.numel() for name, param in twin.named_parameters() if "lora_" in name)


def safetensors_parameter_count(path: str | Path) -> int:
    """Number of values stored in a safetensors file, read from its header only."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            shape = handle.get_slice(key).get_shape()
            count = 1
            for size in shape:
                count *= size
            total += count
    return total
