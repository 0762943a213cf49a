"""Own data (issue 18), end to end: repeat folders, buckets, exact resume, two processes, the latent cache."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_train_args
from safetensors.torch import load_file
from test_resume import ADAPTER, history_steps, run_faulty
from user_data import BUCKET_FLAGS, make_repeat_tree

import train_lora
from lorakit import training
from lorakit.checkpoint import list_checkpoints
from lorakit.config import parse_args

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerator_state")]


@pytest.fixture(scope="module")
def repeat_tree(tmp_path_factory) -> Path:
    return make_repeat_tree(tmp_path_factory.mktemp("own_data") / "data")


def train_in_process(pipeline: Path, data: Path, out: Path, *extra: str) -> train_lora.RunResult:
    AcceleratorState._reset_state(reset_partial_state=True)
    return train_lora.train(parse_args(tiny_train_args(pipeline, data, out, *extra)))


def test_repeat_tree_trains_with_the_prefix_as_trigger_word(tiny_pipeline_dir, repeat_tree, tmp_path):
    out = tmp_path / "out"
    flags = ["--caption_prefix", "blue, ", "--caption_dropout_rate", "0.1", "--validation_prompt", "a red circle"]
    flags += ["--num_validation_images", "1", "--validation_inference_steps", "2"]
    result = train_in_process(tiny_pipeline_dir, repeat_tree, out, *flags)
    assert result.state.global_step == 6  # 3 images x 3 repeats + 3 images x 1 = 12 samples, batch 2
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_samples"] == 12 and summary["data_source"]["folder_captions"] == 1
    assert summary["instance_prompt"] == "blue" and summary["bucket_histogram"] is None
    card = (out / "README.md").read_text()
    assert "**Trigger word:**" in card and "`blue`" in card and "put it in your prompts" in card
    assert "- text: blue, a red circle" in card  # the widget's prompt carries the trigger word
    assert 'pipe("blue, a red circle"' in card  # and so does the snippet's
    assert "6 images, 12 samples per epoch with repeat folders" in card


def test_bucketed_run_trains_each_shape_at_its_bucket(tiny_pipeline_dir, repeat_tree, tmp_path, monkeypatch):
    shapes = []
    original = training.batch_latents

    def record(models, batch, generator):
        latents = original(models, batch, generator)
        shapes.append(tuple(latents.shape))
        return latents

    monkeypatch.setattr(training, "batch_latents", record)
    out = tmp_path / "out"
    train_in_process(tiny_pipeline_dir, repeat_tree, out, *BUCKET_FLAGS)
    # VAE factor 4: 64x32 px -> 16x8 latents (B, C, H, W); never a centre-cropped 12x12 for a 2:1 image.
    assert sorted(shapes) == sorted([(2, 4, 8, 16)] * 2 + [(2, 4, 16, 8)] * 2 + [(2, 4, 12, 12)] * 2)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["bucket_histogram"] == {"32x64": 4, "48x48": 4, "64x32": 4}
    assert "Aspect-ratio buckets (WxH: samples) | 32x64: 4, 48x48: 4, 64x32: 4" in (out / "README.md").read_text()


def test_latent_cache_is_hit_again_and_missed_with_other_buckets(tiny_pipeline_dir, repeat_tree, tmp_path):
    cache = ["--cache_latents", "--latent_cache_dir", str(tmp_path / "cache"), "--caption_dropout_rate", "0.2"]
    first = train_in_process(tiny_pipeline_dir, repeat_tree, tmp_path / "a", *BUCKET_FLAGS, *cache)
    second = train_in_process(tiny_pipeline_dir, repeat_tree, tmp_path / "b", *BUCKET_FLAGS, *cache)
    assert first.latent_cache["hit"] is False and second.latent_cache["hit"] is True
    assert first.latent_cache["path"] == second.latent_cache["path"]
    stored = load_file(first.latent_cache["path"])
    assert stored["latent_moments.64x32"].shape == (4, 8, 8, 16)  # mean and log-variance: 2 x 4 channels
    assert stored["empty_encoder_hidden_states"].shape[0] == 1
    written, reused = load_file(tmp_path / "a" / ADAPTER), load_file(tmp_path / "b" / ADAPTER)
    for key, tensor in written.items():
        assert torch.equal(tensor, reused[key])  # the cached run trains exactly as the run that wrote the cache
    other = [*BUCKET_FLAGS[:-1], "48"]  # --max_bucket_reso 48: the 2:1 and 1:2 images get other buckets
    third = train_in_process(tiny_pipeline_dir, repeat_tree, tmp_path / "c", *other, *cache)
    assert third.latent_cache["hit"] is False and third.latent_cache["path"] != first.latent_cache["path"]


def bucket_args(pipeline: Path, data: Path, out: Path, *extra: str) -> list[str]:
    captions = ["--caption_prefix", "blue, ", "--shuffle_caption", "--caption_dropout_rate", "0.3"]
    augment = ["--random_flip", "--lr_scheduler", "cosine"]
    return tiny_train_args(pipeline, data, out, *BUCKET_FLAGS, *captions, *augment, *extra)


def test_sigkill_then_resume_with_buckets_is_bit_exact(tiny_pipeline_dir, repeat_tree, tmp_path):
    whole = tmp_path / "whole"
    completed = run_faulty("none", bucket_args(tiny_pipeline_dir, repeat_tree, whole, "--num_train_epochs", "2"))
    assert completed.returncode == 0, completed.stderr[-2000:]
    out = tmp_path / "out"
    args = bucket_args(tiny_pipeline_dir, repeat_tree, out, "--num_train_epochs", "2", "--checkpointing_steps", "4")
    killed = run_faulty("kill_after_checkpoint:8", args)  # in the second epoch, mid-way
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-8"]
    resumed = run_faulty("none", [*args, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert history_steps(out) == list(range(1, 13))
    first, second = load_file(out / ADAPTER), load_file(whole / ADAPTER)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    losses = [json.loads((run / "loss_history.json").read_text())["history"] for run in (out, whole)]
    assert [row["loss"] for row in losses[0]] == [row["loss"] for row in losses[1]]


def test_two_processes_see_each_bucketed_sample_once(tiny_pipeline_dir, repeat_tree, tmp_path):
    out, seen = tmp_path / "out", tmp_path / "seen"
    seen.mkdir()
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    completed = run_faulty(
        f"record_indices:{seen}",
        tiny_train_args(tiny_pipeline_dir, repeat_tree, out, *BUCKET_FLAGS),
        launcher,
        ACCELERATE_USE_CPU="true",
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    batches = {
        rank: [json.loads(line) for line in (seen / f"indices-{rank}.jsonl").read_text().splitlines()]
        for rank in ("0", "1")
    }
    assert len(batches["0"]) == len(batches["1"]) == 3  # 12 samples, 6 one-bucket batches of 2
    indices = [i for rank in batches.values() for batch in rank for i in batch]
    assert sorted(indices) == list(range(12))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 3


def test_bucketed_resume_under_another_micro_batch_is_refused(tiny_pipeline_dir, repeat_tree, tmp_path, capsys):
    out = tmp_path / "out"
    train_in_process(tiny_pipeline_dir, repeat_tree, out, *BUCKET_FLAGS, "--checkpointing_steps", "3")
    AcceleratorState._reset_state(reset_partial_state=True)
    split = ["--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest"]
    code = train_lora.main(tiny_train_args(tiny_pipeline_dir, repeat_tree, out, *BUCKET_FLAGS, *split))
    err = capsys.readouterr().err
    assert code == 2 and "bucket_batch_size: checkpoint 2, now 1" in err
