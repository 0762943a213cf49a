"""What a run leaves in its output folder besides checkpoints: adapter, config, loss history, summary, plots."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from lorakit.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from lorakit.config import ConfigError, TrainConfig
from lorakit.filenames import ADAPTER_FILE, LOSS_CURVE_FILE, LOSS_HISTORY_FILE, TRAINING_CONFIG_FILE
from lorakit.hub_token import redact_secrets
from lorakit.lora import save_adapter


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse to overwrite a finished adapter unless asked, or unless resuming into the same folder."""
    adapter = Path(cfg.output.output_dir) / ADAPTER_FILE
    if adapter.exists() and not cfg.output.overwrite_output_dir and cfg.training.resume_from_checkpoint is None:
        raise ConfigError(
            f"{cfg.output.output_dir} already holds an adapter ({ADAPTER_FILE}). "
            "Pass --overwrite_output_dir to replace it, or choose another --output_dir."
        )


def save_adapter_atomic(output_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> Path:
    """Write the adapter to a temporary folder, then rename the file into place."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".tmp-adapter-") as tmp:
        written = save_adapter(tmp, unet, text_encoder)
        os.replace(written, output_dir / ADAPTER_FILE)
    return output_dir / ADAPTER_FILE


# Programs that start the training script in a child process; their command line is what the user typed.
LAUNCHERS = ("accelerate", "accelerate-launch", "torchrun")
# accelerate launch -> (torch elastic agent) -> worker: the launcher is at most a few parents up.
LAUNCHER_SEARCH_DEPTH = 4


def _launcher_command(parents: list[list[str]], script: str) -> list[str] | None:
    """The first parent command line that launched `script` (`accelerate launch ...`, `python -m accelerate...`)."""
    script_name = Path(script).name
    for cmdline in parents[:LAUNCHER_SEARCH_DEPTH]:
        if not any(Path(arg).name == script_name for arg in cmdline[1:]):
            continue
        for index, part in enumerate(cmdline[:2]):  # the program itself, or the script an interpreter runs
            if Path(part).name in LAUNCHERS:
                return [Path(part).name, *cmdline[index + 1 :]]
        if len(cmdline) > 2 and cmdline[1] == "-m" and cmdline[2].split(".")[0] in LAUNCHERS:
            return ["python", *cmdline[1:]]
    return None


def _parent_command_lines() -> list[list[str]]:
    import psutil

    try:
        return [parent.cmdline() for parent in psutil.Process().parents()[:LAUNCHER_SEARCH_DEPTH]]
    except psutil.Error:  # a parent that exited or belongs to another user: no launcher to report
        return []


def launch_command(argv: list[str] | None = None) -> str:
    """The command line that started this run, as it was typed.

    Run as a script (`argv` None): the `accelerate launch ...` (or `torchrun ...`) line of the launcher that
    started this process, else `python SCRIPT ARGS`. Called in-process with explicit flags (tests, the bench):
    the equivalent `python train_lora.py ARGS`. No secret is ever a flag, and the result is redacted anyway.
    """
    script_args = sys.argv[1:] if argv is None else list(argv)
    if argv is None or script_args == sys.argv[1:]:
        launcher = _launcher_command(_parent_command_lines(), sys.argv[0])
        command = launcher or ["python", sys.argv[0], *script_args]
    else:
        command = ["python", "train_lora.py", *script_args]
    return redact_secrets(shlex.join(command))


def write_training_config(output_dir: str | Path, cfg: TrainConfig) -> Path:
    """The resolved configuration, nested by section."""
    path = Path(output_dir) / TRAINING_CONFIG_FILE
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def write_loss_history(
    output_dir: str | Path, history: list[dict[str, float]], validation_history: list[dict[str, float]] | None = None
) -> Path:
    """The training loss per step, and the held-out loss where it was measured (`validation`)."""
    path = Path(output_dir) / LOSS_HISTORY_FILE
    atomic_write_json(path, {"history": history, **({"validation": validation_history} if validation_history else {})})
    return path


def plot_loss_curve(
    output_dir: str | Path, history: list[dict[str, float]], validation_history: list[dict[str, float]] | None = None
) -> Path | None:
    """Loss per step with a moving average (and the held-out loss where measured), as a PNG for the card and README."""
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
    if validation_history:
        held_steps = [row["step"] for row in validation_history]
        axis.plot(held_steps, [row["loss"] for row in validation_history], "o-", label="held-out loss")
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


def clean_temporary_files(output_dir: str | Path) -> None:
    """Remove leftovers of saves that a kill interrupted (never complete checkpoints)."""
    for path in Path(output_dir).glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
