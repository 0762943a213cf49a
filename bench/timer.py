"""A PhaseTimer that also stamps every optimizer step, so the bench can drop warm-up steps and split epochs."""

from __future__ import annotations

import time

from lorakit.timing import PHASES, PhaseTimer


class StepStampTimer(PhaseTimer):
    """Records the wall clock and the phase totals each time the trainer counts an optimizer step."""

    def __init__(self) -> None:
        self._steps = 0
        self.loop_started_at: float | None = None
        self.stamps: list[float] = []
        self.totals: list[dict[str, float]] = []
        super().__init__(enabled=True)

    @property
    def steps(self) -> int:
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        # The trainer increments `steps` once per optimizer step: that moment closes the step.
        if value > self._steps:
            self.stamps.append(time.perf_counter())
            self.totals.append({name: self.seconds.get(name, 0.0) for name in PHASES})
        self._steps = value

    def phase(self, name: str):
        if self.loop_started_at is None:
            self.loop_started_at = time.perf_counter()
        return super().phase(name)

    def add(self, name: str, seconds: float) -> None:
        if self.loop_started_at is None:
            self.loop_started_at = time.perf_counter() - seconds
        super().add(name, seconds)

    def window(self, first: int, last: int) -> dict:
        """Mean step time and phases over steps first..last (1-based, inclusive); first > 1 needs step first-1."""
        if not 1 <= first <= last <= len(self.stamps):
            raise ValueError(f"steps {first}..{last} not timed (have {len(self.stamps)})")
        count = last - first + 1
        start = self.stamps[first - 2] if first > 1 else self.loop_started_at
        before = self.totals[first - 2] if first > 1 else dict.fromkeys(PHASES, 0.0)
        step_s = (self.stamps[last - 1] - start) / count
        phases = {name: (self.totals[last - 1][name] - before[name]) / count for name in PHASES}
        return {"steps": count, "step_s": step_s, "phases_s": phases}
