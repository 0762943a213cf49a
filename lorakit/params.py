"""Parameter counting, kept pure so trainer, eval and tests agree on one definition."""

from __future__ import annotations

import torch


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
