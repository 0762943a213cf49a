"""Continual tuning in the shapes world: learn a second batch without forgetting the first, and without bias.

    python docs/continual_experiment.py      # ~13 minutes on 2 CPU cores; writes docs/results/continual.json
                                             # and docs/images/continual.png, then re-renders the docs' blocks

1. First batch: purple shapes, drawn like embedded/data/adapter. A fresh adapter learns them (default preset).
2. Second batch, chosen by measuring: each candidate is judged on the base model (it must not already draw it,
   R-precision at most BASE_BAR); for those that pass, a naive update (continue from the first adapter with
   `--init_adapter`, second batch only) is trained and judged on purple. The kept candidate is the first that
   passes and whose naive update lowers purple beyond the 95 % intervals.
3. For the kept batch, (a) naive and (b) replay (`--mix_train_data_dir FIRST --mix_weights 3 1`).
4. Bias: the purple batch drawn with most images on a black background, trained as it is and rebalanced with
   `--mix_weights`; judged on prompts that name no background, by the background the judge sees.
5. Every figure is a share of at least MIN_IMAGES images (MIN_SEEDS seeds per prompt or more) with a 95 % Wilson
   interval; the result file holds the counts, so the docs can say which differences are beyond noise.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "docs")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from docgen import sources as src  # noqa: E402
from docgen.stats import intervals_apart, wilson_interval  # noqa: E402

from embedded import world  # noqa: E402
from embedded.dataset import write_imagefolder  # noqa: E402
from lorakit.paths import EMBEDDED_PIPELINE, EMBEDDED_PROMPTS  # noqa: E402
from lorakit.summary import TrainSummary, read_summary  # noqa: E402
from lorakit.token_embeddings import learned_words  # noqa: E402

NEW_BATCH_SEED = 2026
OLD_BATCH_SEED = 2025
SKEW_BATCH_SEED = 2027
NEW_COLOUR = next(iter(world.ADAPTER_COLOURS))  # "purple": the first batch's concept
BASE_BAR = 0.2  # a second batch the base already draws this well teaches nothing new
REPLAY_WEIGHTS = (3, 1)  # new batch : old batch
SKEW = (4, 1)  # black : white images in the skewed batch
# Sampling probabilities (lorakit.data.mix_datasets): black folder : white folder. Equal weights give a half-and-half
# sample whatever the folders' sizes; the epoch stops when the small white folder runs out, so the rebalanced run
# takes more epochs, capped at the skewed run's step count (REBALANCED_EPOCHS x its epoch >= one skewed epoch).
REBALANCE_WEIGHTS = (1, 1)
# One epoch of the skewed batch at the preset's settings moved the black share of neutral prompts by less than the
# intervals (kept as the "skewed_short" stage); BIAS_EPOCHS epochs show the drift. A rebalanced epoch is about
# 2 x the white rows, so it needs about 480 / 192 times as many epochs for the same steps: capped by the step count.
BIAS_EPOCHS = 10
REBALANCED_EPOCHS = 3 * BIAS_EPOCHS
MIN_IMAGES, MIN_SEEDS = 50, 5
NEUTRAL_IMAGES = 200  # the drift in the black share is a few tenths: 50 images' intervals are too wide to show it
TRAIN = ["python", "train_lora.py", "--config", "configs/shapes.yaml", "--validation_prompt", "--report_to", "none"]
FIGURE = src.IMAGES / "continual.png"
FIGURE_PROMPTS = 3  # per concept, first seed
BASE_PROMPT_STRIDE = 3  # every 3rd base prompt: all colours, shapes and both backgrounds, a third of the CPU time


def candidates() -> dict[str, dict]:
    """Second batches considered, in the order tried: what each is, and its concepts."""
    blobs = world.distractor_concepts()
    return {
        "blob": {
            "label": "blobs in the base colours",
            "description": "a new shape, lumpy blobs, in the five base colours",
            "concepts": [c for c in blobs if c.colour in world.BASE_COLOURS],
        },
        "purple_blob": {
            "label": f"{NEW_COLOUR} blobs",
            "description": f"lumpy blobs in {NEW_COLOUR}: a new shape in the colour batch 1 taught",
            "concepts": [c for c in blobs if c.colour == NEW_COLOUR],
        },
    }


def write_batch(folder: Path, concepts: list[world.Concept], rows: int, seed: int, title: str) -> Path:
    """A data batch as an imagefolder, cycling through `concepts`, deterministic from `seed`."""
    write_imagefolder(world.sample(concepts, rows, seed), folder, title=title, description=title)
    return folder


def skewed_concepts() -> list[world.Concept]:
    """The purple shapes with SKEW black-to-white copies of each: sampling cycles through them."""
    black, white = SKEW
    return [
        world.Concept(shape, NEW_COLOUR, background)
        for shape in world.SHAPES
        for background in ["black"] * black + ["white"] * white
    ]


def write_skewed_batch(folder: Path, rows: int) -> dict[str, Path]:
    """The skewed batch as received (`all`) and split by background (`black`, `white`) for rebalancing."""
    drawn = world.sample(skewed_concepts(), rows, SKEW_BATCH_SEED)
    parts = {"all": drawn, **{bg: [row for row in drawn if row[2].background == bg] for bg in ("black", "white")}}
    for name, part in parts.items():
        write_imagefolder(part, folder / name, title=f"Skewed purple batch ({name})", description="Mostly black.")
    return {name: folder / name for name in parts}


def _rel(path: Path) -> str:
    """`path` as a user types it, from the repository root."""
    return os.path.relpath(path, REPO)


def _train_command(extra, data: Path, output: Path, init: Path | None = None, more=()) -> list[str]:
    init_flags = ["--init_adapter", _rel(init)] if init else []
    return [*TRAIN, *extra, "--train_data_dir", _rel(data), *more, *init_flags, "--output_dir", _rel(output)]


def first_command(work: Path, old_data: Path, extra=()) -> list[str]:
    """The first adapter, trained afresh on the first batch."""
    return _train_command(extra, old_data, work / "first")


def update_commands(work: Path, tag: str, new_data: Path, old_data: Path, extra=()) -> dict[str, list[str]]:
    """(a) naive and (b) replay updates of the first adapter on the second batch `tag`."""
    replay = ["--mix_train_data_dir", _rel(old_data), "--mix_weights", *map(str, REPLAY_WEIGHTS)]
    return {
        "naive": _train_command(extra, new_data, work / tag / "naive", work / "first"),
        "replay": _train_command(extra, new_data, work / tag / "replay", work / "first", replay),
    }


def bias_commands(work: Path, data: dict, extra=(), steps: int | None = None) -> dict[str, list[str]]:
    """Fresh adapters for the bias experiment: the skewed batch as it is, for one epoch (the preset) and for
    BIAS_EPOCHS; a balanced batch for as long; and the skewed images rebalanced by --mix_weights, for the skewed
    run's `steps` (the rebalanced epoch is shorter: it ends when the white folder runs out)."""
    skewed = data["skewed"]
    long = ["--num_train_epochs", str(BIAS_EPOCHS)]
    mix = ["--mix_train_data_dir", _rel(skewed["white"]), "--mix_weights", *map(str, REBALANCE_WEIGHTS)]
    more = [*mix, "--num_train_epochs", str(REBALANCED_EPOCHS)] + (
        [] if steps is None else ["--max_train_steps", str(steps)]
    )
    return {
        "skewed_short": _train_command(extra, skewed["all"], work / "skewed_short"),
        "balanced": _train_command(extra, data["old"], work / "balanced", more=long),
        "skewed": _train_command(extra, skewed["all"], work / "skewed", more=long),
        "rebalanced": _train_command(extra, skewed["black"], work / "rebalanced", more=more),
    }


def train(command: list[str], output_dir: Path) -> TrainSummary:
    """Run one training stage (fresh output folder) and return its summary."""
    shutil.rmtree(output_dir, ignore_errors=True)
    subprocess.run([sys.executable, *command[1:]], cwd=REPO, check=True)
    return read_summary(output_dir)


def is_black(images: torch.Tensor) -> torch.Tensor:
    """Per image (N, 3, H, W uint8): is the border darker than mid-grey? Exact for this world's two backgrounds."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    return border.float().mean(dim=(1, 2)) < 128


def sampled_mix(command: list[str]) -> dict:
    """What the trainer really samples for `command`: rows and the black share, read through lorakit's data code."""
    from embedded.measure import to_uint8
    from lorakit.config import parse_args
    from lorakit.data import prepare_dataset

    with contextlib.chdir(REPO):
        cfg = parse_args(command[2:])
        data = prepare_dataset(cfg.data, cfg.training.seed)
    black = int(is_black(to_uint8(list(data.rows[data.image_column]))).sum())
    return {"rows": len(data.rows), "black": black, "black_share": black / len(data.rows)}


def neutral_prompts() -> dict[str, list[str]]:
    """Prompts that name no background: the new colour on every shape, and base colours on pretrained shapes."""
    held = set(world.HELDOUT_COMBOS)
    base = [f"a {c} {s}" for c in world.BASE_COLOURS for s in world.SHAPES if (c, s) not in held][::2]
    return {"purple_neutral": [f"a {NEW_COLOUR} {s}" for s in world.SHAPES], "base_neutral": base}


def prompt_sets(folder: Path = EMBEDDED_PROMPTS) -> dict[str, list[str]]:
    """The prompts each concept is judged on."""
    read = lambda name: [p for p in (folder / name).read_text().splitlines() if p.strip()]  # noqa: E731
    sets = {NEW_COLOUR: read("adapter.txt"), "base": read("base.txt")[::BASE_PROMPT_STRIDE]}
    sets |= {name: [c.caption() for c in cand["concepts"]] for name, cand in candidates().items()}
    return sets | neutral_prompts()


def seeds_for(prompts: list[str], min_images: int = MIN_IMAGES, min_seeds: int = MIN_SEEDS) -> tuple[int, ...]:
    """Enough seeds for `min_images` images over `prompts`, and never fewer than `min_seeds`."""
    return tuple(range(max(min_seeds, math.ceil(min_images / len(prompts)))))


def set_seeds(name: str, prompts: list[str]) -> tuple[int, ...]:
    """The seeds of prompt set `name`: more images for the neutral prompts, whose shares move less."""
    return seeds_for(prompts, NEUTRAL_IMAGES if name.endswith("_neutral") else MIN_IMAGES)


def share(hits: int, images: int) -> dict:
    """A share with its count and 95 % Wilson interval, as stored in the result file."""
    return {"hits": hits, "images": images, "share": hits / images, "interval": list(wilson_interval(hits, images))}


def background_seen(images: torch.Tensor, prompts: list[str], clip) -> torch.Tensor:
    """Per image: does the judge match it better with its prompt "on a black background" than "on a white" one?"""
    from lorakit.metrics import clip_embeddings

    captions = []
    for prompt in prompts:
        said = world.parse_caption(prompt)
        captions += [world.Concept(said.shape, said.colour, bg).caption() for bg in ("black", "white")]
    image_emb, text_emb = clip_embeddings(images, captions, *clip)
    sims = (image_emb * text_emb.view(len(prompts), 2, -1).transpose(0, 1)).sum(-1)  # (2, N): black, white
    return sims[0] > sims[1]


def judge_set(pipe, clip, name: str, prompts: list[str], settings) -> tuple[dict, torch.Tensor]:
    """One prompt set on the loaded model: R-precision (or, for neutral prompts, the background) and its images."""
    from dataclasses import replace

    from embedded.measure import candidate_captions
    from eval.generate import generate
    from lorakit.metrics import clip_r_precision, clip_score

    seeds = set_seeds(name, prompts)
    made = generate(pipe, prompts, replace(settings, seeds=seeds), label=name)
    shown = made.images[:: len(seeds)]
    if name.endswith("_neutral"):
        judged, pixels = background_seen(made.images, list(made.prompts), clip), is_black(made.images)
        score = share(int(judged.sum()), len(judged))
        return score | {"pixel_black": int(pixels.sum()), "agreement": float((judged == pixels).float().mean())}, shown
    ranking = clip_r_precision(made.images, list(made.prompts), candidate_captions(), *clip)
    score = share(sum(rank == 1 for rank in ranking.ranks), len(ranking.ranks))
    score |= {"mean_rank": ranking.mean_rank, "clip_score": clip_score(made.images, list(made.prompts), *clip)}
    return score, shown


class Judge:
    """The loaded pipeline and CLIP judge, the generation settings and the prompt sets: judges one model at a time.

    A plain class, not a dataclass: tests load this script by path, outside sys.modules."""

    def __init__(self, pipe, clip: tuple, settings, sets: dict[str, list[str]]) -> None:
        self.pipe, self.clip, self.settings, self.sets = pipe, clip, settings, sets

    def __call__(self, adapter: Path | None, names=None) -> tuple[dict, dict]:
        """Scores and first-seed images per set (all, or `names`), for the base (adapter None) or base + adapter."""
        if adapter is not None:
            self.pipe.load_lora_weights(str(adapter), adapter_name=adapter.name)
        scores, images = {}, {}
        with learned_words(self.pipe, adapter) if adapter is not None else contextlib.nullcontext():
            for name in names or self.sets:
                scores[name], images[name] = judge_set(self.pipe, self.clip, name, self.sets[name], self.settings)
        if adapter is not None:
            self.pipe.unload_lora_weights()
        return scores, images


def load_judge(world_dir: Path) -> Judge:
    """The world's base pipeline and judge, at the evaluation's settings."""
    from docgen.figures import load_pipeline

    from eval.generate import GenerationSettings
    from eval.models import load_clip

    torch.manual_seed(0)
    settings = GenerationSettings(num_inference_steps=25, guidance_scale=7.5, batch_size=64)
    clip = load_clip(str(world_dir / "clip"), "cpu")
    return Judge(load_pipeline(world_dir / "pipeline"), clip, settings, prompt_sets(world_dir / "prompts"))


def figure(stage_images: list[tuple[str, dict]], sets: dict[str, list[str]], columns: dict, path: Path) -> Path:
    """Rows: stages; columns: the first prompts of each shown set (first seed)."""
    from docgen import figures

    cols = [prompt for name, count in columns.items() for prompt in sets[name][:count]]
    rows = [
        [image for name, count in columns.items() for image in figures.to_pil(images[name][:count])]
        for _, images in stage_images
    ]
    return figures.save(figures.grid(rows, [label for label, _ in stage_images], cols, label_width=230), path)


def naive_update(judge: Judge, commands: dict[str, list[str]]) -> dict:
    """Train a candidate's naive update and judge it on the first batch's prompts."""
    command = commands["naive"]
    output = REPO / command[command.index("--output_dir") + 1]
    train(command, output)
    after, _ = judge(output, [NEW_COLOUR])
    return {"naive_command": shlex.join(command), "naive_" + NEW_COLOUR: after[NEW_COLOUR]}


def score_candidate(scores: dict, name: str, run_naive) -> dict:
    """The base bar for candidate `name`; for one that passes, its naive update's effect on the first batch."""
    row = {"base": scores["base"][name], "passes_base_bar": scores["base"][name]["share"] <= BASE_BAR}
    if not row["passes_base_bar"]:
        return row
    row |= run_naive()
    before, after = scores["first"][NEW_COLOUR], row["naive_" + NEW_COLOUR]
    row["forgets"] = after["share"] < before["share"] and intervals_apart(after["interval"], before["interval"])
    return row


def choose_candidate(scored: dict[str, dict]) -> str:
    """The first candidate that passes the base bar and whose naive update lowers purple beyond the intervals;
    failing that, the first that passes the base bar (the page then says the update forgot nothing)."""
    passing = [name for name, row in scored.items() if row["passes_base_bar"]]
    if not passing:
        raise SystemExit(f"no candidate second batch passed the base bar ({BASE_BAR}); see {sorted(scored)}")
    return next((name for name in passing if scored[name]["forgets"]), passing[0])


def stage_record(name: str, label: str, scores: dict, command: list[str] | None, summary) -> dict:
    """One stage as stored in the result file."""
    stage = {"name": name, "label": label, "scores": scores}
    if command is not None:
        stage |= {
            "command": shlex.join(command),
            "train_seconds": summary.train_seconds,
            "global_step": summary.global_step,
            "num_samples": summary.num_samples,
        }
    return stage


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The script's flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=REPO / "output" / "continual", help="Adapters and data.")
    parser.add_argument("--no_blocks", action="store_true", help="Do not re-render the docs' number blocks.")
    # Another shapes world (e.g. `python -m embedded.build --smoke --out DIR`) for a quick check of this script.
    parser.add_argument("--world", type=Path, help="A world folder instead of embedded/ (pipeline, clip, data).")
    parser.add_argument("--max_train_steps", type=int, help="Cap each training run (quick checks).")
    parser.add_argument("--results", type=Path, default=src.CONTINUAL_JSON, help="Result JSON to write.")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="Figure to write.")
    return parser.parse_args(argv)


LABELS = {
    "base": "base model (no adapter)",
    "first": f"after batch 1 ({NEW_COLOUR}, balanced backgrounds)",
    "naive": "(a) batch 2 only, from the batch-1 adapter",
    "replay": f"(b) batch 2 + replay of batch 1 at {REPLAY_WEIGHTS[0]}:{REPLAY_WEIGHTS[1]}",
    "skewed_short": f"{NEW_COLOUR} batch skewed {SKEW[0]}:{SKEW[1]} black:white, one epoch",
    "balanced": f"{NEW_COLOUR} batch 1 (balanced), {BIAS_EPOCHS} epochs",
    "skewed": f"{NEW_COLOUR} batch skewed {SKEW[0]}:{SKEW[1]} black:white, {BIAS_EPOCHS} epochs",
    "rebalanced": "the same skewed batch rebalanced with --mix_weights, as many steps",
}


def write_data(work: Path, rows: int) -> dict:
    """Every data batch of the experiment, `rows` images each (the skewed one also split by background)."""
    folder = work / "data"
    return {
        "old": write_batch(folder / NEW_COLOUR, world.adapter_concepts(), rows, OLD_BATCH_SEED, "First batch"),
        "new": {
            name: write_batch(folder / name, cand["concepts"], rows, NEW_BATCH_SEED, f"Candidate: {cand['label']}")
            for name, cand in candidates().items()
        },
        "skewed": write_skewed_batch(folder / "skewed", rows),
    }


def second_batch(judge: Judge, scores: dict, work: Path, data: dict, extra: list[str]) -> tuple[dict, str, dict]:
    """Each candidate against the base bar, a naive update for those that pass; the rows, the kept one and its
    update commands."""
    scored, updates = {}, {}
    for name, cand in candidates().items():
        updates[name] = update_commands(work, name, data["new"][name], data["old"], extra)
        scored[name] = {"name": name, "label": cand["label"], "description": cand["description"]}
        scored[name] |= score_candidate(scores, name, lambda n=name: naive_update(judge, updates[n]))
    kept = choose_candidate(scored)
    return scored, kept, updates[kept]


def concept_rows(kept: dict, data: dict) -> list[dict]:
    """The table's three columns: the first batch, the kept second batch, the base prompts."""
    return [
        {"name": NEW_COLOUR, "label": f"{NEW_COLOUR} (batch 1)", "description": "every shape in purple, a colour "
         "the base UNet was never trained on", "train_rows": src.dataset_rows(data["old"])},
        {"name": kept["name"], "label": f"{kept['label']} (batch 2)", "description": kept["description"],
         "train_rows": src.dataset_rows(data["new"][kept["name"]])},
        {"name": "base", "label": "base prompts", "description": "the base concepts the UNet was pretrained on",
         "train_rows": 0},
    ]  # fmt: skip


def results_document(scored: dict, kept: str, data: dict, commands: dict, stages: list, judge: Judge) -> dict:
    """The result file, less the run's timing."""
    from embedded.measure import candidate_captions

    sets, settings = judge.sets, judge.settings
    return {
        "command": src.CONTINUAL_COMMAND,
        "concepts": concept_rows(scored[kept], data),
        "candidates": list(scored.values()),
        "kept": kept,
        "base_bar": BASE_BAR,
        "replay_weights": list(REPLAY_WEIGHTS),
        "bias": {
            "skew": list(SKEW),
            "rebalance_weights": list(REBALANCE_WEIGHTS),
            "prompts": neutral_prompts(),
            "epochs": BIAS_EPOCHS,
            "sampled": {name: sampled_mix(commands[name]) for name in ("balanced", "skewed", "rebalanced")},
            "measure": "judge: the image's prompt with 'on a black background' against 'on a white background'",
        },
        "evaluation": {
            "min_images": MIN_IMAGES,
            "min_seeds": MIN_SEEDS,
            "steps": settings.num_inference_steps,
            "guidance": settings.guidance_scale,
            "prompts": {k: len(v) for k, v in sets.items()},
            "seeds": {k: len(set_seeds(k, v)) for k, v in sets.items()},
            "neutral_images": NEUTRAL_IMAGES,
            "num_candidates": len(candidate_captions()),
            "interval": "95 % Wilson score interval",
        },
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> int:
    """Train the adapters, judge every model, write the result file and the figure."""
    started, load = time.perf_counter(), os.getloadavg()
    args = parse(argv)
    world_dir = args.world.resolve() if args.world else EMBEDDED_PIPELINE.parent
    base = world_dir / "pipeline"
    if not (base / "model_index.json").is_file():
        print(f"error: {base} is missing; build it with `python -m embedded.build`.", file=sys.stderr)
        return 2
    extra = [] if args.world is None else ["--pretrained_model_name_or_path", str(base)]
    extra += [] if args.max_train_steps is None else ["--max_train_steps", str(args.max_train_steps)]
    work = args.work_dir.resolve()
    data = write_data(work, src.dataset_rows(world_dir / "data" / "adapter"))
    commands = {"first": first_command(work, data["old"], extra)}
    summaries = {"first": train(commands["first"], work / "first")}
    judge = load_judge(world_dir)
    scores, images = {}, {}
    for name, adapter in (("base", None), ("first", work / "first")):
        scores[name], images[name] = judge(adapter)

    scored, kept, updates = second_batch(judge, scores, work, data, extra)
    commands |= updates | bias_commands(work, data, extra)
    summaries["naive"] = read_summary(work / kept / "naive")
    summaries["replay"] = train(commands["replay"], work / kept / "replay")
    for name in ("skewed_short", "balanced", "skewed"):
        summaries[name] = train(commands[name], work / name)
    commands["rebalanced"] = bias_commands(work, data, extra, summaries["skewed"].global_step)["rebalanced"]
    summaries["rebalanced"] = train(commands["rebalanced"], work / "rebalanced")
    adapters = {"naive": work / kept / "naive", "replay": work / kept / "replay"}
    for name in ("naive", "replay", "skewed_short", "balanced", "skewed", "rebalanced"):
        names = (NEW_COLOUR, kept, "base", "purple_neutral", "base_neutral")
        scores[name], images[name] = judge(adapters.get(name, work / name), names)

    stages = [stage_record("base", LABELS["base"], scores["base"], None, None)]
    stages += [stage_record(n, LABELS[n], scores[n], commands[n], summaries[n]) for n in commands]
    columns = {NEW_COLOUR: FIGURE_PROMPTS, kept: FIGURE_PROMPTS, "purple_neutral": FIGURE_PROMPTS}
    figure_path = figure([(LABELS[n], images[n]) for n in ("base", *commands)], judge.sets, columns, args.figure)
    results = results_document(scored, kept, data, commands, stages, judge)
    results["run"] = {
        "wall_seconds": time.perf_counter() - started,
        "load_at_start": list(load),
        "cpus": os.cpu_count(),
    }
    print(f"writing {args.results} (figure: {figure_path})")
    src.save_results(args.results, results, src.CONTINUAL_JSON, render_blocks=not args.no_blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
