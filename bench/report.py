"""`python -m bench report`: docs/benchmarks.md rendered from the result JSON files (no figure typed by hand)."""

from __future__ import annotations

from pathlib import Path

from bench.results_io import read_results
from lorakit.atomic import atomic_write_text
from lorakit.markdown import markdown_table
from lorakit.paths import REPO_ROOT
from lorakit.timing import PHASES

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

INTRO = """# Benchmarks

Every figure on this page is rendered by `python -m bench report` from the JSON files in `bench/results/`;
none is typed by hand. Comparisons are ratios measured within one bench run (one process, variants
interleaved where it matters), so a busy machine shifts all of them alike.

How to reproduce:

```bash
OMP_NUM_THREADS=1 python -m bench train      # CPU cases: embedded default, BK-SDM-Tiny, large JPEGs, --cache_latents
OMP_NUM_THREADS=1 python -m bench generate   # the Space's code: schedulers, fused/unfused LoRA, precision, cold start
bash bench/gpu.sh                            # on a CUDA machine: BK-SDM-Tiny 512 px bf16, batch 1/4/8, +-compile
python -m bench report                       # re-render this page
```

`--short` runs a few steps of each case (CI runs it through `tests/test_bench.py`, so the bench cannot rot);
the full mode is what produced the tables below. The CPU figures come from a small shared virtual machine:
other jobs ran beside the bench, so each table states the 1-minute load average at the start and end of its
run and the `OMP_NUM_THREADS` it used; read the ratios, not the absolute seconds. The CPU runs use one
thread (`OMP_NUM_THREADS=1`): with other jobs on both cores, two threads ran slower than one.

Step times drop the first step (lazy initialisation; three
steps under `--compile`). *Start-up* is the time from calling `train()` to the first batch request (model
loading, LoRA attachment, and with `--cache_latents` the encoding pass); *first step* is the first step's own duration.
Phases are mean seconds per optimizer step as timed inside the trainer (`lorakit.timing.PhaseTimer`);
*other* is the rest of the step (loss, noise, logging). Peak RSS is sampled over the process and its
DataLoader workers; the cases run one after another in one process, so the summary also gives the RSS the
process had before each case.
"""


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
        f"- `{c['name']}`: {c['description']}; {c['timed_steps']} timed steps; trainer flags "
        f"`{shown_flags(c['flags'])}`."
        for c in cases
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
    return " ".join(Path(flag).name if "/" in flag else flag for flag in flags)


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
    main = [c for c in document["cases"] if c.get("group") != "cache_latents"]
    checks = document.get("checks", {})
    parts = [f"## Training ({title})", "", machine_line(document), "", *note_lines(document)]
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
    parts += ["", cache_section(document["cases"], checks)]
    return "\n".join(parts)


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
    lines = ["## Summary", ""]
    for d in documents:
        if d["kind"] == "train":
            for c in d["cases"]:
                if c.get("group") != "cache_latents":
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


LEVERS = """## Levers (trainer flags the bench measures)

- Data loading: `--dataloader_num_workers N` decodes and resizes in N worker processes (off the main
  process), `--dataloader_prefetch_factor` sets how many batches each worker prepares ahead,
  `--persistent_workers` keeps them between epochs; memory is pinned automatically on CUDA.
- `--cache_latents` (with `--latent_cache_dir`): the frozen VAE and text encoder run once per dataset; the
  cache file is keyed by the dataset fingerprint, columns, model files, resolution and augmentation, so any
  change writes a new file and a stale one is never read. It stores the VAE posterior's mean and
  log-variance rather than one sample: each step still draws its own sample with the step's generator, so
  the same seed gives the same losses as without the cache (the tables show it), and the sampling noise is kept.
  Random crops and flips are frozen at their first draw when cached.
- `--compile` (torch.compile of the UNet), `--allow_tf32` (Ampere and later), `--channels_last`,
  `--gradient_checkpointing` (less activation memory for more compute), fused AdamW (automatic on CUDA),
  `--mixed_precision bf16|fp16`.
"""

GPU_MISSING = """## GPU

No GPU figures yet: the machine that rendered this page has none, and `bench/gpu.sh` has not been run. On a
CUDA machine, `bash bench/gpu.sh` (prepared to finish in under 8 minutes on an H200: BK-SDM-Tiny
architecture at 512 px in bf16, batch sizes 1, 4 and 8, with and without `--compile`, then generation at 25
steps) writes `bench/results/train-gpu.json` and `bench/results/generate-gpu.json` and re-renders this page.
"""


def render(documents: list[dict]) -> str:
    """The whole page from the full-mode result documents."""
    documents = [d for d in documents if d.get("mode") == "full"]
    # Training before generation, CPU before GPU: the page reads from the trainer to the demo.
    documents.sort(key=lambda d: (d["kind"] != "train", bool(d["machine"].get("gpu"))))
    parts = [INTRO]
    for d in documents:
        parts.append(train_section(d) if d["kind"] == "train" else generate_section(d))
    parts.append(LEVERS)
    if not any(d["machine"].get("gpu") for d in documents):
        parts.append(GPU_MISSING)
    parts.append(closing_note(documents))
    return "\n".join(parts)


def write_report(results: Path, out: Path) -> Path:
    atomic_write_text(out, render(read_results(results)))
    return out
