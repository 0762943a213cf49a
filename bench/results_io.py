"""Result files: one JSON per bench run under bench/results/, with the machine and the load it ran under."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.machine import load_average, machine_info
from lorakit.atomic import atomic_write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(path: Path, kind: str, short: bool, command: list[str], payload: dict, machine: dict) -> Path:
    """Write {kind, mode, machine, command, created, ...payload} atomically."""
    document = {
        "kind": kind,
        "mode": "short" if short else "full",
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m bench " + " ".join(command),
        "machine": {**machine, "load_average_1min_at_end": load_average()},
        **payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, document)
    return path


def read_results(folder: Path) -> list[dict]:
    """Every result file in `folder`, oldest first, each with its file name."""
    documents = []
    for path in sorted(folder.glob("*.json")):
        document = json.loads(path.read_text())
        document["file"] = path.name
        documents.append(document)
    return documents


__all__ = ["RESULTS_DIR", "machine_info", "read_results", "write_results"]
