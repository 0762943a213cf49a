"""Bad input fails fast (before any model loads) with one clear message and a non-zero exit (issue 2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
from conftest import make_tiny_imagefolder, tiny_train_args

import train_lora


@pytest.fixture(autouse=True)
def models_must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(train_lora, "load_models", refuse)


def run(capsys, pipeline: Path, data: Path | str, out: Path, *extra: str) -> tuple[int, str]:
    code = train_lora.main(tiny_train_args(pipeline, data, out, *extra))
    return code, capsys.readouterr().err


def test_nonexistent_dataset_folder(capsys, tiny_pipeline_dir, tmp_path):
    code, err = run(capsys, tiny_pipeline_dir, tmp_path / "nope", tmp_path / "out")
    assert code == 2 and "nope does not exist" in err and "--train_data_dir" in err


def test_misnamed_column_lists_the_columns_that_exist(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    code, err = run(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out", "--caption_column", "caption")
    assert code == 2
    assert "--caption_column 'caption' is not a column" in err and "['image', 'text']" in err


def test_missing_caption_column(capsys, tiny_pipeline_dir, tmp_path):
    data = make_tiny_imagefolder(tmp_path / "data", rows=2)
    (data / "metadata.jsonl").unlink()
    code, err = run(capsys, tiny_pipeline_dir, data, tmp_path / "out")
    assert code == 2 and "No caption column found among ['image']" in err and "--caption_column" in err


def test_empty_dataset(capsys, tiny_pipeline_dir, tmp_path):
    empty = datasets.Dataset.from_dict(
        {"image": [], "text": []},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    (tmp_path / "empty").mkdir()
    empty.to_parquet(str(tmp_path / "empty" / "train.parquet"))
    code, err = run(capsys, tiny_pipeline_dir, tmp_path / "empty", tmp_path / "out")
    assert code == 2 and "is empty" in err


def test_unreadable_image(capsys, tiny_pipeline_dir, tmp_path):
    data = make_tiny_imagefolder(tmp_path / "data", rows=3)
    (data / "001.png").write_bytes(b"this is not a png")
    code, err = run(capsys, tiny_pipeline_dir, data, tmp_path / "out")
    assert code == 2 and "001.png" in err and "cannot be read" in err


def test_resolution_not_a_multiple_of_the_vae_factor(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    code, err = run(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out", "--resolution", "30")
    assert code == 2 and "not a multiple of the VAE factor 4" in err and "use 28 or 32" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--rank", "0"], "LoRA rank must be at least 1"), (["--learning_rate=-1e-4"], "use a positive value")],
)
def test_invalid_hyperparameters(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path, flags, message):
    code, err = run(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out", *flags)
    assert code == 2 and message in err


def test_unknown_flag(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out", "--learning_rat", "1e-4")
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --learning_rat" in capsys.readouterr().err


def test_output_folder_with_an_adapter_is_not_overwritten(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"precious")
    code, err = run(capsys, tiny_pipeline_dir, tiny_dataset_dir, out)
    assert code == 2 and "--overwrite_output_dir" in err
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"precious"


def test_unknown_setting_in_a_yaml_config(capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  learning_rat: 1e-4\n")
    code = train_lora.main(["--config", str(config)])
    assert code == 2 and "unknown settings ['learning_rat']" in capsys.readouterr().err


def test_yaml_config_with_flags_winning(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    from lorakit.config import parse_args

    config = tmp_path / "preset.yaml"
    config.write_text(json.dumps({"lora": {"rank": 8}, "training": {"learning_rate": 5e-4}}))
    cfg = parse_args(
        ["--config", str(config), "--learning_rate", "2e-4", "--pretrained_model_name_or_path", str(tiny_pipeline_dir)]
    )
    assert cfg.lora.rank == 8 and cfg.training.learning_rate == 2e-4
    assert cfg.lora.lora_alpha == 8.0  # resolved from the rank, so the saved config states the scale
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_dataset_card_with_broken_yaml(capsys, tiny_pipeline_dir, tmp_path):
    data = make_tiny_imagefolder(tmp_path / "data", rows=2)
    (data / "README.md").write_text("---\npretty_name: Shapes: broken\n---\n# card\n")
    code, err = run(capsys, tiny_pipeline_dir, data, tmp_path / "out")
    assert code == 2 and "README.md has a YAML header that does not parse" in err
