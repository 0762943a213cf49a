"""eval/ and lorakit.metrics: CLIP score, R-precision, reproducibility, report files, card update, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_WORDS
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub import ModelCard
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from eval.cli import main, options_from_args
from eval.generate import GenerationSettings, generate
from eval.models import adapter_mismatches, adapter_state_dict, load_clip
from eval.prompts import EvalInputError, candidate_prompts, load_prompt_sets, read_prompt_file
from eval.run import EvalOptions, evaluate
from lorakit.metrics import clip_embeddings, clip_r_precision, clip_score, r_precision, truncate_prompts
from lorakit.params import lora_parameter_count
from lorakit.paths import EMBEDDED_BASE_DATA, EMBEDDED_CLIP, EMBEDDED_PIPELINE, shown_path
from lorakit.tokenizer import build_clip_tokenizer

PROMPTS = ["a red circle on a white background", "a blue square on a white background"]


# ---------- fixtures ----------


def _tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A randomly initialised ~20k-parameter CLIP on 32 px images with the tiny-world tokenizer."""
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }  # fmt: skip
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _load_imagefolder(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, H, W) uint8 images and their captions from an imagefolder's metadata.jsonl."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    caption_key = "text" if "text" in rows[0] else next(k for k in rows[0] if k != "file_name")
    images = [torch.from_numpy(np.array(Image.open(folder / row["file_name"]).convert("RGB"))) for row in rows]
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), [r[caption_key] for r in rows]


@pytest.fixture(scope="module")
def random_clip_dir(tmp_path_factory) -> Path:
    model, processor = _tiny_clip()
    folder = tmp_path_factory.mktemp("random_clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def random_clip(random_clip_dir):
    return load_clip(str(random_clip_dir))


@pytest.fixture(scope="module")
def embedded_clip():
    """The embedded world's CLIP judge, trained on the shapes world."""
    return load_clip(str(EMBEDDED_CLIP))


@pytest.fixture(scope="module")
def embedded_base_rows() -> tuple[torch.Tensor, list[str], list[str]]:
    """120 embedded base-dataset images whose caption uses the canonical template, their captions, and
    every world caption (the candidates the embedded build ranks against)."""
    from embedded.measure import candidate_captions

    world = candidate_captions()
    rows = [json.loads(line) for line in (EMBEDDED_BASE_DATA / "metadata.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["text"] in set(world)][:120]
    images = [np.array(Image.open(EMBEDDED_BASE_DATA / row["file_name"]).convert("RGB")) for row in rows]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), [row["text"] for row in rows], world


def _save_adapter(pipe_unet: UNet2DConditionModel, out_dir: Path, seed: int = 1) -> Path:
    torch.manual_seed(seed)
    # init_lora_weights=False: B is random too, so the adapter visibly changes the output (diffusers' test idiom).
    pipe_unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe_unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="module")
def tiny_adapter_dir(tiny_pipeline_dir, tmp_path_factory) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    return _save_adapter(pipe.unet, tmp_path_factory.mktemp("tiny_adapter"))


@pytest.fixture(scope="module")
def mismatched_adapter_dir(tmp_path_factory) -> Path:
    """An adapter for a UNet with cross_attention_dim 8 (the tiny base has 16): attn2 shapes do not fit."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, cross_attention_dim=8, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )  # fmt: skip
    return _save_adapter(unet, tmp_path_factory.mktemp("bad_adapter"))


@pytest.fixture()
def prompt_files(tmp_path) -> list[Path]:
    (tmp_path / "base.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "heldout.txt").write_text("# held-out combinations\na green square on a black background\n\n")
    return [tmp_path / "base.txt", tmp_path / "heldout.txt"]


# ---------- pure metric functions ----------


def test_r_precision_on_hand_built_similarity():
    # Image 0: own candidate 0 is highest (rank 1). Image 1: own candidate 2 is beaten by candidate 0 (rank 2).
    # Image 2: own candidate 1 is the lowest of three (rank 3).
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.8, 0.1, 0.5], [0.7, 0.0, 0.6]])
    result = r_precision(similarity, [0, 2, 1])
    assert result.ranks == (1, 2, 3)
    assert result.top1 == pytest.approx(1 / 3)
    assert result.mean_rank == pytest.approx(2.0)
    assert result.num_candidates == 3


def test_r_precision_ties_count_against_the_image():
    result = r_precision(torch.ones(2, 4), [0, 3])
    assert result.ranks == (4, 4)
    assert result.top1 == 0.0


def test_r_precision_rejects_bad_targets():
    with pytest.raises(ValueError, match="target"):
        r_precision(torch.zeros(2, 3), [0, 3])
    with pytest.raises(ValueError, match="one target per image"):
        r_precision(torch.zeros(2, 3), [0])


def test_clip_score_equals_100_cosine_of_own_embeddings(embedded_clip, embedded_base_rows):
    model, processor = embedded_clip
    images, captions, _ = embedded_base_rows
    image_emb, text_emb = clip_embeddings(images[:24], captions[:24], model, processor)
    expected = float((100 * (image_emb * text_emb).sum(-1)).mean())
    assert expected > 1  # above torchmetrics' clamp at 0, so the comparison means something
    assert clip_score(images[:24], captions[:24], model, processor) == pytest.approx(expected, abs=1e-3)


def test_matching_pairs_score_higher_than_shuffled(embedded_clip, embedded_base_rows):
    model, processor = embedded_clip
    images, captions, _ = embedded_base_rows
    shuffled = captions[1:] + captions[:1]  # consecutive rows are different concepts
    assert sum(a != b for a, b in zip(captions, shuffled, strict=True)) == len(captions)
    # Measured with the embedded CLIP: 90.9 matching against 26.6 shuffled.
    assert clip_score(images, captions, model, processor) > clip_score(images, shuffled, model, processor) + 30


def test_r_precision_of_dataset_images_with_their_captions(embedded_clip, embedded_base_rows):
    model, processor = embedded_clip
    images, captions, world = embedded_base_rows
    result = clip_r_precision(images, captions, world, model, processor)
    assert result.num_candidates == len(world) == 72
    # Measured with the embedded CLIP: top-1 0.858, mean rank 1.17 of 72 (chance: top-1 0.014, mean rank 36.5).
    assert result.top1 >= 0.7 and result.mean_rank <= 1.6


def test_float_images_score_like_uint8(embedded_clip, embedded_base_rows):
    model, processor = embedded_clip
    images, captions, _ = embedded_base_rows
    as_float = clip_score(images[:8].float() / 255, captions[:8], model, processor)
    assert as_float == pytest.approx(clip_score(images[:8], captions[:8], model, processor), abs=1e-3)


def test_long_prompts_are_truncated_with_a_notice(random_clip, tiny_dataset_dir):
    model, processor = random_clip
    long_prompt = "a red circle " * 60  # 180 tokens
    fitted, truncated = truncate_prompts([long_prompt, "a red circle"], processor.tokenizer, 77)
    assert truncated == [0]
    assert len(processor.tokenizer(fitted[0])["input_ids"]) <= 77
    assert fitted[1] == "a red circle"
    images, _ = _load_imagefolder(tiny_dataset_dir)
    with pytest.warns(UserWarning, match="truncated"):
        clip_score(images[:1], [long_prompt], model, processor)


def test_clip_score_needs_one_prompt_per_image(random_clip, tiny_dataset_dir):
    images, _ = _load_imagefolder(tiny_dataset_dir)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images[:2], ["a red circle"], *random_clip)


# ---------- prompts and inputs ----------


def test_prompt_files_skip_blanks_and_comments(prompt_files):
    sets = load_prompt_sets(prompt_files)
    assert [s.name for s in sets] == ["base", "heldout"]
    assert sets[1].prompts == ("a green square on a black background",)
    assert candidate_prompts(sets, None) == [*PROMPTS, "a green square on a black background"]


def test_missing_prompt_file_is_a_clear_error(tmp_path):
    with pytest.raises(EvalInputError, match="Prompt file not found.*--prompts"):
        read_prompt_file(tmp_path / "nope.txt")


def test_empty_prompt_file_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("\n# only a comment\n \n")
    with pytest.raises(EvalInputError, match="empty"):
        read_prompt_file(tmp_path / "empty.txt")


def test_unknown_clip_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EvalInputError, match="Cannot load CLIP model 'no-such-org/no-such-clip'.*--clip_model"):
        load_clip("no-such-org/no-such-clip")


def test_mismatched_adapter_is_found_before_generation(tiny_pipeline_dir, mismatched_adapter_dir, tiny_adapter_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    assert adapter_mismatches(adapter_state_dict(str(tiny_adapter_dir)), components) == []
    problems = adapter_mismatches(adapter_state_dict(str(mismatched_adapter_dir)), components)
    assert problems and all("attn2" in p and "input size 8, base layer has 16" in p for p in problems)


def test_text_encoder_adapter_fits_and_is_counted(tiny_pipeline_dir, tmp_path):
    from fake_run import make_run_folder

    from eval.run import lora_values

    run = make_run_folder(tmp_path / "run", tiny_pipeline_dir, train_text_encoder=True)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    state_dict = adapter_state_dict(str(run))
    assert adapter_mismatches(state_dict, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}) == []
    assert lora_values(state_dict, "text_encoder.") > 0 and lora_values(state_dict, "unet.") > 0
    assert lora_values(state_dict) == lora_values(state_dict, "text_encoder.") + lora_values(state_dict, "unet.")
    # A text-encoder layer that the base lacks is reported, not skipped.
    bad = {"text_encoder.text_model.encoder.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 16)}
    assert adapter_mismatches(bad, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}) == [
        "text_encoder.text_model.encoder.layers.9.self_attn.q_proj does not exist in the base"
    ]


def test_mismatched_adapter_error_names_base_and_adapter(
    tiny_pipeline_dir, mismatched_adapter_dir, random_clip_dir, prompt_files, tmp_path, monkeypatch
):
    import eval.run

    def no_generation(*args, **kwargs):
        raise AssertionError("generation must not start with a mismatched adapter")

    monkeypatch.setattr(eval.run, "generate", no_generation)
    options = EvalOptions(
        base=str(tiny_pipeline_dir),
        lora=str(mismatched_adapter_dir),
        clip_model=str(random_clip_dir),
        prompts=[str(p) for p in prompt_files],
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(EvalInputError, match="does not fit base model") as caught:
        evaluate(options)
    assert str(mismatched_adapter_dir) in str(caught.value) and str(tiny_pipeline_dir) in str(caught.value)


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert main(["--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "Prompt file not found" in capsys.readouterr().err


def test_defaults_point_at_the_embedded_world(monkeypatch, tmp_path):
    import eval.cli

    monkeypatch.chdir(tmp_path)  # no output/ here, nor in the (patched) repository root
    monkeypatch.setattr(eval.cli, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(eval.cli, "EMBEDDED_DEMO_ADAPTER", tmp_path / "demo_adapter")
    (tmp_path / "demo_adapter").mkdir()
    (tmp_path / "p.txt").write_text("a red circle\n")
    options = options_from_args(["--prompts", str(tmp_path / "p.txt")])
    assert options.lora == str(tmp_path / "demo_adapter")
    assert options.base == str(EMBEDDED_PIPELINE)
    assert options.clip_model == str(EMBEDDED_CLIP)
    assert options.generation == GenerationSettings(seeds=(0,), num_inference_steps=25, guidance_scale=7.5)
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert options_from_args(["--prompts", str(tmp_path / "p.txt")]).lora == str(tmp_path / "output")
    # The default preset's own output folder wins over a bare output/.
    preset_dir = tmp_path / eval.cli.preset_output_dir()
    preset_dir.mkdir(parents=True, exist_ok=True)
    (preset_dir / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert options_from_args(["--prompts", str(tmp_path / "p.txt")]).lora == str(preset_dir)


# ---------- generation and the whole run ----------


def test_same_seeds_give_same_images_and_scores(tiny_pipeline_dir, random_clip):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    settings = GenerationSettings(seeds=(0, 1), num_inference_steps=2, batch_size=3)
    first = generate(pipe, PROMPTS, settings)
    second = generate(pipe, PROMPTS, settings)
    assert first.images.shape == (4, 3, 32, 32) and first.images.dtype == torch.uint8
    assert torch.equal(first.images, second.images)
    assert first.prompts == (PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1])
    assert not torch.equal(first.images[0], first.images[1])  # different seeds, different images
    # Batching does not change an image: seed 1 of prompt 2 alone equals its place in the batch.
    alone = generate(pipe, PROMPTS[1:], GenerationSettings(seeds=(1,), num_inference_steps=2, batch_size=1))
    assert torch.equal(alone.images[0], first.images[3])
    assert clip_score(first.images, list(first.prompts), *random_clip) == clip_score(
        second.images, list(second.prompts), *random_clip
    )


def test_adapter_loads_into_the_same_pipeline_and_changes_images(tiny_pipeline_dir, tiny_adapter_dir):
    from eval.models import attach_adapter

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    unet = pipe.unet
    settings = GenerationSettings(seeds=(0,), num_inference_steps=2)
    base = generate(pipe, PROMPTS, settings)
    attach_adapter(pipe, str(tiny_adapter_dir), str(tiny_pipeline_dir))
    assert pipe.unet is unet and any("lora_A" in name for name, _ in unet.named_parameters())
    assert not torch.equal(base.images, generate(pipe, PROMPTS, settings).images)


def test_evaluate_writes_report_and_updates_card(
    tiny_pipeline_dir, tiny_adapter_dir, random_clip_dir, prompt_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    candidates = tmp_path / "candidates.txt"  # a prompt already evaluated: no new candidate, only the file's path
    candidates.write_text(PROMPTS[0] + "\n")
    card_dir = tmp_path / "card"
    card_dir.mkdir()
    (card_dir / "README.md").write_text(
        "---\nlicense: apache-2.0\ntags:\n- lora\n---\n# My adapter\n\nHand-written.\n"
    )
    options = EvalOptions(
        base=str(tiny_pipeline_dir),
        lora=str(tiny_adapter_dir),
        clip_model=str(random_clip_dir),
        prompts=[str(p) for p in prompt_files],
        candidates=str(candidates),
        output_dir=str(tmp_path / "out"),
        generation=GenerationSettings(seeds=(0, 1), num_inference_steps=2),
        update_card=str(card_dir),
    )
    results = evaluate(options)
    assert results["candidates_file"] == "candidates.txt"  # no machine path in a report
    out = tmp_path / "out"
    assert json.loads((out / "eval_results.json").read_text()) == json.loads(json.dumps(results))
    report = (out / "eval_results.md").read_text()
    assert "| base | 2 | 4 |" in report
    assert "| prompt set | seed 0 | seed 1 |" in report  # two seeds: the per-seed table is there
    for row in results["prompt_sets"]:  # equal images per seed, so the pooled rate is the mean of the seeds'
        for side in ("base", "adapter"):
            by_seed = row[side]["r_precision_top1_by_seed"]
            assert list(by_seed) == ["0", "1"]
            assert sum(by_seed.values()) / 2 == pytest.approx(row[side]["r_precision_top1"])
    with Image.open(out / "comparison_grid.png") as grid:
        assert grid.height > 3 * 128 and grid.width > 2 * 128  # three prompt rows, two columns

    assert [row["num_images"] for row in results["prompt_sets"]] == [4, 2]
    assert results["num_candidates"] == 3
    params = results["parameters"]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert params["unet"] == sum(p.numel() for p in pipe.unet.parameters())
    # The adapter file holds exactly what a rank-4 LoRA on the default targets adds (counted independently).
    assert params["lora"] == params["lora_unet"] == lora_parameter_count(pipe.unet, rank=4)
    assert params["lora_text_encoder"] == 0
    assert params["lora_share_of_unet"] == params["lora"] / params["unet"]
    assert params["adapter_file_bytes"] == (tiny_adapter_dir / "pytorch_lora_weights.safetensors").stat().st_size
    assert results["timing"]["base_seconds_per_image"] > 0 and results["timing"]["adapter_seconds_per_image"] > 0
    base_row = results["prompt_sets"][0]

    card = ModelCard.load(card_dir / "README.md")
    assert card.data.license == "apache-2.0" and "Hand-written." in card.text
    values = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values[("base", "clip_score")] == pytest.approx(base_row["adapter"]["clip_score"], abs=1e-4)
    assert values[("heldout", "clip_r_precision")] == pytest.approx(
        results["prompt_sets"][1]["adapter"]["r_precision_top1"], abs=1e-4
    )
    assert card.data.to_dict()["model-index"][0]["results"]

    # Running again replaces the section and the metrics rather than appending copies.
    from eval.card import update_card

    update_card(card_dir, results)
    again = ModelCard.load(card_dir / "README.md")
    assert again.text.count("## Evaluation") == 1
    assert len(again.data.eval_results) == len(card.data.eval_results)


def test_cli_runs_end_to_end(tiny_pipeline_dir, tiny_adapter_dir, random_clip_dir, prompt_files, tmp_path, capsys):
    out = tmp_path / "cli_out"
    args = ["--base", str(tiny_pipeline_dir), "--lora", str(tiny_adapter_dir), "--clip_model", str(random_clip_dir)]
    args += ["--prompts", *map(str, prompt_files), "--output_dir", str(out), "--steps", "2", "--seeds", "3", "4"]
    assert main(args) == 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["settings"]["seeds"] == [3, 4] and results["settings"]["num_inference_steps"] == 2
    assert "| whole pipeline |" in capsys.readouterr().out


def test_update_card_of_a_trainer_run_goes_through_the_card_renderer(
    tiny_pipeline_dir, random_clip_dir, prompt_files, tmp_path
):
    from fake_run import make_run_folder

    run = make_run_folder(tmp_path / "run", tiny_pipeline_dir)
    options = EvalOptions(
        base=str(tiny_pipeline_dir),
        lora=str(run),
        clip_model=str(random_clip_dir),
        prompts=[str(p) for p in prompt_files],
        output_dir=str(tmp_path / "out"),
        generation=GenerationSettings(seeds=(0,), num_inference_steps=2),
        update_card=str(run),
    )
    results = evaluate(options)
    card = ModelCard.load(run / "README.md")
    values = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    expected = results["prompt_sets"][1]["adapter"]["r_precision_top1"]
    assert values[("heldout prompts", "clip_r_precision")] == pytest.approx(expected, abs=1e-4)
    assert "R-precision@1 base" in card.text  # our table, shown by the card template
    # The run keeps the results in the card helper's schema, so a later re-render keeps them.
    stored = json.loads((run / "eval_results.json").read_text())
    assert stored["metrics"] == results["metrics"]


def test_no_arguments_use_embedded_prompts_and_world_captions(monkeypatch, prompt_files):
    import eval.cli
    from embedded.measure import candidate_captions

    monkeypatch.setattr(eval.cli, "default_prompt_files", lambda: [])
    with pytest.raises(EvalInputError, match="embedded.build"):
        options_from_args([])
    monkeypatch.setattr(eval.cli, "default_prompt_files", lambda: prompt_files)
    monkeypatch.setattr(eval.cli, "default_candidates_file", lambda: None)
    monkeypatch.setattr(eval.cli, "default_lora", lambda: prompt_files[0].parent / "no_adapter")
    with pytest.raises(EvalInputError, match="No adapter to evaluate.*--lora"):
        options_from_args([])
    monkeypatch.setattr(eval.cli, "default_lora", lambda: prompt_files[0].parent)
    options = options_from_args([])
    assert options.prompts == [str(p) for p in prompt_files]
    assert options.candidate_texts == candidate_captions() and len(options.candidate_texts) > 50


def test_count_only_gives_bk_sdm_tiny_sizes_without_weights(tmp_path, capsys):
    from lorakit.paths import BK_SDM_TINY_REFERENCE

    assert main(["--count_only", "--base", str(BK_SDM_TINY_REFERENCE), "--output_dir", str(tmp_path)]) == 0
    sizes = json.loads((tmp_path / "param_counts.json").read_text())
    assert sizes["parameters"]["unet"] == 323_384_964 and sizes["lora_by_rank"] == {"4": 431_616}
    assert "| LoRA rank 4 on to_q, to_k, to_v, to_out.0 | 431,616 |" in capsys.readouterr().out


def test_count_only_fetches_configs_only_from_the_hub(monkeypatch, tiny_pipeline_dir):
    import huggingface_hub

    from eval.sizes import model_sizes

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, local_files_only):
        calls.append((repo_id, allow_patterns))
        return str(tiny_pipeline_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sizes = model_sizes("alice/tiny-sd", ranks=(2,))
    assert calls and calls[0][0] == "alice/tiny-sd"
    assert all(pattern.endswith(".json") for pattern in calls[0][1])  # no weight file is ever requested
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert sizes["parameters"]["unet"] == sum(p.numel() for p in pipe.unet.parameters())
    assert sizes["lora_by_rank"]["2"] == lora_parameter_count(pipe.unet, rank=2)


def test_count_only_unknown_hub_id_offline_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--count_only", "--base", "no-such-org/no-such-model"]) == 2
    assert "Cannot read the configs of 'no-such-org/no-such-model'" in capsys.readouterr().err


def test_report_paths_are_relative_inside_the_working_directory(tmp_path, monkeypatch):
    """Committed reports must not carry the machine's absolute paths; Hub ids and outside paths stay as given."""
    monkeypatch.chdir(tmp_path)
    assert shown_path(tmp_path / "embedded" / "clip") == "embedded/clip"
    assert shown_path("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert shown_path("/elsewhere/clip") == "/elsewhere/clip"


def test_world_prompts_are_judged_by_meaning_with_a_colour_confusion_table(
    tiny_pipeline_dir, tiny_adapter_dir, random_clip_dir, tmp_path
):
    from embedded.measure import candidate_captions
    from embedded.world import parse_caption, same_meaning

    prompts = tmp_path / "free.txt"
    prompts.write_text("red circle\na blue square against black\n")
    options = EvalOptions(
        base=str(tiny_pipeline_dir),
        lora=str(tiny_adapter_dir),
        clip_model=str(random_clip_dir),
        prompts=[str(prompts)],
        candidate_texts=candidate_captions(),
        output_dir=str(tmp_path / "out"),
        generation=GenerationSettings(seeds=(0, 1), num_inference_steps=2),
        same_meaning=same_meaning,
        parse_caption=parse_caption,
    )
    results = evaluate(options)
    # the free phrasings are not added as candidates: the world captions say the same
    assert results["candidates"] == candidate_captions() and results["matching"] == "by meaning"
    row = results["prompt_sets"][0]
    judged = row["base"]["judged"]
    assert len(judged) == 4 and set(judged) <= set(candidate_captions())
    # R-precision by meaning, recomputed from the judged captions: "red circle" is met by either background
    hits = [same_meaning(prompt, best) for prompt, best in zip(row["prompts"], judged, strict=True)]
    assert row["base"]["r_precision_top1"] == pytest.approx(sum(hits) / len(hits))
    # per seed, from the same verdicts: images run prompt-major, seed-minor (seeds 0, 1, 0, 1)
    assert row["base"]["r_precision_top1_by_seed"] == pytest.approx(
        {"0": sum(hits[0::2]) / 2, "1": sum(hits[1::2]) / 2}
    )
    confusion = results["colour_confusion"]
    assert confusion["images"] == {"blue": 2, "red": 2}
    for side in ("base", "adapter"):
        assert all(sum(shares.values()) == pytest.approx(1.0) for shares in confusion[side].values())
    expected_red = sum(
        parse_caption(b).colour == "red" for p, b in zip(row["prompts"], judged, strict=True) if "red" in p
    )
    assert confusion["base"]["red"].get("red", 0.0) == pytest.approx(expected_red / 2)
    assert "Colour the judge sees" in (tmp_path / "out" / "eval_results.md").read_text()


def test_top1_by_seed_groups_images_by_their_seed():
    from lorakit.metrics import top1_by_seed

    # seed 3 misses twice (an unlucky shared noise), seed 0 once
    ranks, seeds = [1, 2, 1, 5, 1, 1, 4, 1], [3, 3, 0, 3, 0, 3, 0, 0]
    assert top1_by_seed(ranks, seeds) == {3: 0.5, 0: 0.75}
    assert list(top1_by_seed(ranks, seeds)) == [3, 0]  # the order the seeds first appear
    with pytest.raises(ValueError, match="one seed per image"):
        top1_by_seed(ranks, seeds[:-1])


def test_report_skips_the_seed_table_for_one_seed():
    from eval.report import seed_table

    row = {
        "name": "base",
        "base": {"r_precision_top1_by_seed": {"0": 1.0}},
        "adapter": {"r_precision_top1_by_seed": {"0": 0.5}},
    }
    assert seed_table({"prompt_sets": [row]}) == ""
    row["base"]["r_precision_top1_by_seed"]["1"] = 0.25
    row["adapter"]["r_precision_top1_by_seed"]["1"] = 0.75
    assert "| base | 1.00 → 0.50 | 0.25 → 0.75 |" in seed_table({"prompt_sets": [row]})


def test_r_precision_with_several_right_candidates_ranks_the_best_of_them():
    from lorakit.metrics import r_precision_relevant

    similarity = torch.tensor([[0.1, 0.9, 0.8], [0.7, 0.2, 0.6], [0.5, 0.5, 0.1]])
    relevant = torch.tensor([[False, True, True], [False, True, True], [True, False, False]])
    result = r_precision_relevant(similarity, relevant)
    # image 0: a right candidate is first; image 1: its best right one (0.6) is second; image 2: a tie counts against
    assert result.ranks == (1, 2, 2) and result.top1 == pytest.approx(1 / 3)
    assert result.best == (1, 0, 0)
    with pytest.raises(ValueError, match="relevant candidate"):
        r_precision_relevant(similarity, torch.zeros(3, 3, dtype=torch.bool))
