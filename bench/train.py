"""`python -m bench train`: the trainer's own `train()` for a fixed number of steps, timed phase by phase."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

import train_lora
from bench.data import make_image_folder
from bench.machine import PeakMemory, load_average
from bench.own_data import make_mixed_aspect_folder, make_scan_tree
from bench.timer import StepStampTimer
from lorakit.config import parse_args
from lorakit.paths import BK_SDM_TINY_REFERENCE, CONFIGS_DIR, EMBEDDED_PIPELINE, SHAPES_PRESET
from lorakit.reference import build_reference_pipeline
from lorakit.summary import read_summary
from lorakit.timing import PHASES

REAL_PRESET = CONFIGS_DIR / "bk-sdm-tiny-naruto.yaml"

# Steps dropped before averaging: the first step pays for lazy initialisation (and compilation).
WARMUP_STEPS = 1
COMPILE_WARMUP_STEPS = 3


@dataclass
class TrainCase:
    """One timed trainer run: its flags, how many steps, and which steps make up each epoch."""

    name: str
    description: str
    flags: list[str]
    batch_size: int
    resolution: int
    warmup_steps: int = WARMUP_STEPS
    steps_per_epoch: int | None = None
    group: str = ""
    tags: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # set for this case only (e.g. a fresh probe cache)


def reference_pipeline(work_dir: Path) -> Path:
    """BK-SDM-Tiny's architecture with random weights, built once (~40 s, 2 GB) and kept in `work_dir`.

    The configs are the repository's (configs/architectures/bk-sdm-tiny); $BK_SDM_TINY_CONFIGS names another folder
    of the same four files (another architecture of the same family, say).
    """
    target = work_dir / "bk-sdm-tiny"
    if not (target / "model_index.json").is_file():
        configs = Path(os.environ.get("BK_SDM_TINY_CONFIGS") or BK_SDM_TINY_REFERENCE)
        if not (configs / "unet_config.json").is_file():
            raise SystemExit(
                f"No BK-SDM-Tiny configs in {configs}: set BK_SDM_TINY_CONFIGS to a folder with "
                "unet_config.json, vae_config.json, text_encoder_config.json and scheduler_config.json."
            )
        build_reference_pipeline(configs, target)
    return target


def embedded_flags(pipeline: Path | None, data: Path | None = None) -> list[str]:
    """The default preset as is, or with its pipeline (same architecture) or data folder (same rows) replaced."""
    data_flags = ["--train_data_dir", str(data)] if data is not None else []
    if pipeline is not None:
        # the preset's learned word ("purple") is the embedded world's; another base may not hold it as one token
        return [
            "--config",
            str(SHAPES_PRESET),
            "--pretrained_model_name_or_path",
            str(pipeline),
            "--train_token_embeddings",
            *data_flags,
        ]
    if data is not None:
        return ["--config", str(SHAPES_PRESET), *data_flags]
    if not (EMBEDDED_PIPELINE / "model_index.json").is_file():
        raise SystemExit(
            f"The embedded pipeline {EMBEDDED_PIPELINE} is missing: build it with `python -m embedded.build`, "
            "pass --embedded DIR (a pipeline of the same architecture), or leave out the embedded cases."
        )
    return []


def run_case(case: TrainCase, work_dir: Path) -> dict:
    """Run `train_lora.train` with the case's flags and a step-stamping timer; return the figures."""
    out = work_dir / "runs" / case.name
    flags = [
        "--report_to",
        "none",
        "--validation_prompt",
        "--output_dir",
        str(out),
        "--overwrite_output_dir",
        *case.flags,
    ]
    cfg = parse_args(flags)
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()
    timer = StepStampTimer()
    load_before = load_average()
    started = time.perf_counter()
    with PeakMemory() as memory, case_environment(case.env):
        result = train_lora.train(cfg, flags, timer=timer)
    total_s = time.perf_counter() - started
    summary = read_summary(result.output_dir)
    AcceleratorState._reset_state(reset_partial_state=True)
    steps = len(timer.stamps)
    warmup = min(case.warmup_steps, steps - 1)
    steady = timer.window(warmup + 1, steps)
    record = {
        "name": case.name,
        "group": case.group or case.name,
        "description": case.description,
        "flags": case.flags,
        "tags": case.tags,
        "batch_size": case.batch_size,
        "resolution": case.resolution,
        "steps": steps,
        "warmup_steps": warmup,
        "startup_s": timer.loop_started_at - started,
        "time_to_first_step_s": timer.stamps[0] - started,
        "total_s": total_s,
        **summarize(steady, case.batch_size * result_processes()),
        "peak_rss_mib": memory.peak_rss_mib,
        # Cases share one process: what earlier cases left allocated is part of the peak, so say how much.
        "rss_before_mib": memory.start_rss_mib,
        "peak_cuda_mib": PeakMemory.peak_cuda_mib(),
        "loss_history": [entry["loss"] for entry in result.state.loss_history],
        "load_average_1min": [load_before, load_average()],
        "latent_cache_hit": (result.latent_cache or {}).get("hit"),
        "layout": batch_layout(result.output_dir),
        "mixed_precision": summary.mixed_precision,
        "precision_choice": summary.precision_choice,
        "wind_down_s": (summary.wall_split or {}).get("wind_down_s"),
    }
    if case.steps_per_epoch:
        record["epochs"] = epoch_windows(timer, case.steps_per_epoch, warmup, case.batch_size)
    del result
    return record


@contextlib.contextmanager
def case_environment(env: dict[str, str]):
    """Environment variables set for one case and restored after it."""
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def batch_layout(output_dir: Path) -> dict:
    """How the run split its optimizer steps (chosen by --auto_micro_batch or given by the flags)."""
    summary = read_summary(output_dir)
    return {
        "micro_batch_size": summary.micro_batch_size,
        "gradient_accumulation_steps": summary.gradient_accumulation_steps,
        "gradient_checkpointing": summary.gradient_checkpointing,
        "auto_micro_batch": summary.auto_micro_batch,
    }


def result_processes() -> int:
    return 1  # the bench runs one process; multi-GPU throughput scales this by the process count


def summarize(window: dict, images_per_step: int) -> dict:
    """Step time, images/s and each phase's seconds and share of the step."""
    step_s = window["step_s"]
    phases = window["phases_s"]
    accounted = sum(phases.values())
    return {
        "timed_steps": window["steps"],
        "step_s": step_s,
        "images_per_s": images_per_step / step_s if step_s > 0 else None,
        "phases_s": phases,
        "phase_share": {name: phases[name] / step_s for name in PHASES},
        "other_s": step_s - accounted,
    }


def epoch_windows(timer: StepStampTimer, steps_per_epoch: int, warmup: int, batch_size: int) -> list[dict]:
    """The same figures per epoch (the first epoch without its warm-up steps)."""
    windows = []
    for epoch in range(math.ceil(len(timer.stamps) / steps_per_epoch)):
        first = epoch * steps_per_epoch + 1 + (warmup if epoch == 0 else 0)
        last = min((epoch + 1) * steps_per_epoch, len(timer.stamps))
        if first <= last:
            windows.append({"epoch": epoch + 1, **summarize(timer.window(first, last), batch_size)})
    return windows


# ---- cases -------------------------------------------------------------------------------------------------------


def embedded_case(
    short: bool, pipeline: Path | None = None, data: Path | None = None, workers: int | None = None
) -> TrainCase:
    """The embedded default exactly as `train_lora.py` with no arguments (configs/shapes.yaml), capped in steps.

    With `workers`, the same with that many DataLoader workers (persistent when there are any): the data-loading
    lever against the preset's own setting.
    """
    base = embedded_flags(pipeline, data)
    if workers is not None:
        persistent = "--persistent_workers" if workers else "--no-persistent_workers"
        base += ["--dataloader_num_workers", str(workers), persistent]
    cfg = parse_args(base)
    steps = 4 if short else 30
    where = "" if pipeline is None else f"; pipeline {pipeline.name} (same architecture, other weights)"
    where += "" if data is None else f"; data copied to {data.name}"
    if workers is None:
        settings = "default data settings"
    elif workers:
        settings = f"{workers} persistent DataLoader worker(s)"
    else:
        settings = "no DataLoader workers (decoding in the main process)"
    return TrainCase(
        name="embedded-default" if workers is None else f"embedded-workers{workers}",
        description=f"embedded default (configs/shapes.yaml), {settings}{where}",
        flags=[*base, "--max_train_steps", str(steps)],
        batch_size=cfg.training.train_batch_size,
        resolution=cfg.data.resolution,
    )


def bk_flags(model: Path, data: Path, resolution: int, batch: int) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--resolution",
        str(resolution),
        "--train_batch_size",
        str(batch),
        "--rank",
        "4",
        "--center_crop",
        "--no-random_flip",
        "--learning_rate",
        "1e-4",
        "--seed",
        "0",
        "--mixed_precision",
        "no",
    ]


def fixed_steps(steps: int) -> list[str]:
    """Exactly `steps` optimizer steps whatever the dataset size (epochs are cut by --max_train_steps)."""
    return ["--num_train_epochs", "1000", "--max_train_steps", str(steps)]


def bk_sdm_tiny_case(model: Path, work_dir: Path, short: bool, resolution: int = 64, batch: int = 2) -> TrainCase:
    data = make_image_folder(work_dir / f"data-png-{resolution}-16", 16, resolution)
    steps = 3 if short else 10
    return TrainCase(
        name=f"bk-sdm-tiny-{resolution}px",
        description=f"BK-SDM-Tiny architecture (random weights), {resolution} px, batch {batch}, fp32",
        flags=[*bk_flags(model, data, resolution, batch), *fixed_steps(steps)],
        batch_size=batch,
        resolution=resolution,
    )


def jpeg_case(model: Path, work_dir: Path, short: bool, resolution: int = 64, batch: int = 2) -> TrainCase:
    """Large JPEGs decoded and resized every step: does the default data loading keep up with the model?"""
    count = 8 if short else 24
    data = make_image_folder(work_dir / f"data-jpeg-1024-{count}", count, 1024, fmt="jpeg")
    steps = 3 if short else 10
    return TrainCase(
        name="jpeg-1024-to-64px",
        description=f"{count} JPEGs of 1024 px resized to {resolution} px every step, {model.name}, batch {batch}, "
        "default data settings",
        flags=[*bk_flags(model, data, resolution, batch), *fixed_steps(steps)],
        batch_size=batch,
        resolution=resolution,
    )


def jpeg_workers_cases(work_dir: Path, short: bool, pipeline: Path | None = None) -> list[TrainCase]:
    """The data-loading levers where they matter: a fast model (the embedded one) fed 1024 px JPEGs."""
    base = embedded_flags(pipeline)
    cfg = parse_args(base)
    count = 24 if short else 64
    data = make_image_folder(work_dir / f"data-jpeg-1024-{count}", count, 1024, fmt="jpeg")
    steps = math.ceil(count / cfg.training.train_batch_size)  # one epoch: worker start-up is paid once
    settings = {
        "workers0": (
            "no DataLoader workers (decoding in the main process)",
            ["--dataloader_num_workers", "0", "--no-persistent_workers"],
        ),
        "workers2": ("2 workers, prefetch 4", ["--dataloader_num_workers", "2", "--dataloader_prefetch_factor", "4"]),
    }
    return [
        TrainCase(
            name=f"jpeg-embedded-{key}",
            description=f"embedded default fed {count} JPEGs of 1024 px, {description}",
            flags=[*base, "--train_data_dir", str(data), "--max_train_steps", str(steps), *flags],
            batch_size=cfg.training.train_batch_size,
            resolution=cfg.data.resolution,
            group="data-loading",
        )
        for key, (description, flags) in settings.items()
    ]


def cache_cases(model: Path, work_dir: Path, short: bool, resolution: int = 64, batch: int = 2) -> list[TrainCase]:
    """No cache, cache (first run encodes), then a learning-rate sweep run that must reuse the cache."""
    count = 4 if short else 12
    data = make_image_folder(work_dir / f"data-png-{resolution}-{count}", count, resolution)
    cache_dir = work_dir / f"latent-cache-{time.strftime('%Y%m%d-%H%M%S')}"
    per_epoch = math.ceil(count / batch)
    common = [*bk_flags(model, data, resolution, batch), "--num_train_epochs", "2"]
    cached = ["--cache_latents", "--latent_cache_dir", str(cache_dir)]
    make = lambda name, description, flags: TrainCase(  # noqa: E731
        name=name,
        description=f"{model.name}, {resolution} px, batch {batch}, {description}",
        flags=flags,
        batch_size=batch,
        resolution=resolution,
        steps_per_epoch=per_epoch,
        group="cache_latents",
    )
    return [
        make("cache-off", "2 epochs, no cache", common),
        make("cache-on", "2 epochs, --cache_latents (empty cache: encodes first)", [*common, *cached]),
        make(
            "cache-sweep-lr2e-4",
            "same data, --learning_rate 2e-4: reuses the cache",
            [*common, *cached, "--learning_rate", "2e-4"],
        ),
        # The uncached run again: the baseline is the mean of both, so drift in machine load hits both sides.
        make("cache-off-again", "2 epochs, no cache (repeat, brackets the cached runs)", common),
    ]


def own_data_cases(
    model: Path, work_dir: Path, short: bool, pipeline: Path | None = None, embedded_data: Path | None = None
) -> list[TrainCase]:
    """Mixed-aspect JPEGs (512 to 2048 px) with caption files, default data settings, square and bucketed, on
    the embedded model (32 px) and the BK-SDM-Tiny architecture (64 px): the data wait share of each."""
    count = 50 if short else 1000
    data = make_mixed_aspect_folder(work_dir / f"data-mixed-jpeg-{count}", count)
    models = {
        # the preset as it is (its data settings are the defaults measured); the captions name its word, purple
        "embedded": (embedded_flags(pipeline, embedded_data), 32, 8, None, 20),
        "bk-sdm-tiny": (bk_flags(model, data, 64, 2), 64, 16, 2, 10),  # seconds per step on a CPU
    }
    cases = []
    for key, (flags, resolution, step, batch, steps) in models.items():
        steps = 3 if short else steps
        cfg = parse_args([*flags, "--train_data_dir", str(data), "--resolution", str(resolution)])
        buckets = ["--enable_bucket", "--bucket_reso_steps", str(step), "--min_bucket_reso", str(resolution // 2)]
        buckets += ["--max_bucket_reso", str(resolution * 2)]
        for name, extra in (("square", []), ("bucketed", buckets)):
            cases.append(
                TrainCase(
                    name=f"own-data-{key}-{name}",
                    description=f"{count} mixed-aspect JPEGs (512-2048 px) with caption files, {key}, "
                    f"{resolution} px, {name}, default data settings",
                    flags=[*flags, "--train_data_dir", str(data), "--resolution", str(resolution), *extra]
                    + fixed_steps(steps),
                    batch_size=batch or cfg.training.train_batch_size,
                    resolution=resolution,
                    group="own-data",
                    tags={"model": key, "buckets": bool(extra)},
                )
            )
    return cases


def sidecar_scan_case(work_dir: Path, short: bool, pipeline: Path | None = None) -> TrainCase:
    """Start-up to the first step on a generated tree of 10,000 files (5,000 images and their captions).

    In fp32: the preset's `auto` precision may probe the UNet on CPUs with bf16 for seconds, which is not the scan.
    """
    files = 1000 if short else 10_000
    tree = make_scan_tree(work_dir / f"data-scan-tree-{files}", files)
    flags = embedded_flags(pipeline)
    return TrainCase(
        name="sidecar-scan",
        description=f"start-up on a tree of {files:,} files (images with caption files in repeat folders), embedded",
        flags=[*flags, "--train_data_dir", str(tree), "--max_train_steps", "2", "--mixed_precision", "no"],
        batch_size=parse_args(flags).training.train_batch_size,
        resolution=32,
        group="own-data",
    )


def gpu_cases(
    model: Path, work_dir: Path, short: bool, resolution: int = 512, batch_sizes: tuple[int, ...] = (1, 4, 8)
) -> list[TrainCase]:
    """BK-SDM-Tiny at 512 px in bf16, each batch size with and without torch.compile (bench/gpu.sh)."""
    count = 8 if short else 64
    data = make_image_folder(work_dir / f"data-png-{resolution}-{count}", count, resolution)
    steps = 6 if short else 15
    cases = []
    # Compiled runs last and largest batch first: each compiles anew (minutes), so if the script's time limit
    # cuts the stage, the figures that matter most are already written. The real preset's two runs go between.
    for compiled in (False, True):
        if compiled:
            cases += real_preset_cases(model, data, short)
        for batch in sorted(batch_sizes, reverse=compiled):
            flags = [
                *bk_flags(model, data, resolution, batch),
                "--mixed_precision",
                "bf16",
                "--allow_tf32",
                "--num_train_epochs",
                "1000",
                "--max_train_steps",
                str(steps),
            ]
            cases.append(
                TrainCase(
                    name=f"gpu-{resolution}px-bs{batch}" + ("-compile" if compiled else ""),
                    description=f"BK-SDM-Tiny, {resolution} px, bf16, batch {batch}"
                    + (", --compile" if compiled else ""),
                    flags=[*flags, "--compile"] if compiled else flags,
                    batch_size=batch,
                    resolution=resolution,
                    group="gpu-512",
                    warmup_steps=COMPILE_WARMUP_STEPS if compiled else WARMUP_STEPS,
                    tags={"compile": compiled},
                )
            )
    return cases


def real_preset_cases(model: Path, data: Path, short: bool) -> list[TrainCase]:
    """configs/bk-sdm-tiny-naruto.yaml on the BK-SDM-Tiny architecture and generated images: as the preset was
    before --auto_micro_batch (micro-batch 1 x 4 with gradient checkpointing), then as it is now."""
    cfg = parse_args(["--config", str(REAL_PRESET)])
    effective = cfg.training.train_batch_size * cfg.training.gradient_accumulation_steps
    base = [
        "--config",
        str(REAL_PRESET),
        "--pretrained_model_name_or_path",
        str(model),
        "--dataset_name",
        "",  # the preset's Hub dataset, replaced by the local folder
        "--train_data_dir",
        str(data),
        *fixed_steps(4 if short else 12),
    ]
    variants = {
        "gpu-preset-1x4-checkpointing": (
            "as before --auto_micro_batch: micro-batch 1 x 4, gradient checkpointing",
            ["--no-auto_micro_batch", "--gradient_checkpointing"],
        ),
        "gpu-preset-auto": ("--auto_micro_batch (the preset as it is)", ["--auto_micro_batch"]),
    }
    return [
        TrainCase(
            name=name,
            description=f"real preset ({REAL_PRESET.name}) on the BK-SDM-Tiny architecture, {cfg.data.resolution} px, "
            f"{cfg.training.mixed_precision}, {effective} samples per step, {description}",
            flags=[*base, *flags],
            batch_size=effective,
            resolution=cfg.data.resolution,
            group="gpu-preset",
            tags={"auto_micro_batch": "--auto_micro_batch" in flags},
        )
        for name, (description, flags) in variants.items()
    ]


# `--mixed_precision` values of the precision cases, by the names the docs use.
PRECISIONS = {"fp32": "no", "bf16": "bf16", "auto": "auto"}


def fresh_probe_cache(work_dir: Path, name: str) -> dict[str, str]:
    """An empty probe-timings folder for one case: `auto` measures, and its start-up pays for it, as on a first run."""
    folder = work_dir / "probe-cache" / name
    shutil.rmtree(folder, ignore_errors=True)
    return {"LORAKIT_CACHE_DIR": str(folder)}


def without_flag(flags: list[str], name: str) -> list[str]:
    """`flags` less one `--name value` pair."""
    at = flags.index(name)
    return flags[:at] + flags[at + 2 :]


def precision_cases(
    model: Path, work_dir: Path, short: bool, pipeline: Path | None = None, data: Path | None = None
) -> list[TrainCase]:
    """fp32, bf16 and `auto` (probe measured afresh) on the embedded default and on the BK-SDM-Tiny architecture at
    64 px, batch 2: what auto picks on this machine, and its cost or gain against fp32 (issue 22)."""
    embedded = embedded_flags(pipeline, data)
    embedded_cfg = parse_args(embedded)
    bk_data = make_image_folder(work_dir / "data-png-64-16", 16, 64)
    models = {
        "embedded": (embedded, embedded_cfg.training.train_batch_size, embedded_cfg.data.resolution, 30),
        "bk-sdm-tiny-64px": (without_flag(bk_flags(model, bk_data, 64, 2), "--mixed_precision"), 2, 64, 10),
    }
    cases = []
    for model_name, (flags, batch, resolution, steps) in models.items():
        for label, value in PRECISIONS.items():
            name = f"precision-{model_name}-{label}"
            cases.append(
                TrainCase(
                    name=name,
                    description=f"{model_name}, batch {batch}, {resolution} px, --mixed_precision {value}",
                    flags=[*flags, "--mixed_precision", value, *fixed_steps(3 if short else steps)],
                    batch_size=batch,
                    resolution=resolution,
                    group="precision",
                    tags={"model": model_name, "precision": label},
                    env=fresh_probe_cache(work_dir, name) if label == "auto" else {},
                )
            )
    return cases


def compile_cases(model: Path, work_dir: Path, short: bool) -> list[TrainCase]:
    """The BK-SDM-Tiny architecture at 64 px in fp32 with `--compile`, first with an empty compiler cache (a
    user's first run), then again in the same process, where dynamo and inductor keep what the first run compiled
    (warmer than a new process with a warm on-disk cache): what compiling costs a short run on a CPU, against
    `precision-bk-sdm-tiny-64px-fp32` (same flags without it) when both run."""
    data = make_image_folder(work_dir / "data-png-64-16", 16, 64)
    cache = work_dir / "inductor-cache"
    shutil.rmtree(cache, ignore_errors=True)
    return [
        TrainCase(
            name=f"compile-bk-sdm-tiny-64px-fp32-{state}",
            description=f"bk-sdm-tiny-64px, batch 2, 64 px, fp32, --compile (torch.compile of the UNet), {state} "
            "compiler cache",
            flags=[*bk_flags(model, data, 64, 2), "--compile", *fixed_steps(3 if short else 10)],
            batch_size=2,
            resolution=64,
            group="compile",
            warmup_steps=COMPILE_WARMUP_STEPS,
            tags={"model": "bk-sdm-tiny-64px", "compile": True, "compiler_cache": state},
            env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
        )
        for state in ("cold", "warm")
    ]


def make_cases(
    names: list[str],
    work_dir: Path,
    short: bool,
    model: Path | None = None,
    embedded: Path | None = None,
    embedded_data: Path | None = None,
) -> list[TrainCase]:
    """The named cases; `model` replaces the BK-SDM-Tiny architecture (tests pass a tiny pipeline), `embedded`
    the embedded pipeline."""
    reference = lambda: model or reference_pipeline(work_dir)  # noqa: E731  built only when a case needs it
    builders = {
        "embedded": lambda: [embedded_case(short, embedded, embedded_data)],
        # the preset already uses one persistent worker; the lever case shows what it buys over none
        "embedded-workers": lambda: [embedded_case(short, embedded, embedded_data, workers=0)],
        "bk-sdm-tiny": lambda: [bk_sdm_tiny_case(reference(), work_dir, short)],
        "jpeg": lambda: [jpeg_case(reference(), work_dir, short)],
        "jpeg-workers": lambda: jpeg_workers_cases(work_dir, short, embedded),
        "cache": lambda: cache_cases(reference(), work_dir, short),
        "gpu": lambda: gpu_cases(reference(), work_dir, short),
        "own-data": lambda: own_data_cases(reference(), work_dir, short, embedded, embedded_data),
        "sidecar-scan": lambda: [sidecar_scan_case(work_dir, short, embedded)],
        "precision": lambda: precision_cases(reference(), work_dir, short, embedded, embedded_data),
        "compile": lambda: compile_cases(reference(), work_dir, short),
        "main-job": lambda: [],  # subprocess runs, not in-process cases: run_train_bench runs them (main_job_runs)
    }
    unknown = [name for name in names if name not in builders]
    if unknown:
        raise SystemExit(f"Unknown case(s) {unknown}: choose from {sorted(builders)}.")
    if "gpu" in names and not torch.cuda.is_available():
        raise SystemExit("The 'gpu' case needs a CUDA GPU; on this machine use the CPU cases (see --help).")
    return [case for name in names for case in builders[name]()]


# ---- the main job as users run it: `accelerate launch ...` in a subprocess, wall time split -------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def main_job_command(output_dir: Path, short: bool) -> list[str]:
    """The README's quickstart command (output elsewhere; capped at a few steps with --short)."""
    launcher = shutil.which("accelerate")
    head = [launcher, "launch"] if launcher else [sys.executable, "-m", "accelerate.commands.launch"]
    command = [*head, "--config_file", "accelerate_config.yaml", "train_lora.py", "--output_dir", str(output_dir)]
    return command + (["--max_train_steps", "4"] if short else [])


def run_main_job(name: str, checkout: Path, work_dir: Path, short: bool, env: dict[str, str]) -> dict:
    """One main job in `checkout`; wall time from outside, the split from its summary (when it records one)."""
    out = work_dir / "main-job" / name
    shutil.rmtree(out, ignore_errors=True)
    load_before = load_average()
    started = time.perf_counter()
    with open(work_dir / f"{name}.log", "w") as log:
        subprocess.run(
            main_job_command(out, short), cwd=checkout, env={**os.environ, **env}, stdout=log, stderr=log, check=True
        )
    wall_s = time.perf_counter() - started
    summary = json.loads((out / "train_summary.json").read_text())
    split = summary.get("wall_split")
    return {
        "name": name,
        "group": "main-job",
        "checkout": "this" if checkout == REPO_ROOT else str(checkout),
        "wall_s": wall_s,
        "wall_split": split,
        # what passes before the trainer's process starts: accelerate's launcher (it imports torch) and Python
        "launcher_s": wall_s - sum(split.values()) if split else None,
        "train_seconds": summary["train_seconds"],
        "global_step": summary["global_step"],
        "mixed_precision": summary["mixed_precision"],
        "precision_choice": summary.get("precision_choice"),
        "load_average_1min": [load_before, load_average()],
    }


def main_job_runs(work_dir: Path, short: bool, baseline: Path | None = None) -> list[dict]:
    """The main job with no kept probe timings (a first run), then again (timings kept); with `baseline` (a
    checkout of an earlier commit), that checkout's run before and after them, so drift shows as a gap."""
    cache = fresh_probe_cache(work_dir, "main-job")
    plan = [("main-job-first-run", REPO_ROOT), ("main-job-second-run", REPO_ROOT)]
    if baseline is not None:
        plan = [("main-job-baseline", baseline), *plan, ("main-job-baseline-again", baseline)]
    return [run_main_job(name, checkout, work_dir, short, cache) for name, checkout in plan]


def main_job_checks(records: dict[str, dict]) -> dict | None:
    """The issue's goal (the main job at most 15 s wall) and the split of the runs of this checkout."""
    first, second = records.get("main-job-first-run"), records.get("main-job-second-run")
    if not (first and second):
        return None
    checks = {
        "first_run_wall_s": first["wall_s"],
        "second_run_wall_s": second["wall_s"],
        "first_run_split": {"launcher_s": first["launcher_s"], **first["wall_split"]},
        "second_run_split": {"launcher_s": second["launcher_s"], **second["wall_split"]},
        "second_run_at_most_15_s": second["wall_s"] <= 15.0,
    }
    names = ("main-job-baseline", "main-job-baseline-again")
    baselines = [records[name]["wall_s"] for name in names if name in records]
    if baselines:
        before = sum(baselines) / len(baselines)
        checks["baseline_wall_s"] = before
        checks["first_run_over_baseline"] = first["wall_s"] / before
        checks["second_run_over_baseline"] = second["wall_s"] / before
    return checks


def precision_checks(records: dict[str, dict]) -> dict | None:
    """Per model: what auto chose, and wall time and step time of bf16 and auto as ratios of fp32 (same run)."""
    checks = {}
    for model in ("embedded", "bk-sdm-tiny-64px"):
        runs = {label: records.get(f"precision-{model}-{label}") for label in PRECISIONS}
        if not all(runs.values()):
            continue
        fp32 = runs["fp32"]
        checks[model] = {
            "auto_chose": runs["auto"]["mixed_precision"],
            "auto_reason": runs["auto"]["precision_choice"],
            "bf16_over_fp32_step": runs["bf16"]["step_s"] / fp32["step_s"],
            "auto_over_fp32_step": runs["auto"]["step_s"] / fp32["step_s"],
            "auto_over_fp32_total": runs["auto"]["total_s"] / fp32["total_s"],
            "fp32_step_s": fp32["step_s"],
            "auto_startup_minus_fp32_startup_s": runs["auto"]["startup_s"] - fp32["startup_s"],
            "bf16_minus_fp32_peak_rss_mib": runs["bf16"]["peak_rss_mib"] - fp32["peak_rss_mib"],
        }
    eager = records.get("precision-bk-sdm-tiny-64px-fp32")
    for state in ("cold", "warm"):
        compiled = records.get(f"compile-bk-sdm-tiny-64px-fp32-{state}")
        if compiled and eager and compiled["steps"] == eager["steps"]:
            checks[f"compile_{state}"] = {
                "steps": compiled["steps"],
                "extra_seconds": compiled["total_s"] - eager["total_s"],
                "total_ratio": compiled["total_s"] / eager["total_s"],
                "first_step_s": compiled["time_to_first_step_s"] - compiled["startup_s"],
                "eager_first_step_s": eager["time_to_first_step_s"] - eager["startup_s"],
                "steady_step_ratio": compiled["step_s"] / eager["step_s"],
            }
    return checks or None


# ---- checks: the acceptance figures, computed from one bench run ------------------------------------------


def cache_checks(records: dict[str, dict]) -> dict | None:
    """Second epoch with the cache against the run without it: no VAE/text time, the drop, same loss, reuse."""
    off, on, sweep = (records.get(name) for name in ("cache-off", "cache-on", "cache-sweep-lr2e-4"))
    if not (off and on and sweep):
        return None
    offs = [off, records["cache-off-again"]] if "cache-off-again" in records else [off]
    off_step = sum(run["step_s"] for run in offs) / len(offs)
    off_encoders = sum(run["phases_s"]["vae_encoding"] + run["phases_s"]["text_encoding"] for run in offs) / len(offs)
    off_share = off_encoders / off_step
    on_epoch2 = on["epochs"][-1]
    drop = 1.0 - on_epoch2["step_s"] / off_step
    losses_off, losses_on = off["loss_history"], on["loss_history"]
    return {
        "step_s_without_cache": off_step,
        "epoch2_step_s_with_cache": on_epoch2["step_s"],
        "encoder_share_without_cache": off_share,
        "epoch2_encoder_s_with_cache": on_epoch2["phases_s"]["vae_encoding"] + on_epoch2["phases_s"]["text_encoding"],
        "epoch2_step_time_drop": drop,
        "drop_at_least_share_minus_5_points": drop >= off_share - 0.05,
        "max_abs_loss_difference": max(abs(a - b) for a, b in zip(losses_off, losses_on, strict=True)),
        "same_loss_same_seed": len(losses_off) == len(losses_on)
        and all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(losses_off, losses_on, strict=True)),
        "startup_s_encoding_run": on["startup_s"],
        "startup_s_reuse_run": sweep["startup_s"],
        "sweep_encoder_s": sum(sweep["phases_s"][p] for p in ("vae_encoding", "text_encoding")),
        # The trainer's own report and the files on disk must agree: nothing written, nothing rewritten.
        "sweep_cache_hit": bool(sweep["latent_cache_hit"]) and sweep["cache"]["hit"],
        "first_cached_run_encoded": on["latent_cache_hit"] is False and on["cache"]["files_after"] == 1,
    }


def acceptance(records: dict[str, dict]) -> dict:
    checks: dict = {}
    if "embedded-default" in records:
        share = records["embedded-default"]["phase_share"]["data_wait"]
        checks["embedded_data_wait_share"] = share
        checks["embedded_data_wait_below_5_percent"] = share < 0.05
    if "jpeg-1024-to-64px" in records:
        share = records["jpeg-1024-to-64px"]["phase_share"]["data_wait"]
        checks["jpeg_data_wait_share"] = share
        checks["jpeg_data_wait_below_10_percent"] = share < 0.10
    own = {name: r["phase_share"]["data_wait"] for name, r in records.items() if name.startswith("own-data-")}
    if own:
        checks["own_data_data_wait_share"] = own
        checks["own_data_data_wait_below_5_percent"] = all(share < 0.05 for share in own.values())
    if "sidecar-scan" in records:
        checks["sidecar_scan_time_to_first_step_s"] = records["sidecar-scan"]["time_to_first_step_s"]
        checks["sidecar_scan_below_10_s"] = records["sidecar-scan"]["time_to_first_step_s"] < 10
    cache = cache_checks(records)
    if cache:
        checks["cache_latents"] = cache
    for key, figures in (("precision", precision_checks(records)), ("main_job", main_job_checks(records))):
        if figures:
            checks[key] = figures
    return checks


def cache_files(folder: Path) -> dict[str, float]:
    """Cache files and their modification times: an unchanged set after a run means nothing was re-encoded."""
    return {p.name: p.stat().st_mtime for p in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}


def latent_cache_dir(flags: list[str]) -> Path | None:
    return Path(flags[flags.index("--latent_cache_dir") + 1]) if "--cache_latents" in flags else None


def run_train_bench(
    names: list[str],
    work_dir: Path,
    short: bool,
    model: Path | None = None,
    on_record=None,
    embedded: Path | None = None,
    embedded_data: Path | None = None,
    baseline: Path | None = None,
) -> tuple[list[dict], dict]:
    """Every requested case in this process, in order, then the main-job runs (subprocesses) if asked; returns
    the records and the acceptance checks. `baseline` is an earlier checkout the main job is compared with.

    `on_record(records, checks)` is called after every case, so a run cut short still leaves its figures.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for case in make_cases(names, work_dir, short, model, embedded, embedded_data):
        cache_dir = latent_cache_dir(case.flags)
        before = cache_files(cache_dir) if cache_dir else {}
        print(f"[bench] {case.name}: {case.description}", flush=True)
        record = run_case(case, work_dir)
        if cache_dir:
            after = cache_files(cache_dir)
            record["cache"] = {
                "files_before": len(before),
                "files_after": len(after),
                "hit": bool(before) and before == after,
            }
        print(
            f"[bench] {case.name}: {record['step_s']:.3f} s/step, {record['images_per_s']:.2f} images/s, "
            f"data wait {record['phase_share']['data_wait']:.1%}",
            flush=True,
        )
        records.append(record)
        if on_record is not None:
            on_record(records, acceptance({r["name"]: r for r in records}))
    if "main-job" in names:
        for record in main_job_runs(work_dir, short, baseline):
            print(f"[bench] {record['name']}: {record['wall_s']:.1f} s wall, split {record['wall_split']}", flush=True)
            records.append(record)
            if on_record is not None:
                on_record(records, acceptance({r["name"]: r for r in records}))
    return records, acceptance({r["name"]: r for r in records})
