"""Report files: eval_results.json, eval_results.md (Markdown table) and comparison_grid.png."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from eval.confusion import confusion_markdown
from lorakit import markdown as md
from lorakit.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from lorakit.filenames import EVAL_GRID_FILE, EVAL_REPORT_FILE, EVAL_RESULTS_FILE

METRICS = (("clip_score", "CLIP score"), ("r_precision_top1", "R-precision@1"), ("mean_rank", "mean rank"))
PARAMETER_ROWS = (
    ("text_encoder", "text encoder"),
    ("unet", "UNet"),
    ("vae_encoder", "VAE encoder"),
    ("vae_decoder", "VAE decoder"),
    ("vae", "VAE total"),
    ("pipeline", "whole pipeline"),
    ("lora", "LoRA adapter (all)"),
    ("lora_unet", "LoRA on the UNet"),
    ("lora_text_encoder", "LoRA on the text encoder"),
)


def seed_table(results: dict) -> str:
    """R-precision@1 of each prompt set per seed, base -> LoRA, with a line on why it is worth reading ("" for one
    seed or results written before the per-seed rates existed)."""
    sets = [row for row in results["prompt_sets"] if "r_precision_top1_by_seed" in row["base"]]
    seeds = list(sets[0]["base"]["r_precision_top1_by_seed"]) if sets else []
    if len(seeds) < 2:
        return ""
    rows = []
    for row in sets:
        base, adapter = row["base"]["r_precision_top1_by_seed"], row["adapter"]["r_precision_top1_by_seed"]
        rows.append([row["name"], *(f"{base[seed]:.2f} → {adapter[seed]:.2f}" for seed in seeds)])
    header = ["prompt set", *(f"seed {seed}" for seed in seeds)]
    table = md.markdown_table(header, rows, align=["---", *["---:"] * len(seeds)])
    note = (
        "R-precision@1 per seed (base → base + LoRA). Every prompt of a seed starts from the same noise, so one "
        "seed's draw moves a whole column, and the pooled figures above are the mean of the columns."
    )
    return f"{note}\n\n{table}"


def markdown_table(results: dict) -> str:
    """The results as Markdown: one row per prompt set, base and adapter side by side, then sizes and speed."""
    header = [
        "prompt set",
        "prompts",
        "images",
        *(f"{label} {side}" for _, label in METRICS for side in ("base", "LoRA")),
    ]
    rows = []
    for row in results["prompt_sets"]:
        cells = [row["name"], str(row["num_prompts"]), str(row["num_images"])]
        for key, _ in METRICS:
            cells += [f"{row['base'][key]:.3f}", f"{row['adapter'][key]:.3f}"]
        rows.append(cells)
    params, timing, settings = results["parameters"], results["timing"], results["settings"]
    sizes = [[name, f"{params[key]:,}"] for key, name in PARAMETER_ROWS]
    sizes += [
        ["UNet LoRA as a share of the UNet", f"{100 * params['lora_share_of_unet']:.3f} %"],
        ["adapter file size", f"{params['adapter_file_bytes']:,} bytes"],
    ]
    intro = (
        f"Base `{results['base']}` against base + LoRA `{results['lora']}`, judged by CLIP `{results['clip_model']}` "
        f"({results['num_candidates']} candidate prompts for R-precision; mean rank 1 is best)."
    )
    if results.get("matching") == "by meaning":
        intro += (
            " Each image counts as right when the judge ranks first a candidate that shows what its prompt says, "
            "however the prompt is phrased; a prompt that names no background counts a match on colour and shape "
            "(the candidates collapsed over background)."
        )
    speed = (
        f"Seconds per image ({settings['device']}, {settings['num_inference_steps']} steps, guidance "
        f"{settings['guidance_scale']}, {settings['height']}x{settings['width']} px): base "
        f"{timing['base_seconds_per_image']:.3f}, base + LoRA {timing['adapter_seconds_per_image']:.3f}."
    )
    scores = md.markdown_table(header, rows, align=["---", *["---:"] * (len(header) - 1)])
    parameters = md.markdown_table(["component", "parameters"], sizes, align=["---", "---:"])
    per_seed = seed_table(results)
    per_seed = f"{per_seed}\n\n" if per_seed else ""
    confusion = f"{confusion_markdown(results['colour_confusion'])}\n\n" if "colour_confusion" in results else ""
    return f"{intro}\n\n{scores}\n\n{per_seed}{confusion}{parameters}\n\n{speed}\n"


def _label(text: str, width: int, height: int = 14) -> Image.Image:
    """A white strip with `text` in the default font, cut to fit."""
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    max_chars = max(width // 6, 4)
    draw.text((2, 1), text if len(text) <= max_chars else text[: max_chars - 1] + "…", fill=(0, 0, 0))
    return strip


def comparison_grid(base: torch.Tensor, adapter: torch.Tensor, prompts: list[str], cell: int = 128) -> Image.Image:
    """Rows: prompts (first seed); columns: base | adapter; a caption strip above each row."""
    label_height, pad = 14, 4
    width = 2 * cell + 3 * pad
    grid = Image.new("RGB", (width, label_height + len(prompts) * (cell + label_height + pad) + pad), (255, 255, 255))
    header = Image.new("RGB", (width, label_height), (255, 255, 255))
    ImageDraw.Draw(header).text((pad, 1), "base", fill=(0, 0, 0))
    ImageDraw.Draw(header).text((2 * pad + cell, 1), "base + LoRA", fill=(0, 0, 0))
    grid.paste(header, (0, 0))
    for row, prompt in enumerate(prompts):
        top = label_height + row * (cell + label_height + pad)
        grid.paste(_label(prompt, width), (0, top))
        for column, images in enumerate((base, adapter)):
            tile = Image.fromarray(images[row].permute(1, 2, 0).numpy()).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (pad + column * (cell + pad), top + label_height))
    return grid


def write_report(results: dict, grid: Image.Image, output_dir: str | Path) -> dict[str, Path]:
    """Write the three report files atomically; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": output_dir / EVAL_RESULTS_FILE,
        "markdown": output_dir / EVAL_REPORT_FILE,
        "grid": output_dir / EVAL_GRID_FILE,
    }
    atomic_write_json(paths["json"], results)
    atomic_write_text(paths["markdown"], markdown_table(results))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write_bytes(paths["grid"], buffer.getvalue())
    return paths
