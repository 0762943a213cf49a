"""A user with nothing but pip-installed diffusers gets the demo adapter's concept from the README's snippet."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PROMPT, SEED, STEPS = "a purple star on a white background", 0, 25


def python_block(text: str, must_hold: str) -> str:
    """The first Python block of a Markdown text that holds `must_hold`."""
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    return next(block for block in blocks if must_hold in block)


def eval_image(prompt: str = PROMPT) -> np.ndarray:
    """What `python -m eval` draws for the demo adapter, prompt and seed: (H, W, 3) in 0-1."""
    from eval.generate import GenerationSettings, generate
    from eval.models import attach_adapter, load_pipeline

    base, adapter = str(REPO / "embedded" / "pipeline"), str(REPO / "embedded" / "demo_adapter")
    pipe = load_pipeline(base)
    assert attach_adapter(pipe, adapter, base) == ["purple"]
    settings = GenerationSettings(seeds=(SEED,), num_inference_steps=STEPS, guidance_scale=7.5)
    return generate(pipe, [prompt], settings).images[0].permute(1, 2, 0).numpy() / 255.0


def run_isolated(code: str, cwd: Path) -> None:
    """Run `code` with -I (isolated mode): sys.path holds neither the working directory nor PYTHONPATH, so no
    project code can be imported, as for a user who only pip-installed diffusers."""
    guard = "\nimport sys; assert not any(m.split('.')[0] in ('lorakit', 'eval') for m in sys.modules)\n"
    completed = subprocess.run([sys.executable, "-I", "-c", code + guard], cwd=cwd, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]


def readme_stock_snippet() -> str:
    """The README's Python block that loads an adapter into a stock diffusers pipeline."""
    return python_block((REPO / "README.md").read_text(), "load_textual_inversion")


@pytest.mark.slow
def test_readme_snippet_verbatim_draws_what_eval_draws(tmp_path):
    snippet = readme_stock_snippet()
    assert f'pipe("{PROMPT}", num_inference_steps={STEPS}, generator=generator)' in snippet
    assert f"manual_seed({SEED})" in snippet
    out = tmp_path / "snippet.png"
    run_isolated(snippet + f"\nimage.save({str(out)!r})\n", cwd=REPO)
    snippet_image = np.asarray(Image.open(out).convert("RGB")) / 255.0
    evaluated = eval_image()
    assert snippet_image.shape == evaluated.shape
    assert np.abs(snippet_image - evaluated).max() <= 1e-5


@pytest.mark.slow
def test_demo_adapter_card_snippet_draws_what_eval_draws(tmp_path):
    snippet = python_block((REPO / "embedded" / "demo_adapter" / "README.md").read_text(), "load_textual_inversion")
    assert f"{PROMPT}" in snippet and f"manual_seed({SEED})" in snippet and f"num_inference_steps={STEPS}" in snippet
    (tmp_path / "embedded").symlink_to(REPO / "embedded")  # the card's relative paths, without the project on sys.path
    run_isolated(snippet, cwd=tmp_path)
    card_image = np.asarray(Image.open(tmp_path / "lora_sample.png").convert("RGB")) / 255.0
    assert np.abs(card_image - eval_image()).max() <= 1e-5
