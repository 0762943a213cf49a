"""The adapter file is a function of the weights: the same training gives the same bytes in every process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save

from lorakit.canonical_safetensors import canonical_safetensors, canonicalize_file

REPO = Path(__file__).resolve().parent.parent

SAVE_SEEDED_ADAPTER = """
import sys, torch
from diffusers import UNet2DConditionModel
from lorakit.lora import make_lora_config, save_adapter
unet = UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet")
torch.manual_seed(0)
unet.add_adapter(make_lora_config(rank=4, init_lora_weights="gaussian"))
save_adapter(sys.argv[2], unet)
"""


def save_in_fresh_process(pipeline: Path, out: Path, hash_seed: str) -> bytes:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", SAVE_SEEDED_ADAPTER, str(pipeline), str(out)], env=env, check=True, cwd=REPO)
    return (out / "pytorch_lora_weights.safetensors").read_bytes()


def test_same_weights_give_the_same_file_in_every_process(tiny_pipeline_dir, tmp_path):
    # Two sources of per-process order, both seen before the fix: peft's set of target modules (Python's string
    # hashing) and safetensors' metadata map (a Rust HashMap seeded at random in every process).
    files = [save_in_fresh_process(tiny_pipeline_dir, tmp_path / seed, seed) for seed in ("0", "3", "11", "29")]
    digests = {hashlib.sha256(data).hexdigest() for data in files}
    assert len(digests) == 1


def test_adapter_metadata_writes_target_modules_sorted(tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    from lorakit.lora import adapter_metadata, make_lora_config

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    unet.add_adapter(make_lora_config(rank=4, target_modules=("to_v", "to_q", "to_out.0", "to_k")))
    metadata = adapter_metadata(unet)
    assert metadata["target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert not any(isinstance(value, set) for value in metadata.values())


METADATA = {f"key_{index:02d}": f"value {index} é" for index in range(16)}
TENSORS = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(4, dtype=torch.float16)}


def header(data: bytes) -> dict:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])


def test_canonical_file_sorts_metadata_and_keeps_every_tensor():
    saves = [canonical_safetensors(save(TENSORS, metadata=dict(reversed(METADATA.items())))) for _ in range(5)]
    saves += [canonical_safetensors(save(TENSORS, metadata=METADATA)) for _ in range(5)]
    assert len(set(saves)) == 1
    data = saves[0]
    assert list(header(data)["__metadata__"]) == sorted(METADATA)
    loaded = load(data)
    assert set(loaded) == set(TENSORS)
    assert all(torch.equal(loaded[name], TENSORS[name]) for name in TENSORS)
    assert canonical_safetensors(data) == data


def test_canonicalize_file_keeps_metadata_readable(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(save(TENSORS, metadata=METADATA))
    canonicalize_file(path)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == METADATA
        assert torch.equal(handle.get_tensor("b.weight"), TENSORS["b.weight"])


def test_file_without_metadata_is_left_as_saved():
    data = save(TENSORS)
    assert canonical_safetensors(data) == data
