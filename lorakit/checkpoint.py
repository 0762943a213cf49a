"""Full training-state checkpoints (`output_dir/checkpoint-STEP/`), written atomically, and exact resume.

accelerate's `save_state`/`load_state` store optimizer, LR scheduler, grad scaler and every process's RNG
states; hooks replace its full-model save with the LoRA weights alone (a BK-SDM UNet is 1.3 GB in fp32,
its rank-4 LoRA 1.7 MB). `train_state.json` adds the step counter, the position in the epoch, the loss
history and a fingerprint of what must not change across a resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from lorakit.atomic import atomic_write_json
from lorakit.config import ConfigError
from lorakit.filenames import CHECKPOINT_PREFIX, LEARNED_EMBEDS_FILE
from lorakit.lora import save_adapter
from lorakit.token_embeddings import (
    TokenEmbeddingOffsets,
    read_learned_embeds,
    save_learned_embeds,
)

CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
TRAIN_STATE_FILE = "train_state.json"
TOKEN_OFFSETS_FILE = "token_embedding_offsets.safetensors"  # the trained offsets of --train_token_embeddings
# Said after a refused fingerprint key whose name alone does not tell the user what to change.
RESUME_HINTS = {
    "effective_batch_size": "train_batch_size x gradient_accumulation_steps per process; another split of the "
    "same product resumes",
    "bucket_batch_size": "with --enable_bucket the batches are drawn per micro-batch, so it must stay the same",
}


# Fingerprint keys added later, with the value every checkpoint written before them had.
FINGERPRINT_DEFAULTS: dict[str, Any] = {"optimizer": "adamw", "use_dora": False, "use_ema": False, "held_out": None}


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders of an interrupted save are ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name)) and (path / TRAIN_STATE_FILE).is_file()
    ]
    return [path for _, path in sorted(found)]


def resolve_resume_dir(output_dir: str | Path, resume_from: str | None) -> Path | None:
    """'latest' -> newest checkpoint (None if there is none); a path -> that folder, which must exist."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / TRAIN_STATE_FILE).is_file():
        available = [p.name for p in list_checkpoints(output_dir)]
        raise ConfigError(
            f"--resume_from_checkpoint {resume_from} is not a checkpoint folder. "
            f"Use 'latest' or one of {available or 'no checkpoints found in ' + str(output_dir)}."
        )
    return path


def check_compatible(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume when the data, batch layout or LoRA shape changed (the state would not fit)."""
    saved = {**FINGERPRINT_DEFAULTS, **saved}  # a checkpoint older than a key had that key's default
    changed = [key for key in current if saved.get(key) != current[key]]
    if changed:
        details = "; ".join(
            f"{key}: checkpoint {saved.get(key)!r}, now {current[key]!r}"
            + (f" ({RESUME_HINTS[key]})" if key in RESUME_HINTS else "")
            for key in changed
        )
        raise ConfigError(
            f"Cannot resume from {checkpoint}: {details}. Resume with the settings of that run, "
            "or start a new run in another --output_dir."
        )


def register_lora_hooks(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    token_offsets: TokenEmbeddingOffsets | None = None,
) -> None:
    """Make save_state/load_state write and read only the LoRA weights (diffusers format) and learned words."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        if accelerator.is_main_process:
            save_adapter(
                output_dir,
                accelerator.unwrap_model(unet),
                accelerator.unwrap_model(text_encoder) if text_encoder is not None else None,
            )
            if token_offsets is not None:
                save_learned_embeds(output_dir, token_offsets.words, token_offsets.rows())
                # The offsets themselves too: rows() - base rows rounds, and a resumed run must continue bit for bit.
                save_file(
                    {"offsets": token_offsets.offsets.detach().cpu()}, str(Path(output_dir) / TOKEN_OFFSETS_FILE)
                )
        weights.clear()  # nothing else: the frozen base is not part of the training state

    def load_hook(models: list, input_dir: str) -> None:
        models.clear()
        load_lora_into(
            input_dir,
            accelerator.unwrap_model(unet),
            accelerator.unwrap_model(text_encoder) if text_encoder is not None else None,
        )
        if token_offsets is not None and (Path(input_dir) / TOKEN_OFFSETS_FILE).is_file():
            with torch.no_grad():
                token_offsets.offsets.copy_(load_file(str(Path(input_dir) / TOKEN_OFFSETS_FILE))["offsets"])
        elif token_offsets is not None:  # a checkpoint written before the offsets were saved
            learned = read_learned_embeds(Path(input_dir) / LEARNED_EMBEDS_FILE)
            token_offsets.set_rows(torch.stack([learned[word] for word in token_offsets.words]))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_lora_into(folder: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> None:
    """Load a diffusers-format adapter file into LoRA layers already attached (adapter 'default')."""
    state_dict, _ = StableDiffusionPipeline.lora_state_dict(str(folder))
    unet_state = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ConfigError(f"Checkpoint {folder} has LoRA weights this UNet lacks: {result.unexpected_keys[:3]} ...")
    if text_encoder is not None:
        text_state = {
            k.removeprefix("text_encoder."): v for k, v in state_dict.items() if k.startswith("text_encoder.")
        }
        from diffusers.utils import convert_state_dict_to_peft

        set_peft_model_state_dict(text_encoder, convert_state_dict_to_peft(text_state), adapter_name="default")


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    global_step: int,
    train_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Save the full state to a temporary folder, then rename it to checkpoint-STEP (atomic on one filesystem)."""
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    tmp = output_dir / f".tmp-{CHECKPOINT_PREFIX}{global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAIN_STATE_FILE, train_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most `total_limit` remain; return what was deleted."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - total_limit)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def read_train_state(checkpoint: Path) -> dict[str, Any]:
    """The step counter, epoch position, loss history and fingerprint saved with a checkpoint."""
    return json.loads((checkpoint / TRAIN_STATE_FILE).read_text())
