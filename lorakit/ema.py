"""An exponential moving average (EMA) of the trained weights, from `torch.optim.swa_utils`.

    ema = TrainedWeightsEMA(params, decay=0.999, update_after_step=0)
    ema.update(global_step)              # after every optimizer step
    with ema.averaged_weights(): ...     # validate with the average, then back to the raw weights
    ema.copy_to_params()                 # at the end: the saved adapter is the average

Averaging the weights of the last steps smooths out the noise of the last few updates (Polyak averaging); for
a short run it trades a little of the newest progress for a steadier adapter. Only the trained tensors are
averaged (LoRA layers, DoRA magnitudes, learned token embeddings): a copy the size of the adapter, never of the
UNet. The average is part of every checkpoint (`state_dict`), so a resumed run continues the same average.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class TrainedWeightsEMA:
    """EMA of a list of parameters: e_1 = w_1, then e_k = decay * e_(k-1) + (1 - decay) * w_k after each step k.

    Until `update_after_step` the average simply follows the weights (it restarts at each of those steps), so the
    early, fast-moving steps do not weigh on it.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float, update_after_step: int = 0) -> None:
        self.params = torch.nn.ParameterList(list(params))  # the live parameters themselves, not copies
        self.update_after_step = update_after_step
        # AveragedModel deep-copies the (small) ParameterList; its multi-tensor EMA lerps all tensors at once.
        self.average = AveragedModel(self.params, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.average.requires_grad_(False)

    def update(self, global_step: int) -> None:
        """Fold in the weights after optimizer step `global_step` (the first update copies them)."""
        if global_step <= self.update_after_step:
            self.average.n_averaged.zero_()
        self.average.update_parameters(self.params)

    def averaged(self) -> list[torch.Tensor]:
        """The averaged tensors, in the order of the parameters."""
        return [tensor.detach() for tensor in self.average.module.parameters()]

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Overwrite the live parameters with the average (the end of training)."""
        for param, average in zip(self.params, self.averaged(), strict=True):
            param.copy_(average)

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Within the block the parameters hold the average; afterwards the raw weights again, bit for bit."""
        with torch.no_grad():
            raw = [param.detach().clone() for param in self.params]
            self.copy_to_params()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.params, raw, strict=True):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        """The average and its update count, for `accelerator.register_for_checkpointing`."""
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state)
