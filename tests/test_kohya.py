"""Kohya/webui export: key naming against the loaders' rules, learned words, metadata, the trained alpha, and a
lossless round trip through diffusers' loader."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, tiny_train_args
from diffusers import StableDiffusionPipeline
from fake_run import DATASET_ID, LORA_ALPHA, RANK, make_run_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit.filenames import ADAPTER_FILE, KOHYA_EMBEDDINGS_DIR, KOHYA_FILE, LEARNED_EMBEDS_FILE
from lorakit.hub import UPLOAD_PATTERNS
from lorakit.kohya import base_version, bundled_embeddings, diffusers_to_kohya, export_kohya, tag_frequency
from lorakit.token_embeddings import load_learned_words, save_learned_embeds

WORD = "blue"  # one token of the tiny tokenizer, so diffusers' load_textual_inversion can add it
CAPTIONS = ["a blue circle, Shiny", "a red square ,shiny, ", ["a blue square", "a blue circle, shiny"]]
# What the captions above count to, tag by tag (comma-split, stripped, lower-cased, as sd-scripts counts).
EXPECTED_TAGS = {"a blue circle": 2, "shiny": 3, "a red square": 1, "a blue square": 1}
METADATA_KEYS = {
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_base_model_version",
    "ss_v2",
    "ss_resolution",
    "ss_num_train_images",
    "ss_output_name",
    "ss_tag_frequency",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.title",
    "modelspec.resolution",
    "modelspec.date",
}
# ComfyUI's text-encoder key map (comfy/lora.py, LORA_CLIP_MAP in model_lora_keys_clip): the only CLIP layers a
# `lora_te_text_model_encoder_layers_<i>_<name>` key may name, and the module each name stands for.
CLIP_LAYER_NAMES = {
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
}
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


def loader_rule_violations(
    kohya: dict[str, torch.Tensor], unet: torch.nn.Module, text_encoder: torch.nn.Module
) -> list[str]:
    """Every way the LoRA keys of a kohya file break the rules of the webui loaders; empty when they load.

    - A1111 (extensions-builtin/Lora/networks.py, load_network) splits a key at its first dot into module and
      weight name; ComfyUI (comfy/lora.py, load_lora) looks for `<module>.lora_up.weight`, `.lora_down.weight` and
      `.alpha`, and both read alpha with `.item()` (network.py, NetworkModule), so it is one number.
    - UNet modules: ComfyUI (model_lora_keys_unet) and A1111's diffusers backend name each UNet weight
      `lora_unet_` + its diffusers module path with dots as underscores; the module must exist and be a layer.
    - Text encoder: ComfyUI (model_lora_keys_clip) and A1111 (convert_diffusers_name_to_compvis) take
      `lora_te_text_model_encoder_layers_<i>_<layer>` with the layers of CLIP_LAYER_NAMES.
    - Shapes: up @ down must have the weight's shape, or the loaders' weight update fails.
    """
    unet_modules = {"lora_unet_" + name.replace(".", "_"): m for name, m in unet.named_modules() if name}
    te_modules = dict(text_encoder.named_modules())
    te_pattern = re.compile(rf"lora_te_text_model_encoder_layers_(\d+)_({'|'.join(CLIP_LAYER_NAMES)})")
    problems, modules = [], {}
    for key, tensor in kohya.items():
        module_key, _, suffix = key.partition(".")
        if suffix not in LORA_SUFFIXES:
            problems.append(f"{key}: weight name {suffix!r} is not one of {LORA_SUFFIXES}")
        modules.setdefault(module_key, {})[suffix] = tensor
    for module_key, weights in modules.items():
        if module_key.startswith("lora_unet_"):
            layer = unet_modules.get(module_key)
        elif match := te_pattern.fullmatch(module_key):
            path = f"encoder.layers.{match[1]}.{CLIP_LAYER_NAMES[match[2]]}"
            layer = te_modules.get(path, te_modules.get(f"text_model.{path}"))
        else:
            problems.append(f"{module_key}: neither lora_unet_ nor lora_te_text_model_encoder_layers_<i>_<layer>")
            continue
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            problems.append(f"{module_key}: names no Linear/Conv2d layer of the diffusers model")
            continue
        if set(weights) != set(LORA_SUFFIXES):
            problems.append(f"{module_key}: has {sorted(weights)}, not down, up and alpha")
            continue
        down, up, alpha = weights["lora_down.weight"], weights["lora_up.weight"], weights["alpha"]
        if alpha.numel() != 1:
            problems.append(f"{module_key}: alpha has {alpha.numel()} values, not one")
        up, down = up.flatten(1), down.flatten(1)
        if up.shape[1] != down.shape[0] or (up.shape[0], down.shape[1]) != layer.weight.flatten(1).shape:
            problems.append(f"{module_key}: up @ down is not {tuple(layer.weight.shape)}")
    return problems


def lora_keys(kohya: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in kohya.items() if not key.startswith("bundle_emb.")}


def kohya_metadata_of(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata() or {}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pipeline_dir):
    out = make_run_folder(tmp_path_factory.mktemp("kohya") / "run", tiny_pipeline_dir)
    export_kohya(out, captions=CAPTIONS)
    return out


@pytest.fixture(scope="module")
def word_run(tmp_path_factory, tiny_pipeline_dir):
    """A run that also learned the word WORD (a random 16-wide vector: the tiny text encoder's width)."""
    out = make_run_folder(tmp_path_factory.mktemp("kohya-word") / "shapes-blue", tiny_pipeline_dir)
    save_learned_embeds(out, [WORD], torch.randn(1, 16, generator=torch.Generator().manual_seed(3)))
    export_kohya(out, captions=CAPTIONS)
    return out


@pytest.fixture(scope="module")
def tiny_modules(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    return pipe.unet, pipe.text_encoder


def _generate(base, folder=None, weight_name=None, prompt: str = "a red circle", load_words=None) -> torch.Tensor:
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.load_lora_weights(folder, weight_name=weight_name)
    if load_words is not None:
        load_words(pipe)
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, generator=generator, output_type="pt").images


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
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    assert loader_rule_violations(kohya, pipe.unet, pipe.text_encoder) == []
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
        export_kohya(run_dir, captions=CAPTIONS)
    assert caplog.text == ""


def test_every_kohya_key_follows_the_loaders_rules(run_dir, word_run, tiny_modules):
    for folder in (run_dir, word_run):
        assert loader_rule_violations(lora_keys(load_file(folder / KOHYA_FILE)), *tiny_modules) == []
    # The checker does catch what the loaders refuse.
    good = load_file(run_dir / KOHYA_FILE)
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
    broken = {
        **good,
        f"{q}.lora_up.weight": torch.zeros(RANK, 16),  # up must be (out, rank): (16, 4) here, so (4, 16) fails
        f"{q}.alpha": torch.ones(2),  # not one number
        f"{q}_x.lora_down.weight": good[f"{q}.lora_down.weight"],  # no such module
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 16),  # SDXL's name
        f"{k}.lora_mid.weight": torch.zeros(1),  # LoCon's tensor, not LoRA's
    }
    del broken[f"{q}.lora_down.weight"]
    broken[f"{q}.lora_down.weight"] = torch.zeros(RANK, 8)  # in-features 8, the layer takes 16
    problems = "\n".join(loader_rule_violations(broken, *tiny_modules))
    for expected in (
        f"{q}: alpha has 2 values",
        f"{q}: up @ down is not",
        f"{q}_x: names no",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj: neither",
        f"{k}.lora_mid.weight: weight name",
    ):
        assert expected in problems


def test_learned_word_is_bundled_for_a1111(word_run, tiny_modules):
    kohya = load_file(word_run / KOHYA_FILE)
    learned = load_file(word_run / LEARNED_EMBEDS_FILE)
    bundled = {k: v for k, v in kohya.items() if k.startswith("bundle_emb.")}
    # A1111 (networks.py) reads `bundle_emb.<name>.string_to_param.<k>`, one tensor per name, (vectors, width).
    assert list(bundled) == [f"bundle_emb.{WORD}.string_to_param.*"]
    width = tiny_modules[1].get_input_embeddings().weight.shape[1]
    assert bundled[f"bundle_emb.{WORD}.string_to_param.*"].shape == (1, width)
    assert torch.equal(bundled[f"bundle_emb.{WORD}.string_to_param.*"][0], learned[WORD].reshape(-1))
    assert (
        kohya.keys() - bundled.keys()
        == load_file(word_run.parent / "shapes-blue" / KOHYA_FILE).keys() - bundled.keys()
    )


def test_learned_word_has_its_own_embedding_file(word_run):
    # A1111's embeddings folder and ComfyUI's (`embedding:blue`) name an embedding after its file.
    files = sorted((word_run / KOHYA_EMBEDDINGS_DIR).iterdir())
    assert [f.name for f in files] == [f"{WORD}.safetensors"]
    tensors = load_file(files[0])
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (1, 16)
    assert torch.equal(tensors["emb_params"][0], load_file(word_run / LEARNED_EMBEDS_FILE)[WORD])
    # The Hub upload takes them along.
    assert f"{KOHYA_EMBEDDINGS_DIR}/*.safetensors" in UPLOAD_PATTERNS


def test_a_word_that_cannot_name_an_embedding_is_refused():
    # A1111 would read `bundle_emb.a.b...` as an embedding named "a"; a "/" would put the file elsewhere.
    for word in ("a.b", "a/b", ""):
        with pytest.raises(ValueError, match="cannot name a webui embedding"):
            bundled_embeddings({word: torch.zeros(16)})


def test_adapter_without_learned_words_exports_no_embedding(run_dir):
    kohya = load_file(run_dir / KOHYA_FILE)
    assert not [k for k in kohya if not k.startswith(("lora_unet_", "lora_te_"))]
    assert not (run_dir / KOHYA_EMBEDDINGS_DIR).exists()
    assert "modelspec.trigger_phrase" not in kohya_metadata_of(run_dir / KOHYA_FILE)


def test_kohya_metadata_is_complete_and_right(run_dir, word_run):
    metadata = kohya_metadata_of(word_run / KOHYA_FILE)
    assert METADATA_KEYS <= metadata.keys()
    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == (str(RANK), f"{LORA_ALPHA:g}")
    # The tiny UNet attends to 16-wide text (not SD2's 1024): an SD1-layout model.
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v1", "False")
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.implementation"] == "diffusers"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    assert (metadata["ss_resolution"], metadata["modelspec.resolution"]) == ("(32, 32)", "32x32")
    assert metadata["ss_num_train_images"] == "12"  # train_summary.json's num_samples
    assert metadata["ss_output_name"] == metadata["modelspec.title"] == "shapes-blue"
    assert json.loads(metadata["ss_tag_frequency"]) == {DATASET_ID: EXPECTED_TAGS}
    assert metadata["modelspec.trigger_phrase"] == WORD
    assert datetime.fromisoformat(metadata["modelspec.date"]).tzinfo is not None


def test_tag_frequency_and_base_version_rules():
    assert tag_frequency(["a, B ,, b", " ", "c,a"]) == {"a": 2, "b": 2, "c": 1}
    assert tag_frequency([]) == {}
    sd1, sd2, sd2_v = base_version(768, "epsilon"), base_version(1024, "epsilon"), base_version(1024, "v_prediction")
    assert (sd1.ss_base_model_version, sd1.v2, sd1.architecture) == ("sd_v1", False, "stable-diffusion-v1")
    assert (sd2.ss_base_model_version, sd2.v2, sd2.architecture) == ("sd_v2", True, "stable-diffusion-v2-512")
    assert (sd2_v.ss_base_model_version, sd2_v.architecture, sd2_v.prediction_type) == (
        "sd_v2_v",
        "stable-diffusion-v2-768-v",
        "v",
    )


def test_export_alone_reads_the_captions_of_the_recorded_dataset(run_dir, tiny_dataset_dir, tmp_path):
    alone = shutil.copytree(run_dir, tmp_path / "alone")
    config = yaml.safe_load((alone / "training_config.yaml").read_text())
    config["data"].update(dataset_name=None, train_data_dir=str(tiny_dataset_dir))
    (alone / "training_config.yaml").write_text(yaml.safe_dump(config))
    export_kohya(alone)
    captions = [json.loads(line)["text"] for line in (tiny_dataset_dir / "metadata.jsonl").read_text().splitlines()]
    expected = {tiny_dataset_dir.name: dict(Counter(captions))}
    assert json.loads(kohya_metadata_of(alone / KOHYA_FILE)["ss_tag_frequency"]) == expected


def test_whole_adapter_round_trips_through_the_kohya_export(word_run, tiny_pipeline_dir, tmp_path):
    """The kohya LoRA keys plus the separate embedding file give diffusers' images of the diffusers adapter plus its
    learned word. (Stock `load_lora_weights` refuses the kohya file itself once it bundles a word: diffusers
    converts kohya files only when every key starts with `lora_`; the A1111 bundle is for A1111.)"""
    prompt = f"a {WORD} circle"
    words_file = word_run / KOHYA_EMBEDDINGS_DIR / f"{WORD}.safetensors"
    lora_only = tmp_path / "lora_only.safetensors"
    save_file(lora_keys(load_file(word_run / KOHYA_FILE)), lora_only)
    original = _generate(
        tiny_pipeline_dir,
        word_run,
        ADAPTER_FILE,
        prompt,
        lambda p: load_learned_words(p, word_run / LEARNED_EMBEDS_FILE),
    )
    exported = _generate(
        tiny_pipeline_dir, tmp_path, lora_only.name, prompt, lambda p: p.load_textual_inversion(words_file, token=WORD)
    )
    without_word = _generate(tiny_pipeline_dir, word_run, ADAPTER_FILE, prompt)
    assert not torch.allclose(original, without_word, atol=1e-3), "the learned word should change the output"
    assert torch.equal(original, exported)  # bit-exact: same weights, same vector, same arithmetic


@pytest.mark.slow
def test_trainer_exports_the_captions_it_trained_on_and_its_words(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    # 4 of the 12 rows: the tag counts must come from the trainer's rows, not from re-reading the whole dataset.
    out = tmp_path / "out"
    args = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--max_train_steps", "1", "--max_train_samples")
    args += ["4", "--train_token_embeddings", WORD, "--export_kohya"]
    completed = subprocess.run(
        [sys.executable, "train_lora.py", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    metadata = kohya_metadata_of(out / KOHYA_FILE)
    all_captions = {
        json.loads(line)["text"] for line in (tiny_dataset_dir / "metadata.jsonl").read_text().splitlines()
    }
    tags = json.loads(metadata["ss_tag_frequency"])[tiny_dataset_dir.name]
    assert sum(tags.values()) == 4 == int(metadata["ss_num_train_images"]) and set(tags) <= all_captions
    assert metadata["modelspec.trigger_phrase"] == WORD
    assert f"bundle_emb.{WORD}.string_to_param.*" in load_file(out / KOHYA_FILE)
    assert (out / KOHYA_EMBEDDINGS_DIR / f"{WORD}.safetensors").is_file()
