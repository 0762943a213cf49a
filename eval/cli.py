"""`python -m eval`: base against base + LoRA, offline on the embedded world when run with no arguments."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from eval.generate import GenerationSettings
from eval.prompts import (
    EvalInputError,
    default_candidates_file,
    default_prompt_files,
    embedded_world_captions,
    embedded_world_language,
    load_prompt_sets,
)
from eval.run import EvalOptions, evaluate
from lorakit.filenames import ADAPTER_FILE
from lorakit.paths import (
    EMBEDDED_CLIP,
    EMBEDDED_DEMO_ADAPTER,
    EMBEDDED_PIPELINE,
    EMBEDDED_PROMPTS,
    REPO_ROOT,
    SHAPES_PRESET,
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__)
    parser.add_argument("--base", help=f"Base pipeline folder or Hub id (default: {EMBEDDED_PIPELINE}).")
    parser.add_argument("--lora", help="Adapter folder/file or Hub id (default: the preset's run, else the demo).")
    parser.add_argument("--prompts", nargs="+", help=f"Prompt files, one prompt a line (default: {EMBEDDED_PROMPTS}).")
    parser.add_argument("--candidates", help="Extra candidate prompts for R-precision (default: the world captions).")
    parser.add_argument("--clip_model", help=f"CLIP folder or Hub id (default: {EMBEDDED_CLIP}).")
    parser.add_argument("--output_dir", default="eval_output", help="Where the report is written.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds; one image per prompt and seed.")
    parser.add_argument("--steps", type=int, default=25, help="Sampler steps.")
    parser.add_argument("--guidance", type=float, default=7.5, help="Classifier-free guidance scale.")
    parser.add_argument("--resolution", type=int, help="Image size in pixels (default: the base's native size).")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per pipeline call.")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available).")
    parser.add_argument(
        "--count_only", action="store_true", help="Only count parameters of --base from its configs (no weights)."
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[4], help="LoRA ranks to count with --count_only.")
    parser.add_argument("--update_card", metavar="DIR", help="Write results into DIR/README.md (model-index + table).")
    return parser


def preset_output_dir() -> str | None:
    """`output.output_dir` of the default training preset (configs/shapes.yaml), if readable."""
    try:
        preset = yaml.safe_load(SHAPES_PRESET.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    return (preset.get("output") or {}).get("output_dir")


def default_lora() -> Path:
    """The adapter the main command trained (its preset's output folder, or output/), else the demo adapter."""
    names = [name for name in (preset_output_dir(), "output") if name]
    for folder in (root / name for name in names for root in (Path.cwd(), REPO_ROOT)):
        if (folder / ADAPTER_FILE).is_file():
            return folder
    return EMBEDDED_DEMO_ADAPTER


def options_from_args(argv: Sequence[str] | None = None) -> EvalOptions:
    """Parse and validate arguments, filling in the embedded defaults; no model is loaded here."""
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        raise EvalInputError("--steps and --batch_size must be at least 1.")
    if args.resolution is not None and args.resolution % 8:
        raise EvalInputError(f"--resolution must be a multiple of 8, got {args.resolution}.")
    prompts = args.prompts or [str(p) for p in default_prompt_files()]
    if not prompts:
        raise EvalInputError(
            f"No prompt files in {EMBEDDED_PROMPTS}: build the embedded world (python -m embedded.build) "
            "or pass --prompts FILE [FILE ...]."
        )
    on_embedded_base = not args.base or Path(args.base).resolve() == EMBEDDED_PIPELINE.resolve()
    candidates = args.candidates or (None if args.prompts and not on_embedded_base else default_candidates_file())
    # On the embedded base, rank against every world caption as the embedded build's figures do, judging each
    # prompt by what it says (so a subset of prompts, or prompts of your own phrasing, are judged the same way).
    world_captions = embedded_world_captions() if on_embedded_base and not candidates else []
    same_meaning, parse_caption = embedded_world_language() if world_captions else (None, None)
    load_prompt_sets(prompts)  # missing or empty files fail here, before anything else is looked at
    lora = args.lora or default_lora()
    if not args.lora and not Path(lora).exists():
        raise EvalInputError(
            f"No adapter to evaluate: output/ has no {ADAPTER_FILE} and the demo adapter {lora} is missing. "
            "Train one (python train_lora.py) or pass --lora PATH_OR_HUB_ID."
        )
    generation = GenerationSettings(
        seeds=tuple(dict.fromkeys(args.seeds)),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.resolution,
        width=args.resolution,
        batch_size=args.batch_size,
    )
    return EvalOptions(
        base=str(args.base or EMBEDDED_PIPELINE),
        lora=str(lora),
        clip_model=str(args.clip_model or EMBEDDED_CLIP),
        prompts=prompts,
        candidates=str(candidates) if candidates else None,
        candidate_texts=world_captions,
        same_meaning=same_meaning,
        parse_caption=parse_caption,
        output_dir=args.output_dir,
        generation=generation,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        update_card=args.update_card,
        command=shlex.join(["python", "-m", "eval", *(sys.argv[1:] if argv is None else argv)]),
    )


def _count_only(args: argparse.Namespace) -> int:
    """Print and save parameter counts of --base from configs alone."""
    from eval.sizes import model_sizes, sizes_markdown, write_sizes

    if not args.base:
        raise EvalInputError("--count_only needs --base (a pipeline folder, flat reference configs, or a Hub id).")
    if any(rank < 1 for rank in args.ranks):
        raise EvalInputError("--ranks must be positive integers.")
    sizes = model_sizes(args.base, tuple(args.ranks))
    print(sizes_markdown(sizes))
    print(f"Counts written to {write_sizes(sizes, args.output_dir).resolve()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit code 0 on success, 2 on bad input (with the reason on stderr)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        if args.count_only:
            return _count_only(args)
        options = options_from_args(argv)
        results = evaluate(options)
    except EvalInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from eval.report import markdown_table

    print(markdown_table(results))
    print(f"Report written to {Path(options.output_dir).resolve()}")
    return 0
