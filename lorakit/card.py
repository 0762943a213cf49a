"""Render the model card (`output_dir/README.md`) from the trainer's output folder and `model_card.md`.

Usage (the trainer calls this at the end of every run, pushed or not; the eval helper after evaluating):

    from lorakit.card import write_model_card, update_card_with_eval
    write_model_card(output_dir)                      # reads training_config.yaml, train_summary.json, ...
    update_card_with_eval(output_dir, {"metrics": [...], "table_markdown": "..."})  # see its docstring

Metadata goes through `huggingface_hub.ModelCardData`; the body is the Jinja template `model_card.md` at the
repository root, rendered with `ModelCard.from_template`. Nothing here talks to the Hub.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from lorakit.atomic import atomic_write_json, atomic_write_text
from lorakit.compat import PIPELINE_DTYPE_KWARG
from lorakit.filenames import (
    ADAPTER_FILE,
    EVAL_RESULTS_FILE,
    KOHYA_FILE,
    LEARNED_EMBEDS_FILE,
    LOSS_CURVE_FILE,
    LOSS_HISTORY_FILE,
    SUMMARY_FILE,
    TRAINING_CONFIG_FILE,
    VALIDATION_GRID_FILE,
)
from lorakit.hub_token import redact_secrets
from lorakit.markdown import markdown_table
from lorakit.outputs import plot_loss_curve
from lorakit.summary import TrainSummary, read_summary

CARD_TEMPLATE = "model_card.md"
# In a checkout the template is the repository's top-level file; `pip install .` ships a copy inside the package.
_PACKAGED_TEMPLATE = Path(__file__).resolve().parent / CARD_TEMPLATE
_CHECKOUT_TEMPLATE = Path(__file__).resolve().parent.parent / CARD_TEMPLATE
TAGS = ["text-to-image", "diffusers", "lora", "diffusers-training", "stable-diffusion", "template:sd-lora"]
# Licences of bases we know; the adapter is a derivative and carries the base's licence.
KNOWN_LICENSES = {
    "nota-ai/bk-sdm-tiny": "creativeml-openrail-m",
    "nota-ai/bk-sdm-small": "creativeml-openrail-m",
    "nota-ai/bk-sdm-base": "creativeml-openrail-m",
    "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "compvis/stable-diffusion-v1-4": "creativeml-openrail-m",
    "stabilityai/stable-diffusion-2-1": "openrail++",
    "stabilityai/stable-diffusion-2-1-base": "openrail++",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REQUIRED_METRIC_KEYS = ("metric_type", "value", "dataset_name", "dataset_type")


def template_path() -> Path:
    """The Jinja template of the model card: the installed package's copy, else the checkout's `model_card.md`."""
    return _PACKAGED_TEMPLATE if _PACKAGED_TEMPLATE.is_file() else _CHECKOUT_TEMPLATE


def is_hub_id(name: str | None) -> bool:
    """True for `namespace/name` strings that are not an existing local path."""
    return bool(name) and bool(_HUB_ID.match(name)) and not Path(name).exists()


def _read_run(output_dir: Path) -> tuple[dict, TrainSummary, list[dict]]:
    missing = [n for n in (TRAINING_CONFIG_FILE, SUMMARY_FILE) if not (output_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{output_dir} lacks {', '.join(missing)}: the card is rendered from a finished train_lora.py run. "
            "Point --output_dir at that run's folder."
        )
    config = yaml.safe_load((output_dir / TRAINING_CONFIG_FILE).read_text(encoding="utf-8")) or {}
    summary = read_summary(output_dir)
    history_path = output_dir / LOSS_HISTORY_FILE
    history = json.loads(history_path.read_text(encoding="utf-8")).get("history", []) if history_path.is_file() else []
    return config, summary, history


def resolve_license(base_model: str, summary_license: str | None) -> tuple[str, str | None]:
    """The adapter's licence id and a note when it was not recorded or known."""
    if summary_license:
        return summary_license, None
    if base_model.lower() in KNOWN_LICENSES:
        return KNOWN_LICENSES[base_model.lower()], None
    local_readme = Path(base_model) / "README.md"
    if local_readme.is_file():
        local_license = ModelCard.load(local_readme).data.get("license")
        if local_license:
            return str(local_license), f"read from {local_readme}"
    return "other", "the base model's licence is not known to lorakit; check it before publishing"


def human_size(num_bytes: int) -> str:
    """Bytes as a short human-readable string (binary units)."""
    if num_bytes < 1024:
        return f"{num_bytes} B"
    exponent = min(3, (num_bytes.bit_length() - 1) // 10)
    return f"{num_bytes / 1024**exponent:.1f} {('B', 'KiB', 'MiB', 'GiB')[exponent]}"


def hyperparameter_rows(config: dict) -> list[tuple[str, Any]]:
    """(`section.key`, value) rows of the resolved config, minus output/Hub plumbing and the prompt list."""
    rows = []
    for section in ("model", "data", "lora", "training", "validation"):
        for key, value in (config.get(section) or {}).items():
            if section == "validation" and key in ("validation_prompt", "validation_prompts"):
                value = len(value or [])
                key = "num_validation_prompts"
            rows.append((f"`{section}.{key}`", value))
    return rows


def usage_snippet(
    base_model: str,
    adapter: str,
    prompt: str,
    revision: str | None,
    variant: str | None,
    learned_words: list[str] | None = None,
) -> str:
    """A Python snippet that loads the base pipeline and this adapter (and its learned words), makes one image."""
    # json.dumps gives double-quoted literals that are valid Python for any string.
    q = json.dumps
    dtype_kwarg = PIPELINE_DTYPE_KWARG  # the name the installed diffusers takes without a deprecation warning
    extra = "".join(f", {name}={q(value)}" for name, value in (("revision", revision), ("variant", variant)) if value)
    return "\n".join(
        [
            "import torch",
            "from diffusers import StableDiffusionPipeline",
            "",
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            'dtype = torch.float16 if device == "cuda" else torch.float32',
            f"pipe = StableDiffusionPipeline.from_pretrained({q(base_model)}, {dtype_kwarg}=dtype{extra}).to(device)",
            f"pipe.load_lora_weights({q(adapter)})",
            *(_learned_words_lines(adapter, learned_words) if learned_words else []),
            "generator = torch.Generator(device).manual_seed(0)",
            f"image = pipe({q(prompt)}, num_inference_steps=25, guidance_scale=7.5, generator=generator).images[0]",
            'image.save("lora_sample.png")',
        ]
    )


def batch_layout_rows(summary: TrainSummary) -> list[tuple[str, str]]:
    """Results rows of how each optimizer step was split (none for runs that did not record it)."""
    if summary.micro_batch_size is None:
        return []
    micro, accumulation = summary.micro_batch_size, summary.gradient_accumulation_steps or 1
    how = " (chosen by `--auto_micro_batch`)" if summary.auto_micro_batch else ""
    return [
        ("Batch per optimizer step", f"{micro * accumulation} per process: micro-batch {micro} x {accumulation}{how}"),
        ("Gradient checkpointing", "on" if summary.gradient_checkpointing else "off"),
    ]


def data_rows(summary: TrainSummary) -> list[tuple[str, str]]:
    """Results rows of how a folder of captioned images was read and how its samples fell into buckets."""
    rows = []
    source = summary.data_source
    if source:
        rows.append(
            (
                "Images (caption files)",
                f"{source['images']:,} images, {source['rows']:,} samples per epoch with repeat folders; "
                f"{source['folder_captions']:,} captioned by their folder's name",
            )
        )
    if summary.bucket_histogram:
        shown = ", ".join(f"{size}: {count:,}" for size, count in summary.bucket_histogram.items())
        rows.append(("Aspect-ratio buckets (WxH: samples)", shown))
    if summary.truncated_captions:
        rows.append(("Captions truncated to the tokenizer's limit", f"{summary.truncated_captions:,}"))
    return rows


def held_out_rows(summary: TrainSummary) -> list[tuple[str, str]]:
    """Results rows of the held-out loss and of the EMA (none for runs without them)."""
    rows = []
    if summary.validation_loss is not None:
        rows.append(
            (f"Held-out loss ({summary.validation_rows} rows never trained on)", f"{summary.validation_loss:.4g}")
        )
    if summary.ema_decay is not None:
        rows.append(("Saved weights", f"exponential moving average, decay {summary.ema_decay:g}"))
    return rows


def to_eval_result(metric: dict) -> EvalResult:
    """One metric of the `update_card_with_eval` schema as a huggingface_hub `EvalResult` (model-index)."""
    return EvalResult(
        task_type=metric.get("task_type", "text-to-image"),
        dataset_type=metric["dataset_type"],
        dataset_name=metric["dataset_name"],
        dataset_split=metric.get("dataset_split"),
        metric_type=metric["metric_type"],
        metric_name=metric.get("metric_name"),
        metric_value=metric["value"],
        source_name=metric.get("source_name"),
    )


def _eval_results(eval_data: dict | None, model_name: str) -> list[EvalResult] | None:
    if not eval_data or not eval_data.get("metrics"):
        return None
    return [to_eval_result(m) for m in eval_data["metrics"]]


def validate_eval_results(results: dict) -> dict:
    """Check the eval input schema (see `update_card_with_eval`) and return a JSON-safe copy."""
    if not isinstance(results, dict) or not isinstance(results.get("metrics", []), list):
        raise ValueError('eval results must be a dict like {"metrics": [{...}], "table_markdown": "..."}')
    for index, metric in enumerate(results.get("metrics", [])):
        missing = [k for k in _REQUIRED_METRIC_KEYS if k not in metric]
        if missing:
            raise ValueError(f"eval metric #{index} lacks {', '.join(missing)}; required: {_REQUIRED_METRIC_KEYS}")
        if not isinstance(metric["value"], (int, float, str)):
            raise ValueError(f"eval metric #{index} value must be a number or string, got {metric['value']!r}")
    if "table_markdown" in results and not isinstance(results["table_markdown"], str):
        raise ValueError("eval results table_markdown must be a Markdown string")
    return json.loads(json.dumps(results))


def _learned_words_lines(adapter: str, words: list[str]) -> list[str]:
    """Snippet lines that load the run's learned words with diffusers' `load_textual_inversion` (each becomes an
    added token carrying its learned vector): one call for one word; several words are in one file, so they go in
    as a list of `{word: vector}` dicts."""
    q = json.dumps
    if len(words) == 1:
        return [
            f"pipe.load_textual_inversion({q(adapter)}, weight_name={q(LEARNED_EMBEDS_FILE)}, token={q(words[0])})"
        ]
    source = (
        f"hf_hub_download({q(adapter)}, {q(LEARNED_EMBEDS_FILE)})"
        if is_hub_id(adapter)
        else q(f"{adapter}/{LEARNED_EMBEDS_FILE}")
    )
    return [
        *(["from huggingface_hub import hf_hub_download"] if is_hub_id(adapter) else []),
        "from safetensors.torch import load_file",
        f"words = load_file({source})  # the words this adapter learned",
        "pipe.load_textual_inversion([{word: vector} for word, vector in words.items()], token=list(words))",
    ]


def render_model_card(
    output_dir: str | os.PathLike, eval_results: dict | None = None, repo_id: str | None = None
) -> ModelCard:
    """Build the `ModelCard` for a run folder without writing it."""
    output_dir = Path(output_dir)
    config, summary, history = _read_run(output_dir)
    model_cfg, output_cfg = config.get("model") or {}, config.get("output") or {}
    base_model = str(summary.base_model or model_cfg.get("pretrained_model_name_or_path") or "")
    if not base_model:
        raise ValueError(f"{output_dir}/train_summary.json has no base_model; re-run training or add it.")
    dataset = str(summary.dataset or (config.get("data") or {}).get("dataset_name") or "local data")
    repo_id = repo_id or output_cfg.get("hub_model_id")
    model_name = (repo_id or output_dir.resolve().name).split("/")[-1]
    license_id, license_note = resolve_license(base_model, summary.license)
    if eval_results is None and (output_dir / EVAL_RESULTS_FILE).is_file():
        eval_results = json.loads((output_dir / EVAL_RESULTS_FILE).read_text(encoding="utf-8"))

    validation = [v for v in summary.validation if (output_dir / v.image).is_file()]
    prompt = (validation[0].prompt if validation else None) or summary.instance_prompt or "a photo"
    adapter_path = output_dir / ADAPTER_FILE
    adapter_bytes = adapter_path.stat().st_size if adapter_path.is_file() else summary.adapter_file_bytes
    if not (output_dir / LOSS_CURVE_FILE).is_file() and history:
        plot_loss_curve(output_dir, history)

    evals = _eval_results(eval_results, model_name)
    card_data = ModelCardData(
        base_model=base_model if is_hub_id(base_model) else None,
        library_name="diffusers",
        license=license_id,
        license_name="base-model-license" if license_id == "other" else None,
        datasets=[dataset] if is_hub_id(dataset) else None,
        tags=list(TAGS),
        pipeline_tag="text-to-image",
        eval_results=evals,
        model_name=model_name if evals else None,  # only model-index needs a name
        widget=[{"text": v.prompt, "output": {"url": v.image}} for v in validation] or None,
        instance_prompt=summary.instance_prompt or None,
    )
    final_loss = summary.final_loss
    results_rows = [
        ("Optimisation steps", summary.global_step),
        ("Epochs", summary.num_train_epochs),
        ("Training samples", summary.num_samples),
        ("Final loss", f"{final_loss:.4g}" if isinstance(final_loss, (int, float)) else final_loss),
        *held_out_rows(summary),
        ("Training time", f"{summary.train_seconds:.0f} s"),
        ("Mixed precision", summary.mixed_precision),
        *([("Precision chosen by", summary.precision_choice)] if summary.precision_choice else []),
        *batch_layout_rows(summary),
        *data_rows(summary),
        ("LoRA trainable parameters", f"{summary.lora_trainable_parameters:,}"),
        ("Adapter file size", f"{human_size(adapter_bytes)} ({adapter_bytes:,} bytes)"),
    ]
    metrics = (eval_results or {}).get("metrics") or []
    learned_words = summary.learned_words if (output_dir / LEARNED_EMBEDS_FILE).is_file() else None
    variables = {
        "model_name": model_name,
        "base_model": base_model,
        "base_link": f"https://huggingface.co/{base_model}" if is_hub_id(base_model) else None,
        "is_bk_sdm": "bk-sdm" in base_model.lower(),
        "license": license_id,
        "license_note": license_note,
        "dataset": dataset,
        "dataset_link": f"https://huggingface.co/datasets/{dataset}" if is_hub_id(dataset) else None,
        "num_samples": summary.num_samples,
        "instance_prompt": summary.instance_prompt,
        "lora_params": summary.lora_trainable_parameters,
        "adapter_size": human_size(adapter_bytes),
        "snippet": usage_snippet(
            base_model,
            repo_id or str(output_dir),
            prompt,
            model_cfg.get("revision"),
            model_cfg.get("variant"),
            learned_words=learned_words,
        ),
        "learned_words": learned_words,
        "kohya_file": KOHYA_FILE if (output_dir / KOHYA_FILE).is_file() else None,
        "hyperparameter_table": markdown_table(("Setting", "Value"), hyperparameter_rows(config)),
        "results_table": markdown_table(("Result", "Value"), results_rows),
        "loss_curve": LOSS_CURVE_FILE if (output_dir / LOSS_CURVE_FILE).is_file() else None,
        "validation": validation,
        "validation_grid": VALIDATION_GRID_FILE if (output_dir / VALIDATION_GRID_FILE).is_file() else None,
        "validation_table": markdown_table(("Prompt", "Image"), [(v.prompt, f"![]({v.image})") for v in validation]),
        "eval_metrics": metrics,
        "eval_metrics_table": markdown_table(
            ("Metric", "Dataset", "Value"),
            [(m.get("metric_name") or m["metric_type"], m["dataset_name"], m["value"]) for m in metrics],
        ),
        "eval_table": (eval_results or {}).get("table_markdown"),
        "eval_source": (eval_results or {}).get("source"),
        "command": summary.command or "(command not recorded)",
    }
    card = ModelCard.from_template(card_data, template_path=str(template_path()), **variables)
    # Jinja block tags leave runs of blank lines; collapse them so the Markdown stays tidy.
    text = re.sub(r"\n{3,}", "\n\n", redact_secrets(str(card))).rstrip() + "\n"
    return ModelCard(text)


def write_model_card(
    output_dir: str | os.PathLike, eval_results: dict | None = None, *, repo_id: str | None = None
) -> Path:
    """Render `output_dir/README.md` atomically; `repo_id` names the adapter in the usage snippet."""
    card = render_model_card(output_dir, eval_results=eval_results, repo_id=repo_id)
    path = Path(output_dir) / "README.md"
    atomic_write_text(path, str(card))
    return path


def update_card_with_eval(output_dir: str | os.PathLike, results: dict) -> Path:
    """Store evaluation results in `eval_results.json` and re-render the card with them.

    `results` schema (JSON-serialisable)::

        {
          "metrics": [                              # -> model-index in the metadata, one EvalResult each
            {"metric_type": "clip_score",           # required, metric id
             "metric_name": "CLIP score (ViT-B/32)",  # optional pretty name
             "value": 27.4,                          # required, number or string
             "dataset_name": "shapes prompts",       # required, pretty name
             "dataset_type": "user/shapes-prompts",  # required, dataset id (or a short local name)
             "dataset_split": "test",                # optional
             "task_type": "text-to-image"},          # optional, this default
          ],
          "table_markdown": "| ... |",              # optional, shown verbatim as the card's Evaluation table
          "source": "python eval/evaluate.py ...",   # optional, how the numbers were produced
        }
    """
    output_dir = Path(output_dir)
    clean = validate_eval_results(results)
    _read_run(output_dir)  # fail on a wrong folder before writing anything into it
    atomic_write_json(output_dir / EVAL_RESULTS_FILE, clean)
    return write_model_card(output_dir, eval_results=clean)
