"""Model card: metadata with the run's real values, every body section, and a usage snippet that runs."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import yaml
from fake_run import DATASET_ID, VALIDATION_PROMPTS, make_run_folder
from huggingface_hub import ModelCard, ModelCardData

from lorakit.card import TAGS, update_card_with_eval, write_model_card

BASE_ID = "nota-ai/bk-sdm-tiny"
REPO_ID = "alice/shapes-lora"
TRIGGER = "sks shape"
EVAL = {
    "metrics": [
        {
            "metric_type": "clip_score",
            "metric_name": "CLIP score (tiny CLIP)",
            "value": 27.25,
            "dataset_name": "shapes prompts",
            "dataset_type": "alice/shapes-prompts",
        },
        {"metric_type": "lora_parameters", "value": 4096, "dataset_name": "-", "dataset_type": "none"},
    ],
    "table_markdown": "| Model | CLIP score |\n|---|---|\n| base | 19.50 |\n| base + LoRA | 27.25 |",
    "source": "python eval/evaluate.py --output_dir run",
}


@pytest.fixture(scope="module")
def template_run(tmp_path_factory, tiny_pipeline_dir):
    root = tmp_path_factory.mktemp("card")
    return make_run_folder(root / "run", tiny_pipeline_dir, base_name=BASE_ID, instance_prompt=TRIGGER)


@pytest.fixture
def run_dir(template_run, tmp_path):
    return shutil.copytree(template_run, tmp_path / "shapes-lora")


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "train_summary.json").read_text())


def _python_block(text: str, heading: str) -> str:
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_card_metadata_has_run_values_and_round_trips(run_dir):
    path = write_model_card(run_dir)
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == BASE_ID
    assert data.library_name == "diffusers"
    assert data.license == "creativeml-openrail-m"
    assert data.datasets == [DATASET_ID]
    assert set(TAGS) <= set(data.tags) and len(TAGS) == 6
    assert data.pipeline_tag == "text-to-image"
    assert data.instance_prompt == TRIGGER
    assert [w["text"] for w in data.widget] == VALIDATION_PROMPTS
    for widget in data.widget:
        assert (run_dir / widget["output"]["url"]).is_file()
    assert data.eval_results is None and "model_name" not in data.to_dict()  # no eval yet: no model-index
    # Offline stand-in for card.validate(): the metadata survives a ModelCardData round trip unchanged.
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()
    assert ModelCard(str(card)).data.to_dict() == data.to_dict()


def test_card_body_has_every_section_with_real_values(run_dir):
    text = write_model_card(run_dir, repo_id=REPO_ID).read_text()
    summary = _summary(run_dir)
    config = yaml.safe_load((run_dir / "training_config.yaml").read_text())
    body = text.split("\n---\n", 1)[1]
    for heading in ("How to use", "Training details", "Validation images", "Limitations and bias", "Reproduce"):
        assert f"## {heading}" in body
    assert "https://arxiv.org/abs/2305.15798" in body and "https://arxiv.org/abs/2106.09685" in body
    assert f"https://huggingface.co/{BASE_ID}" in body
    assert f"https://huggingface.co/datasets/{DATASET_ID}" in body
    assert f"{summary['lora_trainable_parameters']:,}" in body
    adapter_bytes = (run_dir / "pytorch_lora_weights.safetensors").stat().st_size
    assert f"{adapter_bytes:,} bytes" in body
    assert "![Training loss](loss_curve.png)" in body
    assert "![Validation grid](validation_grid.png)" in body
    for item in summary["validation"]:
        assert item["prompt"] in body and item["image"] in body
    assert f"| `lora.lora_alpha` | {config['lora']['lora_alpha']} |" in body
    assert f"| `lora.rank` | {config['lora']['rank']} |" in body
    assert f"| `training.learning_rate` | {config['training']['learning_rate']} |" in body
    assert f"| `training.seed` | {config['training']['seed']} |" in body
    assert "output_dir" not in body.split("## Training details")[1].split("| Result")[0]
    assert summary["command"] in body
    limitations = body.split("## Limitations and bias")[1].split("##")[0]
    assert BASE_ID in limitations and DATASET_ID in limitations
    assert TRIGGER in body
    assert "## Evaluation" not in body


@pytest.mark.slow
def test_card_snippet_runs_against_tiny_pipeline_and_changes_output(run_dir, tiny_pipeline_dir, tmp_path, monkeypatch):
    text = write_model_card(run_dir, repo_id=REPO_ID).read_text()
    snippet = _python_block(text, "How to use")
    assert f'from_pretrained("{BASE_ID}"' in snippet and f'load_lora_weights("{REPO_ID}")' in snippet
    local = snippet.replace(BASE_ID, str(tiny_pipeline_dir)).replace(REPO_ID, str(run_dir))
    without_lora = "\n".join(line for line in local.splitlines() if "load_lora_weights" not in line)
    monkeypatch.chdir(tmp_path)
    with_ns, base_ns = {}, {}
    exec(compile(local, "model_card_snippet", "exec"), with_ns)
    assert (tmp_path / "lora_sample.png").is_file()
    exec(compile(without_lora, "model_card_snippet_base", "exec"), base_ns)
    with_img = np.asarray(with_ns["image"], dtype=np.float32)
    base_img = np.asarray(base_ns["image"], dtype=np.float32)
    assert with_img.shape == base_img.shape
    assert np.abs(with_img - base_img).mean() > 1.0, "the adapter should visibly change the image"


def test_card_without_validation_prompts(tiny_pipeline_dir, tmp_path):
    run_dir = make_run_folder(tmp_path / "noval", tiny_pipeline_dir, prompts=[], base_name=BASE_ID)
    card = ModelCard.load(write_model_card(run_dir))
    assert card.data.to_dict().get("widget") is None
    assert "No validation prompts were configured" in card.content
    assert "validation_grid.png" not in card.content
    snippet = _python_block(card.content, "How to use")
    compile(snippet, "snippet", "exec")  # still valid Python with the fallback prompt


def test_card_local_base_gets_other_license_and_recorded_license_wins(tiny_pipeline_dir, tmp_path):
    run_dir = make_run_folder(tmp_path / "local", tiny_pipeline_dir)
    card = ModelCard.load(write_model_card(run_dir))
    assert card.data.license == "other"
    assert card.data.base_model is None  # a local path is not a valid Hub base_model
    assert "not known to lorakit" in card.content and str(tiny_pipeline_dir) in card.content
    assert "arXiv:2305.15798" not in card.content  # not a BK-SDM base
    summary = _summary(run_dir)
    summary["license"] = "apache-2.0"
    (run_dir / "train_summary.json").write_text(json.dumps(summary))
    assert ModelCard.load(write_model_card(run_dir)).data.license == "apache-2.0"


def test_update_card_with_eval_adds_model_index_and_table(run_dir):
    path = update_card_with_eval(run_dir, EVAL)
    card = ModelCard.load(path)
    results = card.data.eval_results
    assert [(r.metric_type, r.metric_value, r.dataset_type) for r in results] == [
        ("clip_score", 27.25, "alice/shapes-prompts"),
        ("lora_parameters", 4096, "none"),
    ]
    assert all(r.task_type == "text-to-image" for r in results)
    assert "model-index" in path.read_text()
    assert "## Evaluation" in card.content and "| base + LoRA | 27.25 |" in card.content
    assert EVAL["source"] in card.content
    # A later plain re-render (e.g. the trainer's, or push) keeps the stored evaluation.
    assert ModelCard.load(write_model_card(run_dir)).data.eval_results[0].metric_value == 27.25


def test_update_card_with_eval_rejects_bad_schema_before_writing(run_dir):
    before = (run_dir / "README.md").exists()
    with pytest.raises(ValueError, match="dataset_type"):
        update_card_with_eval(run_dir, {"metrics": [{"metric_type": "clip_score", "value": 1.0, "dataset_name": "x"}]})
    with pytest.raises(ValueError, match="metrics"):
        update_card_with_eval(run_dir, {"metrics": "clip=27"})
    assert not (run_dir / "eval_results.json").exists()
    assert (run_dir / "README.md").exists() == before


def test_write_model_card_names_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_summary.json"):
        write_model_card(tmp_path)


def test_write_model_card_is_atomic_and_idempotent(run_dir):
    first = write_model_card(run_dir).read_bytes()
    second = write_model_card(run_dir).read_bytes()
    assert first == second
    leftovers = [
        p.name for p in run_dir.iterdir() if p.name.startswith(".README.md.") and p.name != ".README.md.abc123.tmp"
    ]
    assert leftovers == []


def test_card_draws_missing_loss_curve_from_history(run_dir):
    (run_dir / "loss_curve.png").unlink()
    text = write_model_card(run_dir).read_text()
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Training loss](loss_curve.png)" in text
