"""Intervals for the docs' shares: how far a share of a few dozen images can be trusted."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial share: unlike the normal one it stays inside [0, 1] and is not empty at
    0 or `trials` successes, where this world's figures often sit."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0; got {successes} of {trials}")
    share = successes / trials
    spread = z * z / trials
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / trials + spread / (4 * trials)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


def intervals_apart(first: tuple[float, float], second: tuple[float, float]) -> bool:
    """True when two intervals do not overlap: a conservative test that a difference is not noise."""
    return first[1] < second[0] or second[1] < first[0]
