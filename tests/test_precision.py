"""Precision (issue 22): a precision the machine cannot train in stops the run before any model loads."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_train_args

import train_lora

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 works on a CUDA GPU")


@pytest.fixture
def models_must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the precision was checked")

    monkeypatch.setattr(train_lora, "load_models", refuse)


@cpu_only
@pytest.mark.usefixtures("models_must_not_load")
def test_fp16_flag_on_a_cpu_stops_before_the_data_is_read(
    capsys, monkeypatch, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    def refuse(*args, **kwargs):
        raise AssertionError("the data was read before the precision was checked")

    monkeypatch.setattr(train_lora, "prepare_dataset", refuse)
    code = train_lora.main(
        tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out", "--mixed_precision", "fp16")
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "--mixed_precision fp16 asks for fp16, but this run trains on the CPU" in err
    assert "--mixed_precision bf16" in err and "no (fp32)" in err
    assert not (tmp_path / "out").exists()


@cpu_only
@pytest.mark.usefixtures("models_must_not_load")
def test_fp16_from_accelerate_launch_on_a_cpu_stops_before_the_models_load(
    capsys, monkeypatch, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    # `accelerate launch --mixed_precision fp16` (or its config file) hands the precision over in this variable.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    code = train_lora.main(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert "accelerate's mixed_precision" in err and "asks for fp16, but this run trains on the CPU" in err
