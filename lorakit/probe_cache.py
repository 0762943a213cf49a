"""The precision probe's timings, kept per machine and step shape, so `auto` measures once, not every run.

The probe (lorakit.precision) costs 1-6 s of every run's start-up, a large share of a short job. Its answer depends
only on the CPU, the thread count, torch, the UNet's architecture and the shape of the step (micro-batch,
resolution, LoRA, checkpointing, channels_last), so timings are stored under a hash of exactly those and reused.
Only steady measurements are stored: a probe disturbed by other work is not worth remembering.

The file is `$LORAKIT_CACHE_DIR/precision_probe.json` (default `~/.cache/lorakit/`, or under $XDG_CACHE_HOME);
delete it to measure again. It holds timings and a date, nothing about the data.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from lorakit.atomic import atomic_write_json

CACHE_DIR_ENV = "LORAKIT_CACHE_DIR"
CACHE_FILE = "precision_probe.json"
# Raise when the probe's method changes: older timings then no longer match any key.
PROBE_VERSION = 1


def cache_path() -> Path:
    """Where the timings live: $LORAKIT_CACHE_DIR, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit) / CACHE_FILE
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit" / CACHE_FILE


def shown_cache_path() -> str:
    """`cache_path()` with the home folder written as `~`: the note that names it lands in model cards and run
    summaries, which get pushed and shared, and a user's home folder holds their user name."""
    path = cache_path()
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except ValueError:
        return str(path)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (/proc/cpuinfo where there is one, else what Python's platform module says)."""
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or platform.machine()


def probe_key(unet_config: dict, step_shape: dict) -> str:
    """Hash of everything the probe's answer depends on: machine, torch, architecture and step shape."""
    facts = {
        "version": PROBE_VERSION,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "unet": {key: value for key, value in unet_config.items() if not key.startswith("_")},
        "step": step_shape,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _read(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or damaged by hand: measure again
        return {}
    return entries if isinstance(entries, dict) else {}


def load_timings(key: str) -> dict | None:
    """The stored entry for `key` ({"fp32_seconds", "bf16_seconds", "cost_seconds", "measured"}), or None."""
    entry = _read(cache_path()).get(key)
    valid = isinstance(entry, dict) and {"fp32_seconds", "bf16_seconds", "measured"} <= entry.keys()
    return entry if valid else None


def store_timings(key: str, fp32_seconds: tuple, bf16_seconds: tuple, cost_seconds: float) -> Path | None:
    """Add one entry (atomically); a cache that cannot be written only means the next run measures again."""
    path = cache_path()
    entries = _read(path)
    entries[key] = {
        "fp32_seconds": list(fp32_seconds),
        "bf16_seconds": list(bf16_seconds),
        "cost_seconds": cost_seconds,
        "measured": datetime.date.today().isoformat(),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, entries)
    except OSError:
        return None
    return path
