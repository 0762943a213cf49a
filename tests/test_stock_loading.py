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


def readme_stock_snippet() -> str:
    """The README's Python block that loads an adapter into a stock diffusers pipeline."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    return next(block for block in blocks if "load_textual_inversion" in block and "load_lora_weights" in block)


@pytest.mark.slow
def test_readme_snippet_verbatim_draws_what_eval_draws(tmp_path):
    snippet = readme_stock_snippet()
    assert f'pipe("{PROMPT}", num_inference_steps={STEPS}, generator=generator)' in snippet
    assert f"manual_seed({SEED})" in snippet
    out = tmp_path / "snippet.png"
    # -I: isolated mode, so sys.path holds neither the working directory nor PYTHONPATH: no project code at all.
    code = snippet + f"\nimage.save({str(out)!r})\nimport sys; assert not any('lorakit' in m for m in sys.modules)\n"
    completed = subprocess.run([sys.executable, "-I", "-c", code], cwd=REPO, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-2000:]

    from eval.generate import GenerationSettings, generate
    from eval.models import attach_adapter, load_pipeline

    base, adapter = str(REPO / "embedded" / "pipeline"), str(REPO / "embedded" / "demo_adapter")
    pipe = load_pipeline(base)
    assert attach_adapter(pipe, adapter, base) == ["purple"]
    settings = GenerationSettings(seeds=(SEED,), num_inference_steps=STEPS, guidance_scale=7.5)
    evaluated = generate(pipe, [PROMPT], settings).images[0].permute(1, 2, 0).numpy() / 255.0
    snippet_image = np.asarray(Image.open(out).convert("RGB")) / 255.0
    assert snippet_image.shape == evaluated.shape
    assert np.abs(snippet_image - evaluated).max() <= 1e-5
