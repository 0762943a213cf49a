"""The figures of docs/benchmarks.md, rendered from the bench's result files (no figure typed by hand).

The page's prose is Markdown in docs/benchmarks.md; its figures sit in the generated blocks named in
`block_renderers`, registered with the docs' renderers, so `python docs/build.py --check/--blocks` covers them.
`python -m bench report` (`write_report`) re-renders only this page's blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.results_io import RESULTS_DIR, read_results
from lorakit.atomic import atomic_write_text
from lorakit.markdown import markdown_table, render_blocks
from lorakit.paths import REPO_ROOT
from lorakit.timing import PHASES

PAGE = REPO_ROOT / "docs" / "benchmarks.md"

PHASE_LABELS = {
    "data_wait": "data wait",
    "text_encoding": "text enc.",
    "vae_encoding": "VAE enc.",
    "unet_forward_backward": "UNet fwd+bwd",
    "optimizer_step": "optimizer",
}
VARIANT_LABELS = {
    "base": "base model, no LoRA",
    "lora_unfused": "LoRA unfused (Space default)",
    "lora_fused": "LoRA fused (`pipe.fuse_lora()`)",
    "lora_fused_unloaded": "LoRA fused, then `unload_lora_weights()`",
    "pndm_50": "LoRA unfused, PNDM",
    "bfloat16": "LoRA unfused, bf16",
    "float32": "LoRA unfused, fp32",
}


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def machine_line(document: dict) -> str:
    m = document["machine"]
    gpu = f", GPU {m['gpu']} (CUDA {m['cuda']})" if m.get("gpu") else ", no GPU"
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gib', '?')} GiB RAM{gpu}; "
        f"OMP_NUM_THREADS={m.get('omp_num_threads') or 'unset'} (torch threads {m['torch_threads']}); "
        f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, peft {m['peft']}. "
        f"Load average (1 min) {m['load_average_1min_at_start']} at start, {m.get('load_average_1min_at_end')} "
        f"at end. Run {document['created']}, `{document['command']}` ({document['mode']} mode)."
    )


def note_lines(document: dict) -> list[str]:
    return [f"Note: {document['note']}", ""] if document.get("note") else []


def train_table(cases: list[dict]) -> str:
    header = [
        "case",
        "batch",
        "px",
        "s/step",
        "images/s",
        "start-up s",
        "first step s",
        *[PHASE_LABELS[p] for p in PHASES],
        "other",
        "peak RSS MiB",
        "peak CUDA MiB",
    ]
    rows = []
    for c in cases:
        rows.append(
            [
                f"`{c['name']}`",
                fmt(c["batch_size"]),
                fmt(c["resolution"]),
                fmt(c["step_s"]),
                fmt(c["images_per_s"]),
                fmt(c["startup_s"]),
                fmt(c["time_to_first_step_s"] - c["startup_s"]),
                *[pct(c["phase_share"][p]) for p in PHASES],
                pct(c["other_s"] / c["step_s"]),
                fmt(c["peak_rss_mib"], 5),
                fmt(c["peak_cuda_mib"], 5),
            ]
        )
    return markdown_table(header, rows)


def case_notes(cases: list[dict]) -> str:
    return "\n".join(
        f"- `{c['name']}`: {c['description']}; {c['timed_steps']} timed steps{layout_note(c)}; trainer flags "
        f"`{shown_flags(c['flags'])}`."
        for c in cases
    )


def layout_note(case: dict) -> str:
    """How the case split its steps, when it was chosen by --auto_micro_batch (older results do not say)."""
    layout = case.get("layout") or {}
    if not layout.get("auto_micro_batch"):
        return ""
    checkpointing = "on" if layout["gradient_checkpointing"] else "off"
    return (
        f"; `--auto_micro_batch` chose micro-batch {layout['micro_batch_size']} x "
        f"{layout['gradient_accumulation_steps']}, gradient checkpointing {checkpointing}"
    )


def shown_path(reference: str) -> str:
    """Paths inside the repository relative to it; scratch paths by their last part; Hub ids as they are."""
    path = Path(reference)
    if not path.is_absolute():
        return reference
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return f"<scratch>/{path.name}"


def cache_state(case: dict) -> str:
    if "cache" not in case:
        return "no cache"
    return "reused" if case["cache"]["hit"] else "written (encodes)"


def shown_flags(flags: list[str]) -> str:
    """Trainer flags with local paths cut to their last part (the scratch folder differs per machine)."""
    return " ".join(Path(flag).name if "/" in flag else flag or "''" for flag in flags)


def cache_section(cases: list[dict], checks: dict) -> str:
    cache_runs = [c for c in cases if c.get("group") == "cache_latents"]
    if not cache_runs:
        return ""
    rows = []
    for c in cache_runs:
        for e in c.get("epochs", []):
            rows.append(
                [
                    f"`{c['name']}`",
                    fmt(e["epoch"]),
                    fmt(e["step_s"]),
                    pct(e["phase_share"]["vae_encoding"]),
                    pct(e["phase_share"]["text_encoding"]),
                    pct(e["phase_share"]["unet_forward_backward"]),
                    fmt(c["startup_s"]),
                    cache_state(c),
                ]
            )
    parts = [
        "### `--cache_latents` (BK-SDM-Tiny architecture, CPU)",
        "",
        markdown_table(
            ["run", "epoch", "s/step", "VAE enc.", "text enc.", "UNet fwd+bwd", "start-up s", "cache"], rows
        ),
        "",
    ]
    cache = checks.get("cache_latents")
    if cache:
        parts += [
            f"- Without the cache ({fmt(cache['step_s_without_cache'])} s/step, mean of the runs before and after "
            f"the cached ones), VAE and text encoding take {pct(cache['encoder_share_without_cache'])} of a "
            f"step; with it, the second epoch spends {fmt(cache['epoch2_encoder_s_with_cache'])} s per step in "
            f"them and its step time drops by {pct(cache['epoch2_step_time_drop'])} "
            f"(at least the share less 5 points: {fmt(cache['drop_at_least_share_minus_5_points'])}).",
            f"- Same seed, same losses with and without the cache: {fmt(cache['same_loss_same_seed'])} "
            f"(largest difference {cache['max_abs_loss_difference']:.2e}). The cache holds the VAE posterior's "
            "mean and log-variance, and every step draws its sample with the step's own generator, exactly as "
            "the uncached path does, so the noise the model sees is unchanged.",
            f"- Learning-rate sweep: the second run reuses the cache (hit: {fmt(cache['sweep_cache_hit'])}, "
            f"{fmt(cache['sweep_encoder_s'])} s/step encoding); its start-up is {fmt(cache['startup_s_reuse_run'])} s "
            f"against {fmt(cache['startup_s_encoding_run'])} s for the run that encoded.",
            "",
        ]
    return "\n".join(parts)


def train_section(document: dict) -> str:
    title = "GPU" if document["machine"].get("gpu") else "CPU"
    main = [c for c in document["cases"] if c.get("group") not in ("cache_latents", "main-job")]
    checks = document.get("checks", {})
    groups = {c.get("group") for c in document["cases"]}
    what = "Precision, `--compile` and the main job" if groups <= {"precision", "compile", "main-job"} else "Training"
    parts = [f"## {what} ({title})", "", machine_line(document), "", *note_lines(document)]
    if main:
        parts += [train_table(main), "", case_notes(main), ""]
    if "embedded_data_wait_share" in checks:
        parts.append(
            f"- Embedded default, default data settings: data wait is "
            f"{pct(checks['embedded_data_wait_share'])} of step time (< 5%: "
            f"{fmt(checks['embedded_data_wait_below_5_percent'])})."
        )
    lever = {c["name"]: c for c in main}.get("embedded-workers0")
    if lever and "embedded_data_wait_share" in checks:
        parts.append(
            f"- Same with no DataLoader workers: data wait {pct(lever['phase_share']['data_wait'])}, "
            f"step time {lever['step_s'] / {c['name']: c for c in main}['embedded-default']['step_s']:.2f}x."
        )
    if "jpeg_data_wait_share" in checks:
        below = fmt(checks["jpeg_data_wait_below_10_percent"])
        parts.append(
            f"- 1024 px JPEGs resized every step, default workers: data wait "
            f"{pct(checks['jpeg_data_wait_share'])} (< 10%: {below})."
        )
    loading = {c["name"]: c for c in main if c.get("group") == "data-loading"}
    if len(loading) == 2:
        default, workers = loading["jpeg-embedded-workers0"], loading["jpeg-embedded-workers2"]
        parts.append(
            f"- Data-loading levers on a fast model fed 1024 px JPEGs: data wait "
            f"{pct(default['phase_share']['data_wait'])} with the default settings, "
            f"{pct(workers['phase_share']['data_wait'])} with 2 workers and prefetch 4 "
            f"(step time {workers['step_s'] / default['step_s']:.2f}x)."
        )
    compiled = {c["batch_size"]: c for c in main if c.get("tags", {}).get("compile")}
    eager = {c["batch_size"]: c for c in main if c.get("tags", {}).get("compile") is False}
    for batch in sorted(set(compiled) & set(eager)):
        ratio = compiled[batch]["step_s"] / eager[batch]["step_s"]
        parts.append(f"- Batch {batch}: `--compile` step time is {ratio:.2f}x the eager one (same run).")
    parts += preset_lines(main)
    parts += precision_lines(checks.get("precision") or {})
    parts += ["", cache_section(document["cases"], checks), main_job_section(document["cases"], checks)]
    return "\n".join(parts)


PRECISION_MODELS = {"embedded": "Embedded default", "bk-sdm-tiny-64px": "BK-SDM-Tiny architecture, 64 px, batch 2"}


def precision_lines(checks: dict) -> list[str]:
    """What `auto` chose per model and what it gained or cost against fp32 (same run); --compile's cost."""
    lines = []
    for model, label in PRECISION_MODELS.items():
        if model not in checks:
            continue
        c = checks[model]
        chose = "fp32" if c["auto_chose"] == "no" else c["auto_chose"]
        lines.append(
            f"- {label}: bf16 step time {c['bf16_over_fp32_step']:.2f}x fp32's; `auto` chose {chose} "
            f'("{c["auto_reason"]}"); the whole `auto` run took {c["auto_over_fp32_total"]:.2f}x the fp32 run\'s '
            f"time, its start-up {c['auto_startup_minus_fp32_startup_s']:+.1f} s against fp32's (the probe, "
            "measured afresh)" + probe_payback(c) + "."
        )
    caches = {
        "cold": "an empty compiler cache (a first run)",
        "warm": "again in the same process (what that run compiled kept)",
    }
    for state, cache in caches.items():
        c = checks.get(f"compile_{state}")
        if c:
            lines.append(
                f"- `--compile` on the BK-SDM-Tiny architecture (64 px, fp32, {c['steps']} steps), {cache}: "
                f"{c['extra_seconds']:+.0f} s for the whole run ({c['total_ratio']:.1f}x the eager run), a first step "
                f"of {fmt(c['first_step_s'])} s against {fmt(c['eager_first_step_s'])} s, then steps at "
                f"{c['steady_step_ratio']:.2f}x the eager step time."
            )
    return lines


def probe_payback(figures: dict) -> str:
    """How many steps of a first run repay the probe, when auto chose the faster precision (older files: none)."""
    saved = figures.get("fp32_step_s", 0.0) * (1.0 - figures["auto_over_fp32_step"])
    if figures["auto_chose"] == "no" or saved <= 0:
        return ""
    steps = figures["auto_startup_minus_fp32_startup_s"] / saved
    return (
        f"; at {saved:.2f} s saved per step the probe is repaid after about {steps:.0f} steps, and later runs skip it"
    )


def main_job_section(cases: list[dict], checks: dict) -> str:
    """The README's main command as a user runs it: wall time and where it goes."""
    runs = [c for c in cases if c.get("group") == "main-job"]
    if not runs:
        return ""
    header = ["run", "checkout", "wall s", "launcher s", "start-up s", "steps s", "wind-down s", "precision"]
    rows = []
    for run in runs:
        split = run.get("wall_split") or {}
        rows.append(
            [
                f"`{run['name']}`",
                "this" if run["checkout"] == "this" else "baseline",
                fmt(run["wall_s"]),
                fmt(run["launcher_s"]) if run.get("launcher_s") is not None else "–",
                *[fmt(split[key]) if key in split else "–" for key in ("startup_s", "steps_s", "wind_down_s")],
                run["mixed_precision"],
            ]
        )
    parts = [
        "### The main job (`accelerate launch --config_file accelerate_config.yaml train_lora.py`)",
        "",
        markdown_table(header, rows),
        "",
        "*Launcher* is what passes before the trainer's process starts (accelerate's launcher imports torch); "
        "*start-up* runs from that process's start to the first step (imports, data, models, LoRA, the precision "
        "probe), *steps* is the loop with its mid-run validation grid, *wind-down* the last step to "
        "`train_summary.json` (final validation grid, adapter, loss curve). The first run measures the precision "
        "probe; the second reuses its kept timings. A baseline (a checkout of an earlier commit, "
        "`--baseline`) runs before and after them.",
    ]
    job = checks.get("main_job") or {}
    if "baseline_wall_s" in job:
        parts += [
            "",
            f"- Against the baseline (mean of its two runs, {fmt(job['baseline_wall_s'])} s): first run "
            f"{job['first_run_over_baseline']:.2f}x, second run {job['second_run_over_baseline']:.2f}x its wall time.",
        ]
    if job:
        parts.append(f"- Goal of at most 15 s wall (second run): {fmt(job['second_run_at_most_15_s'])}.")
    return "\n".join(parts)


def preset_lines(cases: list[dict]) -> list[str]:
    """The real preset with --auto_micro_batch against its former layout (1 x 4 with gradient checkpointing)."""
    preset = {c["tags"]["auto_micro_batch"]: c for c in cases if c.get("group") == "gpu-preset"}
    if len(preset) != 2:
        return []
    auto, before = preset[True], preset[False]
    line = f"- Real preset{layout_note(auto)}: step time {auto['step_s'] / before['step_s']:.2f}x"
    if auto.get("peak_cuda_mib") and before.get("peak_cuda_mib"):
        line += f", peak GPU memory {auto['peak_cuda_mib'] / before['peak_cuda_mib']:.2f}x"
    return [line + " those of micro-batch 1 x 4 with gradient checkpointing (same run)."]


def generate_section(document: dict) -> str:
    device = document["device"]
    default_s = document["variants"]["lora_unfused"]["seconds_per_image"]
    rows = []
    for name, v in document["variants"].items():
        rows.append(
            [
                VARIANT_LABELS.get(name, name),
                fmt(v["steps"]),
                fmt(v["seconds_per_image"]),
                f"{v['seconds_per_image'] / default_s:.2f}x",
            ]
        )
    r = document["ratios"]
    cold = document.get("space_cold_start")
    parts = [
        f"## Generation ({device.upper()})",
        "",
        machine_line(document),
        "",
        *note_lines(document),
        f"Base `{shown_path(document['base_model'])}`, adapter `{shown_path(document['adapter'])}`, "
        f"{document['image_px']} px images, "
        f'{document["dtype"]}, guidance 7.5, prompt "{document["prompt"]}", median of {document["repeats"]} '
        "image(s) after one warm-up image each, through `space/app.py`'s own sampling code.",
        "",
        markdown_table(["variant", "steps", "s/image", "vs Space default"], rows),
        "",
        f"- Fused LoRA / base model: {r['fused_over_base']:.3f}x (within 5%: "
        f"{fmt(document['checks']['fused_within_5_percent_of_base'])}); fused with the LoRA wrappers unloaded: "
        f"{r['fused_unloaded_over_base']:.3f}x (within 5%: "
        f"{fmt(document['checks']['fused_unloaded_within_5_percent_of_base'])}); unfused overhead: "
        f"{pct(r['unfused_over_base'] - 1)} over the base model. Fused and unfused images differ by at most "
        f"{document['fused_vs_unfused_max_pixel_difference']:.3g} (0-255 scale).",
        f"- PNDM at {document['variants']['pndm_50']['steps']} steps takes {r['pndm_50_over_default']:.2f}x the time "
        "of the default DPM-Solver++ "
        f"at {document['variants']['lora_unfused']['steps']} steps.",
        f"- Other precision / default precision: {r['other_precision_over_default']:.2f}x.",
        f"- Adapter load into a loaded base: {fmt(document['adapter_load_s'])} s; whole pipeline load "
        f"(base + adapter, `load_pipeline`): {fmt(document['pipeline_load_s'])} s.",
    ]
    if cold:
        parts.append(
            f"- Space cold start (`python space/app.py` to the first image over the API): "
            f"{fmt(cold['first_image_s'])} s, of which {fmt(cold['serving_s'])} s until the server answered."
        )
    return "\n".join(parts) + "\n"


def closing_note(documents: list[dict]) -> str:
    """One line per training case and generation run (the page's Summary)."""
    lines = []
    for d in documents:
        if d["kind"] == "train":
            for c in d["cases"]:
                if c.get("group") not in ("cache_latents", "main-job"):
                    lines.append(
                        f"- Training `{c['name']}`: {fmt(c['step_s'])} s/step, {fmt(c['images_per_s'])} "
                        f"images/s, data wait {pct(c['phase_share']['data_wait'])}, peak RSS "
                        f"{fmt(c['peak_rss_mib'], 5)} MiB (before the case: "
                        f"{fmt(c.get('rss_before_mib'), 5)} MiB)."
                    )
            cache = d.get("checks", {}).get("cache_latents")
            if cache:
                lines.append(
                    f"- `--cache_latents`: second-epoch step time {pct(cache['epoch2_step_time_drop'])} "
                    f"lower; VAE + text share without it {pct(cache['encoder_share_without_cache'])}; "
                    f"same losses: {fmt(cache['same_loss_same_seed'])}; sweep reuses the cache: "
                    f"{fmt(cache['sweep_cache_hit'])}."
                )
            job = d.get("checks", {}).get("main_job")
            if job:
                lines.append(
                    f"- Main job (README command, embedded default): {fmt(job['first_run_wall_s'])} s wall on a first "
                    f"run, {fmt(job['second_run_wall_s'])} s with the probe's timings kept."
                )
        else:
            r = d["ratios"]
            cold = d.get("space_cold_start")
            lines.append(
                f"- Generation ({d['device']}, {d['image_px']} px): "
                f"{fmt(d['variants']['lora_unfused']['seconds_per_image'])} s/image at the Space default; "
                f"fused/base {r['fused_over_base']:.3f}x (unloaded {r['fused_unloaded_over_base']:.3f}x), "
                f"unfused/base {r['unfused_over_base']:.3f}x, "
                f"PNDM-50/default {r['pndm_50_over_default']:.2f}x"
                + (f"; cold start {fmt(cold['first_image_s'])} s." if cold else ".")
            )
    return "\n".join(lines) + "\n"


def gpu_status(documents: list[dict]) -> str:
    """Where the GPU figures are, or, while no GPU run is in the results, how to make them."""
    gpu = [d["file"] for d in documents if d["machine"].get("gpu")]
    if gpu:
        return (
            "The GPU figures are in the sections above, from " + ", ".join(f"`bench/results/{f}`" for f in gpu) + "."
        )
    return (
        "No GPU figures yet: `bench/results/` holds no GPU run. On a CUDA machine, `bash bench/gpu.sh` (prepared to\n"
        "finish in under 8 minutes on an H200: BK-SDM-Tiny architecture at 512 px in bf16, batch sizes 1, 4 and 8,\n"
        "with and without `--compile`; the real preset with and without `--auto_micro_batch`; then generation at 25\n"
        "steps) writes `bench/results/train-gpu.json` and `bench/results/generate-gpu.json` and re-renders this page."
    )


def sections(documents: list[dict]) -> str:
    """A section per run, in the order of `full_documents`."""
    if not documents:
        return (
            "_No full-mode bench results in `bench/results/` yet: run `python -m bench train` and "
            "`python -m bench generate`, then `python -m bench report`._"
        )
    parts = [train_section(d) if d["kind"] == "train" else generate_section(d) for d in documents]
    return "\n\n".join(part.strip("\n") for part in parts)


def full_documents(results: Path = RESULTS_DIR) -> list[dict]:
    """The full-mode result documents in `results` (short runs only check that the bench still runs).

    Training before generation, CPU before GPU: the page reads from the trainer to the demo.
    """
    # Other kinds (space-adapters) and the own-data cases (train-own-data-*.json, read by their checks) are stored
    # beside these but not rendered on this page.
    documents = [
        d
        for d in read_results(results)
        if d.get("mode") == "full"
        and d["kind"] in ("train", "generate")
        and not d.get("file", "").startswith("train-own-data")
    ]
    return sorted(documents, key=lambda d: (d["kind"] != "train", bool(d["machine"].get("gpu"))))


def block_renderers(results: Path = RESULTS_DIR) -> dict[str, Callable[[], str]]:
    """The renderers of docs/benchmarks.md's generated blocks, reading the result files in `results`."""
    return {
        "bench-sections": lambda: sections(full_documents(results)),
        "bench-gpu": lambda: gpu_status(full_documents(results)),
        "bench-summary": lambda: closing_note(full_documents(results)),
    }


def write_report(results: Path = RESULTS_DIR, out: Path = PAGE) -> Path:
    """Re-render the generated blocks of `out` (starting from the committed page when `out` does not exist)."""
    template = out if out.is_file() else PAGE
    atomic_write_text(out, render_blocks(template.read_text(encoding="utf-8"), block_renderers(results)))
    return out
