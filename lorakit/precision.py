"""Training precision: refuse one that cannot work on the machine at hand.

accelerate turns fp16 into autocast plus loss scaling on GPUs only; on a CPU it silently runs no autocast, the
frozen weights are cast to fp16 and the first UNet matmul fails ("mat1 and mat2 must have the same dtype").
"""

from __future__ import annotations

from lorakit.config import ConfigError


def precision_source(requested: str | None) -> str:
    """Where the precision came from, for messages: the trainer's flag (or preset), else accelerate's setting."""
    if requested:
        return f"--mixed_precision {requested}"
    return "accelerate's mixed_precision (accelerate launch flag, config file or ACCELERATE_MIXED_PRECISION)"


def check_precision_fits(mixed_precision: str | None, device_type: str, source: str) -> None:
    """Raise ConfigError for a precision the device cannot train in (fp16 on a CPU), naming what to use instead."""
    if mixed_precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            f"{source} asks for fp16, but this run trains on the CPU, where accelerate has no fp16 mixed precision "
            "(the first step would fail with a dtype mismatch). Use --mixed_precision bf16 (fast on CPUs with native "
            "bf16: AMX or AVX512-BF16) or no (fp32)."
        )
