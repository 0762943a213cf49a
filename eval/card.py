"""Write evaluation results into an adapter's model card: `model-index` metadata and a Markdown table.

A trainer run folder (training_config.yaml + train_summary.json) goes through
`lorakit.card.update_card_with_eval`, which re-renders the card from the run with the results; any other
folder (e.g. a downloaded adapter with a hand-written card) is updated in place: metadata replaced, one
marked section swapped, the rest of the card kept.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from eval.report import markdown_table
from lorakit.atomic import atomic_write_text
from lorakit.card import is_hub_id, to_eval_result, update_card_with_eval
from lorakit.filenames import SUMMARY_FILE, TRAINING_CONFIG_FILE

SECTION_START = "<!-- lorakit-eval:start -->"
SECTION_END = "<!-- lorakit-eval:end -->"
# Metrics this module owns in model-index; other entries (e.g. added by hand) are kept.
OWN_METRICS = {"clip_score", "clip_r_precision"}
RUN_FILES = (TRAINING_CONFIG_FILE, SUMMARY_FILE)


def card_metrics(results: dict) -> list[dict]:
    """The adapter's metrics in lorakit.card's schema (base figures stay in the table)."""
    metrics = []
    clip = results["clip_model"]
    judge = clip if is_hub_id(clip) else f"local CLIP {Path(clip).name}"
    for row in results["prompt_sets"]:
        common = {
            "task_type": "text-to-image",
            "dataset_type": "prompts",
            "dataset_name": f"{row['name']} prompts",
            "dataset_split": row["name"],
        }
        metrics.append(
            {
                **common,
                "metric_type": "clip_score",
                "metric_name": f"CLIP score ({judge})",
                "value": round(row["adapter"]["clip_score"], 4),
            }
        )
        metrics.append(
            {
                **common,
                "metric_type": "clip_r_precision",
                "metric_name": f"CLIP R-precision@1 of {results['num_candidates']}",
                "value": round(row["adapter"]["r_precision_top1"], 4),
            }
        )
    return metrics


def _replace_section(content: str, section: str) -> str:
    """Swap the marked evaluation section for `section`, or append it; the rest of the card is kept."""
    block = f"{SECTION_START}\n## Evaluation\n\n{section.rstrip()}\n{SECTION_END}"
    if SECTION_START in content and SECTION_END in content:
        head, _, rest = content.partition(SECTION_START)
        _, _, tail = rest.partition(SECTION_END)
        return f"{head}{block}{tail}"
    return f"{content.rstrip()}\n\n{block}\n"


def update_card_in_place(card_dir: str | Path, results: dict) -> Path:
    """Write results into card_dir/README.md (created minimal if missing), keeping the rest of the card."""
    path = Path(card_dir) / "README.md"
    if path.is_file():
        card = ModelCard.load(path)
    else:
        Path(card_dir).mkdir(parents=True, exist_ok=True)
        card = ModelCard(f"---\n{ModelCardData(library_name='diffusers').to_yaml()}\n---\n# LoRA adapter\n")
    data = card.data
    kept = [r for r in (data.eval_results or []) if r.metric_type not in OWN_METRICS]
    data.eval_results = kept + [to_eval_result(m) for m in results.get("metrics") or card_metrics(results)]
    if not data.model_name:
        data.model_name = Path(card_dir).resolve().name  # model-index requires a name
    text = f"---\n{data.to_yaml()}\n---\n{_replace_section(card.text, markdown_table(results))}"
    atomic_write_text(path, text)
    return path


def update_card(card_dir: str | Path, results: dict) -> Path:
    """Put the results into card_dir's model card; the card helper re-renders trainer runs."""
    if all((Path(card_dir) / name).is_file() for name in RUN_FILES):
        return update_card_with_eval(card_dir, results)
    return update_card_in_place(card_dir, results)
