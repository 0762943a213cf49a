"""Loading the CLIP judge, the base pipeline and the adapter, with errors that say what to fix."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from eval.prompts import EvalInputError
from lorakit.compat import PIPELINE_DTYPE_KWARG
from lorakit.config import ConfigError
from lorakit.filenames import ADAPTER_FILE, LEARNED_EMBEDS_FILE
from lorakit.hub import fetch_optional_file
from lorakit.token_embeddings import load_learned_words

# LoRA down/up weight names across the diffusers, peft and older diffusers formats.
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:lora\.(?P<a>down|up)|lora_linear_layer\.(?P<b>down|up)|lora_(?P<c>[AB]))\."
)


def hub_offline() -> bool:
    """Whether the Hub must not be contacted (HF_HUB_OFFLINE, read now rather than at import time)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _require_local_or_cached(name_or_path: str, filename: str, what: str, flag: str) -> None:
    """Fail fast, before any download attempt or retry, when offline and `name_or_path` is nowhere on disk."""
    from huggingface_hub import try_to_load_from_cache

    if Path(name_or_path).exists() or not hub_offline():
        return
    try:
        cached = try_to_load_from_cache(name_or_path, filename)
    except ValueError:  # not a valid repo id either
        cached = None
    if not isinstance(cached, str):
        raise EvalInputError(
            f"Cannot load {what} '{name_or_path}': it is not a local folder and not in the Hub cache, and the Hub "
            f"is offline (HF_HUB_OFFLINE=1). Pass {flag} with a local folder, or download it once while online."
        )


def load_clip(name_or_path: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, object]:
    """(CLIPModel, CLIPProcessor) from a local folder or a Hub id (the Hub cache when offline)."""
    from transformers import CLIPModel, CLIPProcessor

    _require_local_or_cached(name_or_path, "config.json", "CLIP model", "--clip_model (e.g. embedded/clip)")
    try:
        model = CLIPModel.from_pretrained(name_or_path, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        where = "local folder" if Path(name_or_path).exists() else "Hub id (not found in the local Hub cache)"
        raise EvalInputError(
            f"Cannot load CLIP model '{name_or_path}' as a {where}: {error.__class__.__name__}. "
            "Pass --clip_model with a local CLIP folder (model + processor, safetensors), e.g. embedded/clip, "
            "or a Hub id such as openai/clip-vit-large-patch14 while online."
        ) from error
    return model.eval().to(device), processor


def load_pipeline(name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline in eval mode, without a safety checker, safetensors only."""
    from diffusers import StableDiffusionPipeline

    _require_local_or_cached(name_or_path, "model_index.json", "base pipeline", "--base")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            name_or_path,
            safety_checker=None,
            requires_safety_checker=False,
            use_safetensors=True,
            **{PIPELINE_DTYPE_KWARG: dtype},
        )
    except (OSError, ValueError) as error:
        raise EvalInputError(
            f"Cannot load base pipeline '{name_or_path}': {error}. Pass --base with a saved diffusers "
            "Stable Diffusion pipeline folder or a Hub id (cached, when offline)."
        ) from error
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead of one per call
    return pipe.to(device)


def adapter_state_dict(lora: str) -> dict[str, torch.Tensor]:
    """The adapter's weights as diffusers reads them (local folder, file or Hub id)."""
    from diffusers import StableDiffusionPipeline

    _require_local_or_cached(lora, ADAPTER_FILE, "LoRA adapter", "--lora")
    path = Path(lora)
    if path.is_dir() and not (path / ADAPTER_FILE).is_file() and not any(path.glob("*.safetensors")):
        raise EvalInputError(f"Adapter folder {path} has no {ADAPTER_FILE}: pass --lora with a trained output.")
    try:
        state_dict, _ = StableDiffusionPipeline.lora_state_dict(lora, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise EvalInputError(
            f"Cannot load LoRA adapter '{lora}': {error}. Pass --lora with a folder holding {ADAPTER_FILE} "
            "or a Hub id (cached, when offline)."
        ) from error
    return state_dict


def _module_shapes(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear/Conv layer (peft-wrapped or not), None otherwise."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def adapter_mismatches(state_dict: dict[str, torch.Tensor], components: dict[str, torch.nn.Module]) -> list[str]:
    """Why the adapter does not fit the components (empty if it fits): missing layers, wrong shapes."""
    problems, matched = [], 0
    for key, tensor in state_dict.items():
        prefix, _, rest = key.partition(".")
        found = _LORA_KEY.match(rest)
        if prefix not in components or found is None:
            continue
        kind = found.group("a") or found.group("b") or found.group("c")
        is_down = kind in ("down", "A")
        try:
            target = components[prefix].get_submodule(found.group("module"))
        except AttributeError:
            problems.append(f"{prefix}.{found.group('module')} does not exist in the base")
            continue
        shapes = _module_shapes(target)
        if shapes is None:
            continue
        matched += 1
        expected = shapes[0] if is_down else shapes[1]
        actual = tensor.shape[1] if is_down else tensor.shape[0]
        if expected != actual:
            problems.append(
                f"{key}: adapter has {'input' if is_down else 'output'} size {actual}, base layer has {expected}"
            )
    if not matched and not problems:
        problems.append("no LoRA layer of the adapter names a layer of the base")
    return problems


def check_adapter_fits(state_dict: dict[str, torch.Tensor], pipe, base: str, lora: str) -> None:
    """Raise EvalInputError naming base and adapter when the adapter was trained for another architecture."""
    problems = adapter_mismatches(state_dict, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} problems)" if len(problems) > 3 else "")
        raise EvalInputError(
            f"LoRA adapter '{lora}' does not fit base model '{base}': {shown}. "
            "Evaluate the adapter with the base it was trained on (see its training_config.yaml)."
        )


def attach_adapter(pipe, lora: str, base: str) -> list[str]:
    """`load_lora_weights` on the already loaded pipeline, re-raising shape errors with both names.

    Words the run learned (`--train_token_embeddings`, learned_embeds.safetensors beside the LoRA) go into the
    text encoder too; returns them.
    """
    try:
        pipe.load_lora_weights(lora, use_safetensors=True)
    except (RuntimeError, ValueError) as error:
        raise EvalInputError(f"LoRA adapter '{lora}' does not fit base model '{base}': {str(error)[:400]}") from error
    embeds = learned_embeds_file(lora)
    if embeds is None:
        return []
    try:
        return load_learned_words(pipe, embeds)
    except ConfigError as error:
        raise EvalInputError(f"Adapter '{lora}' does not fit base model '{base}': {error}") from error


def learned_embeds_file(lora: str) -> str | None:
    """learned_embeds.safetensors beside the adapter (its folder, or the folder of an adapter file, or its
    Hub repo), or None when the run learned no words."""
    path = Path(lora)
    if path.exists():
        folder = path if path.is_dir() else path.parent
        found = folder / LEARNED_EMBEDS_FILE
        return str(found) if found.is_file() else None
    return fetch_optional_file(lora, LEARNED_EMBEDS_FILE)
