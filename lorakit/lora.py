"""LoRA configuration and adapter I/O in the diffusers format (Hu et al., 2021, arXiv 2106.09685)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from lorakit.canonical_safetensors import canonicalize_file
from lorakit.filenames import ADAPTER_FILE

# DoRA training arrived in peft 0.9; diffusers loads a UNet's DoRA magnitudes with `load_lora_weights` from 0.28.
DORA_MIN_PEFT = "0.9.0"
DORA_MIN_DIFFUSERS = "0.28.0"

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
    use_dora: bool = False,
) -> LoraConfig:
    """A peft `LoraConfig`; alpha defaults to the rank (scale 1), as in the diffusers example.

    `use_dora`: DoRA (Liu et al., arXiv 2402.09353) splits each adapted weight into a magnitude vector and a
    direction, and trains the magnitude plus a LoRA update of the direction; peft starts the magnitude at the base
    weight's column norms, so training still starts from the base model exactly.
    """
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
        target_modules=list(target_modules),
        use_dora=use_dora,
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
    """The peft LoraConfig of `module` as a plain dict (rank, alpha, targets), for the adapter file.

    peft keeps `target_modules` as a set, whose order follows Python's per-process string hashing
    (PYTHONHASHSEED); written as is, the same weights would give a different file, and a new Hub upload, each run.
    Sets are written sorted.
    """
    config = module.peft_config[adapter_name].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


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
    path = Path(save_directory) / ADAPTER_FILE
    canonicalize_file(path)  # sorted metadata keys: the same weights give the same bytes (see the module)
    return path


def check_dora_loadable(train_text_encoder: bool) -> None:
    """`--use_dora` must give an adapter that stock diffusers loads: raise ConfigError (before any model loads) when
    the installed peft or diffusers cannot, or for a DoRA text encoder, whose magnitudes `load_lora_weights` drops."""
    import diffusers
    import peft
    import transformers
    from packaging.version import Version

    from lorakit.config import ConfigError

    for package, minimum in ((peft, DORA_MIN_PEFT), (diffusers, DORA_MIN_DIFFUSERS)):
        if Version(package.__version__) < Version(minimum):
            raise ConfigError(
                f"--use_dora needs {package.__name__}>={minimum} (installed: {package.__version__}) to train and load "
                f"DoRA adapters: `pip install -U {package.__name__}`, or drop --use_dora."
            )
    if train_text_encoder:
        # Checked with diffusers 0.42 / transformers 5.23: the text encoder's `lora_magnitude_vector` keys are left
        # out on loading (its magnitudes restart from the base weights), so the loaded adapter is not the trained one.
        raise ConfigError(
            f"--use_dora with --train_text_encoder: diffusers {diffusers.__version__} with transformers "
            f"{transformers.__version__} does not load a text encoder's DoRA magnitudes with load_lora_weights, so "
            "the saved adapter would not load as trained. Use DoRA on the UNet only (drop --train_text_encoder; "
            "--train_token_embeddings still works) or drop --use_dora."
        )
