"""The real BK-SDM-Tiny architecture (random weights, configs/architectures/ configs) goes through the trainer."""

from __future__ import annotations

import json

import pytest
from accelerate.state import AcceleratorState
from safetensors import safe_open

import train_lora
from lorakit.config import parse_args
from lorakit.paths import BK_SDM_TINY_REFERENCE
from lorakit.reference import build_reference_pipeline

# A 530M-parameter model built and trained for a step: part of the whole suite, not the inner loop.
pytestmark = pytest.mark.slow

# configs/architectures/bk-sdm-tiny/README.md (diffusers 0.42 / transformers 5.x).
BK_SDM_TINY_LORA_RANK4 = 431_616


@pytest.fixture(scope="module")
def bk_sdm_tiny_dir(tmp_path_factory):
    return build_reference_pipeline(BK_SDM_TINY_REFERENCE, tmp_path_factory.mktemp("bk-sdm-tiny"))


def test_bk_sdm_tiny_architecture_trains_through_the_same_code_path(bk_sdm_tiny_dir, tiny_dataset_dir, tmp_path):
    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "out"
    result = train_lora.train(
        parse_args(
            [
                "--pretrained_model_name_or_path",
                str(bk_sdm_tiny_dir),
                "--train_data_dir",
                str(tiny_dataset_dir),
                "--resolution",
                "64",
                "--rank",
                "4",
                "--max_train_steps",
                "1",
                "--output_dir",
                str(out),
                "--report_to",
                "none",
            ]
        )
    )
    trainable = sum(p.numel() for p in result.unet.parameters() if p.requires_grad)
    assert trainable == BK_SDM_TINY_LORA_RANK4
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["lora_trainable_parameters"] == BK_SDM_TINY_LORA_RANK4
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as adapter:
        stored = sum(
            adapter.get_slice(key).get_shape()[0] * adapter.get_slice(key).get_shape()[1] for key in adapter.keys()
        )
    assert stored == BK_SDM_TINY_LORA_RANK4
    assert summary["global_step"] == 1 and summary["final_loss"] > 0
