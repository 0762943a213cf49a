"""Training options in the shapes world: the default preset with one option changed at a time.

    python docs/options_experiment.py          # one one-epoch run per variant and its evaluation; writes
                                               # docs/results/options.json, then re-renders the docs' blocks
    python docs/options_experiment.py --smoke  # two steps per run, one seed, results in a temporary folder

Variants (configs/shapes.yaml plus): AdamW (the preset as it is), Prodigy at learning rate 1.0, Lion, DoRA, bf16
mixed precision, EMA. `--variants NAME ...` reruns only those and keeps the other rows of the result file.
Every run also measures a held-out loss on purple rows drawn afresh from the world generator (never trained on;
`--validation_data_dir`, so the training rows stay the preset's own). Each adapter is judged with
`python -m eval ... --seeds 0 1 2 3 4`: R-precision on the purple prompts (what the run should learn) and on the
base prompts (what it should not forget), with training time and peak memory from the training process itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "docs")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from docgen import sources as src  # noqa: E402

from lorakit.filenames import EVAL_RESULTS_FILE  # noqa: E402
from lorakit.paths import EMBEDDED_PIPELINE  # noqa: E402
from lorakit.summary import read_summary  # noqa: E402

TRAIN = ["python", "train_lora.py", "--config", "configs/shapes.yaml", "--validation_prompt", "--report_to", "none"]
# Another draw than the training rows' (embedded/build.py). The continual experiment's skewed batch uses 2027 too,
# over another concept list (so other images); the two experiments never share a model, so nothing leaks.
HELD_OUT_SEED = 2027
HELD_OUT_ROWS = 48  # a tenth of the adapter data
SEEDS = (0, 1, 2, 3, 4)
# name -> (label, flags added to the preset). One option changed per run; where an option's own units differ from
# AdamW's, its learning rates follow its paper's guidance rather than a sweep on this world.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "adamw": ("AdamW (the preset)", []),
    "prodigy": (
        "Prodigy, learning rate 1.0",
        # Prodigy (arXiv 2306.06101) estimates its step size; 1.0 is its documented setting. It takes one learning
        # rate for every group, so the learned word trains at Prodigy's step too.
        ["--optimizer", "prodigy", "--learning_rate", "1.0"],
    ),
    "lion": (
        "Lion, learning rates / 3",
        # Lion (arXiv 2302.06675) moves every value by the learning rate each step; its authors advise a rate
        # 3-10x smaller than AdamW's: the mildest end, for the LoRA and the learned word alike.
        ["--optimizer", "lion", "--learning_rate", "6.7e-5", "--token_embedding_lr", "1e-2"],
    ),
    "dora": ("DoRA", ["--use_dora"]),
    # A speed option, not a quality one: frozen weights in bf16, LoRA in fp32. `auto` picks it on GPUs; on this
    # CPU it keeps fp32 for the tiny embedded UNet, so the preset's row is the fp32 run it is compared with.
    "bf16": ("bf16 mixed precision", ["--mixed_precision", "bf16"]),
    "ema": (
        "EMA, decay 0.95",
        # The preset's epoch is 60 steps; the usual 0.999 averages over ~1000 steps and would return little more
        # than the first steps' weights. 0.95 averages over ~20 steps, a third of the run.
        ["--use_ema", "--ema_decay", "0.95"],
    ),
}


def write_held_out(folder: Path, rows: int) -> Path:
    """Purple shapes drawn like embedded/data/adapter with another seed: rows the runs never train on."""
    from embedded import world
    from embedded.dataset import write_imagefolder

    write_imagefolder(
        world.sample(world.adapter_concepts(), rows, HELD_OUT_SEED),
        folder,
        title="Shapes world purple shapes (held-out rows)",
        description="Every shape in purple, drawn with another seed: the options experiment's held-out loss.",
    )
    return folder


def train_one(command: list[str], measure_file: Path) -> None:
    """Run `train_lora.main` in this process and record its peak memory (called in a child process)."""
    import torch

    import train_lora

    started = time.time()
    code = train_lora.main(command[2:])
    peak = {"wall_seconds": round(time.time() - started, 2), "exit_code": code}
    if torch.cuda.is_available():
        peak |= {"peak_memory_bytes": torch.cuda.max_memory_allocated(), "memory_kind": "peak CUDA memory allocated"}
    else:  # ru_maxrss is in kB on Linux: the training process's own peak, its data worker not included
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak |= {"peak_memory_bytes": rss, "memory_kind": "peak resident memory of the training process"}
    measure_file.write_text(json.dumps(peak))
    sys.exit(code)


def run_variant(name: str, flags: list[str], work: Path, held_out: Path, extra: list[str]) -> dict:
    """Train one variant in a fresh process; its summary figures and peak memory."""
    rel = lambda path: os.path.relpath(path, REPO)  # noqa: E731
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    command = [*TRAIN, *flags, "--validation_data_dir", rel(held_out), "--output_dir", rel(out), *extra]
    measure = work / f"{name}.measure.json"
    child = [sys.executable, __file__, "--train_one", str(measure), "--", *command]
    subprocess.run(child, cwd=REPO, check=True)
    summary = read_summary(out)
    return {
        "command": shlex.join(command),
        "train_seconds": summary.train_seconds,
        "global_step": summary.global_step,
        "num_samples": summary.num_samples,
        "lora_trainable_parameters": summary.lora_trainable_parameters,
        "held_out_loss": summary.validation_loss,
        "held_out_rows": summary.validation_rows,
        "mixed_precision": summary.mixed_precision,
        **json.loads(measure.read_text()),
    }


def evaluate(adapter: Path, base: Path, clip: Path, seeds: tuple[int, ...], extra: list[str]) -> dict:
    """`python -m eval` on one adapter; R-precision and CLIP score per prompt set, base and adapted."""
    out = adapter / "eval"
    command = ["python", "-m", "eval", "--base", str(base), "--lora", str(adapter), "--clip_model", str(clip)]
    command += ["--seeds", *map(str, seeds), "--output_dir", str(out), *extra]
    subprocess.run([sys.executable, *command[1:]], cwd=REPO, check=True)
    report = json.loads((out / EVAL_RESULTS_FILE).read_text())
    return {
        "command": shlex.join(command),
        "settings": report["settings"],
        "num_candidates": report["num_candidates"],
        "sets": {
            row["name"]: {"num_images": row["num_images"], "base": row["base"], "adapter": row["adapter"]}
            for row in report["prompt_sets"]
        },
    }


def merged_variants(results: Path, fresh: list[dict], seeds: tuple[int, ...], work: Path) -> list[dict]:
    """`fresh` runs in place of their earlier rows in `results` (same seeds), other rows kept, in VARIANTS order:
    `--variants bf16` adds or reruns one row without retraining the rest. A kept row that predates the
    `mixed_precision` field takes it from its run folder's summary, when that folder is still there."""
    earlier = json.loads(results.read_text()) if results.is_file() else {}
    rows = {v["name"]: v for v in earlier.get("variants", [])} if earlier.get("seeds") == list(seeds) else {}
    for row in rows.values():
        if "mixed_precision" not in row and (work / row["name"] / "train_summary.json").is_file():
            row["mixed_precision"] = read_summary(work / row["name"]).mixed_precision
    rows |= {v["name"]: v for v in fresh}
    return [rows[name] for name in VARIANTS if name in rows]


def main(argv: list[str] | None = None) -> int:
    """Train each variant, evaluate each adapter, write the result file (and re-render the docs' blocks)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=REPO / "output" / "options", help="Adapters and data.")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--results", type=Path, default=src.OPTIONS_JSON, help="Result JSON to write.")
    parser.add_argument("--world", type=Path, help="A world folder instead of embedded/ (pipeline, clip, prompts).")
    parser.add_argument("--smoke", action="store_true", help="2 steps per run, seed 0, 2 sampler steps, in /tmp.")
    parser.add_argument("--no_blocks", action="store_true", help="Do not re-render the docs' number blocks.")
    args = parser.parse_args(argv)
    world_dir = args.world.resolve() if args.world else EMBEDDED_PIPELINE.parent
    base, clip = world_dir / "pipeline", world_dir / "clip"
    if not (base / "model_index.json").is_file():
        print(f"error: {base} is missing; build it with `python -m embedded.build`.", file=sys.stderr)
        return 2
    train_extra = [] if args.world is None else ["--pretrained_model_name_or_path", str(base)]
    eval_extra = ["--prompts", *map(str, sorted((world_dir / "prompts").glob("*.txt")))] if args.world else []
    seeds = SEEDS
    if args.smoke:
        smoke_dir = Path(tempfile.mkdtemp(prefix="lorakit-options-smoke-"))
        args.work_dir, args.no_blocks = smoke_dir, True
        args.results = smoke_dir / "options.json" if args.results == src.OPTIONS_JSON else args.results
        train_extra += ["--max_train_steps", "2"]
        eval_extra += ["--steps", "2"]
        seeds = (0,)
    work = args.work_dir.resolve()
    held_out = write_held_out(work / "data" / "held_out", HELD_OUT_ROWS)
    variants = []
    for name in args.variants:
        label, flags = VARIANTS[name]
        run = run_variant(name, flags, work, held_out, train_extra)
        variants.append({"name": name, "label": label, "flags": flags, **run})
        variants[-1]["eval"] = evaluate(work / name, base, clip, seeds, eval_extra)
    variants = merged_variants(args.results, variants, seeds, work)
    results = {
        "command": "python docs/options_experiment.py" + (" --smoke" if args.smoke else ""),
        "preset": "configs/shapes.yaml",
        "held_out": {"rows": HELD_OUT_ROWS, "seed": HELD_OUT_SEED},
        "seeds": list(seeds),
        "device": variants[0]["eval"]["settings"]["device"] if variants else None,
        "variants": variants,
    }
    print(f"writing {args.results}")
    src.save_results(args.results, results, src.OPTIONS_JSON, render_blocks=not args.no_blocks)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--train_one":
        train_one(sys.argv[4:], Path(sys.argv[2]))
    sys.exit(main())
