"""The optimizer of a run, from libraries: torch's AdamW, bitsandbytes' 8-bit AdamW, Prodigy, Adafactor, Lion.

    groups = param_groups(training, lora, learning_rate, unet, text_encoder, token_offsets)
    optimizer = make_optimizer(training, groups)

Each part of the adapter is its own parameter group, with its own learning rate and weight decay: the UNet LoRA
(`--learning_rate`), the text-encoder LoRA (`--text_encoder_lr`), the learned token embeddings
(`--token_embedding_lr`, no weight decay, which would pull the learned words back towards zero). Prodigy is the
exception: it estimates one step size for all parameters and refuses groups with different learning rates, so
every group takes `--learning_rate` there (the run's log says so).

Optional packages are imported only when chosen; `check_optimizer` (called before any model loads) builds the
chosen optimizer on a dummy parameter, so a missing package or a bad `--optimizer_args` stops the run in seconds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from lorakit.config import ConfigError, LoraArgs, TrainingArgs, parse_optimizer_args
from lorakit.token_embeddings import TokenEmbeddingOffsets

# optimizer -> (module to import, the pip package that provides it)
OPTIONAL_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "lion": ("lion_pytorch", "lion-pytorch"),
}
# Optimizers that take one learning rate for all groups.
SINGLE_LEARNING_RATE = ("prodigy",)


def check_optimizer_available(name: str) -> None:
    """Raise ConfigError naming the `pip install` line when the chosen optimizer's package is missing."""
    if name not in OPTIONAL_PACKAGES:
        return
    module, package = OPTIONAL_PACKAGES[name]
    try:
        importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(
            f"--optimizer {name} needs the package {package}, which is not installed: `pip install {package}` "
            f"(or `pip install lorakit[optimizers]`), or choose --optimizer adamw."
        ) from error


def param_groups(
    training: TrainingArgs,
    lora: LoraArgs,
    learning_rate: float,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    token_offsets: TokenEmbeddingOffsets | None = None,
) -> list[dict[str, Any]]:
    """One group per trained part, named, with its learning rate and weight decay (`learning_rate`: the UNet's,
    already scaled by `--scale_lr`)."""
    decay = training.adam_weight_decay
    groups = [{"name": "unet_lora", "params": trainable(unet), "lr": learning_rate, "weight_decay": decay}]
    if text_encoder is not None:
        text_lr = training.text_encoder_lr if training.text_encoder_lr is not None else learning_rate
        groups.append({"name": "text_encoder_lora", "params": trainable(text_encoder), "lr": text_lr})
        groups[-1]["weight_decay"] = decay
    if token_offsets is not None:
        groups.append(
            {"name": "token_embeddings", "params": [token_offsets.offsets], "lr": lora.token_embedding_lr}
            | {"weight_decay": 0.0}
        )
    if training.optimizer in SINGLE_LEARNING_RATE:
        for group in groups:
            group["lr"] = learning_rate
    return groups


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of `module` that train (its LoRA layers)."""
    return [param for param in module.parameters() if param.requires_grad]


def _adamw(training: TrainingArgs, groups: list[dict], args: dict[str, Any]) -> torch.optim.Optimizer:
    params = [p for group in groups for p in group["params"]]
    # Fused kernels where torch has them for the device (CUDA); elsewhere torch picks its default implementation.
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, **(_adam_defaults(training) | {"fused": fused} | args))


def _adamw8bit(training: TrainingArgs, groups: list[dict], args: dict[str, Any]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb

    # 8-bit optimizer states (Dettmers et al., arXiv 2110.02861); tensors under 4096 values keep 32-bit states.
    return bnb.optim.AdamW8bit(groups, **(_adam_defaults(training) | args))


def _prodigy(training: TrainingArgs, groups: list[dict], args: dict[str, Any]) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    # Prodigy (Mishchenko & Defazio, arXiv 2306.06101) estimates the distance to the solution, d, and steps Adam by
    # d x lr: lr stays near 1.0. decouple: AdamW-style weight decay, as the other optimizers here.
    return Prodigy(groups, **(_adam_defaults(training) | {"decouple": True} | args))


def _adafactor(training: TrainingArgs, groups: list[dict], args: dict[str, Any]) -> torch.optim.Optimizer:
    from transformers.optimization import Adafactor

    # Factored second moments (Shazeer & Stern, arXiv 1804.04235); with the run's learning rate as a fixed step
    # (relative_step off), so the schedule and the per-group rates apply as for the other optimizers.
    defaults = {"lr": training.learning_rate, "relative_step": False, "scale_parameter": False, "warmup_init": False}
    return Adafactor(groups, **(defaults | {"weight_decay": training.adam_weight_decay} | args))


def _lion(training: TrainingArgs, groups: list[dict], args: dict[str, Any]) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    # Lion (Chen et al., arXiv 2302.06675) steps by the sign of a momentum mix: every value moves by lr, so it wants
    # a learning rate 3-10x smaller than AdamW's. Its own betas (0.9, 0.99) unless --optimizer_args says otherwise.
    return Lion(groups, **({"lr": training.learning_rate, "weight_decay": training.adam_weight_decay} | args))


def _adam_defaults(training: TrainingArgs) -> dict[str, Any]:
    return {
        "lr": training.learning_rate,
        "betas": (training.adam_beta1, training.adam_beta2),
        "weight_decay": training.adam_weight_decay,
        "eps": training.adam_epsilon,
    }


BUILDERS: dict[str, Callable[[TrainingArgs, list[dict], dict[str, Any]], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "prodigy": _prodigy,
    "adafactor": _adafactor,
    "lion": _lion,
}


def make_optimizer(training: TrainingArgs, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The `--optimizer` over `groups` (see `param_groups`), with `--optimizer_args` passed to its constructor."""
    check_optimizer_available(training.optimizer)
    args = parse_optimizer_args(training.optimizer_args)
    try:
        return BUILDERS[training.optimizer](training, groups, args)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ConfigError(
            f"--optimizer {training.optimizer} with --optimizer_args {' '.join(training.optimizer_args) or '(none)'} "
            f"cannot be built: {error}"
        ) from error


def check_optimizer(training: TrainingArgs) -> None:
    """Build the chosen optimizer on one dummy parameter: a missing package or a bad argument fails before loading."""
    dummy = torch.nn.Parameter(torch.zeros(2, 2))
    make_optimizer(training, [{"name": "check", "params": [dummy], "lr": training.learning_rate}])


def describe_groups(optimizer: torch.optim.Optimizer, training: TrainingArgs) -> str:
    """One line for the log: the optimizer, each group's learning rate and weight decay, and Prodigy's caveat."""
    parts = ", ".join(
        f"{group.get('name', f'group {index}')} lr {group['lr']:.3g} wd {group.get('weight_decay', 0.0):g}"
        for index, group in enumerate(optimizer.param_groups)
    )
    line = f"Optimizer {training.optimizer} ({type(optimizer).__name__}): {parts}."
    if training.optimizer in SINGLE_LEARNING_RATE:
        line += (
            " Prodigy adapts one step size for all groups, so each takes --learning_rate "
            "(--text_encoder_lr and --token_embedding_lr are not used)."
        )
    return line
