"""Regenerate the docs: every image under docs/images/ and every generated number block in the Markdown files.

    python docs/build.py            # parameter counts, images, then the number blocks (a few minutes on a CPU)
    python docs/build.py --retrain  # first retrain the demo adapter with the main command, then as --rerun
    python docs/build.py --rerun    # first re-run the evaluation and the continual-tuning experiment (~15 min)
    python docs/build.py --check    # exit 1 if a number block differs from what the result files say (fast)
    python docs/build.py --blocks   # only re-render the number blocks from the result files (fast)

Numbers come only from result files (docs/results/, bench/results/, embedded/build_report.json,
embedded/demo_adapter/); images only from the embedded pipeline and its demo adapter. Run from anywhere; paths
are resolved from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "docs")]  # lorakit/eval from the repo, docgen from docs/

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402
from docgen import sources as src  # noqa: E402
from docgen.render import RENDERERS  # noqa: E402

from lorakit.markdown import render_blocks  # noqa: E402

DOC_FILES = (
    "README.md",
    "docs/how-it-works.md",
    "docs/deployment.md",
    "docs/continual-tuning.md",
    "docs/training-options.md",
    "docs/benchmarks.md",
    "embedded/README.md",
)
PIPELINE = REPO / "embedded" / "pipeline"
ADAPTER = src.DEMO_ADAPTER
# Short prompts as people type them, one in the training phrasing, and a neighbouring colour that must stay itself
HERO_PROMPTS = (
    "a purple star",
    "purple circle",
    "a purple cross on a black background",
    "a blue square",
)
STRIP_PROMPT = "a purple star on a white background"
STRIP_SEED = 3
SAMPLE_SEEDS = (0, 1)
# Figures are generated at the evaluation's settings, so what the reader sees is what eval measured.
STEPS, GUIDANCE = 25, 7.5
FIGURES = ("before_after.png", "samples.png", "denoising.png", "parts.png")


def sample_prompts() -> list[str]:
    """The demo run's validation prompts, read from the preset that trained it."""
    preset = yaml.safe_load((REPO / "configs" / "shapes.yaml").read_text())
    return list(preset["validation"]["validation_prompt"])


def write_counts(embedded: bool = True) -> list[Path]:
    """Parameter counts from configs (meta device) for BK-SDM-Tiny and (unless told not to) the embedded model."""
    from eval.sizes import model_sizes
    from lorakit.atomic import atomic_write_json
    from lorakit.paths import BK_SDM_TINY_REFERENCE

    # The repository's copy of the Hub model's configs: counts from configs alone, no download.
    bk = model_sizes(str(BK_SDM_TINY_REFERENCE), (4, 8))
    bk["base"] = "nota-ai/bk-sdm-tiny"
    atomic_write_json(src.SIZES_BK_SDM, bk)
    if not embedded:
        return [src.SIZES_BK_SDM]
    atomic_write_json(src.SIZES_EMBEDDED, model_sizes(src.relative(PIPELINE), (4, 8)))
    return [src.SIZES_BK_SDM, src.SIZES_EMBEDDED]


def write_figures(adapter: Path = ADAPTER) -> list[Path]:
    """Every image of the docs that comes from the embedded pipeline and its demo adapter."""
    import torch
    from docgen import figures

    from eval.generate import GenerationSettings
    from lorakit.token_embeddings import learned_words

    torch.manual_seed(0)
    pipe = figures.load_pipeline(PIPELINE)
    written = []
    hero = GenerationSettings(seeds=(0,), num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    base, adapted = figures.base_and_adapter(pipe, adapter, HERO_PROMPTS, hero)
    written.append(figures.save(figures.before_after(base, adapted, HERO_PROMPTS), src.IMAGES / FIGURES[0]))

    prompts = sample_prompts()
    samples = GenerationSettings(seeds=SAMPLE_SEEDS, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    base, adapted = figures.base_and_adapter(pipe, adapter, prompts, samples)
    grid = figures.sample_grid(base, adapted, prompts, SAMPLE_SEEDS)
    written.append(figures.save(grid, src.IMAGES / FIGURES[1]))

    pipe.load_lora_weights(str(adapter), adapter_name="docs")
    show = (0, 1, 2, 3, 5, 8, 12, 17, STEPS)
    with learned_words(pipe, adapter):
        frames = figures.denoising_frames(pipe, STRIP_PROMPT, STRIP_SEED, STEPS, GUIDANCE, show)
    pipe.unload_lora_weights()
    written.append(figures.save(figures.denoising_strip(frames, STEPS, STRIP_PROMPT), src.IMAGES / FIGURES[2]))
    diagram = figures.parts_diagram(STRIP_PROMPT, frames[0][1], frames[-1][1], STEPS)
    written.append(figures.save(diagram, src.IMAGES / FIGURES[3]))
    return written


# What the demo adapter keeps of a run folder: the adapter, its learned word, card inputs and images (not the logs).
DEMO_FILES = (
    "pytorch_lora_weights.safetensors",
    "learned_embeds.safetensors",
    "train_summary.json",
    "training_config.yaml",
    "loss_history.json",
    "loss_curve.png",
    "validation_grid.png",
    "validation",
)


def retrain_demo_adapter() -> None:
    """Train the demo adapter with the README's main command and commit-ready copy it to embedded/demo_adapter.

    The card is rendered for its new folder, so its snippet loads `embedded/demo_adapter` from the repository root.
    """
    from lorakit.card import write_model_card

    preset = yaml.safe_load((REPO / "configs" / "shapes.yaml").read_text())
    run = REPO / preset["output"]["output_dir"]
    if run.exists():  # never overwrite a run of the user's; the card must quote the main command as it is
        raise SystemExit(f"error: {src.relative(run)} exists: move it away, then run --retrain again.")
    command = ["accelerate", "launch", "--config_file", "accelerate_config.yaml", "train_lora.py"]
    subprocess.run(command, cwd=REPO, check=True)
    shutil.rmtree(ADAPTER, ignore_errors=True)
    ADAPTER.mkdir(parents=True)
    for name in DEMO_FILES:
        source = run / name
        if source.is_dir():
            shutil.copytree(source, ADAPTER / name)
        elif source.is_file():
            shutil.copy2(source, ADAPTER / name)
    with contextlib.chdir(REPO):  # the card names the adapter by the path it is given: relative to the repository
        write_model_card(src.relative(ADAPTER))


def rerun_experiments() -> None:
    """The result files that take minutes: the evaluation report and the continual-tuning experiment."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run([sys.executable, "-m", "eval", *src.EVAL_COMMAND.split()[3:]], cwd=REPO, env=env, check=True)
    subprocess.run([sys.executable, "docs/continual_experiment.py"], cwd=REPO, env=env, check=True)


def rendered(path: Path) -> str:
    """The file's text with every generated block re-rendered from the result files."""
    return render_blocks(path.read_text(encoding="utf-8"), RENDERERS)


def stale_files() -> list[str]:
    """Docs whose generated blocks differ from a fresh render."""
    return [name for name in DOC_FILES if rendered(REPO / name) != (REPO / name).read_text(encoding="utf-8")]


def write_blocks() -> list[str]:
    """Re-render every doc in place; returns the names that changed."""
    changed = stale_files()
    for name in changed:
        (REPO / name).write_text(rendered(REPO / name), encoding="utf-8")
    return changed


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--rerun", action="store_true", help="Re-run eval and the continual experiment first.")
    mode.add_argument("--retrain", action="store_true", help="Retrain the demo adapter first, then as --rerun.")
    mode.add_argument("--check", action="store_true", help="Only check that the number blocks are up to date.")
    mode.add_argument("--blocks", action="store_true", help="Only re-render the number blocks.")
    parser.add_argument("--adapter", type=Path, default=ADAPTER, help="Adapter for the figures (default: the demo).")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"{name}: generated blocks are out of date; run `python docs/build.py --blocks`", file=sys.stderr)
        return 1 if stale else 0
    if not args.blocks:
        if not (PIPELINE / "model_index.json").is_file():
            print(f"error: {PIPELINE} is missing; build it with `python -m embedded.build`.", file=sys.stderr)
            return 2
        if args.retrain:
            retrain_demo_adapter()
        if args.rerun or args.retrain:
            rerun_experiments()
        for path in write_counts() + write_figures(args.adapter):
            print(f"wrote {src.relative(path)}")
    for name in write_blocks():
        print(f"updated {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
