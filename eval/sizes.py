"""Model sizes from configs alone (meta device): `python -m eval --count_only --base FOLDER_OR_HUB_ID`."""

from __future__ import annotations

from pathlib import Path

from eval.models import hub_offline
from eval.prompts import EvalInputError
from lorakit.atomic import atomic_write_json
from lorakit.lora import DEFAULT_UNET_TARGET_MODULES
from lorakit.markdown import markdown_table
from lorakit.params import lora_parameter_count, meta_models_from_configs, pipeline_parameter_counts

SIZES_JSON = "param_counts.json"
CONFIG_PATTERNS = ["model_index.json", "unet/config.json", "text_encoder/config.json", "vae/config.json"]


def config_folder(base: str) -> Path:
    """A local folder with the configs of `base`: itself, or a config-only Hub snapshot (no weights)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=CONFIG_PATTERNS, local_files_only=hub_offline()))
    except Exception as error:  # noqa: BLE001 - any Hub failure means the same thing to the user
        raise EvalInputError(
            f"Cannot read the configs of '{base}': {error.__class__.__name__}. Pass --base with a local folder "
            "(a saved pipeline or unet_config.json/text_encoder_config.json/vae_config.json), or go online once."
        ) from error


def model_sizes(base: str, ranks: tuple[int, ...] = (4,), target_modules=DEFAULT_UNET_TARGET_MODULES) -> dict:
    """Per-component parameter counts and LoRA counts per rank, computed on the meta device."""
    unet, text_encoder, vae = meta_models_from_configs(config_folder(base))
    counts = pipeline_parameter_counts(unet, text_encoder, vae).to_dict()
    lora = {str(rank): lora_parameter_count(unet, rank, target_modules) for rank in ranks}
    return {
        "base": base,
        "parameters": counts,
        "lora_target_modules": list(target_modules),
        "lora_by_rank": lora,
        "lora_share_of_unet_by_rank": {rank: value / counts["unet"] for rank, value in lora.items()},
    }


def sizes_markdown(sizes: dict) -> str:
    """The sizes as a Markdown table."""
    rows = [(name.replace("_", " "), f"{value:,}") for name, value in sizes["parameters"].items()]
    rows += [
        (f"LoRA rank {rank} on {', '.join(sizes['lora_target_modules'])}", f"{value:,}")
        for rank, value in sizes["lora_by_rank"].items()
    ]
    table = markdown_table(["component", "parameters"], rows, align=["---", "---:"])
    return f"Parameters of `{sizes['base']}` (from configs, no weights loaded)\n\n{table}\n"


def write_sizes(sizes: dict, output_dir: str | Path) -> Path:
    """Write param_counts.json under output_dir."""
    path = Path(output_dir) / SIZES_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, sizes)
    return path
