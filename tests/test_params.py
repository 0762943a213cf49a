"""Parameter counts: exact against direct sums on the tiny fixture and against BK-SDM-Tiny's published sizes."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from safetensors.torch import save_file

from lorakit.lora import DEFAULT_UNET_TARGET_MODULES
from lorakit.params import (
    count_parameters,
    lora_parameter_count,
    parameter_counts_from_configs,
    pipeline_parameter_counts,
    safetensors_parameter_count,
)
from lorakit.paths import BK_SDM_TINY_REFERENCE


def _direct_sum(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


def test_tiny_pipeline_counts_equal_direct_sums(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    counts = pipeline_parameter_counts(pipe.unet, pipe.text_encoder, pipe.vae)
    assert counts.unet == _direct_sum(pipe.unet)
    assert counts.text_encoder == _direct_sum(pipe.text_encoder)
    assert counts.vae == _direct_sum(pipe.vae)
    assert counts.vae_encoder + counts.vae_decoder == counts.vae
    assert counts.vae_encoder > _direct_sum(pipe.vae.encoder)  # quant_conv belongs to the encoder side
    assert counts.pipeline == _direct_sum(pipe.unet) + _direct_sum(pipe.text_encoder) + _direct_sum(pipe.vae)


def test_counts_from_pipeline_configs_match_loaded_weights(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert parameter_counts_from_configs(tiny_pipeline_dir) == pipeline_parameter_counts(
        pipe.unet, pipe.text_encoder, pipe.vae
    )


def test_bk_sdm_tiny_counts_from_configs_alone():
    counts = parameter_counts_from_configs(BK_SDM_TINY_REFERENCE)
    assert counts.unet == 323_384_964
    assert counts.text_encoder == 123_060_480
    assert counts.vae == 83_653_863
    assert counts.pipeline == 323_384_964 + 123_060_480 + 83_653_863


def test_bk_sdm_tiny_lora_rank4_count():
    from lorakit.params import meta_models_from_configs

    unet, _, _ = meta_models_from_configs(BK_SDM_TINY_REFERENCE)
    assert lora_parameter_count(unet, rank=4) == 431_616
    # Linear in rank: rank 8 doubles it.
    assert lora_parameter_count(unet, rank=8, target_modules=DEFAULT_UNET_TARGET_MODULES) == 2 * 431_616


def test_lora_count_matches_attached_adapter_and_leaves_unet_untouched(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    before = count_parameters(pipe.unet)
    predicted = lora_parameter_count(pipe.unet, rank=2, target_modules=["to_q", "to_v"])
    assert count_parameters(pipe.unet) == before
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    assert count_parameters(pipe.unet, trainable_only=True) == predicted
    # The base counts ignore attached LoRA layers.
    assert pipeline_parameter_counts(pipe.unet, pipe.text_encoder, pipe.vae).unet == before


def test_missing_config_names_the_component(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="unet"):
        parameter_counts_from_configs(tmp_path)


def test_safetensors_parameter_count_reads_header(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(path))
    assert safetensors_parameter_count(path) == 17
