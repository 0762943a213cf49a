"""Write evaluation results into an adapter's model card: `model-index` metadata and a Markdown section."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from eval.report import markdown_table
from lorakit.atomic import atomic_write_text

SECTION_START = "<!-- lorakit-eval:start -->"
SECTION_END = "<!-- lorakit-eval:end -->"
# Metrics this module owns in model-index; other entries (e.g. added by hand) are kept.
OWN_METRICS = {"clip_score", "clip_r_precision"}


def eval_results_for_card(results: dict) -> list[EvalResult]:
    """One EvalResult per prompt set and metric, for the adapter (base figures stay in the table)."""
    entries = []
    for row in results["prompt_sets"]:
        common = {
            "task_type": "text-to-image",
            "task_name": "Text-to-Image",
            "dataset_type": "prompts",
            "dataset_name": f"{row['name']} prompts",
            "dataset_split": row["name"],
        }
        entries.append(
            EvalResult(
                **common,
                metric_type="clip_score",
                metric_name=f"CLIP score ({results['clip_model']})",
                metric_value=round(row["adapter"]["clip_score"], 4),
            )
        )
        entries.append(
            EvalResult(
                **common,
                metric_type="clip_r_precision",
                metric_name=f"CLIP R-precision@1 of {results['num_candidates']}",
                metric_value=round(row["adapter"]["r_precision_top1"], 4),
            )
        )
    return entries


def _replace_section(content: str, section: str) -> str:
    """Swap the marked evaluation section for `section`, or append it; the rest of the card is kept."""
    block = f"{SECTION_START}\n## Evaluation\n\n{section.rstrip()}\n{SECTION_END}"
    if SECTION_START in content and SECTION_END in content:
        head, _, rest = content.partition(SECTION_START)
        _, _, tail = rest.partition(SECTION_END)
        return f"{head}{block}{tail}"
    return f"{content.rstrip()}\n\n{block}\n"


def update_card(card_dir: str | Path, results: dict) -> Path:
    """Write results into card_dir/README.md (created minimal if missing); returns the card path."""
    path = Path(card_dir) / "README.md"
    if path.is_file():
        card = ModelCard.load(path)
    else:
        Path(card_dir).mkdir(parents=True, exist_ok=True)
        card = ModelCard.from_template(ModelCardData(library_name="diffusers", base_model=None))
    data = card.data
    kept = [r for r in (data.eval_results or []) if r.metric_type not in OWN_METRICS]
    data.eval_results = kept + eval_results_for_card(results)
    if not data.model_name:
        data.model_name = Path(card_dir).resolve().name
    card.content = f"---\n{data.to_yaml()}\n---\n{_replace_section(card.text, markdown_table(results))}"
    atomic_write_text(path, card.content)
    return path
