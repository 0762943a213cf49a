"""Where a run is, and how it survives interruptions: state, signals, divergence, checkpoint save/resume."""

from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from lorakit import checkpoint as ckpt
from lorakit.config import TrainConfig
from lorakit.hub import PushError, push_checkpoint

logger = logging.getLogger(__name__)
# Under fp16 loss scaling a few overflowing steps are expected; the scaler skips them and backs off.
FP16_NONFINITE_TOLERANCE = 8


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    """Where the run is: saved with every checkpoint so a resumed run continues at the exact sample.

    `batches_in_epoch` counts this run's micro-batches; checkpoints store `steps_in_epoch` (optimizer steps)
    instead, so a run resumed with another micro-batch of the same effective batch skips the same samples.
    """

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    steps_in_epoch: int = 0
    loss_history: list[dict[str, float]] = field(default_factory=list)
    nonfinite_streak: int = 0
    # Held-out loss at each step it was measured: [{"step": k, "loss": value}] (empty without held-out rows).
    validation_history: list[dict[str, float]] = field(default_factory=list)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and exits (pre-emption, Ctrl-C)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        """Give the signals back to whoever handled them before (pytest, an embedding program)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signal_name = signal.Signals(signum).name


def current_fingerprint(
    cfg: TrainConfig, data_fingerprint: str, num_processes: int, held_out_fingerprint: str | None = None
) -> dict:
    """What must match between a checkpoint and the run that resumes from it (`data_fingerprint`: the rows').

    Keys added after checkpoints were first written have a default in `checkpoint.FINGERPRINT_DEFAULTS`, which
    an older checkpoint is taken to have had.
    """
    return {
        "data": data_fingerprint,
        # Samples per optimizer step per process: how they are split into micro-batches may change on resume.
        "effective_batch_size": cfg.training.train_batch_size * cfg.training.gradient_accumulation_steps,
        "num_processes": num_processes,
        "rank": cfg.lora.rank,
        "lora_alpha": cfg.lora.lora_alpha,
        "target_modules": list(cfg.lora.target_modules),
        "train_text_encoder": cfg.lora.train_text_encoder,
        "train_token_embeddings": list(cfg.lora.train_token_embeddings),
        "seed": cfg.training.seed,
        # The optimizer's saved state fits only its own optimizer; DoRA adds weights; EMA adds a checkpointed average.
        "optimizer": cfg.training.optimizer,
        "use_dora": cfg.lora.use_dora,
        "use_ema": cfg.training.use_ema,
        "held_out": held_out_fingerprint,
    }


def resume_if_asked(
    cfg: TrainConfig, accelerator: Accelerator, fingerprint: dict, accumulation_steps: int
) -> TrainState:
    """A fresh state, or the checkpoint's, positioned in micro-batches of this run (`accumulation_steps` each)."""
    checkpoint_dir = ckpt.resolve_resume_dir(cfg.output.output_dir, cfg.training.resume_from_checkpoint)
    if checkpoint_dir is None:
        if cfg.training.resume_from_checkpoint == "latest":
            accelerator.print("No checkpoint found in the output folder: starting a new run.")
        return TrainState()
    saved = upgrade_saved_state(ckpt.read_train_state(checkpoint_dir))
    ckpt.check_compatible(saved["fingerprint"], fingerprint, checkpoint_dir)
    accelerator.load_state(str(checkpoint_dir))
    accelerator.print(f"Resumed from {checkpoint_dir} at step {saved['global_step']}.")
    if saved.get("mixed_precision", accelerator.mixed_precision) != accelerator.mixed_precision:
        accelerator.print(
            f"Note: {checkpoint_dir.name} was trained in {saved['mixed_precision']}; "
            f"it continues in {accelerator.mixed_precision}, as asked."
        )
    return TrainState(
        global_step=saved["global_step"],
        epoch=saved["epoch"],
        # Checkpoints are taken after optimizer steps only, so this is exact (past the end at an epoch's last,
        # partial step, where nothing is left to skip to anyway).
        batches_in_epoch=saved["steps_in_epoch"] * accumulation_steps,
        steps_in_epoch=saved["steps_in_epoch"],
        loss_history=saved["loss_history"][: saved["global_step"]],
        validation_history=[row for row in saved.get("validation_history", []) if row["step"] <= saved["global_step"]],
    )


def upgrade_saved_state(saved: dict) -> dict:
    """A checkpoint written before micro-batches could change on resume, in today's terms.

    It stored the position in batches of its `train_batch_size` and fingerprinted both batch flags.
    """
    fingerprint = saved["fingerprint"]
    if "steps_in_epoch" in saved or "gradient_accumulation_steps" not in fingerprint:
        return saved
    accumulation = fingerprint["gradient_accumulation_steps"]
    effective = fingerprint["train_batch_size"] * accumulation
    old_keys = ("train_batch_size", "gradient_accumulation_steps")
    upgraded_fingerprint = {k: v for k, v in fingerprint.items() if k not in old_keys}
    return {
        **saved,
        "steps_in_epoch": -(-saved["batches_in_epoch"] // accumulation),
        "fingerprint": {**upgraded_fingerprint, "effective_batch_size": effective},
    }


def save_training_state(cfg: TrainConfig, accelerator: Accelerator, state: TrainState, fingerprint: dict) -> Path:
    payload = {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "steps_in_epoch": state.steps_in_epoch,
        "loss_history": state.loss_history,
        "validation_history": state.validation_history,
        "fingerprint": fingerprint,
        "mixed_precision": accelerator.mixed_precision,  # `auto` resumes in it (lorakit.precision)
    }
    where = ckpt.save_checkpoint(
        accelerator, cfg.output.output_dir, state.global_step, payload, cfg.training.checkpoints_total_limit
    )
    if cfg.output.hub_push_checkpoints and accelerator.is_main_process:
        try:  # a failed checkpoint upload must not cost the run: warn and train on
            push_checkpoint(where, cfg.output.hub_model_id or Path(cfg.output.output_dir).name, state.global_step)
        except PushError as error:
            logger.warning("Checkpoint %s was saved locally but not pushed: %s", where.name, error)
    return where


def check_finite(loss: float, state: TrainState, cfg: TrainConfig, mixed_precision: str) -> None:
    """Stop with a clear message when the loss diverges (a few fp16 overflow steps are tolerated)."""
    if math.isfinite(loss):
        state.nonfinite_streak = 0
        return
    state.nonfinite_streak += 1
    if mixed_precision == "fp16" and state.nonfinite_streak <= FP16_NONFINITE_TOLERANCE:
        return
    checkpoints = ckpt.list_checkpoints(cfg.output.output_dir)
    last_good = str(checkpoints[-1]) if checkpoints else "none (use --checkpointing_steps to keep some)"
    raise TrainingDivergedError(
        f"The loss became {loss} at step {state.global_step}. Last good checkpoint: {last_good}. "
        "Lower --learning_rate, use --mixed_precision bf16 or no, then resume with --resume_from_checkpoint."
    )


def stop_requested(accelerator: Accelerator, stop: StopRequest) -> bool:
    """True on every process when any process got SIGTERM/SIGINT (they must stop at the same step)."""
    flag = torch.tensor([1.0 if stop.signal_name else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
        if flag.item() > 0 and stop.signal_name is None:
            stop.signal_name = "SIGTERM"
    return flag.item() > 0
