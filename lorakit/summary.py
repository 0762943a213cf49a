"""`train_summary.json`: what a finished run measured, written by the trainer and read by the card, docs and bench.

One dataclass is the schema; `write_summary` and `read_summary` are the only code that touches the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.atomic import atomic_write_json
from lorakit.filenames import SUMMARY_FILE


@dataclass(frozen=True)
class ValidationImage:
    """One final validation image: its prompt and its path relative to the output folder."""

    prompt: str
    image: str


@dataclass(frozen=True)
class TrainSummary:
    """The figures of one finished run (the model card's results table and the docs read them)."""

    base_model: str = field(metadata={"help": "Hub id or local folder of the base pipeline."})
    dataset: str | None = field(metadata={"help": "Hub dataset id or local folder trained on."})
    num_samples: int = field(metadata={"help": "Training samples in one epoch."})
    global_step: int = field(metadata={"help": "Optimizer steps taken."})
    num_train_epochs: int = field(metadata={"help": "Epochs asked for."})
    lora_trainable_parameters: int = field(metadata={"help": "Trainable LoRA parameters (UNet and text encoder)."})
    adapter_file_bytes: int = field(metadata={"help": "Size of pytorch_lora_weights.safetensors."})
    train_seconds: float = field(metadata={"help": "Wall time from the start of train() to the saved adapter."})
    final_loss: float | None = field(metadata={"help": "Loss of the last optimizer step."})
    command: str = field(metadata={"help": "The command line that ran the training, as typed (see launch_command)."})
    mixed_precision: str = field(metadata={"help": "The precision accelerate actually used: no, fp16 or bf16."})
    precision_choice: str | None = field(
        default=None,
        metadata={
            "help": "How the precision was chosen: asked for, accelerate's, a checkpoint's, auto's rule or probe."
        },
    )
    num_processes: int = field(default=1, metadata={"help": "Data-parallel processes."})
    micro_batch_size: int | None = field(
        default=None, metadata={"help": "Samples per forward/backward pass per process (None: not recorded)."}
    )
    gradient_accumulation_steps: int | None = field(
        default=None, metadata={"help": "Micro-batches accumulated per optimizer step."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Whether the UNet recomputed activations in the backward pass."}
    )
    auto_micro_batch: bool = field(
        default=False, metadata={"help": "Whether --auto_micro_batch chose the three values above by trial."}
    )
    learned_words: list[str] = field(default_factory=list, metadata={"help": "Words of --train_token_embeddings."})
    validation: list[ValidationImage] = field(default_factory=list, metadata={"help": "Final validation images."})
    instance_prompt: str | None = field(default=None, metadata={"help": "The prompt that names the concept."})
    license: str | None = field(default=None, metadata={"help": "Licence id of the adapter (the base's)."})
    data_source: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "How a folder of images with caption files was read: format, images, rows (images x repeats), "
            "folder_captions (images captioned by their repeat folder's words), skipped_files, orphan_captions."
        },
    )
    bucket_histogram: dict[str, int] | None = field(
        default=None, metadata={"help": "With --enable_bucket: training size WxH -> samples (None: square)."}
    )
    truncated_captions: int | None = field(
        default=None, metadata={"help": "Captions longer than the tokenizer's limit, truncated as they trained."}
    )
    validation_loss: float | None = field(
        default=None,
        metadata={"help": "Mean diffusion loss on the held-out rows with the saved adapter (None: none)."},
    )
    validation_rows: int | None = field(default=None, metadata={"help": "Held-out rows behind validation_loss."})
    optimizer: str | None = field(default=None, metadata={"help": "The --optimizer the run used."})
    wall_split: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": "Where this process's wall time went: startup_s (process start to the first step: imports, data, "
            "models, probe), steps_s (the loop, in-loop validation included), wind_down_s (last step to this file)."
        },
    )
    ema_decay: float | None = field(
        default=None, metadata={"help": "EMA decay when the saved adapter is the weights' average (None: raw)."}
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = SUMMARY_FILE) -> TrainSummary:
        """Build from parsed JSON; unknown keys (a newer lorakit's) are ignored, missing required ones named."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(missing)}: it was not written by this trainer; re-run it.")
        values = {key: value for key, value in data.items() if key in names}
        values["validation"] = [ValidationImage(**item) for item in values.get("validation") or []]
        values["learned_words"] = list(values.get("learned_words") or [])
        return cls(**values)


def write_summary(output_dir: str | os.PathLike, summary: TrainSummary) -> Path:
    """Write `train_summary.json` atomically."""
    path = Path(output_dir) / SUMMARY_FILE
    atomic_write_json(path, summary.to_dict())
    return path


def read_summary(output_dir: str | os.PathLike) -> TrainSummary:
    """Read `train_summary.json` of a run folder (FileNotFoundError names the file when it is missing)."""
    path = Path(output_dir) / SUMMARY_FILE
    return TrainSummary.from_dict(json.loads(path.read_text(encoding="utf-8")), source=str(path))
