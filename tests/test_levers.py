"""Trainer levers: latent cache (same loss, reuse, invalidation), phase timer, init adapter, data mixing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import make_tiny_imagefolder, tiny_train_args
from safetensors.torch import load_file

import train_lora
from lorakit.config import parse_args
from lorakit.data import prepare_dataset
from lorakit.timing import PHASES, PhaseTimer

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


def args(pipeline: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return tiny_train_args(pipeline, data, out, "--overwrite_output_dir", *extra)


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in json.loads((out / "loss_history.json").read_text())["history"]]


def test_cached_latents_give_the_same_losses_and_are_reused(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    cache = tmp_path / "cache"
    plain = train_lora.train(parse_args(args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "plain")))
    first = train_lora.train(
        parse_args(args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "a", "--cache_latents",
                        "--latent_cache_dir", str(cache)))
    )  # fmt: skip
    assert first.latent_cache["hit"] is False and len(list(cache.glob("*.safetensors"))) == 1
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
    AcceleratorState._reset_state(reset_partial_state=True)
    sweep = train_lora.train(
        parse_args(args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "b", "--cache_latents",
                        "--latent_cache_dir", str(cache), "--learning_rate", "5e-4"))
    )  # fmt: skip
    assert sweep.latent_cache["hit"] is True  # a learning-rate sweep encodes once
    assert plain.state.global_step == sweep.state.global_step == 6


def test_cache_is_invalidated_when_the_resolution_or_data_change(tiny_pipeline_dir, tmp_path):
    cache, data = tmp_path / "cache", make_tiny_imagefolder(tmp_path / "data", rows=4)
    common = ["--cache_latents", "--latent_cache_dir", str(cache), "--max_train_steps", "1"]
    train_lora.train(parse_args(args(tiny_pipeline_dir, data, tmp_path / "o", *common)))
    AcceleratorState._reset_state(reset_partial_state=True)
    second = train_lora.train(parse_args(args(tiny_pipeline_dir, data, tmp_path / "o", *common, "--center_crop")))
    assert second.latent_cache["hit"] is False
    make_tiny_imagefolder(data, rows=5, seed=1)  # new rows and new pixels
    AcceleratorState._reset_state(reset_partial_state=True)
    third = train_lora.train(parse_args(args(tiny_pipeline_dir, data, tmp_path / "o", *common)))
    assert third.latent_cache["hit"] is False and len(list(cache.glob("*.safetensors"))) == 3


def test_with_a_warm_cache_the_vae_and_text_encoder_never_run(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, monkeypatch
):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    calls = {"vae_encode": 0, "text_encoder": 0}
    encode, forward = AutoencoderKL.encode, CLIPTextModel.forward

    def counted_encode(self, *args, **kwargs):
        calls["vae_encode"] += 1
        return encode(self, *args, **kwargs)

    def counted_forward(self, *args, **kwargs):
        calls["text_encoder"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counted_encode)
    monkeypatch.setattr(CLIPTextModel, "forward", counted_forward)
    cache = tmp_path / "cache"
    plain_timer = PhaseTimer()
    train_lora.train(parse_args(args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "p")), timer=plain_timer)
    assert calls == {"vae_encode": 6, "text_encoder": 6}  # one per batch of the epoch
    assert set(plain_timer.per_step()) == set(PHASES) and plain_timer.steps == 6
    assert all(
        plain_timer.per_step()[phase] > 0 for phase in ("vae_encoding", "text_encoding", "unet_forward_backward")
    )
    cached_args = args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "c", "--cache_latents", "--latent_cache_dir",
                       str(cache))  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    train_lora.train(parse_args(cached_args))  # encodes the cache: whole dataset in batches of 8
    calls.update(vae_encode=0, text_encoder=0)
    AcceleratorState._reset_state(reset_partial_state=True)
    warm = train_lora.train(parse_args(cached_args))
    assert warm.latent_cache["hit"] is True
    assert calls == {"vae_encode": 0, "text_encoder": 0}


def test_init_adapter_starts_from_an_existing_adapter(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    first = tmp_path / "first"
    train_lora.train(parse_args(args(tiny_pipeline_dir, tiny_dataset_dir, first, "--max_train_steps", "2")))
    AcceleratorState._reset_state(reset_partial_state=True)
    result = train_lora.train(
        parse_args(args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "second", "--init_adapter", str(first),
                        "--learning_rate", "1e-12", "--max_train_steps", "1"))
    )  # fmt: skip
    start, after = (
        load_file(first / "pytorch_lora_weights.safetensors"),
        load_file(tmp_path / "second" / "pytorch_lora_weights.safetensors"),
    )
    assert start.keys() == after.keys()
    for key in start:  # a learning rate of 1e-12 leaves the initial adapter as it was loaded
        assert torch.allclose(start[key], after[key], atol=1e-6), key
    assert result.state.global_step == 1


def test_mixing_datasets_replays_old_data_at_the_stated_share(tmp_path):
    new = make_tiny_imagefolder(tmp_path / "new", rows=12, seed=0)
    old = make_tiny_imagefolder(tmp_path / "old", rows=12, seed=1)
    for folder, tag in ((new, "new"), (old, "old")):
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        text = "".join(json.dumps({**row, "text": f"{tag} {row['text']}"}) + "\n" for row in rows)
        (folder / "metadata.jsonl").write_text(text)
    cfg = parse_args(["--train_data_dir", str(new), "--mix_train_data_dir", str(old), "--mix_weights", "3", "1"])
    data = prepare_dataset(cfg.data, seed=0)
    captions = data.rows[data.caption_column]
    new_count = sum(c.startswith("new") for c in captions)
    assert new_count == 12 and len(set(c for c in captions if c.startswith("new"))) <= 12
    assert 1 <= len(captions) - new_count <= 8  # about a quarter of the epoch is replayed old data


def test_mix_weights_must_match_the_datasets(capsys, tiny_dataset_dir):
    code = train_lora.main(["--train_data_dir", str(tiny_dataset_dir), "--mix_train_data_dir", "x", "--mix_weights",
                            "1"])  # fmt: skip
    assert code == 2 and "--mix_weights needs 2 values" in capsys.readouterr().err


def test_persistent_workers_follow_the_epoch(tiny_dataset_dir):
    import datasets

    from lorakit.data import CaptionedImageDataset, collate_examples
    from lorakit.tokenizer import build_clip_tokenizer

    rows = datasets.load_dataset(str(tiny_dataset_dir), split="train")
    dataset = CaptionedImageDataset(rows, "image", "text", build_clip_tokenizer(["a"]), 32, False, True, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=12, num_workers=1, persistent_workers=True, collate_fn=collate_examples
    )
    per_epoch = []
    for epoch in range(3):
        dataset.set_epoch(epoch)
        per_epoch.append(next(iter(loader))["pixel_values"])
    in_process = collate_examples([dataset[i] for i in range(12)])["pixel_values"]  # epoch 2, main process
    assert not torch.equal(per_epoch[0], per_epoch[1]) and not torch.equal(per_epoch[1], per_epoch[2])
    assert torch.equal(per_epoch[2], in_process)  # the worker drew exactly what epoch 2 draws anywhere


def test_cache_is_keyed_by_the_precision_the_encoders_ran_in(tiny_pipeline_dir, tmp_path):
    cache, data = tmp_path / "cache", make_tiny_imagefolder(tmp_path / "data", rows=4)
    common = ["--cache_latents", "--latent_cache_dir", str(cache), "--max_train_steps", "1"]
    runs = {}
    for attempt in ("first", "second"):
        for precision in ("no", "bf16"):
            AcceleratorState._reset_state(reset_partial_state=True)
            result = train_lora.train(
                parse_args(args(tiny_pipeline_dir, data, tmp_path / "o", *common, "--mixed_precision", precision))
            )
            runs[attempt, precision] = result.latent_cache
    assert runs["first", "no"]["path"] != runs["first", "bf16"]["path"]  # one file per precision
    assert not runs["first", "no"]["hit"] and not runs["first", "bf16"]["hit"]
    for precision in ("no", "bf16"):  # each precision finds its own file again
        assert runs["second", precision] == {"path": runs["first", precision]["path"], "hit": True}
    assert len(list(cache.glob("*.safetensors"))) == 2
    fp32, bf16 = (load_file(runs["first", precision]["path"])["latent_moments"] for precision in ("no", "bf16"))
    assert not torch.equal(fp32, bf16)  # what the key now separates: bf16 encoding rounds the moments
