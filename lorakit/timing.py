"""Where a training step's time goes: a phase timer the bench switches on (a no-op otherwise)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# The phases of one training step, in order, as the bench reports them.
PHASES = ("data_wait", "text_encoding", "vae_encoding", "unet_forward_backward", "optimizer_step")


class PhaseTimer:
    """Accumulates wall time per named phase; synchronizes CUDA so GPU work lands in the right phase."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start

    def add(self, name: str, seconds: float) -> None:
        if self.enabled:
            self.seconds[name] += seconds

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def per_step(self) -> dict[str, float]:
        """Mean seconds per optimizer step for each phase (0.0 for phases that never ran)."""
        steps = max(self.steps, 1)
        return {name: self.seconds.get(name, 0.0) / steps for name in PHASES}


def timed_batches(loader, timer: PhaseTimer):
    """Yield batches, charging the time spent waiting for each to the data_wait phase."""
    iterator = iter(loader)
    while True:
        waited = time.perf_counter()
        batch = next(iterator, None)
        timer.add("data_wait", time.perf_counter() - waited)
        if batch is None:
            return
        yield batch


NULL_TIMER = PhaseTimer(enabled=False)


@dataclass
class WallClock:
    """When this process started, when train() began, and when the training loop began and ended (time.time()
    seconds): the run's fixed cost before the first step and after the last, next to the steps themselves."""

    process_started: float
    train_started: float
    loop_started: float | None = None
    loop_ended: float | None = None

    @classmethod
    def now(cls) -> WallClock:
        import psutil  # the process's own start: interpreter and imports count as start-up

        return cls(process_started=psutil.Process().create_time(), train_started=time.time())

    def split(self, finished: float) -> dict[str, float]:
        """Seconds of start-up (process start to the first step), steps, and wind-down (last step to `finished`)."""
        loop_started = self.loop_started or finished
        loop_ended = self.loop_ended or loop_started
        return {
            "startup_s": round(loop_started - self.process_started, 2),
            "steps_s": round(loop_ended - loop_started, 2),
            "wind_down_s": round(finished - loop_ended, 2),
        }
