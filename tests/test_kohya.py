"""Kohya/webui export: key naming, the trained alpha, and a lossless round trip through diffusers' loader."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from fake_run import LORA_ALPHA, RANK, make_run_folder
from safetensors.torch import load_file, save_file

from lorakit.filenames import ADAPTER_FILE, KOHYA_FILE
from lorakit.kohya import diffusers_to_kohya, export_kohya


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pipeline_dir):
    out = make_run_folder(tmp_path_factory.mktemp("kohya") / "run", tiny_pipeline_dir)
    export_kohya(out)
    return out


def _generate(base, folder=None, weight_name=None) -> torch.Tensor:
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.load_lora_weights(folder, weight_name=weight_name)
    generator = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=3, generator=generator, output_type="pt").images


def test_kohya_keys_follow_webui_naming(run_dir):
    kohya = load_file(run_dir / KOHYA_FILE)
    diffusers_state = load_file(run_dir / ADAPTER_FILE)
    expected = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert f"{expected}.lora_down.weight" in kohya
    assert f"{expected}.lora_up.weight" in kohya
    assert f"{expected}.alpha" in kohya
    assert "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in kohya
    for key in kohya:
        module, _, suffix = key.partition(".")
        assert module.startswith("lora_unet_") and "." not in module, key
        assert suffix in {"lora_down.weight", "lora_up.weight", "alpha"}, key
    # One (down, up, alpha) triple per adapted layer of the diffusers file, nothing lost or invented.
    assert len(kohya) == len(diffusers_state) // 2 * 3
    diffusers_q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    down = diffusers_state.get(f"{diffusers_q}.lora.down.weight", diffusers_state.get(f"{diffusers_q}.lora_A.weight"))
    assert torch.equal(kohya[f"{expected}.lora_down.weight"], down)
    assert kohya[f"{expected}.lora_down.weight"].shape[0] == RANK


def test_kohya_alpha_is_trained_lora_alpha_not_rank(run_dir):
    kohya = load_file(run_dir / KOHYA_FILE)
    config_alpha = yaml.safe_load((run_dir / "training_config.yaml").read_text())["lora"]["lora_alpha"]
    alphas = {key: float(value) for key, value in kohya.items() if key.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {float(config_alpha)}
    assert config_alpha == LORA_ALPHA != RANK  # the fixture makes a lost alpha observable


def test_kohya_round_trip_gives_same_images_as_diffusers_adapter(run_dir, tiny_pipeline_dir):
    base = _generate(tiny_pipeline_dir)
    diffusers_out = _generate(tiny_pipeline_dir, run_dir, ADAPTER_FILE)
    kohya_out = _generate(tiny_pipeline_dir, run_dir, KOHYA_FILE)
    assert not torch.allclose(base, diffusers_out, atol=1e-3), "adapter should change the output"
    assert torch.allclose(diffusers_out, kohya_out, atol=1e-5)


def test_kohya_accepts_peft_key_layout(run_dir):
    diffusers_state = load_file(run_dir / ADAPTER_FILE)
    peft_state = {
        k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v for k, v in diffusers_state.items()
    }
    from_peft = diffusers_to_kohya(peft_state, 3.0)
    from_diffusers = diffusers_to_kohya(diffusers_state, 3.0)
    assert from_peft.keys() == from_diffusers.keys()
    assert all(torch.equal(from_peft[k], from_diffusers[k]) for k in from_peft)


def test_kohya_export_errors_name_the_fix(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        export_kohya(tmp_path)
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    config = yaml.safe_load((broken / "training_config.yaml").read_text())
    del config["lora"]["lora_alpha"]
    (broken / "training_config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="lora_alpha"):
        export_kohya(broken)
    with pytest.raises(ValueError, match="LoRA state dict"):
        diffusers_to_kohya({"unet.conv_in.weight": torch.zeros(1)}, 4.0)


def test_kohya_text_encoder_lora_uses_webui_clip_names_and_round_trips(tmp_path, tiny_pipeline_dir):
    run_dir = make_run_folder(tmp_path / "te", tiny_pipeline_dir, train_text_encoder=True)
    kohya = load_file(export_kohya(run_dir))
    te_keys = [k for k in kohya if k.startswith("lora_te")]
    # `lora_te_`, not diffusers' `lora_te1_`: A1111 maps only `lora_te_` onto SD2's text encoder.
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in te_keys
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)
    assert {float(kohya[k]) for k in te_keys if k.endswith(".alpha")} == {LORA_ALPHA}
    diffusers_out = _generate(tiny_pipeline_dir, run_dir, ADAPTER_FILE)
    kohya_out = _generate(tiny_pipeline_dir, run_dir, KOHYA_FILE)
    assert torch.allclose(diffusers_out, kohya_out, atol=1e-5)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.load_lora_weights(run_dir, weight_name=KOHYA_FILE)
    assert any("lora" in name for name, _ in pipe.text_encoder.named_parameters())


def test_kohya_warns_when_diffusers_file_lacks_alpha_metadata(run_dir, tmp_path, caplog):
    # Without lora_adapter_metadata diffusers loads alpha = rank, so the two files would disagree: say so.
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    save_file(load_file(bare / ADAPTER_FILE), bare / ADAPTER_FILE)
    with caplog.at_level(logging.WARNING, logger="lorakit.kohya"):
        export_kohya(bare)
    assert "no lora_adapter_metadata" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lorakit.kohya"):
        export_kohya(run_dir)
    assert caplog.text == ""
