"""CLI: `python -m bench train|generate|space-adapters|report` (full mode by default, `--short` for CI)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from bench.report import PAGE  # noqa: E402
from bench.results_io import RESULTS_DIR, write_results  # noqa: E402

DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "lorakit-bench"
CPU_CASES = ["embedded", "embedded-workers", "jpeg-workers", "bk-sdm-tiny", "jpeg", "cache"]


def device_tag() -> str:
    return "gpu" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="Time the trainer's steps phase by phase.")
    train.add_argument(
        "--cases",
        nargs="+",
        default=None,
        help=f"Cases to run (default on CPU: {' '.join(CPU_CASES)}; on a GPU: gpu).",
    )
    train.add_argument(
        "--model",
        type=Path,
        default=None,
        help="Use this diffusers folder instead of the BK-SDM-Tiny architecture (quick checks).",
    )
    train.add_argument(
        "--embedded",
        type=Path,
        default=None,
        help="A pipeline of the embedded architecture to use instead of embedded/pipeline.",
    )
    train.add_argument(
        "--embedded_data",
        type=Path,
        default=None,
        help="The embedded adapter data from another folder (same rows) for the embedded-default case.",
    )
    train.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="A checkout of an earlier commit (git worktree add DIR REV): the main-job case runs it too, for ratios.",
    )
    generate = commands.add_parser("generate", help="Seconds per image with the Space's code, and its cold start.")
    generate.add_argument("--base", default=None, help="Base pipeline (default: the Space's default).")
    generate.add_argument("--adapter", default=None, help="LoRA adapter (default: the Space's default).")
    generate.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the Space's default).")
    generate.add_argument("--device", default=None, choices=["cpu", "cuda"], help="Default: cuda when available.")
    generate.add_argument(
        "--no-cold_start", dest="cold_start", action="store_false", help="Skip the Space cold-start measurement."
    )
    adapters = commands.add_parser(
        "space-adapters",
        help="The Space with several adapters: a request that switches adapters against one that does not, and "
        "the process's memory with 1, 2 and 4 adapters.",
    )
    adapters.add_argument("--base", default=None, help="Base pipeline (default: the Space's default).")
    adapters.add_argument("--adapter", default=None, help="The adapter to copy (default: the Space's default).")
    adapters.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the Space's default).")
    adapters.add_argument("--device", default=None, choices=["cpu", "cuda"], help="Default: cuda when available.")
    for sub in (train, generate, adapters):
        sub.add_argument("--note", default=None, help="A sentence stored with the results and shown in the docs.")
        sub.add_argument("--short", action="store_true", help="A few steps only (CI): checks the bench still runs.")
        sub.add_argument(
            "--out", type=Path, default=None, help="Result JSON (default: bench/results/<kind>-<device>.json)."
        )
        sub.add_argument(
            "--work_dir",
            type=Path,
            default=DEFAULT_WORK_DIR,
            help="Scratch space: reference model (2 GB, reused), data, runs.",
        )
    report = commands.add_parser(
        "report", help="Re-render the figures (generated blocks) of docs/benchmarks.md from the result JSON files."
    )
    report.add_argument("--results", type=Path, default=RESULTS_DIR)
    report.add_argument(
        "--out", type=Path, default=PAGE, help="Page to re-render in place (a new file starts as the committed page)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "report":
        from bench.report import write_report

        print(f"Wrote {write_report(args.results, args.out)}")
        return 0
    machine = machine_info()
    # The note is shown on its own line in the docs; the command line keeps only the flags.
    shown = [a for i, a in enumerate(argv) if a != "--note" and (i == 0 or argv[i - 1] != "--note")]
    suffix = device_tag() + ("-short" if args.short else "")
    if args.command == "train":
        from bench.train import run_train_bench

        names = args.cases or (["gpu"] if torch.cuda.is_available() else CPU_CASES)
        out = args.out or RESULTS_DIR / f"train-{suffix}.json"

        def save(records: list[dict], checks: dict) -> None:
            payload = {"cases": records, "checks": checks, "note": args.note}
            write_results(out, "train", args.short, shown, payload, machine)

        run_train_bench(
            names,
            args.work_dir,
            args.short,
            args.model,
            on_record=save,
            embedded=args.embedded,
            embedded_data=args.embedded_data,
            baseline=args.baseline,
        )
    elif args.command == "space-adapters":
        from bench.generate import default_models
        from bench.space_adapters import run_space_adapters_bench

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        base, adapter = default_models(args.base, args.adapter, args.work_dir)
        result = run_space_adapters_bench(base, adapter, device, args.steps, args.short, args.work_dir)
        out = args.out or RESULTS_DIR / f"space-adapters-{suffix}.json"
        write_results(out, "space-adapters", args.short, shown, {**result, "note": args.note}, machine)
    else:
        from bench.generate import default_models, run_generate_bench

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        base, adapter = default_models(args.base, args.adapter, args.work_dir)
        result = run_generate_bench(base, adapter, device, args.steps, args.short, args.work_dir, args.cold_start)
        out = args.out or RESULTS_DIR / f"generate-{suffix}.json"
        write_results(out, "generate", args.short, shown, {**result, "note": args.note}, machine)
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
