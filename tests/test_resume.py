"""Checkpoints, exact resume and fault tolerance (issue 4). Faults are real signals sent to real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_train_args
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import train_lora
from lorakit.checkpoint import list_checkpoints
from lorakit.config import parse_args
from lorakit.run_state import upgrade_saved_state

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "fault_runner.py"
ADAPTER = "pytorch_lora_weights.safetensors"


def train_args(pipeline: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_args(pipeline, data, out, "--lr_scheduler", "cosine", "--random_flip", *extra)


def run_faulty(
    fault: str, args: list[str], launcher: list[str] | None = None, **env_vars: str
) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), str(RUNNER), fault, "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_vars}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)


def history_steps(out: Path) -> list[int]:
    return [row["step"] for row in json.loads((out / "loss_history.json").read_text())["history"]]


def assert_same_adapter(a: Path, b: Path) -> None:
    first, second = load_file(a / ADAPTER), load_file(b / ADAPTER)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.allclose(first[key], second[key], atol=1e-6), key


@pytest.fixture(scope="module")
def uninterrupted(tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    completed = run_faulty("none", train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--checkpointing_steps", "2"))
    assert completed.returncode == 0, completed.stderr[-2000:]
    return out


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(
    uninterrupted, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    out = tmp_path / "out"
    args = train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--checkpointing_steps", "2")
    killed = run_faulty("kill_after_checkpoint:4", args)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / ADAPTER).exists()
    resumed = run_faulty("none", [*args, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resumed from" in resumed.stdout + resumed.stderr
    assert history_steps(out) == list(range(1, 7))  # each step once
    assert_same_adapter(out, uninterrupted)
    uninterrupted_losses = json.loads((uninterrupted / "loss_history.json").read_text())["history"]
    resumed_losses = json.loads((out / "loss_history.json").read_text())["history"]
    assert [round(r["loss"], 6) for r in resumed_losses] == [round(r["loss"], 6) for r in uninterrupted_losses]


@pytest.mark.slow
def test_sigkill_inside_a_checkpoint_write_leaves_the_previous_one_loadable(
    uninterrupted, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    out = tmp_path / "out"
    args = train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--checkpointing_steps", "2")
    killed = run_faulty("kill_inside_save:4", args)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]  # the torn one never got its name
    state = json.loads((out / "checkpoint-2" / "train_state.json").read_text())
    assert state["global_step"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora_weights(out / "checkpoint-2")  # a checkpoint is a loadable adapter too
    resumed = run_faulty("none", [*args, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert history_steps(out) == list(range(1, 7))
    assert_same_adapter(out, uninterrupted)
    assert not list(out.glob(".tmp-*"))  # the torn temporary folder is cleaned up


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_latest_finishes_the_epoch(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "out"
    args = train_args(tiny_pipeline_dir, tiny_dataset_dir, out)
    stopped = run_faulty("sigterm_at_step:3", args)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "--resume_from_checkpoint latest" in stopped.stdout
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    resumed = run_faulty("none", [*args, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert history_steps(out) == list(range(1, 7))
    assert (out / ADAPTER).is_file()


def test_checkpoints_total_limit_keeps_exactly_k(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "out"
    train_lora.train(
        parse_args(
            train_args(
                tiny_pipeline_dir,
                tiny_dataset_dir,
                out,
                "--checkpointing_steps",
                "1",
                "--checkpoints_total_limit",
                "2",
            )
        )
    )
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5", "checkpoint-6"]


def test_resume_with_a_changed_batch_size_is_refused(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, capsys):
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "out"
    train_lora.train(parse_args(train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--checkpointing_steps", "3")))
    AcceleratorState._reset_state(reset_partial_state=True)
    code = train_lora.main(
        train_args(
            tiny_pipeline_dir,
            tiny_dataset_dir,
            out,
            "--train_batch_size",
            "3",
            "--resume_from_checkpoint",
            "latest",
            "--rank",
            "8",
        )
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "effective_batch_size: checkpoint 2, now 3" in err and "rank: checkpoint 4, now 8" in err


def test_a_checkpoint_written_before_steps_in_epoch_resumes_in_optimizer_steps():
    """Older checkpoints counted batches of their train_batch_size and fingerprinted both batch flags."""
    old = {"global_step": 3, "epoch": 0, "batches_in_epoch": 5, "loss_history": []}
    old["fingerprint"] = {"data": "x", "train_batch_size": 1, "gradient_accumulation_steps": 2, "rank": 4}
    upgraded = upgrade_saved_state(old)
    assert upgraded["steps_in_epoch"] == 3  # the last step of the epoch took one batch: ceil(5 / 2)
    assert upgraded["fingerprint"] == {"data": "x", "rank": 4, "effective_batch_size": 2}
    assert upgrade_saved_state(upgraded) == upgraded


def test_nan_loss_stops_with_step_and_last_good_checkpoint(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, monkeypatch, capsys
):
    AcceleratorState._reset_state(reset_partial_state=True)
    original = train_lora.training_loss
    calls = {"n": 0}

    def nan_from_fifth_call(*args, **kwargs):
        calls["n"] += 1
        loss = original(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(train_lora, "training_loss", nan_from_fifth_call)
    out = tmp_path / "out"
    code = train_lora.main(train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--checkpointing_steps", "2"))
    err = capsys.readouterr().err
    assert code == 3
    assert "The loss became nan at step 5" in err and f"Last good checkpoint: {out / 'checkpoint-4'}" in err
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora_weights(out / "checkpoint-4")
    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-4" / ADAPTER).values())


@pytest.mark.slow
def test_two_processes_see_each_sample_once_and_write_one_adapter(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    out, seen = tmp_path / "out", tmp_path / "seen"
    seen.mkdir()
    # accelerate 1.x runs `--cpu --num_processes 2` as one process; DDP on CPU (gloo) is the multi-process
    # launcher with ACCELERATE_USE_CPU set, as the README documents.
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    completed = run_faulty(
        f"record_indices:{seen}",
        train_args(tiny_pipeline_dir, tiny_dataset_dir, out),
        launcher,
        ACCELERATE_USE_CPU="true",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    per_process = [
        [i for line in (seen / f"indices-{rank}.jsonl").read_text().splitlines() for i in json.loads(line)]
        for rank in ("0", "1")
    ]
    assert sorted(per_process[0] + per_process[1]) == list(range(12))  # 12 rows, each seen once overall
    assert len(per_process[0]) == len(per_process[1]) == 6
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 3
    assert list(out.glob("*.safetensors")) == [out / ADAPTER]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    base = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    pipe.load_lora_weights(out)
    adapted = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert (adapted - base).abs().max() > 1e-4
