"""`--auto_micro_batch` (issue 22): the largest micro-batch that fits, found by trial, without changing the run.

There is no GPU here, so out-of-memory errors are injected into the trial step at a chosen micro-batch size
(as CUDA raises them). Unit tests drive `choose_layout` with stand-ins for the models; in-process runs on the tiny
fixtures check the samples of every optimizer step, the schedule, the summary and card, and resume across
micro-batches; a subprocess run (slow) is killed with SIGKILL and resumed bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_train_args
from safetensors.torch import load_file

import train_lora
from lorakit import micro_batch
from lorakit.checkpoint import list_checkpoints
from lorakit.config import parse_args
from lorakit.micro_batch import MemoryFitError, candidate_layouts, choose_layout, micro_batch_sizes
from lorakit.summary import read_summary

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).resolve().parent / "fault_runner.py"
ADAPTER = "pytorch_lora_weights.safetensors"


def injected_oom(micro: int) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a micro-batch of {micro} (injected)")


def oom_unless(fits, real=None):
    """A trial step that raises an out-of-memory error unless `fits(micro, checkpointing)`; records its calls."""
    calls = []

    def trial(cfg, accelerator, models, micro):
        checkpointing = models.unet.is_gradient_checkpointing
        calls.append((micro, checkpointing))
        if not fits(micro, checkpointing):
            raise injected_oom(micro)
        if real is not None:
            real(cfg, accelerator, models, micro)

    trial.calls = calls
    return trial


# ---- the search, with stand-in models (no weights, no training) ----------------------------------------------------


class StubUnet:
    is_gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        self.is_gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.is_gradient_checkpointing = False


def choose(monkeypatch, fits, *flags: str, gpu: bool = False):
    cfg = parse_args(["--pretrained_model_name_or_path", "base", "--train_data_dir", "data", *flags])
    trial = oom_unless(fits)
    monkeypatch.setattr(micro_batch, "trial_step", trial)
    monkeypatch.setattr(micro_batch, "raises_on_out_of_memory", lambda device: gpu)
    models = SimpleNamespace(unet=StubUnet())
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    return choose_layout(cfg, accelerator, models, []), trial.calls, models.unet


def split(layout) -> tuple:
    """(micro-batch, accumulation steps, checkpointing) of a BatchLayout or a TrainSummary."""
    return layout.micro_batch_size, layout.gradient_accumulation_steps, layout.gradient_checkpointing


def test_sizes_halve_through_divisors_of_the_effective_batch():
    assert micro_batch_sizes(8, 8) == [8, 4, 2, 1]
    assert micro_batch_sizes(12, 12) == [12, 6, 3, 1]
    assert micro_batch_sizes(6, 6) == [6, 3, 1]
    assert micro_batch_sizes(5, 5) == [5, 1]
    assert micro_batch_sizes(8, 2) == [2, 1]  # from --train_batch_size on a CPU
    assert candidate_layouts(4, 4, checkpointing_forced=False) == [
        (4, False),
        (2, False),
        (1, False),
        (4, True),
        (2, True),
        (1, True),
    ]
    assert candidate_layouts(4, 4, checkpointing_forced=True) == [(4, True), (2, True), (1, True)]


def test_out_of_memory_above_two_gives_micro_batch_two_and_double_accumulation(monkeypatch):
    layout, calls, unet = choose(monkeypatch, lambda m, c: m <= 2, "--train_batch_size", "4", "--auto_micro_batch")
    assert split(layout) == (2, 2, False)
    assert calls == [(4, False), (2, False)] and not unet.is_gradient_checkpointing
    assert layout.auto and layout.trials == ("4: out of memory", "2: fits")
    assert "micro-batch 2 x 2 accumulation step(s) = 4 samples" in layout.describe()


def test_on_a_gpu_the_search_starts_at_the_effective_batch(monkeypatch):
    flags = ("--train_batch_size", "1", "--gradient_accumulation_steps", "4", "--auto_micro_batch")
    layout, calls, _ = choose(monkeypatch, lambda m, c: m <= 2, *flags, gpu=True)
    assert calls == [(4, False), (2, False)]
    assert (layout.micro_batch_size, layout.gradient_accumulation_steps) == (2, 2)


def test_on_a_cpu_an_explicit_accumulation_is_kept(monkeypatch):
    flags = ("--train_batch_size", "1", "--gradient_accumulation_steps", "4", "--auto_micro_batch")
    layout, calls, _ = choose(monkeypatch, lambda m, c: True, *flags)
    assert calls == [(1, False)]  # never more than --train_batch_size: a CPU out of memory kills the process
    assert split(layout) == (1, 4, False)


def test_checkpointing_only_when_a_micro_batch_of_one_does_not_fit(monkeypatch):
    flags = ("--train_batch_size", "4", "--auto_micro_batch")
    layout, calls, unet = choose(monkeypatch, lambda m, c: c and m <= 2, *flags)
    assert calls == [(4, False), (2, False), (1, False), (4, True), (2, True)]
    assert split(layout) == (2, 2, True)
    assert unet.is_gradient_checkpointing  # left on for the run


def test_asked_for_checkpointing_is_never_turned_off(monkeypatch):
    flags = ("--train_batch_size", "4", "--auto_micro_batch", "--gradient_checkpointing")
    layout, calls, unet = choose(monkeypatch, lambda m, c: True, *flags)
    assert calls == [(4, True)] and layout.gradient_checkpointing and unet.is_gradient_checkpointing


def test_nothing_fits_stops_with_what_was_tried(monkeypatch):
    with pytest.raises(MemoryFitError, match=r"not even a micro-batch of 1 .*1 with checkpointing: out of memory"):
        choose(monkeypatch, lambda m, c: False, "--train_batch_size", "2", "--auto_micro_batch")


def test_an_error_other_than_out_of_memory_is_not_swallowed(monkeypatch):
    def broken(cfg, accelerator, models, micro):
        raise RuntimeError("mat1 and mat2 must have the same dtype")

    cfg = parse_args(["--pretrained_model_name_or_path", "b", "--train_data_dir", "d", "--auto_micro_batch"])
    monkeypatch.setattr(micro_batch, "trial_step", broken)
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    with pytest.raises(RuntimeError, match="same dtype"):
        choose_layout(cfg, accelerator, SimpleNamespace(unet=StubUnet()), [])


def test_without_the_flag_the_layout_is_the_flags_and_nothing_is_tried(monkeypatch):
    flags = ("--train_batch_size", "3", "--gradient_accumulation_steps", "2", "--gradient_checkpointing")
    layout, calls, _ = choose(monkeypatch, lambda m, c: False, *flags)
    assert calls == [] and not layout.auto
    assert split(layout) == (3, 2, True)


def test_the_real_preset_chooses_its_micro_batch_and_checkpointing():
    training = parse_args(["--config", str(REPO_ROOT / "configs" / "bk-sdm-tiny-naruto.yaml")]).training
    assert training.auto_micro_batch and not training.gradient_checkpointing  # on only when 1 does not fit
    assert training.train_batch_size * training.gradient_accumulation_steps == 4
    assert not parse_args(["--config", str(REPO_ROOT / "configs" / "shapes.yaml")]).training.auto_micro_batch


# ---- real runs on the tiny fixtures, in process ------------------------------------------------------------------


def run(args: list[str], fits=None, main: bool = False):
    """Train in process with the trial step failing unless `fits(micro, checkpointing)`; record every micro-batch
    (sample indices) the loop trains on. Returns (result or exit code, micro-batches)."""
    from accelerate.state import AcceleratorState

    seen: list[list[int]] = []
    original_loss = train_lora.training_loss

    def recording_loss(models, unet, text_encoder, batch, *rest, **kwargs):
        seen.append(batch["index"].tolist())
        return original_loss(models, unet, text_encoder, batch, *rest, **kwargs)

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_lora, "training_loss", recording_loss)
        if fits is not None:
            patch.setattr(micro_batch, "trial_step", oom_unless(fits, micro_batch.trial_step))
        result = train_lora.main(args) if main else train_lora.train(parse_args(args))
    AcceleratorState._reset_state(reset_partial_state=True)
    return result, seen


def history(out: Path) -> list[dict]:
    return json.loads((out / "loss_history.json").read_text())["history"]


def pairs(batches: list[list[int]]) -> list[set[int]]:
    """Samples of each optimizer step of a micro-batch-2, accumulation-2 run (12 rows: every step is full)."""
    return [set(batches[i]) | set(batches[i + 1]) for i in range(0, len(batches), 2)]


def same_adapters(a: Path, b: Path) -> bool:
    first, second = load_file(a / ADAPTER), load_file(b / ADAPTER)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


ONE_EPOCH = ("--train_batch_size", "4", "--lr_scheduler", "linear", "--random_flip")


@pytest.fixture(scope="module")
def batch_four(tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory):
    """The reference: micro-batch 4, no accumulation, no trial."""
    out = tmp_path_factory.mktemp("batch4") / "out"
    _, seen = run(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, *ONE_EPOCH))
    return out, seen


def test_oom_above_two_trains_micro_batches_of_two_with_the_same_samples_per_step(
    batch_four, tiny_pipeline_dir, tiny_dataset_dir, tmp_path, capsys
):
    reference, reference_batches = batch_four
    out = tmp_path / "out"
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, *ONE_EPOCH, "--auto_micro_batch")
    _, seen = run(args, fits=lambda micro, checkpointing: micro <= 2)
    assert "Batch layout: micro-batch 2 x 2 accumulation step(s) = 4 samples" in capsys.readouterr().out
    assert [len(batch) for batch in seen] == [2] * 6
    assert pairs(seen) == [set(batch) for batch in reference_batches]  # each step: the same four samples
    # Same number of optimizer steps and the same schedule over them.
    assert [(r["step"], r["lr"]) for r in history(out)] == [(r["step"], r["lr"]) for r in history(reference)]
    summary = read_summary(out)
    assert (summary.micro_batch_size, summary.gradient_accumulation_steps) == (2, 2)
    assert summary.auto_micro_batch and summary.gradient_checkpointing is False and summary.global_step == 3
    card = (out / "README.md").read_text()
    assert "| Batch per optimizer step | 4 per process: micro-batch 2 x 2 (chosen by `--auto_micro_batch`) |" in card
    assert "| Gradient checkpointing | off |" in card
    reference_summary = read_summary(reference)
    assert (reference_summary.micro_batch_size, reference_summary.gradient_accumulation_steps) == (4, 1)
    assert not reference_summary.auto_micro_batch


def test_a_trial_that_keeps_the_layout_leaves_no_trace(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """The trial's gradients, random draws (LoRA dropout here) and memory are gone before the loop starts."""
    flags = ("--train_batch_size", "4", "--lora_dropout", "0.2", "--max_train_steps", "2")
    plain, auto = tmp_path / "plain", tmp_path / "auto"
    run(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, plain, *flags))
    run(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, auto, *flags, "--auto_micro_batch"))
    assert read_summary(auto).auto_micro_batch and read_summary(auto).micro_batch_size == 4
    assert history(auto) == history(plain)
    assert same_adapters(auto, plain)


def test_when_even_one_does_not_fit_checkpointing_is_turned_on(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "out"
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--max_train_steps", "1", "--auto_micro_batch")
    result, seen = run(args, fits=lambda micro, checkpointing: checkpointing and micro <= 1)
    assert result.unet.is_gradient_checkpointing and [len(batch) for batch in seen] == [1, 1]
    summary = read_summary(out)
    assert split(summary) == (1, 2, True)
    assert "| Gradient checkpointing | on |" in (out / "README.md").read_text()


TWO_EPOCHS = ("--train_batch_size", "4", "--num_train_epochs", "2", "--lr_scheduler", "cosine")


@pytest.fixture(scope="module")
def checkpointed(tiny_pipeline_dir, tiny_dataset_dir, tmp_path_factory):
    """Micro-batch 4, two epochs of three steps, a checkpoint every two steps: checkpoint-2 is mid-epoch."""
    out = tmp_path_factory.mktemp("checkpointed") / "out"
    _, seen = run(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, *TWO_EPOCHS, "--checkpointing_steps", "2"))
    return out, seen


def from_checkpoint_two(checkpointed: Path, folder: Path) -> Path:
    """An output folder holding only the run's mid-epoch checkpoint, as a run killed after it leaves."""
    folder.mkdir()
    shutil.copytree(checkpointed / "checkpoint-2", folder / "checkpoint-2")
    return folder


def test_resume_with_another_micro_batch_continues_at_the_same_sample(
    checkpointed, tiny_pipeline_dir, tiny_dataset_dir, tmp_path, capsys
):
    uninterrupted, batches = checkpointed
    out = from_checkpoint_two(uninterrupted, tmp_path / "out")
    flags = (*TWO_EPOCHS, "--auto_micro_batch", "--resume_from_checkpoint", "latest")
    _, seen = run(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, *flags), fits=lambda m, c: m <= 2)
    assert "Resumed from" in capsys.readouterr().out
    # Steps 3-6 (the rest of epoch 1, then epoch 2) with the samples the micro-batch-4 run gave them.
    assert pairs(seen) == [set(batch) for batch in batches[2:]]
    resumed, reference = history(out), history(uninterrupted)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    assert resumed[:2] == reference[:2]  # the checkpoint's history, continued
    assert [r["lr"] for r in resumed] == pytest.approx([r["lr"] for r in reference], rel=1e-9, abs=1e-15)
    summary = read_summary(out)
    assert (summary.global_step, summary.micro_batch_size, summary.gradient_accumulation_steps) == (6, 2, 2)


def test_resume_with_another_effective_batch_is_refused(
    checkpointed, tiny_pipeline_dir, tiny_dataset_dir, tmp_path, capsys
):
    out = from_checkpoint_two(checkpointed[0], tmp_path / "out")
    flags = ("--train_batch_size", "2", "--gradient_accumulation_steps", "3", "--auto_micro_batch")
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, *flags, "--resume_from_checkpoint", "latest")
    code, seen = run(args, main=True)
    err = capsys.readouterr().err
    assert code == 2 and seen == []
    assert "effective_batch_size: checkpoint 4, now 6" in err
    assert "train_batch_size x gradient_accumulation_steps per process" in err


# ---- SIGKILL and resume, in subprocesses --------------------------------------------------------------------------


def run_faulty(fault: str, args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RUNNER), fault, "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)


@pytest.mark.slow
def test_sigkill_then_resume_with_the_same_micro_batch_is_bit_exact(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    flags = (*TWO_EPOCHS, "--random_flip", "--auto_micro_batch", "--checkpointing_steps", "2")
    uninterrupted, out = tmp_path / "uninterrupted", tmp_path / "out"
    done = run_faulty("oom_above:2", tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, uninterrupted, *flags))
    assert done.returncode == 0, done.stderr[-2000:]
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, *flags)
    killed = run_faulty("oom_above:2+kill_after_checkpoint:2", args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    resumed = run_faulty("oom_above:2", [*args, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "micro-batch 2 x 2" in resumed.stdout and "checkpoint-2 at step 2." in resumed.stdout
    assert history(out) == history(uninterrupted)
    assert same_adapters(out, uninterrupted)
    assert read_summary(out).micro_batch_size == read_summary(uninterrupted).micro_batch_size == 2


@pytest.mark.slow
def test_two_processes_take_the_layout_that_fits_on_both(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    """Only process 1 runs out of memory above 1: both must accumulate 2 micro-batches of 1, or their steps would
    not line up."""
    out, seen = tmp_path / "out", tmp_path / "seen"
    seen.mkdir()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--auto_micro_batch")  # batch 2
    command = [*launcher, str(RUNNER), f"oom_above:1@1+record_indices:{seen}", "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "tried 2: out of memory; 1: fits" in completed.stdout
    per_process = [[json.loads(line) for line in (seen / f"indices-{r}.jsonl").read_text().splitlines()] for r in "01"]
    assert all(len(batch) == 1 for batches in per_process for batch in batches)
    assert sorted(i for batches in per_process for batch in batches for i in batch) == list(range(12))
    summary = read_summary(out)
    assert (summary.micro_batch_size, summary.gradient_accumulation_steps, summary.global_step) == (1, 2, 3)
