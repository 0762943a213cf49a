"""The bench in its short mode (so it cannot rot) and the sanity of what it reports."""

from __future__ import annotations

import json
import math
import re

import pytest

from bench.__main__ import main as bench_main
from bench.report import PAGE, block_renderers, fmt, layout_note, preset_lines
from bench.results_io import RESULTS_DIR, read_results
from bench.timer import StepStampTimer
from bench.train import gpu_cases, make_cases, run_train_bench
from lorakit.config import parse_args
from lorakit.data import prepare_dataset
from lorakit.markdown import block_names, render_blocks
from lorakit.paths import REPO_ROOT
from lorakit.timing import PHASES


@pytest.fixture(scope="module")
def short_train(tiny_pipeline_dir, tmp_path_factory):
    """The CPU cases in short mode, with the tiny pipeline standing in for BK-SDM-Tiny (seconds, not minutes)."""
    work = tmp_path_factory.mktemp("bench")
    out = work / "train.json"
    assert (
        bench_main(
            [
                "train",
                "--short",
                "--cases",
                "bk-sdm-tiny",
                "jpeg",
                "cache",
                "--model",
                str(tiny_pipeline_dir),
                "--work_dir",
                str(work),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return json.loads(out.read_text())


LAYOUT_KEYS = ("micro_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "auto_micro_batch")


def by_name(document: dict) -> dict[str, dict]:
    return {case["name"]: case for case in document["cases"]}


@pytest.mark.slow
def test_every_case_reports_consistent_figures(short_train):
    assert {"bk-sdm-tiny-64px", "jpeg-1024-to-64px", "cache-off", "cache-on", "cache-sweep-lr2e-4"} <= set(
        by_name(short_train)
    )
    for case in short_train["cases"]:
        assert case["timed_steps"] == case["steps"] - case["warmup_steps"] >= 1
        assert set(case["phases_s"]) == set(PHASES)
        assert all(seconds >= 0 for seconds in case["phases_s"].values())
        # The phases are timed inside the step, so together they can never exceed it.
        assert sum(case["phases_s"].values()) <= case["step_s"] * (1 + 1e-9)
        assert case["other_s"] >= -1e-9
        assert case["images_per_s"] == pytest.approx(case["batch_size"] / case["step_s"])
        assert 0 < case["startup_s"] < case["time_to_first_step_s"] < case["total_s"]
        assert case["peak_rss_mib"] > 100  # torch alone is more than that: the sampler really ran
        assert len(case["loss_history"]) == case["steps"] and all(math.isfinite(x) for x in case["loss_history"])
    assert short_train["machine"]["cores"] >= 1 and short_train["machine"]["torch"]
    assert short_train["mode"] == "short"


@pytest.mark.slow
def test_uncached_steps_spend_time_in_vae_and_text_encoder(short_train):
    off = by_name(short_train)["cache-off"]
    for epoch in off["epochs"]:
        assert epoch["phases_s"]["vae_encoding"] > 0 and epoch["phases_s"]["text_encoding"] > 0


@pytest.mark.slow
def test_cache_latents_second_epoch_skips_the_encoders_with_the_same_losses(short_train):
    cases, cache = by_name(short_train), short_train["checks"]["cache_latents"]
    second = cases["cache-on"]["epochs"][-1]
    assert second["epoch"] == 2
    # That no encoder runs with a warm cache is asserted by call counts in tests/test_levers.py; timing ratios
    # on a shared machine would flake. Here: the bench reports the cached epoch's phases.
    assert set(second["phases_s"]) == set(cases["cache-off"]["phases_s"])
    assert cache["same_loss_same_seed"], cache["max_abs_loss_difference"]
    assert cases["cache-on"]["loss_history"] != cases["cache-sweep-lr2e-4"]["loss_history"]  # the lr did change


@pytest.mark.slow
def test_second_run_of_a_sweep_reuses_the_cache(short_train):
    cases, cache = by_name(short_train), short_train["checks"]["cache_latents"]
    assert cache["first_cached_run_encoded"] and cases["cache-on"]["cache"]["files_after"] == 1
    assert cache["sweep_cache_hit"]
    assert cases["cache-sweep-lr2e-4"]["cache"] == {"files_before": 1, "files_after": 1, "hit": True}


@pytest.mark.slow
def test_embedded_default_and_jpeg_cases_report_the_data_wait_share(tmp_path):
    # The < 5% / < 10% goals are figures of the full bench (docs/benchmarks.md), not timed assertions:
    # a timed test on a shared 2-core machine would be flaky. Here: the cases run and report the share.
    records, checks = run_train_bench(["embedded", "jpeg-workers"], tmp_path, short=True)
    records = {r["name"]: r for r in records}
    default = records["embedded-default"]
    assert default["batch_size"] == 8 and default["resolution"] == 32  # configs/shapes.yaml, unchanged
    assert 0.0 <= checks["embedded_data_wait_share"] < 1.0
    assert isinstance(checks["embedded_data_wait_below_5_percent"], bool)
    for name in ("jpeg-embedded-workers0", "jpeg-embedded-workers2"):
        assert records[name]["phases_s"]["data_wait"] > 0.0


def test_gpu_script_cases_are_flags_the_trainer_accepts(tiny_pipeline_dir, tmp_path):
    cases = gpu_cases(tiny_pipeline_dir, tmp_path, short=True, resolution=64)
    # Eager runs, the real preset's two, then the compiled runs (the ones a time limit may cut).
    assert [c.name for c in cases][3:5] == ["gpu-preset-1x4-checkpointing", "gpu-preset-auto"]
    sweep = [c for c in cases if c.group == "gpu-512"]
    assert [(c.batch_size, c.tags["compile"]) for c in sweep] == [
        (1, False),
        (4, False),
        (8, False),
        (8, True),
        (4, True),
        (1, True),
    ]
    for case in sweep:
        cfg = parse_args([*case.flags, "--output_dir", str(tmp_path / "out")])
        assert cfg.training.mixed_precision == "bf16" and cfg.training.compile == case.tags["compile"]
        assert cfg.training.train_batch_size == case.batch_size and cfg.data.resolution == 64
    script = (REPO_ROOT / "bench" / "gpu.sh").read_text()
    assert "--cases gpu" in script and "--steps 25" in script and "bench report" in script
    limits = [int(limit) for limit in re.findall(r"^timeout (\d+) ", script, re.M)]
    assert len(limits) == 2 and sum(limits) <= 450  # the stages' limits leave the 8 minutes room to start up


def test_gpu_script_runs_the_real_preset_with_and_without_auto_micro_batch(tiny_pipeline_dir, tmp_path):
    cases = [c for c in gpu_cases(tiny_pipeline_dir, tmp_path, short=True, resolution=64) if c.group == "gpu-preset"]
    preset = parse_args(["--config", str(REPO_ROOT / "configs" / "bk-sdm-tiny-naruto.yaml")])
    out = ["--output_dir", str(tmp_path / "out")]
    configs = {c.tags["auto_micro_batch"]: parse_args([*c.flags, *out]) for c in cases}
    assert set(configs) == {True, False} and {c.batch_size for c in cases} == {4}
    for auto, cfg in configs.items():
        assert cfg.training.auto_micro_batch is auto
        # The preset itself, on the local architecture and generated images instead of the Hub's.
        assert cfg.model.pretrained_model_name_or_path == str(tiny_pipeline_dir) and not cfg.data.dataset_name
        assert (cfg.training.train_batch_size, cfg.training.gradient_accumulation_steps) == (1, 4)
        assert (cfg.data.resolution, cfg.training.mixed_precision, cfg.lora.rank) == (
            preset.data.resolution,
            preset.training.mixed_precision,
            preset.lora.rank,
        )
        assert len(prepare_dataset(cfg.data, cfg.training.seed).rows) == 8  # the preset's columns are there
    # Without the flag: the preset's layout before it (1 x 4 with checkpointing); with it, checkpointing is chosen.
    assert configs[False].training.gradient_checkpointing and not configs[True].training.gradient_checkpointing


def test_report_compares_the_real_preset_layouts():
    def case(name, auto, step_s, peak, layout):
        return {
            "name": name,
            "group": "gpu-preset",
            "tags": {"auto_micro_batch": auto},
            "step_s": step_s,
            "peak_cuda_mib": peak,
            "layout": dict(zip(LAYOUT_KEYS, layout, strict=True)),
        }

    cases = [
        case("gpu-preset-1x4-checkpointing", False, 1.0, 4000.0, (1, 4, True, False)),
        case("gpu-preset-auto", True, 0.5, 9000.0, (4, 1, False, True)),
    ]
    assert preset_lines(cases) == [
        "- Real preset; `--auto_micro_batch` chose micro-batch 4 x 1, gradient checkpointing off: step time 0.50x, "
        "peak GPU memory 2.25x those of micro-batch 1 x 4 with gradient checkpointing (same run)."
    ]
    assert layout_note(cases[0]) == "" and preset_lines(cases[:1]) == []


@pytest.mark.slow
def test_report_renders_every_case_and_the_machine(short_train, tmp_path):
    """`python -m bench report` re-renders the page's figures from a results folder; short runs never reach it."""
    results, page = tmp_path / "results", tmp_path / "benchmarks.md"
    results.mkdir()
    (results / "train-cpu.json").write_text(json.dumps({**short_train, "mode": "full"}))
    assert bench_main(["report", "--results", str(results), "--out", str(page)]) == 0
    text = page.read_text()
    machine = short_train["machine"]
    assert machine["cpu"] in text and f"torch {machine['torch']}" in text and f"{machine['cores']} cores" in text
    for case in short_train["cases"]:
        assert f"`{case['name']}`" in text
    step = fmt(by_name(short_train)["bk-sdm-tiny-64px"]["step_s"])
    assert f"| {step} |" in text
    assert "No GPU figures yet" in text
    assert "## Levers" in text  # the page's prose, kept from the committed page
    (results / "train-cpu.json").write_text(json.dumps(short_train))
    assert bench_main(["report", "--results", str(results), "--out", str(page)]) == 0
    assert "## Training" not in page.read_text()  # short runs never reach the docs


@pytest.mark.slow
def test_gpu_results_replace_the_missing_gpu_note(short_train, tmp_path):
    gpu = {**short_train, "mode": "full", "machine": {**short_train["machine"], "gpu": "H200", "cuda": "12.8"}}
    (tmp_path / "train-gpu.json").write_text(json.dumps(gpu))
    renderers = block_renderers(tmp_path)
    assert "## Training (GPU)" in renderers["bench-sections"]()
    assert "`bench/results/train-gpu.json`" in renderers["bench-gpu"]()
    assert "No GPU figures yet" not in renderers["bench-gpu"]()


def test_docs_are_rendered_from_the_committed_results():
    documents = read_results(RESULTS_DIR)
    assert any(d["kind"] == "train" and d["mode"] == "full" for d in documents)
    text = PAGE.read_text()
    renderers = block_renderers()
    assert block_names(text) == list(renderers)
    assert render_blocks(text, renderers) == text, "run `python -m bench report`"


@pytest.mark.slow
def test_generate_short_uses_the_space_code_and_measures_cold_start(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "generate.json"
    assert (
        bench_main(
            [
                "generate",
                "--short",
                "--base",
                str(tiny_pipeline_dir),
                "--device",
                "cpu",
                "--work_dir",
                str(tmp_path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    variants = result["variants"]
    assert set(variants) == {"base", "lora_unfused", "lora_fused", "lora_fused_unloaded", "pndm_50", "bfloat16"}
    assert variants["pndm_50"]["steps"] > variants["lora_unfused"]["steps"]
    assert all(v["seconds_per_image"] > 0 for v in variants.values())
    ratios = result["ratios"]
    assert ratios["fused_over_base"] == pytest.approx(
        variants["lora_fused"]["seconds_per_image"] / variants["base"]["seconds_per_image"]
    )
    # Fusing folds the same weights in: the images must match the unfused adapter's.
    assert result["fused_vs_unfused_max_pixel_difference"] <= 2.0
    assert result["fused_unloaded_vs_unfused_max_pixel_difference"] <= 2.0
    assert result["adapter_load_s"] > 0 and result["image_px"] == 32
    cold = result["space_cold_start"]
    assert 0 < cold["serving_s"] < cold["first_image_s"]


@pytest.mark.slow
def test_generate_with_several_space_adapters_short_times_switching_and_memory(tiny_pipeline_dir, tmp_path):
    """`python -m bench space-adapters --short` on the tiny pipeline: both request kinds timed, 1, 2 and 4 adapters."""
    from test_space import make_tiny_adapter

    adapter = make_tiny_adapter(tiny_pipeline_dir, tmp_path / "adapter")
    out = tmp_path / "space-adapters.json"
    argv = ["space-adapters", "--short", "--base", str(tiny_pipeline_dir), "--adapter", str(adapter)]
    assert bench_main([*argv, "--device", "cpu", "--work_dir", str(tmp_path), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "space-adapters" and result["mode"] == "short"
    switching = result["switching"]
    assert switching["same_adapter_request_s"] > 0 and switching["switching_request_s"] > 0
    assert switching["switching_over_same"] == pytest.approx(
        switching["switching_request_s"] / switching["same_adapter_request_s"]
    )
    assert switching["switching_request_min_s"] <= switching["switching_request_s"]
    assert [row["adapters"] for row in result["memory"]] == [1, 2, 4]
    assert all(row["rss_mib"] > 100 for row in result["memory"])  # torch alone is more: the Space really ran
    assert result["machine"]["load_average_1min_at_end"] >= 0


def test_window_averages_only_the_requested_steps():
    timer = StepStampTimer()
    timer.loop_started_at = 10.0
    timer.stamps = [11.0, 11.5, 12.5]
    timer.totals = [{p: 0.0 for p in PHASES} | {"data_wait": s} for s in (0.9, 1.0, 1.2)]
    warm = timer.window(2, 3)
    assert warm["steps"] == 2 and warm["step_s"] == pytest.approx(0.75)
    assert warm["phases_s"]["data_wait"] == pytest.approx(0.15)
    assert timer.window(1, 1)["step_s"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not timed"):
        timer.window(2, 4)


def test_unknown_case_and_gpu_case_on_cpu_fail_with_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="Unknown case.*choose from"):
        run_train_bench(["nope"], tmp_path, short=True)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            run_train_bench(["gpu"], tmp_path, short=True)


def test_data_loading_lever_cases_differ_from_the_preset(tmp_path):
    """The lever cases must change the workers against the preset (1 persistent worker), not repeat it."""
    cases = {c.name: c for c in make_cases(["embedded", "embedded-workers", "jpeg-workers"], tmp_path, short=True)}

    def data(name):
        return parse_args([*cases[name].flags, "--output_dir", str(tmp_path / "out")]).data

    assert (data("embedded-default").dataloader_num_workers, data("embedded-default").persistent_workers) == (1, True)
    for name in ("embedded-workers0", "jpeg-embedded-workers0"):
        assert (data(name).dataloader_num_workers, data(name).persistent_workers) == (0, False)
    assert data("jpeg-embedded-workers2").dataloader_num_workers == 2


@pytest.mark.slow
def test_precision_cases_run_fp32_bf16_and_auto_with_a_fresh_probe(tiny_pipeline_dir, tmp_path):
    records, checks = run_train_bench(["precision"], tmp_path, short=True, model=tiny_pipeline_dir)
    records = {r["name"]: r for r in records}
    for model in ("embedded", "bk-sdm-tiny-64px"):
        fp32, bf16, auto = (records[f"precision-{model}-{label}"] for label in ("fp32", "bf16", "auto"))
        assert (fp32["mixed_precision"], bf16["mixed_precision"]) == ("no", "bf16")
        assert auto["mixed_precision"] in ("no", "bf16") and auto["precision_choice"]
        assert checks["precision"][model]["auto_chose"] == auto["mixed_precision"]
        ratio = checks["precision"][model]["auto_over_fp32_total"]
        assert math.isclose(ratio, auto["total_s"] / fp32["total_s"])
        assert all(r["wind_down_s"] is not None and r["wind_down_s"] >= 0 for r in (fp32, bf16, auto))
    # each auto case starts without kept timings, so it pays for its probe like a first run
    assert "kept in" not in records["precision-embedded-auto"]["precision_choice"]


def test_main_job_checks_split_the_wall_time_and_compare_with_the_baseline():
    from bench.train import main_job_checks

    def run(name, wall, split=None):
        launcher = wall - sum(split.values()) if split else None
        return name, {"name": name, "wall_s": wall, "wall_split": split, "launcher_s": launcher}

    split = {"startup_s": 6.0, "steps_s": 5.0, "wind_down_s": 1.0}
    records = dict(
        [
            run("main-job-baseline", 30.0),
            run("main-job-first-run", 16.0, split),
            run("main-job-second-run", 14.0, split),
            run("main-job-baseline-again", 26.0),
        ]
    )
    checks = main_job_checks(records)
    assert checks["second_run_split"] == {"launcher_s": 2.0, **split}
    assert checks["first_run_split"]["launcher_s"] == 4.0
    assert checks["baseline_wall_s"] == 28.0 and checks["second_run_over_baseline"] == 0.5
    assert checks["second_run_at_most_15_s"] is True
    records["main-job-second-run"]["wall_s"] = 15.5
    assert main_job_checks(records)["second_run_at_most_15_s"] is False
    assert main_job_checks({"main-job-first-run": records["main-job-first-run"]}) is None


@pytest.mark.slow
def test_main_job_runs_the_readme_command_and_splits_its_wall_time(tmp_path):
    from bench.train import main_job_command, main_job_runs

    assert main_job_command(tmp_path, short=False)[-5:] == [
        "--config_file",
        "accelerate_config.yaml",
        "train_lora.py",
        "--output_dir",
        str(tmp_path),
    ]
    first, second = main_job_runs(tmp_path, short=True)
    for run in (first, second):
        assert run["global_step"] == 4 and run["checkout"] == "this"
        assert set(run["wall_split"]) == {"startup_s", "steps_s", "wind_down_s"}
        assert 0 < run["launcher_s"] < run["wall_s"]  # accelerate's launcher runs before the trainer's process
    reason = first["precision_choice"] or ""
    steady_probe = reason.startswith("probe: ") and "not kept" not in reason  # a busy machine's probe is not kept
    if steady_probe:  # a CPU with native bf16 on a quiet machine: the second run reuses the first run's timings
        assert "kept in" in second["precision_choice"] and "kept in" not in first["precision_choice"]


def test_precision_checks_compare_with_fp32_and_the_report_says_what_auto_chose():
    from bench.report import precision_lines
    from bench.train import precision_checks

    def record(name, total, step, startup, first_step_end, precision="no", reason=None, rss=1000.0):
        return name, {
            "total_s": total,
            "step_s": step,
            "startup_s": startup,
            "time_to_first_step_s": first_step_end,
            "steps": 10,
            "mixed_precision": precision,
            "precision_choice": reason,
            "peak_rss_mib": rss,
        }

    records = dict(
        [
            record("precision-bk-sdm-tiny-64px-fp32", 20.0, 1.0, 1.0, 3.0),
            record("precision-bk-sdm-tiny-64px-bf16", 14.0, 0.6, 1.0, 2.0, "bf16", rss=900.0),
            record("precision-bk-sdm-tiny-64px-auto", 16.0, 0.6, 5.0, 6.0, "bf16", "probe: bf16 1.50x faster"),
            record("compile-bk-sdm-tiny-64px-fp32-cold", 150.0, 1.2, 1.0, 131.0),
            record("compile-bk-sdm-tiny-64px-fp32-warm", 40.0, 1.2, 1.0, 21.0),
        ]
    )
    checks = precision_checks(records)
    bk = checks["bk-sdm-tiny-64px"]
    assert bk["auto_chose"] == "bf16" and bk["auto_over_fp32_total"] == 0.8 and bk["bf16_over_fp32_step"] == 0.6
    assert bk["auto_startup_minus_fp32_startup_s"] == 4.0 and bk["bf16_minus_fp32_peak_rss_mib"] == -100.0
    assert checks["compile_cold"]["extra_seconds"] == 130.0 and checks["compile_cold"]["first_step_s"] == 130.0
    assert checks["compile_warm"]["total_ratio"] == 2.0 and checks["compile_warm"]["steady_step_ratio"] == 1.2
    assert "embedded" not in checks  # its runs are missing: no figure rather than a wrong one
    text = "\n".join(precision_lines(checks))
    assert '`auto` chose bf16 ("probe: bf16 1.50x faster"); the whole `auto` run took 0.80x' in text
    assert "at 0.40 s saved per step the probe is repaid after about 10 steps" in text
    assert "an empty compiler cache (a first run): +130 s for the whole run (7.5x the eager run)" in text
    assert "again in the same process (what that run compiled kept): +20 s" in text
