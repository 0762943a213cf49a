"""What a benchmark ran on: CPU, cores, threads, library versions, GPU, and how busy the machine was."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time

import psutil
import torch

from lorakit import probe_cache


def cpu_model() -> str:
    """The CPU's marketing name (the trainer's own lookup, which keys the precision probe's kept timings)."""
    return probe_cache.cpu_model() or "unknown"


def gpu_name() -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def load_average() -> float:
    """The 1-minute load average: with 2 cores, anything above ~2 means the timings were shared."""
    return round(os.getloadavg()[0], 2)


def machine_info() -> dict:
    """The facts a reader needs to compare our figures with theirs."""
    import accelerate
    import diffusers
    import peft
    import transformers

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "gpu": gpu_name(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "load_average_1min_at_start": load_average(),
    }


class PeakMemory:
    """Samples the resident memory of this process and its children (DataLoader workers) in a thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._process = psutil.Process()

    def _sample(self) -> int:
        total = self._process.memory_info().rss
        for child in self._process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # a worker that exited between listing and reading
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._sample())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start_bytes = self.peak_bytes = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._sample())

    @property
    def start_rss_mib(self) -> float:
        return round(self.start_bytes / 2**20, 1)

    @property
    def peak_rss_mib(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

    @staticmethod
    def lifetime_max_rss_mib() -> float:
        """getrusage's high-water mark of this process since it started (KiB on Linux)."""
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    @staticmethod
    def peak_cuda_mib() -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
