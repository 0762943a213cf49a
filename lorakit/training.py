"""The pieces of one training run: models, LoRA attachment, optimizer, the diffusion loss and step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from transformers import CLIPTextModel, CLIPTokenizer

from lorakit.config import ConfigError, LoraArgs, ModelConfig, TrainConfig, TrainingArgs
from lorakit.lora import make_lora_config
from lorakit.timing import NULL_TIMER, PhaseTimer
from lorakit.token_embeddings import TokenEmbeddingOffsets, word_token_ids

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Models:
    """The frozen base pipeline parts plus the trainable LoRA layers attached to them."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def vae_scale_factor_from_config(model_cfg: ModelConfig) -> int:
    """Read only the VAE's config (cheap, no weights) to get its downsampling factor."""
    try:
        vae_config = AutoencoderKL.load_config(
            model_cfg.pretrained_model_name_or_path, subfolder="vae", revision=model_cfg.revision
        )
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"Cannot read the base model '{model_cfg.pretrained_model_name_or_path}' (vae/config.json): {error}. "
            "Give a local diffusers folder or a Hub id you can reach."
        ) from error
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    """Frozen weights follow the accelerator's actual precision, however it was set."""
    return WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)


def load_tokenizer(model_cfg: ModelConfig) -> CLIPTokenizer:
    """The base's tokenizer alone (cheap: no weights), for checks before any model loads."""
    return CLIPTokenizer.from_pretrained(
        model_cfg.pretrained_model_name_or_path, subfolder="tokenizer", revision=model_cfg.revision
    )


def load_models(model_cfg: ModelConfig, prediction_type: str | None = None) -> Models:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler (safetensors only)."""
    source = model_cfg.pretrained_model_name_or_path
    common: dict[str, Any] = {"revision": model_cfg.revision}
    weights: dict[str, Any] = {**common, "variant": model_cfg.variant, "use_safetensors": True}
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    return Models(
        tokenizer=load_tokenizer(model_cfg),
        text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **weights),
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **weights),
        noise_scheduler=noise_scheduler,
    )


def attach_lora(
    models: Models, lora: LoraArgs, weight_dtype: torch.dtype, device: torch.device
) -> list[torch.nn.Parameter]:
    """Freeze the base, move it to `weight_dtype`, add LoRA layers, keep them fp32; return trainable params."""
    for module in (models.unet, models.vae, models.text_encoder):
        module.requires_grad_(False)
    for module in (models.unet, models.vae, models.text_encoder):
        module.to(device) if weight_dtype == torch.float32 else module.to(device, dtype=weight_dtype)
    dora = {"use_dora": lora.use_dora}
    add_adapter(
        models.unet, make_lora_config(lora.rank, lora.lora_alpha, lora.lora_dropout, lora.target_modules, **dora)
    )
    trainable_modules = [models.unet]
    if lora.train_text_encoder:
        config = make_lora_config(
            lora.rank, lora.lora_alpha, lora.lora_dropout, lora.text_encoder_target_modules, **dora
        )
        add_adapter(models.text_encoder, config)
        trainable_modules.append(models.text_encoder)
    # LoRA weights stay fp32 under fp16/bf16: low-precision optimizer updates underflow (diffusers #6086).
    cast_training_params(trainable_modules, dtype=torch.float32)
    return [p for module in trainable_modules for p in module.parameters() if p.requires_grad]


def add_adapter(module: torch.nn.Module, config) -> None:
    """`module.add_adapter(config)`; a layer peft cannot give a DoRA adapter is named in a ConfigError."""
    try:
        module.add_adapter(config)
    except (ValueError, TypeError, NotImplementedError) as error:
        if not getattr(config, "use_dora", False):
            raise
        raise ConfigError(
            f"DoRA cannot adapt this {type(module).__name__}'s target modules with the installed peft: {error}. "
            "Drop --use_dora or choose other --target_modules."
        ) from error


def attach_token_offsets(models: Models, lora: LoraArgs) -> TokenEmbeddingOffsets | None:
    """Trainable input-embedding offsets for `--train_token_embeddings` words (None when none are named)."""
    if not lora.train_token_embeddings:
        return None
    token_ids = word_token_ids(models.tokenizer, lora.train_token_embeddings)
    return TokenEmbeddingOffsets(models.text_encoder.get_input_embeddings(), lora.train_token_embeddings, token_ids)


def scaled_learning_rate(cfg: TrainConfig, num_processes: int) -> float:
    """The diffusers `--scale_lr` rule: lr x batch x accumulation x processes."""
    t = cfg.training
    if not t.scale_lr:
        return t.learning_rate
    return t.learning_rate * t.train_batch_size * t.gradient_accumulation_steps * num_processes


def total_train_steps(num_batches: int, training: TrainingArgs, accumulation_steps: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) for `num_batches` micro-batches per epoch per process.

    `accumulation_steps` is the run's (--auto_micro_batch may choose another split than the flags): for any split
    of the same effective batch E, ceil(ceil(N / micro) / accumulation) = ceil(N / E), so the count is the same.
    """
    per_epoch = math.ceil(num_batches / accumulation_steps)
    total = per_epoch * training.num_train_epochs
    if training.max_train_steps is not None:
        total = min(total, training.max_train_steps)
    return per_epoch, total


def make_lr_scheduler(optimizer: torch.optim.Optimizer, training: TrainingArgs, total_steps: int, num_processes: int):
    """The LR schedule; accelerate steps it once per process, hence the scaling (as the diffusers example)."""
    return get_scheduler(
        training.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=training.lr_warmup_steps * num_processes,
        num_training_steps=total_steps * num_processes,
    )


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR weighting (Hang et al., arXiv 2303.09556, eq. 11 and its v form).

    Epsilon prediction: min(SNR, gamma) / SNR. v-prediction: min(SNR, gamma) / (SNR + 1), because the v loss
    already carries a factor SNR + 1 relative to the epsilon loss.
    """
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE between prediction and target, optionally min-SNR weighted per sample."""
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


def diffusion_target(
    noise_scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon) or the velocity (v)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ConfigError(f"Unsupported prediction type {prediction_type!r}: use epsilon or v_prediction.")


def step_generator(seed: int, global_step: int, process_index: int, device: torch.device) -> torch.Generator:
    """Noise and timesteps for step k come from (seed, k, process) alone, so a resumed run draws the same."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + global_step * 1_009 + process_index) % (2**63))
    return generator


def encode_latents(vae: AutoencoderKL, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sample the VAE posterior and scale to the UNet's latent space (vae.config.scaling_factor)."""
    posterior = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    return scale_latents(vae, posterior.sample(generator=generator))


def scale_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Shift and scale raw VAE latents into the UNet's latent space."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def batch_latents(models: Models, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """Latents of a batch: from cached posterior moments when present, else by running the VAE.

    Both draw the posterior sample with the same generator call, so cached and uncached runs match.
    """
    if "latent_moments" in batch:
        moments = batch["latent_moments"].to(models.vae.device)
        return scale_latents(models.vae, DiagonalGaussianDistribution(moments).sample(generator=generator))
    with torch.no_grad():
        return encode_latents(models.vae, batch["pixel_values"], generator)


def batch_text_embeddings(text_encoder: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Encoder hidden states: cached when the text encoder is frozen and the cache is on, else computed."""
    if "encoder_hidden_states" in batch:
        return batch["encoder_hidden_states"]
    return text_encoder(batch["input_ids"], return_dict=False)[0]


def training_loss(
    models: Models,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    training: TrainingArgs,
    generator: torch.Generator,
    timer: PhaseTimer = NULL_TIMER,
) -> torch.Tensor:
    """One forward pass: encode, add noise at random timesteps, predict, compare."""
    with timer.phase("vae_encoding"):
        latents = batch_latents(models, batch, generator).float()
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    if training.noise_offset:
        # Offset noise lets the model learn very dark/bright images (crosslabs.org/blog/diffusion-with-offset-noise).
        noise += training.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), generator=generator, device=latents.device
        )
    num_timesteps = models.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=latents.device)
    noisy_latents = models.noise_scheduler.add_noise(latents, noise, timesteps)
    with timer.phase("text_encoding"):
        encoder_hidden_states = batch_text_embeddings(text_encoder, batch)
    with timer.phase("unet_forward_backward"):
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    target = diffusion_target(models.noise_scheduler, latents, noise, timesteps)
    return diffusion_loss(model_pred, target, timesteps, models.noise_scheduler, training.snr_gamma)


def apply_speed_options(cfg: TrainConfig, models: Models) -> None:
    """Memory/speed levers, each behind its flag (measured by `python -m bench train`)."""
    if cfg.training.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    if cfg.training.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.training.channels_last:
        models.unet.to(memory_format=torch.channels_last)
    if cfg.training.compile:
        models.unet.compile()  # in place: parameter names and saved keys stay those of the plain module
