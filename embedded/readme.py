"""The figures of embedded/README.md, rendered from build_report.json and the demo adapter's files, never typed.

The page's prose is Markdown in embedded/README.md; every figure sits in a generated block whose renderer is
named in `block_renderers`. They are registered with the docs' renderers, so `python docs/build.py --check`
and `--blocks` cover this page like the others. `render(folder)` writes a build's own README: the committed
page with its blocks rendered from that build's build_report.json (`python -m embedded.build` calls it).

Figures of one-off experiments that no committed script reproduces are not here: they are dated, with their
commits, in docs/notes/2026-12-embedded-experiments.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from embedded import world
from eval.confusion import confusion_markdown
from lorakit.atomic import atomic_write_text
from lorakit.filenames import EVAL_RESULTS_FILE, SUMMARY_FILE
from lorakit.markdown import markdown_table, render_blocks
from lorakit.paths import EMBEDDED_DEMO_ADAPTER, EMBEDDED_DIR, REPO_ROOT
from lorakit.summary import TrainSummary, read_summary

PAGE = EMBEDDED_DIR / "README.md"
# the demo adapter's evaluation, written by docs/build.py --rerun (python -m eval ... --output_dir docs/results/eval)
LORA_EVAL = REPO_ROOT / "docs" / "results" / "eval" / EVAL_RESULTS_FILE
DEMO_SUMMARY = EMBEDDED_DEMO_ADAPTER / SUMMARY_FILE

JUDGE_BAR = ">= 0.95"
BARS = {
    "base": ("base prompts", ">= 0.95"),
    "base_phrasings": ("base prompts in held-out phrasings", ">= 0.85"),
    "heldout": ("held-out combinations", ">= 0.85"),
    "adapter": ("adapter concept (purple), before any LoRA", "<= 0.20"),
    "adapter_phrasings": ("adapter concept in held-out phrasings, before any LoRA", "<= 0.20"),
}
LORA_BARS = {
    "base": ">= 0.95",
    "base_phrasings": ">= 0.85",
    "heldout": ">= 0.85",
    "adapter_before": "<= 0.20",
    "adapter_after": ">= 0.80",
    "adapter_phrasings_after": ">= 0.70",
    "base_drop": "<= 0.05",
    "bleed": "<= 0.05",
}
# sentence forms shown as examples in the world table: short, plain, and the canonical one
GRAMMAR_EXAMPLES = ("{colour} {shape}", "{a} {shape} in {colour} against {background}", world.CANONICAL_TEMPLATE)
# the prompt sets the after-LoRA figures read from the demo adapter's evaluation
EVAL_SETS = ("base", "base_phrasings", "heldout", "adapter", "adapter_phrasings")
# the base colour next to the adapter's: the one a purple LoRA is likeliest to bleed into
NEIGHBOUR_COLOUR = "blue"


def _met(value: float, bar: str) -> str:
    """'yes'/'no' for a bar written as '>= x' or '<= x'."""
    op, threshold = bar.split()
    return "yes" if (value >= float(threshold) if op == ">=" else value <= float(threshold)) else "**no**"


def read_report(folder: Path = EMBEDDED_DIR) -> dict:
    """folder/build_report.json, everything a build measured."""
    return json.loads((folder / "build_report.json").read_text())


def command_line(report: dict) -> str:
    """The command these artifacts were built with."""
    return f"These artifacts were built with `{report['command']}` (see `build_report.json`)."


def world_table(report: dict) -> str:
    """What the world holds, from embedded/world.py, and the dataset sizes the build wrote."""
    rows = [
        ["shapes", ", ".join(world.SHAPES)],
        ["base colours", ", ".join(world.BASE_COLOURS)],
        ["adapter colour (never shown to the UNet)", ", ".join(world.ADAPTER_COLOURS)],
        ["backgrounds", " or ".join(world.BACKGROUNDS)],
        ["held-out combinations (out of the base dataset)", ", ".join(f"{c} {s}" for c, s in world.HELDOUT_COMBOS)],
        [
            "captions",
            f"a grammar of {len(world.grammar_templates())} sentence forms, e.g. "
            + ", ".join(f'"{world.Concept("star", "orange", "black").caption(t)}"' for t in GRAMMAR_EXAMPLES),
        ],
        [
            "held-out phrasings (never trained on)",
            ", ".join(f'"{world.Concept("circle", "red", "white").caption(t)}"' for t in world.HELDOUT_PHRASINGS),
        ],
        [
            "image size",
            f"{world.IMAGE_SIZE} px, drawn at {world.IMAGE_SIZE * world.SUPERSAMPLE} px and downscaled with LANCZOS",
        ],
        ["judge-only hard negatives", f"`{world.DISTRACTOR_SHAPE}` shapes in every colour"],
        ["candidate captions of every figure below", f"{report['quality']['candidates']}, blobs included"],
        ["`data/base/`", f"{report['data']['base_rows']} rows"],
        ["`data/adapter/`", f"{report['data']['adapter_rows']} rows"],
    ]
    return markdown_table(["what", "in this world"], rows)


def known_gap(report: dict) -> str:
    """A warning while the base draws the adapter concept above its bar before any LoRA; nothing otherwise."""
    label, bar = BARS["adapter"]
    if _met(report["quality"]["base_pipeline_r_precision"]["adapter"]["top1"], bar) == "yes":
        return ""
    return (
        '**Known gap: the base draws purple above its bar before any LoRA** (the "before any LoRA" figure below, '
        f"against a bar of {bar.split()[1]}), although its text encoder was made to forget the word."
    )


def tempering(unet: dict) -> str:
    """How the UNet's guidance was tempered, for its row of the build table (older reports have none)."""
    if not unet.get("temper_share"):
        return ""
    return (
        f"; guidance tempering from step {unet['temper_from_step']}: {unet['temper_share']:.0%} of captioned "
        "samples learn the unconditional prediction"
    )


def build_figures(report: dict) -> str:
    """Parameters and training of each part, the measured VAE scaling, build time and size."""
    params, sizes, unet = report["params"], report["sizes"], report["unet"]
    rows = [
        [
            "CLIP judge (`clip/`), first stage: whole model",
            f"{params['clip']:,}",
            f"{sizes['clip_steps']} steps on {sizes['clip_pool']:,} renders",
        ],
        [
            "CLIP judge, second stage: vision tower only",
            "(same model)",
            f"{sizes['judge_refine_steps']} steps on the same renders plus {sizes['judge_confusable_pool']:,} fresh "
            f"circles and blobs and {sizes['judge_round_trip_pool']:,} fresh renders of every concept after a VAE "
            "round trip",
        ],
        ["text encoder (the judge's text tower)", f"{params['text_encoder']:,}", "the judge's first stage"],
        ["VAE", f"{params['vae']:,}", f"{sizes['vae_steps']} steps"],
        ["UNet", f"{params['unet']:,}", f"{unet['steps']} steps of batch {unet['batch_size']}" + tempering(unet)],
    ]
    judge = report["quality"]["judge_top1"]
    resumed = "resumed" in str(report["clip_vae_logs"])
    return (
        markdown_table(["part", "parameters", "training"], rows, align=["---", "---:", "---"])
        + f"\n\nFresh blobs the judge named correctly after its first stage: "
        f"{judge['hard_negatives_blobs_first_stage']:.3f} (after the second: {judge['hard_negatives_blobs']:.3f}). "
        f"VAE `scaling_factor` = 1/std of the base latents = {unet['scaling_factor']:.4f} (measured, stored in the "
        f"config). Build time: {report['build_seconds'] / 60:.1f} min wall ({report['train_seconds'] / 60:.1f} min "
        f"training; {report['build_cpu_seconds'] / 60:.1f} CPU-minutes) on 2 CPU cores"
        + (f" ({report['cpu']})" if report.get("cpu") else "")
        + (", resumed (`--resume`) after stage-1 CLIP and VAE of an interrupted run" if resumed else "")
        + f"; artifacts {report['artifact_bytes'] / 1e6:.1f} MB in files ({report['artifact_bytes_du'] / 1e6:.1f} MB "
        "on disk in 4 KiB blocks, as `du` counts; MB = 10^6 bytes). Source: `build_report.json`."
    )


def quality_table(report: dict) -> str:
    """The judge's accuracy and the base pipeline's R-precision, each against its bar."""
    quality = report["quality"]
    judge = quality["judge_top1"]
    rows = [
        (
            f"Judge top-1 on fresh world images (all {quality['candidates']} captions)",
            judge["all_concepts"],
            JUDGE_BAR,
        ),
        ("Judge top-1 on fresh hard negatives (blobs)", judge["hard_negatives_blobs"], JUDGE_BAR),
        ("Judge top-1 on fresh adapter-concept images", judge["adapter_concept"], JUDGE_BAR),
        ("Judge top-1 on fresh world images after a VAE round trip", judge["all_concepts_round_trip"], JUDGE_BAR),
        ("Judge top-1 on fresh blobs after a VAE round trip", judge["hard_negatives_blobs_round_trip"], JUDGE_BAR),
    ]
    for name, (label, bar) in BARS.items():
        figure = quality["base_pipeline_r_precision"][name]
        seeds = ", ".join(f"{v:.3f}" for v in figure["per_seed"])
        rows.append(
            (f"Base pipeline R-precision, {label} ({figure['images']} images; per seed {seeds})", figure["top1"], bar)
        )
    cells = [[label, f"{value:.3f}", bar, _met(value, bar)] for label, value, bar in rows]
    return markdown_table(["Figure", "Value", "Bar", "Met"], cells) + (
        "\n\nR-precision: the share of generated images for which the judge (`clip/`) ranks first, among all world "
        "captions, one that shows what the image's prompt says (colour and shape, and the background where the "
        "prompt names one), with the pipeline called as the eval report, validation and the model card's snippet "
        f"call it (DPM-Solver, {report['sizes']['inference_steps']} steps, guidance 7.5), sampling seeds "
        f"{', '.join(map(str, report['sizes']['seeds']))}."
    )


def _prompt_set(lora_eval: dict, name: str) -> dict:
    return next(entry for entry in lora_eval["prompt_sets"] if entry["name"] == name)


def _learned(summary: TrainSummary) -> str:
    """', and the learned word `purple`' when the run learned words beside the LoRA."""
    words = summary.learned_words
    return ", and the learned word " + ", ".join(f"`{w}`" for w in words) if words else ""


def _bleed(lora_eval: dict) -> tuple[float, float, int]:
    """Share of NEIGHBOUR_COLOUR prompts judged that colour, before and after the LoRA, and their image count."""
    confusion = lora_eval["colour_confusion"]
    before = confusion["base"][NEIGHBOUR_COLOUR].get(NEIGHBOUR_COLOUR, 0.0)
    after = confusion["adapter"][NEIGHBOUR_COLOUR].get(NEIGHBOUR_COLOUR, 0.0)
    return before, after, confusion["images"][NEIGHBOUR_COLOUR]


def lora_rows(lora_eval: dict) -> list[tuple[str, float, int, str]]:
    """(figure, value, images, bar) of every target the eval of the demo adapter measures."""

    def figure(name: str, side: str) -> tuple[float, int]:
        entry = _prompt_set(lora_eval, name)
        return entry[side]["r_precision_top1"], entry["num_images"]

    base_before, base_images = figure("base", "base")
    base_after, _ = figure("base", "adapter")
    blue_before, blue_after, blue_images = _bleed(lora_eval)
    bleed_bar = LORA_BARS["bleed"]
    return [
        ("Base, canonical phrasing", base_before, base_images, LORA_BARS["base"]),
        ("Base, held-out phrasings", *figure("base_phrasings", "base"), LORA_BARS["base_phrasings"]),
        ("Base, held-out colour-shape combinations", *figure("heldout", "base"), LORA_BARS["heldout"]),
        ("Purple before the LoRA", *figure("adapter", "base"), LORA_BARS["adapter_before"]),
        ("Purple after the LoRA, canonical phrasing", *figure("adapter", "adapter"), LORA_BARS["adapter_after"]),
        (
            "Purple after the LoRA, held-out phrasings",
            *figure("adapter_phrasings", "adapter"),
            LORA_BARS["adapter_phrasings_after"],
        ),
        ("Base prompts after the LoRA", base_after, base_images, ""),
        ("Drop on base prompts", base_before - base_after, base_images, LORA_BARS["base_drop"]),
        (f"{NEIGHBOUR_COLOUR.capitalize()} prompts judged {NEIGHBOUR_COLOUR}, before", blue_before, blue_images, ""),
        (f"{NEIGHBOUR_COLOUR.capitalize()} prompts judged {NEIGHBOUR_COLOUR}, after", blue_after, blue_images, ""),
        (f"Drop of {NEIGHBOUR_COLOUR} judged {NEIGHBOUR_COLOUR}", blue_before - blue_after, blue_images, bleed_bar),
    ]


def lora_figures(lora_eval: dict, summary: TrainSummary) -> str:
    """The after-LoRA figures, from `python -m eval` on the committed demo adapter and its train_summary.json."""
    settings = lora_eval["settings"]
    table = markdown_table(
        ["Figure", "Images", "Value", "Bar", "Met"],
        [
            [label, images, f"{value:.3f}", bar or "-", _met(value, bar) if bar else "-"]
            for label, value, images, bar in lora_rows(lora_eval)
        ],
        align=["---", "---:", "---", "---", "---"],
    )
    return (
        f"`{summary.command}` with no arguments trains the adapter concept on this base: {summary.global_step} "
        f"steps over {summary.num_samples} images, {summary.train_seconds:.1f} s of training on 2 CPU cores "
        f"({summary.lora_trainable_parameters:,} LoRA parameters{_learned(summary)}). Its output is committed as "
        f"`demo_adapter/`. Measured by `{lora_eval['source']}` (seeds {', '.join(map(str, settings['seeds']))}, one "
        f"image per prompt and seed, {settings['num_inference_steps']} DPM-Solver steps, guidance "
        f"{settings['guidance_scale']}; same judge, same {lora_eval['num_candidates']} candidates, prompts judged by "
        f"what they say):\n\n{table}\n\n{confusion_markdown(lora_eval['colour_confusion'])}"
    )


def lora_block(folder: Path) -> str:
    """The after-LoRA figures for the committed world; a note for other builds or while the eval is missing."""
    if folder.resolve() != EMBEDDED_DIR:
        return "_Not measured for this build: the demo adapter and its evaluation belong to the committed world._"
    pending = "_Not measured yet: train the demo adapter, then run `python docs/build.py --rerun`._"
    if not (LORA_EVAL.exists() and DEMO_SUMMARY.exists()):
        return pending
    lora_eval = json.loads(LORA_EVAL.read_text())
    measured = {row["name"] for row in lora_eval["prompt_sets"]}
    if "colour_confusion" not in lora_eval or not set(EVAL_SETS) <= measured:
        return pending  # an evaluation from before this world's prompt sets existed
    return lora_figures(lora_eval, read_summary(EMBEDDED_DEMO_ADAPTER))


def block_renderers(folder: Path = EMBEDDED_DIR) -> dict[str, Callable[[], str]]:
    """The renderers of embedded/README.md's generated blocks, reading folder/build_report.json."""
    return {
        "embedded-command": lambda: command_line(read_report(folder)),
        "embedded-world": lambda: world_table(read_report(folder)),
        "embedded-known-gap": lambda: known_gap(read_report(folder)),
        "embedded-build": lambda: build_figures(read_report(folder)),
        "embedded-quality": lambda: quality_table(read_report(folder)),
        "embedded-lora": lambda: lora_block(folder),
    }


def render(folder: Path = EMBEDDED_DIR) -> None:
    """Write folder/README.md: the committed page with its generated blocks rendered from folder's build."""
    atomic_write_text(folder / "README.md", render_blocks(PAGE.read_text(encoding="utf-8"), block_renderers(folder)))
