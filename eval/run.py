"""The evaluation run: validate inputs, generate base then base + adapter on one pipeline, measure, report."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from eval.card import card_metrics, update_card
from eval.confusion import Described, confusion_report
from eval.generate import Generated, GenerationSettings, generate, native_resolution, warm_up
from eval.models import adapter_state_dict, attach_adapter, check_adapter_fits, load_clip, load_pipeline
from eval.prompts import PromptSet, candidate_prompts, load_prompt_sets
from eval.report import comparison_grid, markdown_table, write_report
from lorakit.filenames import ADAPTER_FILE
from lorakit.metrics import clip_r_precision, clip_score, top1_by_seed
from lorakit.params import pipeline_parameter_counts
from lorakit.paths import shown_path


@dataclass
class EvalOptions:
    """Resolved options of one evaluation (cli.py fills in the embedded defaults)."""

    base: str
    lora: str
    clip_model: str
    prompts: list[str]
    candidates: str | None = None
    candidate_texts: list[str] = field(default_factory=list)
    output_dir: str = "eval_output"
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    device: str = "cpu"
    update_card: str | None = None
    command: str | None = None
    # How a prompt is matched against candidates, and how a caption is read (the embedded world's language);
    # None: a prompt is right only when its own text ranks first, and there is no colour confusion table.
    same_meaning: Callable[[str, str], bool] | None = None
    parse_caption: Callable[[str], Described | None] | None = None


def adapter_file_bytes(lora: str) -> int | None:
    """Size on disk of the adapter weights (local folder/file, or the Hub cache); None if unknown."""
    path = Path(lora)
    if path.is_file():
        return path.stat().st_size
    if (path / ADAPTER_FILE).is_file():
        return (path / ADAPTER_FILE).stat().st_size
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(lora, ADAPTER_FILE)
    return Path(cached).stat().st_size if isinstance(cached, str) else None


def lora_values(state_dict: dict[str, torch.Tensor], prefix: str = "") -> int:
    """Trainable LoRA parameters stored in an adapter (down/up matrices; alpha scalars excluded)."""
    return sum(
        t.numel()
        for key, t in state_dict.items()
        if key.startswith(prefix) and "lora" in key and not key.endswith(".alpha")
    )


def score_set(
    images: torch.Tensor,
    prompts: tuple[str, ...],
    seeds: tuple[int, ...],
    candidates: list[str],
    clip: tuple,
    same_meaning: Callable[[str, str], bool] | None = None,
) -> dict:
    """CLIP score and R-precision of one prompt set's images (also per seed), and what the judge ranked first."""
    model, processor = clip
    ranking = clip_r_precision(images, list(prompts), candidates, model, processor, same_meaning)
    by_seed = top1_by_seed(ranking.ranks, seeds)
    return {
        "clip_score": clip_score(images, list(prompts), model, processor),
        "r_precision_top1": ranking.top1,
        # JSON keys are strings: {"0": 0.95, "1": 0.93, ...}
        "r_precision_top1_by_seed": {str(seed): rate for seed, rate in by_seed.items()},
        "mean_rank": ranking.mean_rank,
        "judged": list(ranking.best_texts),
    }


def _slices(prompt_sets: list[PromptSet], num_seeds: int) -> list[slice]:
    """Where each set's images sit in the prompt-major, seed-minor generation order."""
    slices, start = [], 0
    for prompt_set in prompt_sets:
        stop = start + len(prompt_set.prompts) * num_seeds
        slices.append(slice(start, stop))
        start = stop
    return slices


def score_prompt_sets(
    prompt_sets: list[PromptSet],
    base: Generated,
    adapted: Generated,
    candidates: list[str],
    clip: tuple,
    same_meaning: Callable[[str, str], bool] | None = None,
) -> list[dict]:
    """One report row per prompt set: CLIP score and R-precision of base and adapter images."""
    rows = []
    for prompt_set, where in zip(prompt_sets, _slices(prompt_sets, len(set(base.seeds))), strict=True):
        set_prompts, set_seeds = base.prompts[where], base.seeds[where]
        rows.append(
            {
                "name": prompt_set.name,
                "file": shown_path(prompt_set.path),
                "num_prompts": len(prompt_set.prompts),
                "num_images": len(set_prompts),
                "prompts": list(set_prompts),
                "base": score_set(base.images[where], set_prompts, set_seeds, candidates, clip, same_meaning),
                "adapter": score_set(adapted.images[where], set_prompts, set_seeds, candidates, clip, same_meaning),
            }
        )
    return rows


def colour_confusion(rows: list[dict], parse: Callable[[str], Described | None]) -> dict:
    """The colour confusion of every scored image, base against adapter (eval/confusion.py)."""
    prompts = [prompt for row in rows for prompt in row["prompts"]]
    base = [text for row in rows for text in row["base"]["judged"]]
    adapter = [text for row in rows for text in row["adapter"]["judged"]]
    return confusion_report(prompts, base, adapter, parse)


def parameter_report(pipe, state_dict: dict[str, torch.Tensor], lora: str) -> dict:
    """Base component counts, LoRA counts (all, UNet, text encoder), LoRA share of the UNet, adapter bytes."""
    counts = pipeline_parameter_counts(pipe.unet, pipe.text_encoder, pipe.vae).to_dict()
    return {
        **counts,
        "lora": lora_values(state_dict),
        "lora_unet": lora_values(state_dict, "unet."),
        "lora_text_encoder": lora_values(state_dict, "text_encoder."),
        "lora_share_of_unet": lora_values(state_dict, "unet.") / counts["unet"],
        "adapter_file_bytes": adapter_file_bytes(lora),
    }


def settings_report(settings: GenerationSettings, pipe, device: str) -> dict:
    """The generation settings as actually used (resolution filled in), with scheduler, device and dtype."""
    size = native_resolution(pipe)
    return {
        **asdict(settings),
        "seeds": list(settings.seeds),
        "height": settings.height or size,
        "width": settings.width or size,
        "scheduler": type(pipe.scheduler).__name__,
        "device": device if device != "cpu" else f"cpu ({platform.machine()})",
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
    }


def evaluate(options: EvalOptions) -> dict:
    """Run the whole evaluation and write the report; returns the results dict (as in eval_results.json)."""
    # Cheap checks first: prompt files, CLIP, base, adapter shapes; only then generation.
    prompt_sets = load_prompt_sets(options.prompts)
    # Judged by meaning, the world's captions are the whole candidate list: a freely phrased prompt added beside
    # them would be a second, differently worded right answer (clip_r_precision adds a prompt no caption means).
    ranked_sets = [] if options.same_meaning else prompt_sets
    candidates = candidate_prompts(ranked_sets, options.candidates, options.candidate_texts)
    clip = load_clip(options.clip_model, options.device)
    dtype = torch.float16 if options.device.startswith("cuda") else torch.float32
    pipe = load_pipeline(options.base, options.device, dtype)
    state_dict = adapter_state_dict(options.lora)
    check_adapter_fits(state_dict, pipe, options.base, options.lora)
    parameters = parameter_report(pipe, state_dict, options.lora)  # before LoRA layers are attached

    settings = options.generation
    prompts = [prompt for prompt_set in prompt_sets for prompt in prompt_set.prompts]
    warm_up(pipe, settings)
    base = generate(pipe, prompts, settings, label="base")
    attach_adapter(pipe, options.lora, options.base)  # same pipeline object: no second copy of the base
    adapted = generate(pipe, prompts, settings, label="base + LoRA")

    results = {
        "base": options.base,
        "lora": options.lora,
        "clip_model": shown_path(options.clip_model),
        "num_candidates": len(candidates),
        "candidates_file": shown_path(options.candidates) if options.candidates else None,
        "candidates": candidates,
        "settings": settings_report(settings, pipe, options.device),
        "matching": "by meaning" if options.same_meaning else "exact prompt",
        "prompt_sets": score_prompt_sets(prompt_sets, base, adapted, candidates, clip, options.same_meaning),
        "parameters": parameters,
        "timing": {
            "base_seconds_per_image": base.seconds_per_image,
            "adapter_seconds_per_image": adapted.seconds_per_image,
        },
    }
    if options.parse_caption is not None:
        results["colour_confusion"] = colour_confusion(results["prompt_sets"], options.parse_caption)
    # lorakit.card's eval schema too, so this file can be handed to the card renderer as it is.
    results["metrics"] = card_metrics(results)
    results["table_markdown"] = markdown_table(results)
    results["source"] = options.command or "python -m eval"
    write_report(results, comparison_grid(*_first_seed(base, adapted, len(settings.seeds))), options.output_dir)
    if options.update_card:
        update_card(options.update_card, results)
    return results


def _first_seed(base: Generated, adapted: Generated, num_seeds: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Grid inputs: one image per prompt (its first seed) from each run."""
    return base.images[::num_seeds], adapted.images[::num_seeds], list(base.prompts[::num_seeds])
