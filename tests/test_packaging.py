"""A non-editable install of lorakit (no repository beside it) still renders a model card from the shipped template."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fake_run import make_run_folder

REPO = Path(__file__).resolve().parent.parent
# What `pip install .` reads: the package, its build files, and the card template at the top level.
SOURCE_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "requirements.txt", "README.md", "model_card.md")


@pytest.mark.slow
def test_installed_package_renders_a_card_from_the_shipped_template(tmp_path, tiny_pipeline_dir):
    source = tmp_path / "source"
    shutil.copytree(REPO / "lorakit", source / "lorakit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in SOURCE_FILES:
        shutil.copy(REPO / name, source / name)
    site = tmp_path / "site"
    install = ["install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), "."]
    subprocess.run(
        [sys.executable, "-m", "pip", *install],
        cwd=source,
        check=True,
        capture_output=True,
    )
    assert (site / "lorakit" / "model_card.md").read_text() == (REPO / "model_card.md").read_text()
    run = make_run_folder(tmp_path / "run", tiny_pipeline_dir, base_name="nota-ai/bk-sdm-tiny")
    (run / "README.md").unlink(missing_ok=True)
    elsewhere = tmp_path / "elsewhere"  # neither the repository nor the source copy on sys.path
    elsewhere.mkdir()
    script = (
        "import lorakit, lorakit.card as card, sys; "
        "print(lorakit.__file__); print(card.template_path()); card.write_model_card(sys.argv[1])"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    completed = subprocess.run(
        [sys.executable, "-c", script, str(run)], cwd=elsewhere, env=env, capture_output=True, text=True, check=True
    )
    package_file, template = completed.stdout.splitlines()[:2]
    assert Path(package_file).is_relative_to(site) and Path(template) == site / "lorakit" / "model_card.md"
    card = (run / "README.md").read_text()
    assert "nota-ai/bk-sdm-tiny" in card and "load_lora_weights" in card
