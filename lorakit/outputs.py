"""What a run leaves in its output folder besides checkpoints: adapter, config, loss history, summary, plots."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from lorakit.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from lorakit.config import ConfigError, TrainConfig
from lorakit.lora import ADAPTER_WEIGHT_NAME, save_adapter

TRAINING_CONFIG_FILE = "training_config.yaml"
LOSS_HISTORY_FILE = "loss_history.json"
LOSS_CURVE_FILE = "loss_curve.png"
SUMMARY_FILE = "train_summary.json"
VALIDATION_DIR = "validation"
VALIDATION_GRID_FILE = "validation_grid.png"


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to overwrite a finished adapter unless asked, or unless resuming into the same folder."""
    adapter = Path(cfg.output.output_dir) / ADAPTER_WEIGHT_NAME
    if adapter.exists() and not cfg.output.overwrite_output_dir and cfg.training.resume_from_checkpoint is None:
        raise ConfigError(
            f"{cfg.output.output_dir} already holds an adapter ({ADAPTER_WEIGHT_NAME}). "
            "Pass --overwrite_output_dir to replace it, or choose another --output_dir."
        )


def save_adapter_atomic(output_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> Path:
    """Write the adapter to a temporary folder, then rename the file into place."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-adapter-") as tmp:
        written = save_adapter(tmp, unet, text_encoder)
        os.replace(written, output_dir / ADAPTER_WEIGHT_NAME)
    return output_dir / ADAPTER_WEIGHT_NAME


def reproduce_command(argv: list[str] | None) -> str:
    """The command that reproduces the run (flags as given; no secrets are ever flags)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["accelerate", "launch", "--config_file", "accelerate_config.yaml", "train_lora.py", *args])


def write_training_config(output_dir: str | Path, cfg: TrainConfig) -> Path:
    """The resolved configuration, nested by section."""
    path = Path(output_dir) / TRAINING_CONFIG_FILE
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def write_loss_history(output_dir: str | Path, history: list[dict[str, float]]) -> Path:
    path = Path(output_dir) / LOSS_HISTORY_FILE
    atomic_write_json(path, {"history": history})
    return path


def plot_loss_curve(output_dir: str | Path, history: list[dict[str, float]]) -> Path | None:
    """Loss per step with a moving average, as a PNG for the card and README."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    losses = [row["loss"] for row in history]
    window = max(1, len(losses) // 10)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    figure, axis = plt.subplots(figsize=(6, 3.2), dpi=100)
    axis.plot(steps, losses, alpha=0.35, label="loss per step")
    axis.plot(steps, smooth, label=f"moving average ({window} steps)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (MSE)")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    path = Path(output_dir) / LOSS_CURVE_FILE
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_summary(output_dir: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(output_dir) / SUMMARY_FILE
    atomic_write_json(path, summary)
    return path


def clean_temporary_files(output_dir: str | Path) -> None:
    """Remove leftovers of saves that a kill interrupted (never complete checkpoints)."""
    for path in Path(output_dir).glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
