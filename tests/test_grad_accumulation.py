"""`--gradient_accumulation_steps 2` through the real trainer on the tiny fixtures.

In-process runs record every batch loss the loop computes, the LoRA weights each batch saw and the learning
rate of every real optimizer step; they check the step count, the schedule and the logged loss against those.
Subprocess runs (slow) kill the trainer with SIGKILL and check that `--resume_from_checkpoint latest` ends
with the same adapter, bit for bit, as a run that was never interrupted.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_train_args
from safetensors.torch import load_file

import train_lora
from lorakit.checkpoint import list_checkpoints
from lorakit.config import parse_args

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "fault_runner.py"
ADAPTER = "pytorch_lora_weights.safetensors"
LEARNING_RATE = 1e-3  # tiny_train_args

# name: (extra flags, batches per epoch, epochs). The second has an odd number of batches per epoch, so each
# epoch ends with a one-batch step (accelerate syncs at the end of the dataloader).
LAYOUTS = {
    "batch2-1epoch": (["--train_batch_size", "2"], 6, 1),
    "batch4-2epochs": (["--train_batch_size", "4", "--num_train_epochs", "2"], 3, 2),
}


def expected_groups(batches_per_epoch: int, epochs: int) -> list[list[int]]:
    """Indices (over the whole run) of the batches each optimizer step accumulates: pairs, restarting per epoch."""
    groups = []
    for epoch in range(epochs):
        first = epoch * batches_per_epoch
        for start in range(0, batches_per_epoch, 2):
            groups.append(list(range(first + start, first + min(start + 2, batches_per_epoch))))
    return groups


def read_history(out: Path) -> list[dict]:
    return json.loads((out / "loss_history.json").read_text())["history"]


@dataclass
class Recorded:
    out: Path
    batches_per_epoch: int
    epochs: int
    batch_losses: list[float] = field(default_factory=list)  # every loss training_loss returned, in order
    lora_seen: list[torch.Tensor] = field(default_factory=list)  # the LoRA weights each of those batches used
    step_lrs: list[float] = field(default_factory=list)  # learning rate of each real optimizer step
    noise_seeds: list[int] = field(default_factory=list)  # seed of the generator each batch drew its noise from

    @property
    def total_steps(self) -> int:
        return math.ceil(self.batches_per_epoch / 2) * self.epochs


def lora_vector(unet: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for name, p in unet.named_parameters() if "lora_" in name])


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def recorded(request, tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory) -> Recorded:
    """One in-process linear-schedule run with accumulation 2, watched from the loss function and optimizer."""
    flags, batches_per_epoch, epochs = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(f"accum-{request.param}") / "out"
    record = Recorded(out, batches_per_epoch, epochs)
    original_loss, original_optimizer = train_lora.training_loss, train_lora.make_optimizer

    def recording_loss(models, unet, *args, **kwargs):
        record.lora_seen.append(lora_vector(unet))
        call = inspect.signature(original_loss).bind(models, unet, *args, **kwargs)
        record.noise_seeds.append(call.arguments["generator"].initial_seed())
        loss = original_loss(models, unet, *args, **kwargs)
        record.batch_losses.append(loss.detach().float().item())
        return loss

    def watched_optimizer(*args, **kwargs):
        optimizer = original_optimizer(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda opt, *_: record.step_lrs.append(opt.param_groups[0]["lr"]))
        return optimizer

    args = tiny_train_args(
        tiny_pipeline_dir,
        tiny_dataset_dir,
        out,
        "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear", "--lr_warmup_steps", "0",
        *flags,
    )  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_lora, "training_loss", recording_loss)
        patch.setattr(train_lora, "make_optimizer", watched_optimizer)
        train_lora.train(parse_args(args))
    AcceleratorState._reset_state(reset_partial_state=True)
    assert record.batch_losses, "the loop no longer calls train_lora.training_loss: update this test's hook"
    return record


def test_one_optimizer_step_per_two_batches(recorded):
    total = recorded.total_steps
    assert total == {6: 3, 3: 2}[recorded.batches_per_epoch] * recorded.epochs  # ceil(batches / 2) per epoch
    assert len(recorded.batch_losses) == recorded.batches_per_epoch * recorded.epochs  # every batch once
    assert len(recorded.step_lrs) == total  # the real optimizer stepped once per step, not per batch
    summary = json.loads((recorded.out / "train_summary.json").read_text())
    assert summary["global_step"] == total
    assert [row["step"] for row in read_history(recorded.out)] == list(range(1, total + 1))


def test_weights_change_only_between_accumulation_groups(recorded):
    seen = recorded.lora_seen
    for group in expected_groups(recorded.batches_per_epoch, recorded.epochs):
        for index in group[1:]:
            assert torch.equal(seen[index], seen[group[0]]), f"weights moved inside the step of batches {group}"
        if group[0] > 0:
            assert not torch.equal(seen[group[0]], seen[group[0] - 1]), f"no update before batch {group[0]}"


def test_each_batch_of_a_step_draws_its_own_noise(recorded):
    """Noise and timesteps are seeded per batch, not per optimizer step: the two halves of a step differ."""
    assert len(recorded.noise_seeds) == len(recorded.batch_losses)
    assert len(set(recorded.noise_seeds)) == len(recorded.noise_seeds)


def test_linear_schedule_advances_once_per_optimizer_step(recorded):
    total = recorded.total_steps
    # Step k (from 1) runs at lr0 * (1 - (k - 1) / total): decay over optimizer steps, not over batches.
    assert recorded.step_lrs == pytest.approx([LEARNING_RATE * (1 - k / total) for k in range(total)], rel=1e-9)
    # loss_history records the scheduler's lr after its step, i.e. the one the next step will use.
    logged = [row["lr"] for row in read_history(recorded.out)]
    assert logged == pytest.approx([LEARNING_RATE * (1 - k / total) for k in range(1, total + 1)], rel=1e-9, abs=1e-15)


def test_logged_loss_is_the_mean_of_its_batch_losses(recorded):
    groups = expected_groups(recorded.batches_per_epoch, recorded.epochs)
    expected = [sum(recorded.batch_losses[i] for i in group) / len(group) for group in groups]
    history = read_history(recorded.out)
    assert [row["loss"] for row in history] == pytest.approx(expected, rel=1e-9)
    # Not the last (or first) batch alone: the two losses of every full step differ here.
    assert all(recorded.batch_losses[g[0]] != recorded.batch_losses[g[-1]] for g in groups if len(g) == 2)
    summary = json.loads((recorded.out / "train_summary.json").read_text())
    assert summary["final_loss"] == history[-1]["loss"]


# Resume after SIGKILL. Three batches per epoch, two epochs: steps are batches (1,2) (3) | (4,5) (6), with a
# checkpoint after every step. Same flags as the in-process layout "batch4-2epochs", plus random flips and a
# cosine schedule so that the RNG and scheduler state both have to come back.
def resume_args(pipeline: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_args(
        pipeline,
        data,
        out,
        "--gradient_accumulation_steps", "2", "--train_batch_size", "4", "--num_train_epochs", "2",
        "--lr_scheduler", "cosine", "--random_flip", "--checkpointing_steps", "1",
        *extra,
    )  # fmt: skip


def run_faulty(fault: str, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RUNNER), fault, "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)


def assert_bit_identical_adapters(a: Path, b: Path) -> None:
    first, second = load_file(a / ADAPTER), load_file(b / ADAPTER)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def uninterrupted_accum(tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("accum-uninterrupted") / "out"
    completed = run_faulty("none", resume_args(tiny_pipeline_dir, tiny_dataset_dir, out))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert [row["step"] for row in read_history(out)] == [1, 2, 3, 4]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "checkpoints_left", "resumed_at"),
    [
        # Killed right after the step-1 checkpoint, mid-epoch: the resumed run starts at batch 3, the epoch's
        # last, which must still be a step of its own (end of dataloader) and not pair with epoch 2's first.
        ("kill_after_checkpoint:1", ["checkpoint-1"], 1),
        # Killed as batch 5 starts: batch 4's gradient is accumulated but not applied. The resumed run goes back
        # to the step-2 checkpoint (end of epoch 1) and must redo batch 4 from that state.
        ("kill_at_batch:5", ["checkpoint-1", "checkpoint-2"], 2),
    ],
    ids=["after-checkpoint-mid-epoch", "mid-accumulation"],
)
def test_sigkill_then_resume_gives_the_uninterrupted_adapter_bit_for_bit(
    uninterrupted_accum, tiny_pipeline_dir, tiny_dataset_dir, tmp_path, fault, checkpoints_left, resumed_at
):
    out = tmp_path / "out"
    args = resume_args(tiny_pipeline_dir, tiny_dataset_dir, out)
    killed = run_faulty(fault, args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == checkpoints_left
    assert not (out / ADAPTER).exists()
    resumed = run_faulty("none", [*args, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoint-{resumed_at} at step {resumed_at}." in resumed.stdout + resumed.stderr
    assert read_history(out) == read_history(uninterrupted_accum)  # same steps, losses and lrs, each once
    assert json.loads((out / "train_summary.json").read_text())["global_step"] == 4
    assert_bit_identical_adapters(out, uninterrupted_accum)
