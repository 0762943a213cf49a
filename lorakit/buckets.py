"""Aspect-ratio buckets (`--enable_bucket`): train each image near its own shape instead of a square crop.

A square crop of a 2:1 landscape throws away a third of each side and with it the composition; a bucket is a
training size with about the same area as `resolution`² and the image's aspect ratio, so the crop is small.
Every batch comes from one bucket (a batch is one tensor), and the batch order is a function of the seed and
the epoch alone, so a resumed run trains on exactly the batches it would have trained on.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import torch

from lorakit.config import DataConfig

Size = tuple[int, int]  # (width, height) in pixels


@dataclass(frozen=True)
class BucketSpec:
    """The bucket flags of a run (see `DataConfig`)."""

    resolution: int
    min_reso: int
    max_reso: int
    step: int
    no_upscale: bool = False

    @classmethod
    def from_config(cls, data: DataConfig) -> BucketSpec:
        return cls(
            data.resolution, data.min_bucket_reso, data.max_bucket_reso, data.bucket_reso_steps, data.bucket_no_upscale
        )


def make_buckets(spec: BucketSpec) -> list[Size]:
    """Every (width, height) with sides multiples of `step` in [min, max] and area at most resolution²,
    the largest height for each width (so each aspect ratio gets its biggest size)."""
    max_area = spec.resolution**2
    buckets = set()
    for width in range(spec.min_reso, spec.max_reso + 1, spec.step):
        height = min(spec.max_reso, max_area // width // spec.step * spec.step)
        if height >= spec.min_reso:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (log scale, so 2:1 and 1:2 are as far from 1:1);
    among equally close ones the largest."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def no_upscale_bucket(size: Size, spec: BucketSpec) -> Size:
    """The image's own size scaled down to at most resolution² in area (never up), sides rounded down to `step`."""
    width, height = size
    scale = min(1.0, math.sqrt(spec.resolution**2 / (width * height)))
    return (
        max(spec.step, int(width * scale) // spec.step * spec.step),
        max(spec.step, int(height * scale) // spec.step * spec.step),
    )


def assign_buckets(sizes: list[Size], spec: BucketSpec) -> list[Size]:
    """Each image's training size."""
    if spec.no_upscale:
        return [no_upscale_bucket(size, spec) for size in sizes]
    buckets = make_buckets(spec)
    return [nearest_bucket(size, buckets) for size in sizes]


def histogram(assigned: list[Size]) -> dict[str, int]:
    """`WxH` -> images, largest count first (what the run prints and the summary and card keep)."""
    counts = Counter(assigned)
    return {f"{w}x{h}": n for (w, h), n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of one bucket each, in an order set by (seed, epoch) alone.

    It yields the batches of all processes in turn (batch i is process i mod P's); accelerate's sharding hands
    each process its own, so every sample is seen once per epoch. When the batch count is not a multiple of the
    process count, the epoch's first batches are repeated to fill the last round (as accelerate does), because
    every process must step together. `batch_size` is None: accelerate then keeps batches whole.
    """

    batch_size = None

    def __init__(self, assigned: list[Size], batch_size: int, seed: int, num_processes: int = 1) -> None:
        self.groups: dict[Size, list[int]] = {}
        for index, bucket in enumerate(assigned):
            self.groups.setdefault(bucket, []).append(index)
        self.per_batch, self.seed, self.num_processes, self.epoch = batch_size, seed, num_processes, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: int) -> list[list[int]]:
        """All processes' batches of one epoch, in order."""
        rng = random.Random(f"buckets/{self.seed}/{epoch}")
        batches = []
        for bucket in sorted(self.groups):
            indices = list(self.groups[bucket])
            rng.shuffle(indices)
            batches += [indices[start : start + self.per_batch] for start in range(0, len(indices), self.per_batch)]
        rng.shuffle(batches)
        original = len(batches)
        return batches + [batches[i % original] for i in range(-original % self.num_processes)]

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        count = sum(math.ceil(len(indices) / self.per_batch) for indices in self.groups.values())
        return count + (-count % self.num_processes)
