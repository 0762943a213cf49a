"""Continual tuning in the shapes world: learn a second concept without forgetting the first.

    python docs/continual_experiment.py      # ~8 minutes on 2 CPU cores; writes docs/results/continual.json
                                             # and docs/images/continual.png, then re-renders the docs' blocks

1. First batch: purple shapes, drawn like embedded/data/adapter. A fresh adapter learns them (default preset).
2. Second batch: "blob" shapes in the five base colours, written here from the world generator. The embedded
   CLIP judge knows blobs (they are its hard negatives) but the base UNet never drew one.
3. (a) naive: continue from the first adapter (`--init_adapter`) on the second batch only;
   (b) replay: the same, with the first batch mixed back in (`--mix_train_data_dir ... --mix_weights 3 1`).
4. Every stage is judged on both concepts and on the base prompts: R-precision among all world captions and
   CLIP score with the embedded CLIP, at fixed seeds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "docs")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from docgen import sources as src  # noqa: E402

from embedded import world  # noqa: E402
from embedded.dataset import write_imagefolder  # noqa: E402
from lorakit.atomic import atomic_write_json  # noqa: E402
from lorakit.paths import EMBEDDED_ADAPTER_DATA, EMBEDDED_PIPELINE, EMBEDDED_PROMPTS  # noqa: E402
from lorakit.summary import TrainSummary, read_summary  # noqa: E402
from lorakit.token_embeddings import learned_words  # noqa: E402

NEW_SHAPE = world.DISTRACTOR_SHAPE  # "blob": known to the judge, never drawn by the base UNet
NEW_BATCH_SEED = 2026
OLD_BATCH_SEED = 2025
REPLAY_WEIGHTS = (3, 1)  # new batch : old batch
TRAIN = ["python", "train_lora.py", "--config", "configs/shapes.yaml", "--validation_prompt", "--report_to", "none"]
FIGURE = src.IMAGES / "continual.png"
FIGURE_PROMPTS = 3  # per concept, first seed
BASE_PROMPT_STRIDE = 3  # every 3rd base prompt: all colours, shapes and both backgrounds, a third of the CPU time


def new_batch_concepts() -> list[world.Concept]:
    """Blobs in the base colours on both backgrounds: a new shape, in words the base already knows."""
    return [c for c in world.distractor_concepts() if c.colour in world.BASE_COLOURS]


def write_new_batch(folder: Path, rows: int) -> Path:
    """The second data batch as an imagefolder, deterministic from NEW_BATCH_SEED."""
    write_imagefolder(
        world.sample(new_batch_concepts(), rows, NEW_BATCH_SEED),
        folder,
        title="Shapes world blobs (second batch)",
        description="Smooth irregular blobs in the five base colours: the continual-tuning experiment's new data.",
    )
    return folder


def write_first_batch(folder: Path, rows: int) -> Path:
    """The first batch: purple shapes like embedded/data/adapter, drawn afresh so the run is self-contained."""
    write_imagefolder(
        world.sample(world.adapter_concepts(), rows, OLD_BATCH_SEED),
        folder,
        title="Shapes world purple shapes (first batch)",
        description="Every shape in purple: the continual-tuning experiment's first data batch.",
    )
    return folder


def stage_commands(work: Path, new_data: Path, old_data: Path = EMBEDDED_ADAPTER_DATA, extra=()) -> dict[str, list]:
    """Training command of each stage; paths relative to the repository root, as a user would type them."""
    rel = lambda path: os.path.relpath(path, REPO)  # noqa: E731
    first = rel(work / "first")
    train = [*TRAIN, *extra]
    return {
        "first": [*train, "--train_data_dir", rel(old_data), "--output_dir", first],
        "naive": [
            *train,
            "--train_data_dir",
            rel(new_data),
            "--init_adapter",
            first,
            "--output_dir",
            rel(work / "naive"),
        ],
        "replay": [
            *train,
            "--train_data_dir",
            rel(new_data),
            "--init_adapter",
            first,
            "--mix_train_data_dir",
            rel(old_data),
            "--mix_weights",
            *map(str, REPLAY_WEIGHTS),
            "--output_dir",
            rel(work / "replay"),
        ],
    }


def train(command: list[str], output_dir: Path) -> TrainSummary:
    """Run one training stage (fresh output folder) and return its summary."""
    shutil.rmtree(output_dir, ignore_errors=True)
    subprocess.run([sys.executable, *command[1:]], cwd=REPO, check=True)
    return read_summary(output_dir)


def prompt_sets(folder: Path = EMBEDDED_PROMPTS) -> dict[str, list[str]]:
    """The prompts each concept is judged on."""
    read = lambda name: [p for p in (folder / name).read_text().splitlines() if p.strip()]  # noqa: E731
    return {
        "purple": read("adapter.txt"),
        "blob": [c.caption() for c in new_batch_concepts()],
        "base": read("base.txt")[::BASE_PROMPT_STRIDE],
    }


def judge(pipe, clip, sets: dict[str, list[str]], settings) -> tuple[dict, dict]:
    """Scores per concept and the images (uint8 tensors) per concept, for one stage."""
    from embedded.measure import candidate_captions
    from eval.generate import generate
    from lorakit.metrics import clip_r_precision, clip_score

    model, processor = clip
    scores, images = {}, {}
    for name, prompts in sets.items():
        made = generate(pipe, prompts, settings, label=name)
        ranking = clip_r_precision(made.images, list(made.prompts), candidate_captions(), model, processor)
        scores[name] = {
            "r_precision_top1": ranking.top1,
            "mean_rank": ranking.mean_rank,
            "clip_score": clip_score(made.images, list(made.prompts), model, processor),
            "images": len(made.prompts),
        }
        images[name] = made.images[:: len(settings.seeds)]
    return scores, images


def figure(stage_images: list[tuple[str, dict]], sets: dict[str, list[str]], path: Path = FIGURE) -> Path:
    """Rows: stages; columns: the first prompts of each new concept (first seed)."""
    from docgen import figures

    concepts = ("purple", "blob")
    cols = [prompt for name in concepts for prompt in sets[name][:FIGURE_PROMPTS]]
    rows = [
        [image for name in concepts for image in figures.to_pil(images[name][:FIGURE_PROMPTS])]
        for _, images in stage_images
    ]
    return figures.save(figures.grid(rows, [label for label, _ in stage_images], cols, label_width=230), path)


LABELS = {
    "base": "base model (no adapter)",
    "first": "after batch 1 (purple)",
    "naive": "(a) batch 2 only, from the batch-1 adapter",
    "replay": f"(b) batch 2 + replay of batch 1 at {REPLAY_WEIGHTS[0]}:{REPLAY_WEIGHTS[1]}",
}


def main(argv: list[str] | None = None) -> int:
    """Train the three adapters, judge the four models, write the result file and the figure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=REPO / "output" / "continual", help="Adapters and data.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Seeds per prompt for the judging.")
    parser.add_argument("--no_blocks", action="store_true", help="Do not re-render the docs' number blocks.")
    # Another shapes world (e.g. `python -m embedded.build --smoke --out DIR`) for a quick check of this script.
    parser.add_argument("--world", type=Path, help="A world folder instead of embedded/ (pipeline, clip, data).")
    parser.add_argument("--max_train_steps", type=int, help="Cap each training run (quick checks).")
    parser.add_argument("--results", type=Path, default=src.CONTINUAL_JSON, help="Result JSON to write.")
    parser.add_argument("--figure", type=Path, default=FIGURE, help="Figure to write.")
    args = parser.parse_args(argv)
    world_dir = args.world.resolve() if args.world else EMBEDDED_PIPELINE.parent
    base, clip_dir = world_dir / "pipeline", world_dir / "clip"
    prompt_dir = world_dir / "prompts"
    if not (base / "model_index.json").is_file():
        print(f"error: {base} is missing; build it with `python -m embedded.build`.", file=sys.stderr)
        return 2
    extra = [] if args.world is None else ["--pretrained_model_name_or_path", str(base)]
    extra += [] if args.max_train_steps is None else ["--max_train_steps", str(args.max_train_steps)]
    from eval.generate import GenerationSettings
    from eval.models import load_clip

    work = args.work_dir.resolve()
    rows = src.dataset_rows(world_dir / "data" / "adapter")
    old_data = write_first_batch(work / "data" / "purple", rows)
    new_data = write_new_batch(work / "data" / "blob", rows)
    commands = stage_commands(work, new_data, old_data, extra)
    summaries = {name: train(command, work / name) for name, command in commands.items()}

    from docgen.figures import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(base)
    clip = load_clip(str(clip_dir), "cpu")
    settings = GenerationSettings(seeds=tuple(args.seeds), num_inference_steps=25, guidance_scale=7.5)
    sets = prompt_sets(prompt_dir)
    stages, stage_images = [], []
    for name in ("base", *commands):
        if name != "base":
            pipe.load_lora_weights(str(work / name), adapter_name=name)
        with learned_words(pipe, work / name):  # none for the base
            scores, images = judge(pipe, clip, sets, settings)
        if name != "base":
            pipe.unload_lora_weights()
        stage = {"name": name, "label": LABELS[name], "scores": scores}
        if name in commands:
            stage["command"] = shlex.join(commands[name])
            stage["train_seconds"] = summaries[name].train_seconds
            stage["global_step"] = summaries[name].global_step
            stage["num_samples"] = summaries[name].num_samples
        stages.append(stage)
        stage_images.append((LABELS[name], images))

    from embedded.measure import candidate_captions

    results = {
        "command": "python docs/continual_experiment.py",
        "concepts": [
            {
                "name": "purple",
                "label": "purple (batch 1)",
                "description": "every shape in purple, a colour the base UNet was never trained on",
                "train_rows": src.dataset_rows(EMBEDDED_ADAPTER_DATA),
            },
            {
                "name": "blob",
                "label": "blob (batch 2)",
                "description": "a new shape, lumpy blobs, in the five base colours",
                "train_rows": src.dataset_rows(new_data),
            },
            {
                "name": "base",
                "label": "base prompts",
                "description": "the base concepts the UNet was pretrained on",
                "train_rows": 0,
            },
        ],
        "replay_weights": list(REPLAY_WEIGHTS),
        "evaluation": {
            "seeds": list(args.seeds),
            "steps": settings.num_inference_steps,
            "guidance": settings.guidance_scale,
            "prompts_per_concept": {k: len(v) for k, v in sets.items()},
            "num_candidates": len(candidate_captions()),
        },
        "stages": stages,
    }
    atomic_write_json(args.results, results)
    print(f"wrote {args.results} and {figure(stage_images, sets, args.figure)}")
    if not args.no_blocks and args.results == src.CONTINUAL_JSON:
        subprocess.run([sys.executable, "docs/build.py", "--blocks"], cwd=REPO, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
