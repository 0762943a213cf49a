"""Training configuration: one dataclass per concern, parsed from CLI flags and an optional YAML file.

Flag names follow diffusers' `train_text_to_image_lora.py` where one exists, so users can move over.
Precedence: dataclass defaults < YAML file (`--config`) < flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.lora import DEFAULT_TEXT_ENCODER_TARGET_MODULES, DEFAULT_UNET_TARGET_MODULES
from lorakit.paths import EMBEDDED_ADAPTER_DATA, EMBEDDED_PIPELINE, REPO_ROOT, SHAPES_PRESET, shown_path

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16", "auto")
LR_SCHEDULER_CHOICES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
PREDICTION_TYPE_CHOICES = ("epsilon", "v_prediction")
OPTIMIZER_CHOICES = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


def _parse_scalar(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_optimizer_args(pairs: list[str]) -> dict[str, Any]:
    """`["d_coef=0.5", "betas=0.9,0.99", "decouple=true"]` -> {"d_coef": 0.5, "betas": (0.9, 0.99), ...}."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not key.strip().isidentifier():
            raise ConfigError(f"--optimizer_args {pair!r} is not key=value: write e.g. weight_decay=0.01.")
        parts = [_parse_scalar(part) for part in value.split(",")] if "," in value else None
        parsed[key.strip()] = tuple(parts) if parts is not None else _parse_scalar(value)
    return parsed


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str = field(
        default=shown_path(EMBEDDED_PIPELINE),
        metadata={"help": "Base model: a Hub id (e.g. nota-ai/bk-sdm-tiny) or a local diffusers folder."},
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the model."})
    variant: str | None = field(default=None, metadata={"help": "Weights variant to load, e.g. 'fp16'."})

    def __post_init__(self) -> None:
        if not self.pretrained_model_name_or_path:
            raise ConfigError("--pretrained_model_name_or_path is empty: give a Hub id or a local diffusers folder.")


@dataclass
class DataConfig:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (e.g. lambdalabs/naruto-blip-captions) or a local path."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of the Hub dataset."})
    train_data_dir: str | None = field(
        default=shown_path(EMBEDDED_ADAPTER_DATA),
        metadata={"help": "Local folder: an imagefolder with metadata.jsonl, parquet files, or save_to_disk output."},
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (detected when not given)."})
    caption_column: str | None = field(default=None, metadata={"help": "Caption column (detected when not given)."})
    resolution: int = field(default=512, metadata={"help": "Training resolution in pixels (square)."})
    center_crop: bool = field(default=False, metadata={"help": "Center crop instead of a random crop."})
    random_flip: bool = field(default=False, metadata={"help": "Randomly flip images horizontally."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many samples."})
    dataloader_num_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes that decode and resize images (0: main process)."}
    )
    dataloader_prefetch_factor: int | None = field(
        default=None, metadata={"help": "Batches each worker prepares ahead (torch default 2; needs workers)."}
    )
    persistent_workers: bool = field(
        default=False, metadata={"help": "Keep workers alive between epochs (augmentations then repeat per epoch)."}
    )
    mix_train_data_dir: list[str] = field(
        default_factory=list,
        metadata={"help": "More local datasets mixed into training (e.g. replay of earlier data).", "nargs": "*"},
    )
    mix_weights: list[float] = field(
        default_factory=list,
        metadata={
            "help": "Sampling weights: the main dataset's first, then one per --mix_train_data_dir.",
            "nargs": "*",
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded datasets are cached."})
    caption_extension: str = field(
        default=".txt",
        metadata={"help": "Extension of the caption file beside each image in a folder of images (.caption too)."},
    )
    caption_prefix: str | None = field(
        default=None,
        metadata={
            "help": "Text put before every caption, e.g. a trigger word 'nrt style, '; the model card names it as "
            "the trigger word and its prompts carry it."
        },
    )
    caption_dropout_rate: float = field(
        default=0.0,
        metadata={"help": "Share of samples trained on the empty caption (classifier-free guidance), e.g. 0.05."},
    )
    shuffle_caption: bool = field(
        default=False, metadata={"help": "Shuffle a caption's parts (split by --caption_separator) each epoch."}
    )
    keep_tokens: int = field(
        default=0, metadata={"help": "With --shuffle_caption: the first N parts stay in place (e.g. a trigger word)."}
    )
    caption_separator: str = field(default=", ", metadata={"help": "What splits a caption into parts for shuffling."})
    enable_bucket: bool = field(
        default=False,
        metadata={
            "help": "Aspect-ratio buckets: each image trains at the bucket size nearest its shape (area at most "
            "resolution squared) instead of a square crop; every batch comes from one bucket."
        },
    )
    min_bucket_reso: int = field(default=256, metadata={"help": "Smallest bucket side in pixels."})
    max_bucket_reso: int = field(default=1024, metadata={"help": "Largest bucket side in pixels."})
    bucket_reso_steps: int = field(
        default=64, metadata={"help": "Bucket sides are multiples of this (itself a multiple of the VAE factor)."}
    )
    bucket_no_upscale: bool = field(
        default=False,
        metadata={"help": "Never enlarge an image: a small image gets a bucket of its own size, rounded down."},
    )
    validation_split: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this share of the training rows (a split seeded by --seed, never trained on) and log "
            "their mean diffusion loss at fixed noise and timesteps every --validation_steps and at the end."
        },
    )
    validation_data_dir: str | None = field(
        default=None,
        metadata={"help": "A local dataset folder whose rows give the held-out loss (instead of --validation_split)."},
    )

    def __post_init__(self) -> None:
        if not self.dataset_name and not self.train_data_dir:
            raise ConfigError("No data: give --dataset_name (Hub id) or --train_data_dir (local folder).")
        if self.dataset_name and self.train_data_dir:
            raise ConfigError("Both --dataset_name and --train_data_dir are set: give only one of them.")
        if self.resolution < 8:
            raise ConfigError(f"--resolution {self.resolution} is too small: use at least 8 pixels.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError("--max_train_samples must be at least 1 (or left out to use all samples).")
        if self.dataloader_num_workers < 0:
            raise ConfigError("--dataloader_num_workers must be 0 or more.")
        if self.mix_train_data_dir and len(self.mix_weights) != len(self.mix_train_data_dir) + 1:
            raise ConfigError(
                f"--mix_weights needs {len(self.mix_train_data_dir) + 1} values (main dataset first, then one per "
                f"--mix_train_data_dir), got {len(self.mix_weights)}."
            )
        if self.mix_weights and (any(w <= 0 for w in self.mix_weights) or not self.mix_train_data_dir):
            raise ConfigError("--mix_weights must be positive and go with --mix_train_data_dir.")
        if self.validation_split is not None and not 0.0 < self.validation_split < 1.0:
            raise ConfigError(
                f"--validation_split {self.validation_split} is invalid: use a share in (0, 1), e.g. 0.05."
            )
        if self.validation_split is not None and self.validation_data_dir:
            raise ConfigError("Both --validation_split and --validation_data_dir are set: give only one of them.")
        if not self.caption_extension.strip("."):
            raise ConfigError("--caption_extension is empty: use .txt or .caption.")
        self.caption_extension = "." + self.caption_extension.lstrip(".")
        if not 0.0 <= self.caption_dropout_rate < 1.0:
            raise ConfigError(f"--caption_dropout_rate {self.caption_dropout_rate} is invalid: use a value in [0, 1).")
        if self.keep_tokens < 0:
            raise ConfigError(f"--keep_tokens {self.keep_tokens} is invalid: use 0 or more.")
        if self.keep_tokens and not self.shuffle_caption:
            raise ConfigError("--keep_tokens only applies with --shuffle_caption: add it, or drop --keep_tokens.")
        if self.shuffle_caption and not self.caption_separator:
            raise ConfigError("--caption_separator is empty: use the text between caption parts, e.g. ', '.")
        if self.enable_bucket:
            self._check_buckets()

    @property
    def has_held_out_rows(self) -> bool:
        """Whether the run measures a held-out loss."""
        return self.validation_split is not None or bool(self.validation_data_dir)

    def _check_buckets(self) -> None:
        step = self.bucket_reso_steps
        if step < 8:
            raise ConfigError(f"--bucket_reso_steps {step} is too small: use 64 (or at least 8).")
        for name in ("min_bucket_reso", "max_bucket_reso"):
            value = getattr(self, name)
            if value < step or value % step:
                raise ConfigError(
                    f"--{name} {value} is not a positive multiple of --bucket_reso_steps {step}: "
                    f"use {max(step, value // step * step)}."
                )
        if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise ConfigError(
                f"--resolution {self.resolution} lies outside the bucket sides [{self.min_bucket_reso}, "
                f"{self.max_bucket_reso}]: set --min_bucket_reso at most, --max_bucket_reso at least the resolution."
            )
        if self.resolution < step:
            raise ConfigError(
                f"--resolution {self.resolution} is smaller than --bucket_reso_steps {step}: no bucket fits; "
                f"lower --bucket_reso_steps (e.g. {max(8, self.resolution // 4)})."
            )


@dataclass
class LoraArgs:
    rank: int = field(default=4, metadata={"help": "LoRA rank r (the adapter's inner dimension)."})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha; the update is scaled by alpha/rank. Default: equal to rank."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_UNET_TARGET_MODULES),
        metadata={"help": "UNet module names that get LoRA layers.", "nargs": "+"},
    )
    train_text_encoder: bool = field(default=False, metadata={"help": "Also train LoRA layers on the text encoder."})
    init_adapter: str | None = field(
        default=None,
        metadata={"help": "Start from an existing adapter (folder) instead of fresh LoRA weights; same rank."},
    )
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TEXT_ENCODER_TARGET_MODULES),
        metadata={"help": "Text-encoder module names that get LoRA layers.", "nargs": "+"},
    )
    train_token_embeddings: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Words whose text-encoder input embeddings train beside the LoRA (pivotal tuning), for a "
            "concept word the base does not know; saved as learned_embeds.safetensors. Bare flag: none.",
            "nargs": "*",
        },
    )
    token_embedding_lr: float = field(
        default=3e-2, metadata={"help": "Learning rate of --train_token_embeddings (no weight decay)."}
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "Weight-decomposed LoRA (DoRA, Liu et al., arXiv 2402.09353, through peft): each adapted weight "
            "learns a magnitude vector beside the low-rank direction update; saved in the diffusers format."
        },
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"--rank {self.rank} is invalid: the LoRA rank must be at least 1 (typical: 4-64).")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"--lora_alpha {self.lora_alpha} is invalid: use a positive number (or leave it out).")
        if self.lora_alpha is None:
            self.lora_alpha = float(self.rank)  # resolved here so the saved config states the scale used
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout {self.lora_dropout} is invalid: use a value in [0, 1).")
        if not self.target_modules:
            raise ConfigError("--target_modules is empty: name at least one module, e.g. to_q to_k to_v to_out.0.")
        if self.token_embedding_lr <= 0:
            raise ConfigError(f"--token_embedding_lr {self.token_embedding_lr} is invalid: use a positive number.")
        if len(set(self.train_token_embeddings)) != len(self.train_token_embeddings):
            raise ConfigError(f"--train_token_embeddings {self.train_token_embeddings} names a word twice.")

    @property
    def trains_text_side(self) -> bool:
        """Whether anything before the UNet trains, so text states cannot be cached."""
        return self.train_text_encoder or bool(self.train_token_embeddings)


@dataclass
class TrainingArgs:
    num_train_epochs: int = field(default=1, metadata={"help": "Epochs over the dataset."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps."})
    train_batch_size: int = field(default=1, metadata={"help": "Batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches accumulated per step."})
    auto_micro_batch: bool = field(
        default=False,
        metadata={
            "help": "Treat train_batch_size x gradient_accumulation_steps as the batch per optimizer step and "
            "split it into the largest micro-batch that fits in memory (found by a trial step; gradient "
            "checkpointing only if a micro-batch of 1 does not fit). On a CPU the micro-batch starts at "
            "train_batch_size."
        },
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    scale_lr: bool = field(default=False, metadata={"help": "Scale lr by batch size, accumulation and processes."})
    lr_scheduler: str = field(default="constant", metadata={"help": "LR schedule.", "choices": LR_SCHEDULER_CHOICES})
    lr_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the LR schedule."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    use_8bit_adam: bool = field(default=False, metadata={"help": "Alias of --optimizer adamw8bit."})
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "adamw (torch, fused kernels on CUDA); adamw8bit (bitsandbytes); prodigy (prodigyopt, "
            "arXiv 2306.06101: estimates one step size for all parameters, so use --learning_rate 1.0; every group "
            "then takes that learning rate and --text_encoder_lr and --token_embedding_lr are not used); adafactor "
            "(transformers, with --learning_rate as a fixed step); lion (lion-pytorch, arXiv 2302.06675: sign "
            "updates, usually 3-10x smaller learning rates than AdamW). The adam_* flags apply to adamw, adamw8bit "
            "and prodigy; other settings go through --optimizer_args.",
            "choices": OPTIMIZER_CHOICES,
        },
    )
    optimizer_args: list[str] = field(
        default_factory=list,
        metadata={
            "help": "key=value pairs passed to the optimizer's constructor (numbers, true/false, none and "
            "comma-separated tuples are parsed), e.g. d_coef=0.5 betas=0.95,0.98.",
            "nargs": "*",
        },
    )
    text_encoder_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the text-encoder LoRA (default: --learning_rate)."}
    )
    use_ema: bool = field(
        default=False,
        metadata={
            "help": "Keep an exponential moving average of the trained weights (LoRA and learned embeddings, "
            "torch.optim.swa_utils); the adapter saved at the end and the validation use the average."
        },
    )
    ema_decay: float = field(
        default=0.999, metadata={"help": "EMA decay per optimizer step (it averages over about 1/(1-decay) steps)."}
    )
    ema_update_after_step: int = field(
        default=0, metadata={"help": "Until this step the average just follows the weights; it averages after."}
    )
    save_raw_weights: bool = field(
        default=False,
        metadata={"help": "With --use_ema, also save the last step's (not averaged) adapter in output_dir/raw/."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=0, metadata={"help": "Seed for data order, noise and initialisation."})
    snr_gamma: float | None = field(
        default=None, metadata={"help": "Min-SNR weighting gamma (arXiv 2303.09556); 5.0 is recommended."}
    )
    noise_offset: float = field(default=0.0, metadata={"help": "Noise offset (0.1 is typical); 0 disables it."})
    prediction_type: str | None = field(
        default=None,
        metadata={"help": "Override the scheduler's prediction type.", "choices": PREDICTION_TYPE_CHOICES},
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "no (fp32), fp16 (GPUs only), bf16, or auto: bf16 on GPUs with native bf16, fp16 on older "
            "GPUs, on CPUs fp32 or bf16 as a short start-up probe of the UNet measures (fp32 without native bf16). "
            "LoRA weights stay fp32. Default: what `accelerate launch` or its config file set.",
            "choices": MIXED_PRECISION_CHOICES,
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Trade compute for UNet memory."})
    allow_tf32: bool = field(default=False, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs."})
    cache_latents: bool = field(
        default=False, metadata={"help": "Encode images and captions once (frozen VAE/text encoder), cached on disk."}
    )
    latent_cache_dir: str | None = field(
        default=None, metadata={"help": "Where --cache_latents stores its files (default ~/.cache/lorakit/latents)."}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the UNet (faster steps after warm-up)."})
    channels_last: bool = field(default=False, metadata={"help": "UNet in channels_last memory format (GPU convs)."})
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save the full training state every N steps (output_dir/checkpoint-N)."}
    )
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep only the newest K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder to resume from."}
    )
    report_to: str = field(default="tensorboard", metadata={"help": "Tracker: tensorboard, wandb, all or none."})

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate {self.learning_rate} is invalid: use a positive value, e.g. 1e-4.")
        for name in ("num_train_epochs", "train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} is invalid: it must be at least 1.")
        for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} {value} is invalid: it must be at least 1 (or left out).")
        if self.lr_warmup_steps < 0:
            raise ConfigError("--lr_warmup_steps must be 0 or more.")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"--snr_gamma {self.snr_gamma} is invalid: use a positive value such as 5.0.")
        if self.noise_offset < 0:
            raise ConfigError("--noise_offset must be 0 or more.")
        if self.use_8bit_adam:
            if self.optimizer not in ("adamw", "adamw8bit"):
                raise ConfigError(f"--use_8bit_adam and --optimizer {self.optimizer} disagree: give only one of them.")
            self.optimizer = "adamw8bit"  # the alias, resolved so the saved config names the optimizer used
        if self.optimizer not in OPTIMIZER_CHOICES:
            raise ConfigError(
                f"--optimizer {self.optimizer!r} is unknown: choose one of {', '.join(OPTIMIZER_CHOICES)}."
            )
        parse_optimizer_args(self.optimizer_args)  # a malformed pair stops here, before anything loads
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise ConfigError(f"--text_encoder_lr {self.text_encoder_lr} is invalid: use a positive value.")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay {self.ema_decay} is invalid: use a value in (0, 1), e.g. 0.999.")
        if self.ema_update_after_step < 0:
            raise ConfigError("--ema_update_after_step must be 0 or more.")
        if self.save_raw_weights and not self.use_ema:
            raise ConfigError("--save_raw_weights keeps the raw weights beside the EMA ones: it needs --use_ema.")


@dataclass
class ValidationArgs:
    validation_prompt: list[str] = field(
        default_factory=list, metadata={"help": "Prompt(s) rendered during and after training.", "nargs": "*"}
    )
    validation_steps: int | None = field(
        default=None, metadata={"help": "Render validation images every N steps (always at the end)."}
    )
    num_validation_images: int = field(default=2, metadata={"help": "Images per prompt (one seed each)."})
    validation_seed: int = field(default=0, metadata={"help": "First seed of the validation images."})
    validation_inference_steps: int = field(default=25, metadata={"help": "Sampler steps for validation."})
    validation_guidance_scale: float = field(default=7.5, metadata={"help": "Classifier-free guidance scale."})
    validation_width: int | None = field(
        default=None, metadata={"help": "Width of the validation images (default: --resolution)."}
    )
    validation_height: int | None = field(
        default=None, metadata={"help": "Height of the validation images (default: --resolution)."}
    )

    def __post_init__(self) -> None:
        if self.num_validation_images < 1:
            raise ConfigError("--num_validation_images must be at least 1.")
        if self.validation_steps is not None and self.validation_steps < 1:
            raise ConfigError("--validation_steps must be at least 1 (or left out).")
        for name in ("validation_width", "validation_height"):
            value = getattr(self, name)
            if value is not None and value < 8:
                raise ConfigError(f"--{name} {value} is too small: use at least 8 pixels (or leave it out).")


@dataclass
class OutputArgs:
    output_dir: str = field(default="output", metadata={"help": "Where the adapter, card and logs are written."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a folder that already holds an adapter."}
    )
    logging_dir: str = field(default="logs", metadata={"help": "TensorBoard folder, relative to output_dir."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push adapter and card to the Hub at the end."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repo id; default: the output folder's name in your namespace."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})
    hub_push_checkpoints: bool = field(
        default=False, metadata={"help": "Also push each checkpoint, to a branch (never to main)."}
    )
    export_kohya: bool = field(
        default=False, metadata={"help": "Also write the adapter in kohya/webui format (A1111, ComfyUI)."}
    )
    push_only: bool = field(
        default=False, metadata={"help": "Do not train: push an existing output_dir (retry after a failed push)."}
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraArgs,
    "training": TrainingArgs,
    "validation": ValidationArgs,
    "output": OutputArgs,
}


@dataclass
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    lora: LoraArgs
    training: TrainingArgs
    validation: ValidationArgs
    output: OutputArgs
    config_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict by section (what `training_config.yaml` holds)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def flat_scalars(self) -> dict[str, Any]:
        """Hyper-parameters TensorBoard can show: `section/key` -> scalar or string."""
        return {
            f"{section}/{key}": value
            for section, values in self.to_dict().items()
            for key, value in values.items()
            if isinstance(value, (int, float, str, bool))
        }


def _field_owner() -> dict[str, str]:
    owners = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            owners[f.name] = section
    return owners


def _add_field_argument(parser: argparse.ArgumentParser, f: dataclasses.Field, hint: Any) -> None:
    help_text = f.metadata.get("help", "")
    flag = f"--{f.name}"
    if hint is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text, default=argparse.SUPPRESS)
        return
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]
    kwargs: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, "type": base}
    if "nargs" in f.metadata:
        kwargs["nargs"] = f.metadata["nargs"]
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one flag per dataclass field, grouped by section."""
    parser = argparse.ArgumentParser(
        description="Train a LoRA adapter for a Stable-Diffusion-architecture model (one epoch by default).",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML file of settings (flat or by section); flags win. Default without a model: {SHAPES_PRESET.name}",
    )
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field_argument(group, f, hints[f.name])
    return parser


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config, flat or nested by section, into a flat {field: value} dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Presets live in {shown_path(REPO_ROOT)}/configs/.")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of settings, not {type(raw).__name__}.")
    owners = _field_owner()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(owners))
    if unknown:
        raise ConfigError(f"Config file {path} has unknown settings {unknown}; see `train_lora.py --help`.")
    return flat


def _resolve_paths(flat: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative local paths in a preset are relative to the repository root, not the caller's cwd."""
    for key in ("pretrained_model_name_or_path", "train_data_dir"):
        value = flat.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            flat[key] = shown_path((base / value).resolve())
    return flat


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse flags (and `--config`) into a validated `TrainConfig`. Raises ConfigError on bad values."""
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    config_file = namespace.pop("config")
    if config_file is None and "pretrained_model_name_or_path" not in namespace and SHAPES_PRESET.is_file():
        config_file = str(SHAPES_PRESET)
    layers = [_resolve_paths(load_yaml_config(config_file), REPO_ROOT)] if config_file is not None else []
    values: dict[str, Any] = {}
    for layer in [*layers, namespace]:
        values.update(layer)
        if layer.get("dataset_name") and "train_data_dir" not in layer:
            values["train_data_dir"] = None  # a dataset named in a later layer replaces an earlier folder
        if layer.get("train_data_dir") and "dataset_name" not in layer:
            values["dataset_name"] = None  # and a folder named in a later layer replaces an earlier Hub dataset
    owners = _field_owner()
    per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        per_section[owners[key]][key] = value
    sections = {name: SECTIONS[name](**kwargs) for name, kwargs in per_section.items()}
    return TrainConfig(**sections, config_file=config_file)
