"""The embedded shapes world: smoke rebuild, committed pipeline/CLIP/datasets load with stock libraries."""

from __future__ import annotations

import json
import re

import datasets
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler, StableDiffusionPipeline
from transformers import CLIPModel, CLIPProcessor

from embedded import readme, world
from embedded.build import PROMPT_SETS, BuildSizes, apparent_bytes, artifact_files, du_bytes
from embedded.build import main as build_main
from embedded.measure import candidate_captions, judge_accuracy, to_uint8
from embedded.models import make_vae
from embedded.train_clip import FORGET_NORM_RATIO, forget_words, refine_judge, train_clip, vae_round_trip
from eval.generate import GenerationSettings
from lorakit.markdown import block_names, render_blocks
from lorakit.metrics import clip_r_precision
from lorakit.paths import EMBEDDED_ADAPTER_DATA, EMBEDDED_BASE_DATA, EMBEDDED_CLIP, EMBEDDED_PIPELINE, EMBEDDED_PROMPTS


@pytest.fixture(scope="module")
def committed_pipeline() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED_PIPELINE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def committed_clip() -> tuple[CLIPModel, CLIPProcessor]:
    return CLIPModel.from_pretrained(EMBEDDED_CLIP).eval(), CLIPProcessor.from_pretrained(EMBEDDED_CLIP)


def test_world_is_deterministic_and_keeps_heldout_out_of_base():
    first = world.sample(world.all_concepts(), 8, seed=3)
    again = world.sample(world.all_concepts(), 8, seed=3)
    other = world.sample(world.all_concepts(), 8, seed=4)
    assert all(np.array_equal(np.asarray(a[0]), np.asarray(b[0])) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(np.asarray(a[0]), np.asarray(b[0])) for a, b in zip(first, other, strict=True))
    assert first[0][0].size == (32, 32)
    base = {(c.colour, c.shape) for c in world.base_concepts()}
    assert base.isdisjoint(world.HELDOUT_COMBOS)
    assert all(c.colour not in world.BASE_COLOURS for c in world.adapter_concepts())


def grammar_sentences(concepts: list[world.Concept]) -> set[str]:
    """Every caption the grammar can make for `concepts`."""
    return {concept.caption(template) for concept in concepts for template in world.grammar_templates()}


def test_grammar_draws_varied_captions_that_say_the_concept():
    concept = world.Concept("star", "orange", "black")
    rng = np.random.default_rng(0)
    drawn = [concept.phrase(rng) for _ in range(400)]
    assert set(drawn) <= grammar_sentences([concept])
    assert len(set(drawn)) > 50  # many sentences, not three templates
    assert concept.caption() in drawn and "an orange star on a black background" == concept.caption()
    described = [world.parse_caption(text) for text in drawn]
    assert all(d.colour == "orange" and d.shape == "star" and d.background in (None, "black") for d in described)
    no_background = sum(d.background is None for d in described) / len(described)
    assert 0.2 < no_background < 0.45  # about a third name no background, so a short prompt draws either
    again = np.random.default_rng(0)
    assert [concept.phrase(again) for _ in range(400)] == drawn


def test_heldout_phrasings_are_never_grammar_sentences_and_use_known_words():
    sentences = grammar_sentences(world.all_concepts())
    words = set(world.world_words())
    for concept in world.all_concepts():
        for phrasing in world.HELDOUT_PHRASINGS:
            text = concept.caption(phrasing)
            assert text not in sentences, text
            assert set(text.replace(",", " , ").split()) <= words, text
            described = world.parse_caption(text)
            assert (described.colour, described.shape) == (concept.colour, concept.shape)


def test_every_world_word_is_one_token_of_the_world_tokenizer():
    from embedded.models import make_tokenizer

    tokenizer = make_tokenizer()
    # "simple" and "image" share "im"; "in" is inside "triangle": each must still be one token
    for word in world.world_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_same_meaning_collapses_a_missing_background():
    assert world.same_meaning("purple star", "a purple star on a white background")
    assert world.same_meaning("a purple star", "a purple star on a black background")
    assert world.same_meaning("purple star against black", "a purple star on a black background")
    assert not world.same_meaning("purple star against black", "a purple star on a white background")
    assert not world.same_meaning("a purple star", "a blue star on a white background")
    assert not world.same_meaning("a purple star", "a purple star")  # a candidate must name its background
    assert world.parse_caption("a red blue circle") is None and world.parse_caption("hello") is None


@pytest.mark.slow
def test_smoke_rebuild_writes_every_artifact(tmp_path):
    build_main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "build_report.json").read_text())
    assert set(report["quality"]["base_pipeline_r_precision"]) == set(PROMPT_SETS)
    assert 0.0 <= report["quality"]["judge_top1"]["all_concepts"] <= 1.0
    assert 0.0 <= report["quality"]["judge_top1"]["all_concepts_round_trip"] <= 1.0
    assert "python -m embedded.build" in (tmp_path / "README.md").read_text()
    assert report["cpu"] and f"on 2 CPU cores ({report['cpu']})" in (tmp_path / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.vae.config.scaling_factor == pytest.approx(report["unet"]["scaling_factor"])
    assert CLIPModel.from_pretrained(tmp_path / "clip").config.text_config.vocab_size == len(pipe.tokenizer)
    assert (tmp_path / "prompts" / "heldout.txt").read_text().splitlines()
    assert not (tmp_path / "_work").exists()
    assert "judge_refine_log" in report
    # sizes count the artifacts a clone carries, not code beside them
    (tmp_path / "unrelated.bin").write_bytes(b"x" * 100_000)
    files = artifact_files(tmp_path)
    assert apparent_bytes(files) == report["artifact_bytes"] < report["artifact_bytes_du"]
    assert all("_work" not in p.parts and p.name != "unrelated.bin" for p in files)


def test_build_check_calls_the_pipeline_as_the_eval_report_does():
    # the README's build check and the eval report's figures must measure the same call on the same seeds
    from docs.docgen.sources import EVAL_COMMAND

    assert BuildSizes().inference_steps == GenerationSettings().num_inference_steps
    eval_seeds = re.search(r"--seeds ([\d ]+)", EVAL_COMMAND).group(1).split()
    assert BuildSizes().seeds == tuple(map(int, eval_seeds))


def test_du_rounds_every_file_up_to_whole_blocks(tmp_path):
    (tmp_path / "small.txt").write_bytes(b"x")
    (tmp_path / "block.bin").write_bytes(b"x" * 4097)
    files = sorted(tmp_path.iterdir())
    assert apparent_bytes(files) == 4098
    assert du_bytes(files) == 3 * 4096


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_refining_the_judge_trains_its_vision_tower_only(tmp_path):
    train_clip(tmp_path / "clip", steps=2, pool_size=144)
    log = refine_judge(tmp_path / "clip", tmp_path / "judge", steps=2, pool_size=144, confusable_size=24)
    first, refined = (CLIPModel.from_pretrained(tmp_path / name) for name in ("clip", "judge"))
    assert log["pool_size"] == 144 + 24
    # the text tower is the pipeline's text encoder: refining the judge must not move what the UNet reads
    assert same_weights(first.text_model, refined.text_model)
    assert same_weights(first.text_projection, refined.text_projection)
    assert torch.equal(first.logit_scale, refined.logit_scale)
    assert not same_weights(first.vision_model, refined.vision_model)


def test_vae_round_trip_hands_back_8_bit_images_of_the_same_shape():
    vae = make_vae(seed=0).eval()
    images = torch.from_numpy(world.to_array([im for im, _, _ in world.sample(world.base_concepts(), 5, seed=3)]))
    decoded = vae_round_trip(vae, images, chunk=2)
    assert decoded.shape == images.shape
    assert decoded.min() >= -1 and decoded.max() <= 1
    levels = (decoded + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # what a saved PNG holds
    assert not torch.equal(decoded, images)  # an untrained VAE does not hand the renders back


@pytest.mark.slow
def test_refining_the_judge_with_a_vae_adds_decoded_renders(tmp_path):
    train_clip(tmp_path / "clip", steps=2, pool_size=144)
    make_vae(seed=0).save_pretrained(tmp_path / "vae")
    log = refine_judge(
        tmp_path / "clip",
        tmp_path / "judge",
        steps=2,
        pool_size=144,
        confusable_size=24,
        vae_dir=tmp_path / "vae",
        round_trip_size=36,
    )
    assert log["pool_size"] == 144 + 24 + 36


def test_judge_accuracy_reads_images_after_the_round_trip(committed_clip):
    model, processor = committed_clip
    concepts = world.base_concepts()
    plain = judge_accuracy(model, processor, concepts, 72, seed=5)
    assert judge_accuracy(model, processor, concepts, 72, seed=5, round_trip=lambda x: x) == plain
    assert judge_accuracy(model, processor, concepts, 72, seed=5, round_trip=torch.zeros_like) < plain


def test_committed_pipeline_is_stock_and_consistent(committed_pipeline):
    pipe = committed_pipeline
    assert same_weights(CLIPModel.from_pretrained(EMBEDDED_CLIP).text_model, pipe.text_encoder)
    assert isinstance(DiffusionPipeline.from_pretrained(EMBEDDED_PIPELINE), StableDiffusionPipeline)
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler)
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32
    config = pipe.text_encoder.config
    tokenizer = pipe.tokenizer
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert pipe.unet.config.cross_attention_dim == config.hidden_size
    # the scaling factor was measured on the latents, not copied from Stable Diffusion
    assert pipe.vae.config.scaling_factor != pytest.approx(0.18215)


def test_committed_pipeline_draws_any_text(committed_pipeline):
    prompts = ["a red circle on a white background", "a zorblax flibbertigibbet 🦄", ""]
    generator = torch.Generator().manual_seed(0)
    out = committed_pipeline(
        prompts, negative_prompt=["", "", ""], num_inference_steps=4, generator=generator, output_type="np"
    )
    assert out.images.shape == (3, 32, 32, 3)
    assert np.isfinite(out.images).all() and out.images.std() > 0.01


@pytest.mark.parametrize(
    "folder,colour_in,colour_out", [(EMBEDDED_BASE_DATA, None, "purple"), (EMBEDDED_ADAPTER_DATA, "purple", None)]
)
def test_committed_datasets_load_with_datasets(folder, colour_in, colour_out):
    data = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert {"image", "text"} <= set(data.column_names)
    assert len(data) == len((folder / "metadata.jsonl").read_text().splitlines())
    texts = data["text"]
    if colour_in:
        assert all(colour_in in t for t in texts)
    if colour_out:
        assert not any(colour_out in t for t in texts)
    assert data[0]["image"].size == (32, 32)
    assert datasets.load_dataset(str(folder), split="train").num_rows == len(data)


def test_prompt_files_split_the_world():
    lines = {n: (EMBEDDED_PROMPTS / f"{n}.txt").read_text().splitlines() for n in PROMPT_SETS}
    assert all(lines.values())
    assert set(lines["heldout"]).isdisjoint(lines["base"])
    assert all("purple" in p for name in ("adapter", "adapter_phrasings") for p in lines[name])
    # the held-out phrasings ask for the base concepts, in sentences the grammar never makes
    asked = {(d.colour, d.shape) for d in map(world.parse_caption, lines["base_phrasings"])}
    assert asked == {(c.colour, c.shape) for c in world.base_concepts()}
    assert set(lines["base_phrasings"]).isdisjoint(grammar_sentences(world.base_concepts()))


def test_committed_clip_ranks_its_own_caption_first():
    model = CLIPModel.from_pretrained(EMBEDDED_CLIP).eval()
    processor = CLIPProcessor.from_pretrained(EMBEDDED_CLIP)
    rows = world.sample(world.all_concepts(), 36, seed=4242)  # images no training set drew
    result = clip_r_precision(
        to_uint8([r[0] for r in rows]), [r[2].caption() for r in rows], candidate_captions(), model, processor
    )
    assert result.top1 >= 0.9


def test_committed_readme_shows_the_committed_figures():
    """embedded/README.md's figures are rendered from build_report.json and the demo adapter's eval, never typed."""
    text = readme.PAGE.read_text()
    renderers = readme.block_renderers()
    assert block_names(text) == list(renderers)  # every renderer used once, in page order
    assert render_blocks(text, renderers) == text
    eval_results = json.loads(readme.LORA_EVAL.read_text())
    adapter = next(s for s in eval_results["prompt_sets"] if s["name"] == "adapter")
    after = adapter["adapter"]["r_precision_top1"]
    assert f"| Purple after the LoRA, canonical phrasing | {adapter['num_images']} | {after:.3f} | >= 0.80 |" in text
    blue = eval_results["colour_confusion"]["adapter"]["blue"].get("blue", 0.0)
    images = eval_results["colour_confusion"]["images"]["blue"]
    assert f"| Blue prompts judged blue, after | {images} | {blue:.3f} |" in text
    report = readme.read_report()
    assert f"| `data/base/` | {report['data']['base_rows']} rows |" in text
    assert f"{report['params']['unet']:,}" in text


def test_readme_of_another_build_renders_its_own_report(tmp_path):
    """A build elsewhere gets the committed page's prose with its own figures, and no claim about the demo adapter."""
    report = readme.read_report()
    report["command"] = "python -m embedded.build --out elsewhere"
    report["data"]["base_rows"] = 7
    (tmp_path / "build_report.json").write_text(json.dumps(report))
    readme.render(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "`python -m embedded.build --out elsewhere`" in text and "| `data/base/` | 7 rows |" in text
    assert "Not measured for this build" in text and ">= 0.60" not in text
    assert text.split("<!--")[0] == readme.PAGE.read_text().split("<!--")[0]  # same prose


@pytest.mark.parametrize("adapter_before,shows_gap", [(0.10, False), (0.625, True)])
def test_readme_explains_the_adapter_gap_only_while_the_bar_is_missed(adapter_before, shows_gap):
    report = readme.read_report()
    report["quality"]["base_pipeline_r_precision"]["adapter"]["top1"] = adapter_before
    assert ("Known gap" in readme.known_gap(report)) is shows_gap
    assert (readme.known_gap(report) == "") is not shows_gap


def test_forget_words_redraws_only_the_word_orthogonal_to_the_known_words_at_the_norm_ratio():
    from embedded.models import make_clip, make_tokenizer

    tokenizer = make_tokenizer()
    models = [make_clip(tokenizer, seed=0) for _ in range(2)]
    before = models[0].text_model.embeddings.token_embedding.weight.detach().clone()
    for model in models:
        forget_words(model, tokenizer, ["purple"], list(world.BASE_COLOURS), seed=7)
    after = models[0].text_model.embeddings.token_embedding.weight.detach()
    (changed,) = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert tokenizer.convert_ids_to_tokens(changed) == "purple</w>"
    known = before[[tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in world.BASE_COLOURS]]
    assert torch.allclose(known @ after[changed], torch.zeros(len(known)), atol=1e-5)  # no known colour in it
    assert after[changed].norm() == pytest.approx(FORGET_NORM_RATIO * known.norm(dim=1).mean().item(), rel=1e-5)
    assert torch.equal(models[1].text_model.embeddings.token_embedding.weight[changed], after[changed])  # seeded
