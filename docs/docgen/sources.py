"""Where every number in the docs comes from: the result files, read here and nowhere else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lorakit.atomic import atomic_write_json
from lorakit.filenames import EVAL_RESULTS_FILE, SUMMARY_FILE
from lorakit.summary import TrainSummary, read_summary

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
RESULTS = DOCS / "results"
IMAGES = DOCS / "images"

EVAL_DIR = RESULTS / "eval"
EVAL_JSON = EVAL_DIR / EVAL_RESULTS_FILE
SIZES_EMBEDDED = RESULTS / "param_counts_embedded.json"
SIZES_BK_SDM = RESULTS / "param_counts_bk_sdm_tiny.json"
CONTINUAL_JSON = RESULTS / "continual.json"
OPTIONS_JSON = RESULTS / "options.json"
FACTS_JSON = RESULTS / "facts.json"
DEMO_ADAPTER = REPO / "embedded" / "demo_adapter"
TRAIN_SUMMARY = DEMO_ADAPTER / SUMMARY_FILE
BUILD_REPORT = REPO / "embedded" / "build_report.json"
BENCH_RESULTS = REPO / "bench" / "results"

# The commands that write each file, quoted in the docs when a file is missing.
EVAL_COMMAND = (
    "python -m eval --base embedded/pipeline --lora embedded/demo_adapter --seeds 0 1 2 3 4 "
    "--output_dir docs/results/eval"
)
CONTINUAL_COMMAND = "python docs/continual_experiment.py"
OPTIONS_COMMAND = "python docs/options_experiment.py"
BENCH_CPU_COMMANDS = "python -m bench train && python -m bench generate"
BENCH_GPU_COMMAND = "bash bench/gpu.sh"
BENCH_PRECISION_COMMAND = (
    "python -m bench train --cases precision compile main-job --out bench/results/train-precision-cpu.json"
)
BENCH_PRECISION_JSON = BENCH_RESULTS / "train-precision-cpu.json"


def demo_summary() -> TrainSummary | None:
    """The committed demo adapter's run summary, or None when it has not been trained yet."""
    return read_summary(DEMO_ADAPTER) if TRAIN_SUMMARY.is_file() else None


def read_json(path: Path) -> dict | None:
    """The JSON document at `path`, or None when it has not been produced yet."""
    return json.loads(path.read_text()) if path.is_file() else None


def bench_result(kind: str, device: str) -> dict | None:
    """The full-mode bench result of `kind` (train/generate) on `device` (cpu/gpu), if the bench wrote one."""
    return read_json(BENCH_RESULTS / f"{kind}-{device}.json")


def bench_case(document: dict | None, name: str) -> dict | None:
    """One case of a train bench result by name."""
    if not document:
        return None
    return next((case for case in document.get("cases", []) if case.get("name") == name), None)


def dataset_rows(folder: Path) -> int:
    """Rows of an imagefolder: lines of its metadata.jsonl."""
    return sum(1 for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip())


def relative(path: Path) -> str:
    """`path` relative to the repository root, for display."""
    return path.resolve().relative_to(REPO).as_posix()


def save_results(path: Path, results: dict, committed: Path, render_blocks: bool = True) -> None:
    """Write an experiment's result file; when it is the committed one, re-render every page's number blocks
    from it (`python docs/build.py --blocks`), so the docs never lag behind their source."""
    atomic_write_json(path, results)
    if render_blocks and Path(path) == committed:
        subprocess.run([sys.executable, "docs/build.py", "--blocks"], cwd=REPO, check=True)
