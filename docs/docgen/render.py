"""Renderers of the generated blocks: each turns result files into Markdown, with no number typed by hand.

RENDERERS maps every block name of every page in docs/build.py's DOC_FILES to its renderer; the blocks of
docs/benchmarks.md and embedded/README.md come from bench/report.py and embedded/readme.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import yaml

from bench import report as bench_report
from docgen import sources as src
from docgen.stats import intervals_apart
from embedded import readme as embedded_readme
from lorakit.markdown import markdown_table

BYTES_PER_PARAM = (("fp32", 4), ("fp16 / bf16", 2), ("8-bit", 1))
COMPONENTS = (
    ("text_encoder", "text encoder"),
    ("unet", "UNet (denoiser)"),
    ("vae_encoder", "VAE encoder"),
    ("vae_decoder", "VAE decoder"),
    ("pipeline", "whole pipeline"),
)
SET_LABELS = {
    "adapter": "adapter concept (purple)",
    "adapter_phrasings": "adapter concept, held-out phrasings",
    "base": "base concepts",
    "base_phrasings": "base concepts, held-out phrasings",
    "heldout": "held-out combinations",
}


def _n(value: int) -> str:
    return f"{value:,}"


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:,.1f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:,.1f} kB"


def _pending(what: str, command: str) -> str:
    then = "" if command.startswith("python docs/build.py") else ", then `python docs/build.py --blocks`"
    return f"_{what} not measured yet: run `{command}`{then}._"


def _lr(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    """A figures table: the first column left-aligned, the others right-aligned unless `align` says otherwise."""
    return markdown_table(header, rows, align or ["---", *["---:"] * (len(header) - 1)])


# --- evaluation -------------------------------------------------------------------------------------------


def _rate_with_seed_range(scores: dict) -> str:
    """Like "0.93 (0.81-0.98)": the pooled R-precision, then its lowest and highest seed when there are several."""
    by_seed = list(scores.get("r_precision_top1_by_seed", {}).values())
    spread = f" ({min(by_seed):.2f}–{max(by_seed):.2f})" if len(by_seed) > 1 else ""
    return f"{scores['r_precision_top1']:.2f}{spread}"


def eval_table() -> str:
    """Base against base + demo adapter, per prompt set (README, how-it-works)."""
    results = src.read_json(src.EVAL_JSON)
    if results is None:
        return _pending("The evaluation", src.EVAL_COMMAND)
    rows = []
    for row in results["prompt_sets"]:
        base, lora = row["base"], row["adapter"]
        rows.append(
            [
                SET_LABELS.get(row["name"], row["name"]),
                str(row["num_images"]),
                _rate_with_seed_range(base),
                _rate_with_seed_range(lora),
                f"{base['clip_score']:.1f}",
                f"{lora['clip_score']:.1f}",
            ]
        )
    settings = results["settings"]
    table = _table(
        ["prompts", "images", "R-precision base", "R-precision + LoRA", "CLIP score base", "CLIP score + LoRA"], rows
    )
    return (
        f"{table}\n\n"
        f"Judge: the embedded CLIP ranking the {results['num_candidates']} world captions for each image; it counts "
        "when the first says what the image's prompt says, however phrased (a prompt naming no background: colour "
        "and shape); "
        f"{settings['num_inference_steps']} sampler steps ({settings['scheduler']}), guidance "
        f"{settings['guidance_scale']}, seeds {', '.join(map(str, settings['seeds']))}, "
        f"{settings['height']}x{settings['width']} px; adapter `{results['lora']}`. In brackets, R-precision of "
        "the lowest and the highest seed: every prompt of a seed starts from the same noise, so one seed's draw "
        "moves all its prompts together. Source: "
        f"`docs/results/eval/eval_results.json`, written by `{results['source']}`."
    )


def eval_headline() -> str:
    """One sentence: the adapter concept's R-precision before and after."""
    results = src.read_json(src.EVAL_JSON)
    if results is None:
        return _pending("The evaluation", src.EVAL_COMMAND)
    sets = {row["name"]: row for row in results["prompt_sets"]}
    parts = []
    if "adapter" in sets:
        row = sets["adapter"]
        parts.append(
            f"On prompts with the new colour, the judge picks the right caption for "
            f"{row['base']['r_precision_top1']:.0%} of the base model's images and "
            f"{row['adapter']['r_precision_top1']:.0%} of the adapter's"
        )
    if "base" in sets:
        row = sets["base"]
        parts.append(
            f"on the colours the base already knew it goes from {row['base']['r_precision_top1']:.0%} to "
            f"{row['adapter']['r_precision_top1']:.0%}"
        )
    return "; ".join(parts) + "."


# --- sizes ------------------------------------------------------------------------------------------------


def _sizes() -> tuple[dict | None, dict | None]:
    return src.read_json(src.SIZES_EMBEDDED), src.read_json(src.SIZES_BK_SDM)


def model_sizes() -> str:
    """Parameters per component for the embedded model and BK-SDM-Tiny, and the LoRA share (README)."""
    embedded, bk = _sizes()
    if embedded is None or bk is None:
        return _pending("Parameter counts", "python docs/build.py")
    rows = [[label, _n(embedded["parameters"][key]), _n(bk["parameters"][key])] for key, label in COMPONENTS]
    for rank in sorted({*embedded["lora_by_rank"], *bk["lora_by_rank"]}, key=int):
        cells = []
        for sizes in (embedded, bk):
            count = sizes["lora_by_rank"].get(rank)
            share = sizes["lora_share_of_unet_by_rank"].get(rank)
            cells.append("-" if count is None else f"{_n(count)} ({100 * share:.2f} % of the UNet)")
        rows.append([f"LoRA rank {rank} on {', '.join(bk['lora_target_modules'])}", *cells])
    summary = src.demo_summary()
    note = ""
    if summary:
        note = (
            f"\n\nThe committed demo adapter holds {_n(summary.lora_trainable_parameters)} trainable parameters "
            f"in a {_mb(summary.adapter_file_bytes)} file (`{src.relative(src.TRAIN_SUMMARY)}`)."
        )
    return (
        _table(["component", "embedded shapes model", "BK-SDM-Tiny"], rows)
        + "\n\nCounted from the model configs on PyTorch's meta device (no weights loaded) by `eval.sizes`; "
        "source: `docs/results/param_counts_embedded.json`, `docs/results/param_counts_bk_sdm_tiny.json`." + note
    )


def deploy_sizes() -> str:
    """Weights on disk/in memory at fp32, fp16 and 8-bit, from parameter counts (deployment)."""
    embedded, bk = _sizes()
    if embedded is None or bk is None:
        return _pending("Parameter counts", "python docs/build.py")
    rows = []
    for name, sizes in (("BK-SDM-Tiny", bk), ("embedded shapes model", embedded)):
        for key, label in COMPONENTS:
            count = sizes["parameters"][key]
            rows.append([f"{name}: {label}", _n(count), *(_mb(count * b) for _, b in BYTES_PER_PARAM)])
        lora = sizes["lora_by_rank"].get("4")
        if lora is not None:
            rows.append([f"{name}: LoRA rank 4", _n(lora), *(_mb(lora * b) for _, b in BYTES_PER_PARAM)])
    return (
        _table(["part", "parameters", *(label for label, _ in BYTES_PER_PARAM)], rows)
        + "\n\nBytes = parameters x 4 (fp32), x 2 (fp16/bf16) or x 1 (8-bit weights), before file-format overhead. "
        "Parameter counts: `docs/results/param_counts_*.json`."
    )


def device_fit() -> str:
    """Whether BK-SDM-Tiny's weights fit in the memory an app may use on each device class (deployment)."""
    _, bk = _sizes()
    facts = src.read_json(src.FACTS_JSON)["device_classes"]
    if bk is None:
        return _pending("Parameter counts", "python docs/build.py")
    total = bk["parameters"]["pipeline"]
    share = facts["usable_share"]
    rows = []
    for device in facts["devices"]:
        budget = device["ram_gib"] * 2**30 * share
        cells = []
        for _, width in BYTES_PER_PARAM:
            need = total * width
            if need > 10 * budget:
                cells.append("no (far too large)")
            else:
                cells.append(f"{'fits' if need <= budget else 'no'} ({100 * need / budget:.0f} % of budget)")
        ram = f"{device['ram_gib']:g} GiB" if device["ram_gib"] >= 1 else f"{device['ram_gib'] * 2**20:,.0f} KiB"
        rows.append([device["name"], device["platform"], ram, *cells])
    return (
        _table(
            ["device", "platform", "RAM", *(f"weights {label}" for label, _ in BYTES_PER_PARAM)],
            rows,
            align=["---", "---", "---:", "---", "---", "---"],
        )
        + f"\n\nBudget: {share:.0%} of the device's RAM for the model's weights (the rest is the OS, the app and "
        f"the activations while generating). BK-SDM-Tiny has {_n(total)} parameters in all. RAM figures and the "
        "budget share are assumptions in `docs/results/facts.json`."
    )


# --- datasets and training --------------------------------------------------------------------------------


def datasets_block() -> str:
    """The two datasets with their sizes (README)."""
    facts = src.read_json(src.FACTS_JSON)
    base_rows = src.dataset_rows(src.REPO / "embedded" / "data" / "base")
    adapter_rows = src.dataset_rows(src.REPO / "embedded" / "data" / "adapter")
    naruto = facts["naruto"]
    return (
        _table(
            ["dataset", "rows", "what", "licence"],
            [
                [
                    "[`embedded/data/base`](embedded/data/base/README.md)",
                    _n(base_rows),
                    '32 px shapes in five colours, captions like "a red star on a white background" (pretrains the '
                    "embedded base)",
                    "Apache-2.0 (generated by this repo)",
                ],
                [
                    "[`embedded/data/adapter`](embedded/data/adapter/README.md)",
                    _n(adapter_rows),
                    "the same shapes in purple, a colour the base UNet was never trained on (the default LoRA run)",
                    "Apache-2.0 (generated by this repo)",
                ],
                [
                    f"[`{naruto['hub_id']}`](https://huggingface.co/datasets/{naruto['hub_id']})",
                    _n(naruto["rows"]),
                    naruto["what"],
                    naruto["license_note"],
                ],
            ],
            align=["---", "---:", "---", "---"],
        )
        + f"\n\nNaruto figures: {naruto['source']} (`docs/results/facts.json`)."
    )


def train_run() -> str:
    """What the embedded default run did (README, how-it-works)."""
    summary = src.demo_summary()
    if summary is None:
        run = default_run()
        if run is None:
            return _pending("The demo run", "accelerate launch --config_file accelerate_config.yaml train_lora.py")
        return (
            f"One epoch of the default preset ({run['what']}) saw {_n(run['num_samples'])} images in "
            f"{run['global_step']} optimizer steps and trained in {run['train_seconds']:.0f} s on a shared CPU "
            f"(`{run['source']}`)."
        )
    return (
        f"The committed demo adapter (`embedded/demo_adapter/`) saw {_n(summary.num_samples)} images in "
        f"{summary.global_step} optimizer steps ({summary.num_train_epochs} epoch) and trained in "
        f"{summary.train_seconds:.0f} s on a shared CPU; final loss {summary.final_loss:.3f}, "
        f"{_n(summary.lora_trainable_parameters)} trainable LoRA parameters, adapter file "
        f"{_mb(summary.adapter_file_bytes)}. Source: `{src.relative(src.TRAIN_SUMMARY)}`."
    )


def _preset(name: str) -> dict:
    return yaml.safe_load((src.REPO / "configs" / name).read_text())


def sample_prompts() -> str:
    """The demo run's validation prompts, as a numbered list, read from its preset (README)."""
    prompts = _preset("shapes.yaml")["validation"]["validation_prompt"]
    return "\n".join(f'{i}. "{prompt}"' for i, prompt in enumerate(prompts, 1))


def naruto_preset() -> str:
    """The real-run preset's main settings (README)."""
    p = _preset("bk-sdm-tiny-naruto.yaml")
    t, lora, data = p["training"], p["lora"], p["data"]
    rows = [
        ["base model", f"`{p['model']['pretrained_model_name_or_path']}`"],
        ["dataset", f"`{data['dataset_name']}` at {data['resolution']} px"],
        ["LoRA", f"rank {lora['rank']}, alpha {lora['lora_alpha']}, on {', '.join(lora['target_modules'])}"],
        ["optimizer", f"AdamW, learning rate {_lr(t['learning_rate'])}, {t['lr_scheduler']} schedule"],
        ["batch", _preset_batch(t)],
        ["epochs", str(t["num_train_epochs"])],
        ["precision", f"{t['mixed_precision']} (LoRA weights stay fp32)"],
        ["loss weighting", f"min-SNR, gamma {t['snr_gamma']:g}"],
        ["checkpoints", f"every {t['checkpointing_steps']} steps, newest {t['checkpoints_total_limit']} kept"],
        ["validation prompts", "; ".join(f'"{v}"' for v in p["validation"]["validation_prompt"])],
        ["output", f"`{p['output']['output_dir']}/`"],
    ]
    return _table(["setting", "value"], rows, align=["---", "---"])


def _preset_batch(t: dict) -> str:
    """A preset's batch: the flags' split, or with --auto_micro_batch the batch per step and how it is split."""
    if not t.get("auto_micro_batch"):
        return f"{t['train_batch_size']} per step x {t['gradient_accumulation_steps']} accumulation steps"
    return (
        f"{t['train_batch_size'] * t['gradient_accumulation_steps']} per optimizer step, as the largest micro-batch "
        "that fits in memory (`--auto_micro_batch`; gradient checkpointing only if 1 does not fit)"
    )


def python_version() -> str:
    """The Python versions pyproject.toml accepts (README)."""
    import tomllib

    project = tomllib.loads((src.REPO / "pyproject.toml").read_text())["project"]
    return f"Python {project['requires-python'].replace('>=', '')} or newer (`pyproject.toml`)."


def default_run() -> dict | None:
    """One epoch of the default preset: the demo adapter's run, else the continual experiment's first stage."""
    summary = src.demo_summary()
    if summary is not None:
        return {
            **summary.to_dict(),
            "what": "the run that made the committed demo adapter",
            "source": src.relative(src.TRAIN_SUMMARY),
        }
    continual = src.read_json(src.CONTINUAL_JSON)
    if continual is None:
        return None
    first = next(stage for stage in continual["stages"] if stage["name"] == "first")
    return {
        **first,
        "what": "the default preset's run in the continual-tuning experiment",
        "source": src.relative(src.CONTINUAL_JSON),
    }


def quickstart_time() -> str:
    """How long the quickstart run took (README)."""
    run = default_run()
    if run is None:
        return _pending("The demo run", "accelerate launch --config_file accelerate_config.yaml train_lora.py")
    return (
        f"One epoch of this preset ({run['what']}) took {run['train_seconds']:.0f} s of training "
        f"({run['global_step']} steps) on a shared CPU (`{run['source']}`)."
    )


# --- cost and speed (bench) -------------------------------------------------------------------------------


def precision_measured() -> str:
    """What `auto` chose on the bench's CPU and the ratios against fp32; --compile's cost; the main job (README)."""
    document = src.read_json(src.BENCH_PRECISION_JSON)
    if document is None:
        return _pending("The precision measurements", src.BENCH_PRECISION_COMMAND)
    checks = document.get("checks", {})
    machine = document["machine"]
    lines = bench_report.precision_lines(checks.get("precision") or {})
    job = checks.get("main_job")
    if job:
        split = {key: f"{value:.1f} s" for key, value in job["second_run_split"].items()}
        lines.append(
            f"- The quickstart command itself: {job['first_run_wall_s']:.1f} s wall on a first run, "
            f"{job['second_run_wall_s']:.1f} s once the probe's timings are kept (launcher {split['launcher_s']}, "
            f"start-up {split['startup_s']}, steps {split['steps_s']}, wind-down {split['wind_down_s']})."
        )
    load = machine["load_average_1min_at_start"]
    intro = (
        f"Measured on {machine['cpu']} ({machine['cores']} cores, load {load} at the start; "
        f"`{src.BENCH_PRECISION_COMMAND}`, all in one run, `docs/benchmarks.md` has the tables):"
    )
    return intro + "\n\n" + "\n".join(lines)


def _gpu_price(facts: dict, gpu_name: str | None) -> dict:
    """The assumed hourly price of the measured GPU, else the first listed."""
    prices = facts["gpu_prices"]
    if gpu_name:
        for price in prices:
            if price["match"].lower() in gpu_name.lower():
                return price
    return prices[0]


def epoch_cost() -> str:
    """What one epoch costs: embedded default on CPU, BK-SDM-Tiny + naruto on a rented GPU (how-it-works)."""
    facts = src.read_json(src.FACTS_JSON)
    lines = []
    summary = default_run()
    cpu_price = facts["cpu_price"]
    if summary:
        seconds = summary["train_seconds"]
        cost = seconds / 3600 * cpu_price["usd_per_hour"]
        lines.append(
            f"- **Embedded default** (shapes, {_n(summary['num_samples'])} images): {seconds:.0f} s for one epoch "
            f"on a shared CPU ({summary['what']}, `{summary['source']}`). At {cpu_price['usd_per_hour']:.2f} USD "
            "per hour for such a machine "
            f"({cpu_price['what']}) that is about {cost:.4f} USD: effectively free."
        )
    gpu = src.bench_result("train", "gpu")
    naruto = facts["naruto"]
    case = _best_gpu_case(gpu)
    if case is None:
        lines.append(
            f"- **BK-SDM-Tiny + naruto on a rented GPU**: {_pending('GPU training speed', src.BENCH_GPU_COMMAND)}"
        )
    else:
        price = _gpu_price(facts, gpu["machine"].get("gpu_name") or gpu["machine"].get("gpu"))
        seconds = naruto["rows"] / case["images_per_s"]
        lines.append(
            f"- **BK-SDM-Tiny + naruto on a rented GPU**: the bench measured {case['images_per_s']:.1f} images/s at "
            f"{case['resolution']} px, batch {case['batch_size']} on {_gpu_label(gpu)}; one epoch over "
            f"{_n(naruto['rows'])} images is then about {seconds / 60:.1f} minutes of training, "
            f"{seconds / 3600 * price['usd_per_hour']:.2f} USD at {price['usd_per_hour']:.2f} USD/hour "
            f"({price['what']}). Add a few minutes for start-up and the model download."
        )
    return "\n".join(lines) + (
        "\n\nPrices are assumptions, not quotes (`docs/results/facts.json`); times come from "
        "the files named above and `bench/results/train-gpu.json`."
    )


def _gpu_label(document: dict) -> str:
    machine = document.get("machine", {})
    return str(machine.get("gpu_name") or machine.get("gpu") or "the benchmark GPU")


def _best_gpu_case(document: dict | None) -> dict | None:
    """The fastest 512 px GPU training case (images/s), if the GPU bench ran."""
    if not document:
        return None
    cases = [c for c in document.get("cases", []) if c.get("images_per_s") and c.get("resolution") == 512]
    return max(cases, key=lambda c: c["images_per_s"]) if cases else None


def _model_name(name: str) -> str:
    """A Hub id as it is; a local folder by its last part (bench folders live in temporary directories)."""
    return name if name.count("/") == 1 and not name.startswith(("/", ".")) else Path(name).name


def _generate_rows(document: dict, device_label: str) -> list[list[str]]:
    rows = []
    for name, variant in document.get("variants", {}).items():
        rows.append(
            [
                f"{device_label}: {name.replace('_', ' ')}",
                f"{document['image_px']} px",
                str(variant["steps"]),
                f"{variant['seconds_per_image']:.3f}",
            ]
        )
    return rows


def latency() -> str:
    """Seconds per image and memory measured by the bench (deployment)."""
    rows, notes = [], []
    for device in ("cpu", "gpu"):
        document = src.bench_result("generate", device)
        if document is None:
            command = src.BENCH_GPU_COMMAND if device == "gpu" else "python -m bench generate"
            notes.append(_pending(f"Generation on {device.upper()}", command))
            continue
        label = _gpu_label(document) if device == "gpu" else f"CPU ({document['machine'].get('cpu', 'cpu')})"
        rows += _generate_rows(document, f"{label}, `{_model_name(document['base_model'])}`")
        notes.append(
            f"{device.upper()}: pipeline load {document['pipeline_load_s']:.2f} s, adapter load "
            f"{document['adapter_load_s']:.2f} s (`bench/results/generate-{device}.json`)."
        )
    table = _table(["setting", "size", "steps", "seconds per image"], rows) if rows else ""
    memory = _train_memory_lines()
    return "\n\n".join(part for part in (table, " ".join(notes), memory) if part)


def _train_memory_lines() -> str:
    lines = []
    for device in ("cpu", "gpu"):
        document = src.bench_result("train", device)
        for case in (document or {}).get("cases", []):
            peak = case.get("peak_cuda_mib") if device == "gpu" else case.get("peak_rss_mib")
            if peak:
                what = "peak GPU memory" if device == "gpu" else "peak process memory"
                lines.append(
                    f"- training `{case['name']}` ({case['resolution']} px, batch {case['batch_size']}): "
                    f"{what} {peak:,.0f} MiB"
                )
    return ("Memory measured by the bench:\n\n" + "\n".join(lines)) if lines else ""


def hosting_cost() -> str:
    """Cost per 1,000 images from measured seconds per image and assumed hourly prices (deployment)."""
    facts = src.read_json(src.FACTS_JSON)
    rows = []
    for device in ("gpu", "cpu"):
        document = src.bench_result("generate", device)
        if document is None:
            continue
        variant = document["variants"].get("lora_fused") or next(iter(document["variants"].values()))
        seconds = variant["seconds_per_image"]
        if device == "gpu":
            price = _gpu_price(facts, _gpu_label(document))
        else:
            price = facts["cpu_price"]
        per_1000 = seconds * 1000 / 3600 * price["usd_per_hour"]
        rows.append(
            [
                _gpu_label(document) if device == "gpu" else "CPU",
                f"`{_model_name(document['base_model'])}` {document['image_px']} px, {variant['steps']} steps",
                f"{seconds:.3f}",
                f"{3600 / seconds:,.0f}",
                f"{price['usd_per_hour']:.2f} ({price['what']})",
                f"{per_1000:.3f}",
            ]
        )
    if not rows:
        return _pending("Generation speed", "python -m bench generate")
    text = _table(
        ["machine", "model and setting", "s/image", "images/hour", "USD/hour (assumed)", "USD per 1,000"], rows
    )
    if src.bench_result("generate", "gpu") is None:
        text += "\n\n" + _pending("BK-SDM-Tiny at 512 px on a GPU", src.BENCH_GPU_COMMAND)
    return text + (
        "\n\nAssumes one image per request, a worker kept 100 % busy (no idle time billed), fused LoRA, and the "
        "prices in `docs/results/facts.json`; idle replicas, storage and egress come on top."
    )


# --- continual tuning --------------------------------------------------------------------------------------


def _ci(score: dict) -> str:
    """A share with its 95 % interval."""
    low, high = score["interval"]
    return f"{score['share']:.2f} ({low:.2f}\u2013{high:.2f})"


def _versus(first: dict, second: dict) -> str:
    """Whether two shares differ beyond their 95 % intervals, in words."""
    return "beyond the intervals" if intervals_apart(first["interval"], second["interval"]) else "within the intervals"


def _continual() -> dict | None:
    return src.read_json(src.CONTINUAL_JSON)


def continual_candidates() -> str:
    """The second batches considered, the base bar and the naive update's effect on batch 1 (continual-tuning)."""
    results = _continual()
    if results is None:
        return _pending("The continual-tuning experiment", src.CONTINUAL_COMMAND)
    first = next(s for s in results["stages"] if s["name"] == "first")["scores"]["purple"]
    rows = []
    for cand in results["candidates"]:
        naive = cand.get("naive_purple")
        effect = f"{_ci(first)} \u2192 {_ci(naive)}, {_versus(first, naive)}" if naive else "not trained"
        passes = "yes" if cand["passes_base_bar"] else "**no**"
        kept = "**kept**" if cand["name"] == results["kept"] else "-"
        rows.append([cand["label"], _ci(cand["base"]), passes, effect, kept])
    bar = results["base_bar"]
    header = ["candidate second batch", "base model R-precision", f"at most {bar}", "naive update: purple", "kept"]
    return _table(header, rows, ["---", "---:", "---", "---", "---"])


def continual_table() -> str:
    """Per-concept R-precision (with 95 % intervals) and CLIP score across the experiment's stages."""
    results = _continual()
    if results is None:
        return _pending("The continual-tuning experiment", src.CONTINUAL_COMMAND)
    concepts = results["concepts"]
    header = ["model", *(f"{c['label']} R-precision" for c in concepts), *(f"{c['label']} CLIP" for c in concepts)]
    rows = []
    for stage in results["stages"]:
        scores = stage["scores"]
        rows.append(
            [
                stage["label"],
                *(_ci(scores[c["name"]]) for c in concepts),
                *(f"{scores[c['name']]['clip_score']:.1f}" for c in concepts),
            ]
        )
    return _table(header, rows)


BIAS_STAGES = ("skewed_short", "balanced", "skewed", "rebalanced")


def continual_bias() -> str:
    """Black-background share for prompts that name no background, per model (continual-tuning)."""
    results = _continual()
    if results is None:
        return _pending("The continual-tuning experiment", src.CONTINUAL_COMMAND)
    sampled = results["bias"]["sampled"]
    rows = []
    for stage in results["stages"]:
        if stage["name"] not in ("base", *BIAS_STAGES):
            continue
        scores = stage["scores"]
        mix = sampled.get(stage["name"].removesuffix("_short"))  # the one-epoch run samples the same batch
        rows.append(
            [
                stage["label"],
                f"{mix['black_share']:.2f} of {_n(mix['rows'])}" if mix else "-",
                _ci(scores["purple_neutral"]),
                _ci(scores["base_neutral"]),
                f"{scores['purple_neutral']['pixel_black'] / scores['purple_neutral']['images']:.2f}",
                f"{scores['base_neutral']['pixel_black'] / scores['base_neutral']['images']:.2f}",
            ]
        )
    header = [
        "model",
        "black share of the training sample",
        "purple prompts: black, judge",
        "base-colour prompts: black, judge",
        "purple: black, border pixels",
        "base-colour: black, border pixels",
    ]
    return _table(header, rows)


def continual_setup() -> str:
    """The experiment's settings, stated from its result file (continual-tuning)."""
    results = _continual()
    if results is None:
        return _pending("The continual-tuning experiment", src.CONTINUAL_COMMAND)
    ev = results["evaluation"]
    images = lambda name: ev["prompts"][name] * ev["seeds"][name]  # noqa: E731
    lines = []
    for concept in results["concepts"]:
        data = f", {_n(concept['train_rows'])} training images" if concept["train_rows"] else ""
        name = concept["name"]
        lines.append(
            f"- {concept['label']}: {concept['description']} ({ev['prompts'][name]} evaluation prompts x "
            f"{ev['seeds'][name]} seeds = {images(name)} images per model{data})"
        )
    for name, what in (("purple_neutral", "purple"), ("base_neutral", "base-colour")):
        lines.append(
            f'- {what} prompts that name no background, e.g. "{results["bias"]["prompts"][name][0]}" '
            f"({ev['prompts'][name]} prompts x {ev['seeds'][name]} seeds = {images(name)} images per model)"
        )
    for stage in results["stages"]:
        if stage.get("command"):
            lines.append(
                f"- {stage['label']}: `{stage['command']}` ({stage['global_step']} steps over "
                f"{_n(stage['num_samples'])} samples, {stage['train_seconds']:.0f} s)"
            )
    run = results["run"]
    lines.append(
        f"- Judging: {ev['steps']} sampler steps, guidance {ev['guidance']}, at least {ev['min_seeds']} seeds per "
        f"prompt and {ev['min_images']} images per figure; R-precision ranks each image's prompt among "
        f"{ev['num_candidates']} world captions with the embedded CLIP; every share has its {ev['interval']}. "
        f"The whole run took {run['wall_seconds'] / 60:.1f} min wall on {run['cpus']} CPU cores (load average "
        f"{run['load_at_start'][0]:.2f} at its start). Source: `docs/results/continual.json`."
    )
    return "\n".join(lines)


def _bias_findings(results: dict, stage: dict) -> list[str]:
    """The bias experiment's findings: the skew the batch puts into neutral prompts, and the fix."""
    sampled, epochs = results["bias"]["sampled"], results["bias"]["epochs"]
    lines = []
    for name, what in (("purple_neutral", "purple"), ("base_neutral", "base-colour")):
        base, short, balanced, skewed, fixed = (stage[s][name] for s in ("base", *BIAS_STAGES))
        lines.append(
            f"- **Bias, {what} prompts without a background:** black in {_ci(base)} of the base model's images; "
            f"after one epoch of the skewed batch (the preset) {_ci(short)}, {_versus(short, base)} of the base. "
            f"After {epochs} epochs: {_ci(balanced)} with the balanced batch, {_ci(skewed)} with the skewed one "
            f"({_versus(skewed, base)} of the base, {_versus(skewed, balanced)} of the balanced run), and "
            f"{_ci(fixed)} rebalanced ({_versus(fixed, skewed)} of the skewed run, {_versus(fixed, base)} of the "
            "base)."
        )
    fixed, skewed = sampled["rebalanced"], sampled["skewed"]
    weights = ":".join(map(str, results["bias"]["rebalance_weights"]))
    steps = {s["name"]: s for s in results["stages"]}
    lines.append(
        f"- **What the trainer sampled:** the skewed batch as it is, {_n(skewed['rows'])} rows per epoch, "
        f"{skewed['black_share']:.2f} black; with `--mix_weights` {weights} (black folder : white folder), "
        f"{_n(fixed['rows'])} rows per epoch, {fixed['black_share']:.2f} black (read back through `lorakit.data`), "
        f"repeated to the same {steps['rebalanced']['global_step']} steps as the skewed run's "
        f"{steps['skewed']['global_step']}."
    )
    agreement = min(s[n]["agreement"] for s in stage.values() for n in ("purple_neutral", "base_neutral") if n in s)
    share = "every image" if agreement == 1 else f"at least {agreement:.2f} of the images of every row"
    lines.append(
        f"- **Measure:** the judge's call (black or white background) agreed with the border pixels on {share}."
    )
    return lines


def continual_findings() -> str:
    """What the tables show, in words, with the intervals that say which differences are beyond noise."""
    results = _continual()
    if results is None:
        return _pending("The continual-tuning experiment", src.CONTINUAL_COMMAND)
    stage = {s["name"]: s["scores"] for s in results["stages"]}
    kept = results["kept"]
    new = next(c for c in results["concepts"] if c["name"] == kept)["label"]
    rejected = [c for c in results["candidates"] if not c["passes_base_bar"]]
    weights = ":".join(str(w) for w in results["replay_weights"])
    p = lambda name: stage[name]["purple"]  # noqa: E731
    k = lambda name: stage[name][kept]  # noqa: E731
    b = lambda name: stage[name]["base"]  # noqa: E731
    lines = [
        f"- **Batch 1 learned:** purple R-precision went from {_ci(p('base'))} (base model) to {_ci(p('first'))} "
        f"with the first adapter, {_versus(p('base'), p('first'))}.",
        "- **Second batch:** "
        + "; ".join(
            f"{c['label']} rejected: the base model already scores {_ci(c['base'])}, above the bar of "
            f"{results['base_bar']}"
            for c in rejected
        )
        + f"{'; ' if rejected else ''}kept: {new}, {_ci(k('base'))} on the base model.",
        f"- **Naive update:** training on the second batch alone took purple from {_ci(p('first'))} to "
        f"{_ci(p('naive'))} ({_versus(p('first'), p('naive'))}: "
        + ("forgetting" if intervals_apart(p("first")["interval"], p("naive")["interval"]) else "not clear forgetting")
        + f"); {new} went from {_ci(k('first'))} to {_ci(k('naive'))} ({_versus(k('first'), k('naive'))}).",
        f"- **With replay ({weights} new to old):** purple {_ci(p('replay'))}, {_versus(p('replay'), p('naive'))} "
        f"of the naive run and {_versus(p('replay'), p('first'))} of the first adapter; {new} {_ci(k('replay'))} "
        f"({_versus(k('replay'), k('naive'))} of the naive run).",
        f"- **Base prompts:** {_ci(b('base'))} for the base model; "
        + ", ".join(
            f"{_ci(b(name))} {what} ({_versus(b(name), b('base'))})"
            for name, what in (("first", "after batch 1"), ("naive", "naive"), ("replay", "with replay"))
        )
        + ", each against the base model.",
        *_bias_findings(results, stage),
        f"- **How sure:** every figure is a share of {results['evaluation']['min_images']} or more images with its "
        "95 % Wilson interval. A difference counts as real here only when the two intervals do not overlap, a strict "
        'test: a real gap of a few hundredths can hide inside overlapping intervals, so "within the intervals" '
        'means "not shown", not "no difference". The judge and the base model are themselves imperfect (their '
        "own accuracy is in `embedded/README.md`).",
    ]
    return "\n".join(lines)


# --- training options --------------------------------------------------------------------------------------


def beats_beyond_noise(share: float, baseline: float, images: int) -> bool:
    """True when `share` exceeds `baseline` by more than 1.96 standard errors of the difference of two shares of
    `images` each: a gap that one or two images could make is not a win."""
    error = math.sqrt((share * (1 - share) + baseline * (1 - baseline)) / images)
    return share - baseline > 1.96 * error


def within_noise(share: float, baseline: float, images: int) -> bool:
    """True when two shares of `images` each differ by at most 1.96 standard errors of their difference."""
    return not (beats_beyond_noise(share, baseline, images) or beats_beyond_noise(baseline, share, images))


PRECISION_LABELS = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}


def precision_verdict(variants: list[dict], sizes: tuple[int, int]) -> str:
    """The lower-precision rows against the preset's fp32 row: same learning and forgetting within the noise?"""
    first = variants[0]
    if first.get("mixed_precision") != "no":
        return ""
    sentences = []
    for v in variants[1:]:
        if v.get("mixed_precision") in (None, "no"):
            continue
        pairs = [
            (
                v["eval"]["sets"][name]["adapter"]["r_precision_top1"],
                first["eval"]["sets"][name]["adapter"]["r_precision_top1"],
            )
            for name in ("adapter", "base")
        ]
        same = all(within_noise(a, b, n) for (a, b), n in zip(pairs, sizes, strict=True))
        figures = (
            f"purple {pairs[0][0]:.2f} against {pairs[0][1]:.2f}, base {pairs[1][0]:.2f} against {pairs[1][1]:.2f}"
        )
        sentences.append(
            f"{v['label']} against the fp32 preset row: {figures}, "
            + ("within the noise (quality kept)." if same else "a difference beyond the noise.")
        )
    return " ".join(sentences)


def options_table(results: dict | None = None) -> str:
    """The default preset with one option changed at a time: learning, forgetting, held-out loss, time, memory."""
    results = results if results is not None else src.read_json(src.OPTIONS_JSON)
    if results is None:
        return _pending("The training-options experiment", src.OPTIONS_COMMAND)
    rows, scores = [], {}
    for variant in results["variants"]:
        sets = variant["eval"]["sets"]
        purple, base = sets["adapter"]["adapter"]["r_precision_top1"], sets["base"]["adapter"]["r_precision_top1"]
        scores[variant["name"]] = (purple, base)
        loss = variant.get("held_out_loss")
        rows.append(
            [
                variant["label"],
                f"{purple:.2f}",
                f"{base:.2f}",
                f"{loss:.4f}" if loss is not None else "-",
                PRECISION_LABELS.get(variant.get("mixed_precision"), "-"),
                f"{variant['train_seconds']:.0f} s",
                _mb(variant["peak_memory_bytes"]),
            ]
        )
    table = _table(
        [
            "option",
            "purple R-precision",
            "base R-precision after",
            "held-out loss",
            "precision",
            "training time",
            "peak memory",
        ],
        rows,
    )
    first = results["variants"][0]
    sets = first["eval"]["sets"]
    sizes = (sets["adapter"]["num_images"], sets["base"]["num_images"])
    ahead = [
        v["label"]
        for v in results["variants"][1:]
        if all(a > b for a, b in zip(scores[v["name"]], scores[first["name"]], strict=True))
    ]
    clearly = [
        v["label"]
        for v in results["variants"][1:]
        if all(
            beats_beyond_noise(a, b, n)
            for a, b, n in zip(scores[v["name"]], scores[first["name"]], sizes, strict=True)
        )
    ]
    if clearly:
        verdict = f"Better than {first['label']} on both purple and base prompts, beyond noise: {', '.join(clearly)}."
    elif ahead:
        verdict = (
            f"Ahead of {first['label']} on both purple and base prompts, but by less than the noise of "
            f"{sizes[0]} and {sizes[1]} images (a difference counts when it exceeds 1.96 standard errors): "
            f"{', '.join(ahead)}; the preset keeps {first['label']}."
        )
    else:
        verdict = f"No option beats {first['label']} on both purple and base prompts here."
    verdict = " ".join(filter(None, [verdict, precision_verdict(results["variants"], sizes)]))
    seeds = ", ".join(map(str, results["seeds"]))
    return (
        f"{table}\n\n"
        f"Each row: `{results['preset']}` with one option changed, {first['global_step']} optimizer steps each, "
        f"judged by `python -m eval` with seeds {seeds} ({sets['adapter']['num_images']} purple and "
        f"{sets['base']['num_images']} base-prompt images per adapter; base prompts before any adapter: "
        f"{sets['base']['base']['r_precision_top1']:.2f}). Held-out loss: mean diffusion loss on "
        f"{results['held_out']['rows']} purple rows never trained on. Memory: {first['memory_kind']}. "
        f"{verdict} Device: {results['device']}. Source: `docs/results/options.json`, written by "
        f"`{results['command']}`."
    )


RENDERERS: dict[str, Callable[[], str]] = {
    "eval-table": eval_table,
    "eval-headline": eval_headline,
    "model-sizes": model_sizes,
    "deploy-sizes": deploy_sizes,
    "device-fit": device_fit,
    "datasets": datasets_block,
    "train-run": train_run,
    "sample-prompts": sample_prompts,
    "naruto-preset": naruto_preset,
    "quickstart-time": quickstart_time,
    "precision-measured": precision_measured,
    "python-version": python_version,
    "epoch-cost": epoch_cost,
    "latency": latency,
    "hosting-cost": hosting_cost,
    "continual-table": continual_table,
    "continual-setup": continual_setup,
    "continual-findings": continual_findings,
    "continual-candidates": continual_candidates,
    "continual-bias": continual_bias,
    "options-table": options_table,
    # docs/benchmarks.md and embedded/README.md: their renderers live beside the code that makes their results
    **bench_report.block_renderers(),
    **embedded_readme.block_renderers(),
}
