#!/usr/bin/env python
"""Train a LoRA adapter for a Stable-Diffusion-architecture model, one epoch by default.

    accelerate launch --config_file accelerate_config.yaml train_lora.py [--config FILE] [--flag value ...]

With no arguments it trains the embedded shapes world's adapter concept (configs/shapes.yaml), offline, on a
CPU. Each step below is a named function in `lorakit`; this file reads top to bottom.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from lorakit import checkpoint as ckpt
from lorakit import latent_cache, outputs
from lorakit.buckets import BucketBatchSampler
from lorakit.captions import CaptionOptions, count_truncated, trigger_word
from lorakit.card import resolve_license, write_model_card
from lorakit.config import ConfigError, TrainConfig, parse_args
from lorakit.data import (
    CaptionedImageDataset,
    DataError,
    TrainingData,
    check_resolution,
    collate_examples,
    prepare_dataset,
)
from lorakit.ema import TrainedWeightsEMA
from lorakit.fast_exit import exit_now
from lorakit.filenames import ADAPTER_FILE, LEARNED_EMBEDS_FILE, RAW_WEIGHTS_DIR
from lorakit.hub import PushError, push_adapter
from lorakit.kohya import export_kohya
from lorakit.lora import check_dora_loadable
from lorakit.micro_batch import BatchLayout, choose_layout
from lorakit.optimizers import check_optimizer, describe_groups, make_optimizer, param_groups
from lorakit.params import count_parameters
from lorakit.precision import (
    PrecisionChoice,
    check_precision_fits,
    choose_precision,
    process_state,
    requested_choice,
)
from lorakit.run_state import (
    StopRequest,
    TrainingDivergedError,
    TrainState,
    check_finite,
    current_fingerprint,
    resume_if_asked,
    save_training_state,
    stop_requested,
)
from lorakit.summary import TrainSummary, write_summary
from lorakit.timing import NULL_TIMER, PhaseTimer, WallClock, timed_batches
from lorakit.token_embeddings import (
    TokenEmbeddingOffsets,
    apply_learned_embeds,
    read_learned_embeds,
    save_learned_embeds,
    word_token_ids,
)
from lorakit.training import (
    Models,
    apply_speed_options,
    attach_lora,
    attach_token_offsets,
    load_models,
    load_tokenizer,
    make_lr_scheduler,
    scaled_learning_rate,
    step_generator,
    total_train_steps,
    training_loss,
    vae_scale_factor_from_config,
    weight_dtype_for,
)
from lorakit.validation import run_validation
from lorakit.validation_loss import HeldOutLoss

logger = logging.getLogger("train_lora")


@dataclass
class RunResult:
    """What `train` hands back to callers (tests, bench): the folder and the trained modules."""

    output_dir: Path
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    state: TrainState
    latent_cache: dict | None = None


def preflight(cfg: TrainConfig) -> None:
    """Checks that need no weights: output folder, optional packages, resolution against the VAE factor."""
    outputs.check_output_dir(cfg)
    check_optimizer(cfg.training)  # a missing optimizer package or a bad --optimizer_args stops here
    if cfg.lora.use_dora:
        check_dora_loadable(cfg.lora.train_text_encoder)
    vae_factor = vae_scale_factor_from_config(cfg.model)
    check_resolution(cfg.data.resolution, vae_factor)
    check_data_options(cfg, vae_factor)
    if cfg.lora.init_adapter and not (Path(cfg.lora.init_adapter) / ADAPTER_FILE).is_file():
        raise ConfigError(
            f"--init_adapter {cfg.lora.init_adapter} has no {ADAPTER_FILE}: point it at a finished run folder."
        )
    if cfg.lora.train_token_embeddings:
        word_token_ids(load_tokenizer(cfg.model), cfg.lora.train_token_embeddings)
    if cfg.training.mixed_precision == "fp16":  # the device accelerate will use, known before any data is read
        check_precision_fits("fp16", process_state().device.type, requested_choice("fp16").reason)


def check_data_options(cfg: TrainConfig, vae_factor: int) -> None:
    """Bucket and validation sizes the VAE can divide; caption flags the latent cache can honour."""
    if cfg.data.enable_bucket and cfg.data.bucket_reso_steps % vae_factor:
        step = cfg.data.bucket_reso_steps
        raise ConfigError(
            f"--bucket_reso_steps {step} is not a multiple of the VAE factor {vae_factor}: use "
            f"{max(vae_factor, step // vae_factor * vae_factor)} or {(step // vae_factor + 1) * vae_factor}."
        )
    for name in ("validation_width", "validation_height"):
        value = getattr(cfg.validation, name)
        if value is not None and value % vae_factor:
            raise ConfigError(f"--{name} {value} is not a multiple of the VAE factor {vae_factor}.")
    if cfg.data.shuffle_caption and cfg.training.cache_latents:
        raise ConfigError(
            "--shuffle_caption with --cache_latents: the cache encodes each caption once, so every epoch would see "
            "the same order. Drop one of the two."
        )


def report_data(accelerator: Accelerator, data: TrainingData) -> None:
    """What the folder scan found and how the samples fall into buckets, before anything slow starts."""
    if data.source is not None:
        source = data.source
        accelerator.print(
            f"Read {source['images']} images with caption files ({source['rows']} samples per epoch with repeats); "
            f"{source['folder_captions']} captioned by their repeat folder's name, {source['skipped_files']} "
            "non-image file(s) skipped."
        )
        if source["orphan_captions"]:
            logger.warning(
                "%d caption file(s) have no image beside them and were ignored (an image renamed or deleted?).",
                source["orphan_captions"],
            )
    if data.bucket_histogram is not None:
        shown = ", ".join(f"{size}: {count}" for size, count in data.bucket_histogram.items())
        accelerator.print(f"Buckets (width x height: samples): {shown}.")


def check_processes(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Learned word embeddings are trained outside the modules accelerate syncs across processes."""
    if cfg.lora.train_token_embeddings and accelerator.num_processes > 1:
        raise ConfigError(
            f"--train_token_embeddings runs on one process, not {accelerator.num_processes}: launch with "
            "--num_processes 1, or drop the flag."
        )


def make_accelerator(cfg: TrainConfig, mixed_precision: str | None) -> Accelerator:
    """Precision, accumulation and trackers; mixed precision (resolved when `auto`) left to accelerate when None."""
    output_dir = Path(cfg.output.output_dir)
    return Accelerator(
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if cfg.training.report_to == "none" else cfg.training.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / cfg.output.logging_dir)
        ),
        # A seedable sampler makes the shuffled order a function of (seed, epoch): resume can skip batches exactly.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.training.seed),
    )


def accelerator_in_precision(cfg: TrainConfig) -> tuple[Accelerator, PrecisionChoice]:
    """The Accelerator built in the run's precision (`auto` decided first), and how that precision was chosen."""
    choice = choose_precision(cfg, process_state())
    accelerator = make_accelerator(cfg, choice.mixed_precision)
    # accelerate may have taken its precision from the launch line or its config file: check what it uses.
    check_precision_fits(accelerator.mixed_precision, accelerator.device.type, choice.reason)
    accelerator.print(f"Mixed precision {accelerator.mixed_precision} ({choice.reason}).")
    return accelerator, PrecisionChoice(accelerator.mixed_precision, choice.reason)


def make_dataloader(
    cfg: TrainConfig,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    bucket_sampler: BucketBatchSampler | None = None,
) -> torch.utils.data.DataLoader:
    """Micro-batches of `batch_size` (or the bucket sampler's); workers decode and resize off the main process;
    pinned memory speeds copies."""
    workers = cfg.data.dataloader_num_workers
    batching = {"batch_sampler": bucket_sampler} if bucket_sampler else {"batch_size": batch_size, "shuffle": True}
    return torch.utils.data.DataLoader(
        dataset,
        **batching,
        collate_fn=collate_examples,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.data.persistent_workers and workers > 0,
        prefetch_factor=cfg.data.dataloader_prefetch_factor if workers > 0 else None,
    )


def train(cfg: TrainConfig, argv: list[str] | None = None, timer: PhaseTimer | None = None) -> RunResult:
    """The whole run: checks, data, models, LoRA, loop, outputs. `timer` (bench) splits each step's time."""
    clock = WallClock.now()
    timer = timer or NULL_TIMER
    command = outputs.launch_command(argv)
    preflight(cfg)
    data = prepare_dataset(cfg.data, cfg.training.seed)
    accelerator, precision = accelerator_in_precision(cfg)  # `auto` may probe the UNet: after the data checks
    report_data(accelerator, data)
    check_processes(cfg, accelerator)
    set_seed(cfg.training.seed)
    stop = StopRequest()
    try:
        run = set_up(cfg, accelerator, data)
        state = resume_if_asked(cfg, accelerator, run.fingerprint, run.layout.gradient_accumulation_steps)
        if accelerator.is_main_process:
            accelerator.init_trackers("lora", config=cfg.flat_scalars())
            outputs.write_training_config(cfg.output.output_dir, cfg)
        accelerator.print(
            f"{len(data.rows)} samples, {run.total_steps} steps, {run.lora_parameters:,} LoRA parameters, "
            f"precision {accelerator.mixed_precision}, {accelerator.num_processes} process(es)."
        )
        accelerator.print(run.layout.describe())
        clock.loop_started = time.time()
        train_loop(cfg, accelerator, run, state, stop, timer, command)
        clock.loop_ended = time.time()
        out = write_outputs(cfg, accelerator, run, state, data, clock, command, precision)
        accelerator.end_training()
        publish(cfg, accelerator, out)
        unwrap = accelerator.unwrap_model
        return RunResult(out, unwrap(run.unet), unwrap(run.text_encoder), state, run.latent_cache)
    finally:
        stop.restore()


@dataclass
class Run:
    """Everything the loop needs, prepared by accelerate."""

    models: Models
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    trained: list[torch.nn.Module]
    params: list[torch.nn.Parameter]
    token_offsets: TokenEmbeddingOffsets | None
    inherited_words: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader
    train_data: torch.utils.data.Dataset
    num_batches: int
    total_steps: int
    fingerprint: dict
    lora_parameters: int
    layout: BatchLayout
    latent_cache: dict | None = None
    bucket_sampler: BucketBatchSampler | None = None
    truncated_captions: int | None = None
    ema: TrainedWeightsEMA | None = None
    held_out: HeldOutLoss | None = None

    def averaged_weights(self):
        """Within the block the trained weights are the EMA's (validation), when the run keeps one."""
        return self.ema.averaged_weights() if self.ema is not None else nullcontext()


def set_up(cfg: TrainConfig, accelerator: Accelerator, data: TrainingData) -> Run:
    """Load the base, attach LoRA, build data, optimizer and schedule, and hand them to accelerate."""
    models = load_models(cfg.model, cfg.training.prediction_type)
    params = attach_lora(models, cfg.lora, weight_dtype_for(accelerator), accelerator.device)
    if cfg.lora.init_adapter:
        text_encoder = models.text_encoder if cfg.lora.train_text_encoder else None
        ckpt.load_lora_into(cfg.lora.init_adapter, models.unet, text_encoder)
    inherited_words = inherit_learned_words(cfg.lora.init_adapter, models)
    token_offsets = attach_token_offsets(models, cfg.lora)
    trainable = params + ([token_offsets.offsets] if token_offsets is not None else [])
    # Before the speed options: the trial steps must not trigger torch.compile (once per shape tried).
    layout = choose_layout(cfg, accelerator, models, trainable)
    accelerator.gradient_accumulation_steps = layout.gradient_accumulation_steps  # made before the layout was known
    apply_speed_options(cfg, models)
    captions = CaptionOptions.from_config(cfg.data)
    train_data = CaptionedImageDataset(
        data.rows,
        data.image_column,
        data.caption_column,
        models.tokenizer,
        cfg.data.resolution,
        cfg.data.center_crop,
        cfg.data.random_flip,
        cfg.training.seed,
        captions=captions,
        sizes=data.buckets,
    )
    truncated = report_truncated(accelerator, data, models.tokenizer, captions.prefix)
    latent_cache_info = None
    if cfg.training.cache_latents:
        with accelerator.main_process_first():
            train_data, path, hit = latent_cache.cached_dataset(
                models, train_data, cfg, data.fingerprint, accelerator.is_main_process
            )
        latent_cache_info = {"path": str(path), "hit": hit}
        accelerator.print(f"Latent cache {'reused' if hit else 'written'}: {path}")
    bucket_sampler = None
    if data.buckets is not None:
        bucket_sampler = BucketBatchSampler(
            data.buckets, layout.micro_batch_size, cfg.training.seed, accelerator.num_processes
        )
    dataloader = make_dataloader(cfg, train_data, layout.micro_batch_size, bucket_sampler)
    learning_rate = scaled_learning_rate(cfg, accelerator.num_processes)
    text_encoder_trained = models.text_encoder if cfg.lora.train_text_encoder else None
    groups = param_groups(cfg.training, cfg.lora, learning_rate, models.unet, text_encoder_trained, token_offsets)
    optimizer = make_optimizer(cfg.training, groups)
    accelerator.print(describe_groups(optimizer, cfg.training))
    num_batches = math.ceil(len(dataloader) / accelerator.num_processes)
    _, total_steps = total_train_steps(num_batches, cfg.training, layout.gradient_accumulation_steps)
    lr_scheduler = make_lr_scheduler(optimizer, cfg.training, total_steps, accelerator.num_processes)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(models.unet, optimizer, dataloader, lr_scheduler)
    text_encoder = accelerator.prepare(models.text_encoder) if cfg.lora.train_text_encoder else models.text_encoder
    trained = [unet] + ([text_encoder] if cfg.lora.train_text_encoder else [])
    ckpt.register_lora_hooks(accelerator, unet, text_encoder if cfg.lora.train_text_encoder else None, token_offsets)
    fingerprint = current_fingerprint(cfg, data.fingerprint, accelerator.num_processes, data.held_out_fingerprint)
    if bucket_sampler is not None:  # bucket batches are drawn at the micro-batch size: another split, other batches
        fingerprint["bucket_batch_size"] = layout.micro_batch_size
    ema = None
    if cfg.training.use_ema:
        ema = TrainedWeightsEMA(trainable, cfg.training.ema_decay, cfg.training.ema_update_after_step)
        accelerator.register_for_checkpointing(ema)  # saved and restored with every checkpoint
    held_out = None
    if data.held_out is not None and accelerator.is_main_process:
        held_out = HeldOutLoss.prepare(
            models, data.held_out, data.image_column, data.caption_column, cfg, accelerator.device
        )
        accelerator.print(f"Held-out loss on {len(held_out)} rows that are never trained on.")
    return Run(
        models=models,
        unet=unet,
        text_encoder=text_encoder,
        trained=trained,
        params=trainable,
        token_offsets=token_offsets,
        inherited_words=inherited_words,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataloader=dataloader,
        train_data=train_data,
        num_batches=num_batches,
        total_steps=total_steps,
        fingerprint=fingerprint,
        lora_parameters=count_parameters(accelerator.unwrap_model(unet), trainable_only=True),
        layout=layout,
        latent_cache=latent_cache_info,
        bucket_sampler=bucket_sampler,
        truncated_captions=truncated,
        ema=ema,
        held_out=held_out,
    )


def report_truncated(accelerator: Accelerator, data: TrainingData, tokenizer, prefix: str) -> int:
    """Captions longer than the text encoder reads are cut (as always); say how many, with one example."""
    captions = [c if isinstance(c, str) else str(c) for c in data.rows[data.caption_column]]
    count, example = count_truncated(captions, tokenizer, prefix)
    if count:
        accelerator.print(
            f"{count} caption(s) are longer than the tokenizer's {tokenizer.model_max_length} tokens and are "
            f"truncated, e.g. {example[:200]!r}."
        )
    return count


def inherit_learned_words(init_adapter: str | None, models: Models) -> dict[str, torch.Tensor]:
    """Words an `--init_adapter` run learned, written into this run's text encoder (and saved with its output):
    its LoRA was trained with them, and would not know its concept word without them."""
    path = Path(init_adapter) / LEARNED_EMBEDS_FILE if init_adapter else None
    if path is None or not path.is_file():
        return {}
    words = read_learned_embeds(path)
    apply_learned_embeds(models.text_encoder, models.tokenizer, words)
    return words


def train_loop(
    cfg: TrainConfig, accelerator: Accelerator, run: Run, state: TrainState, stop: StopRequest, timer, command: str
) -> None:
    """Epochs of optimizer steps until the step budget or the epoch count is reached; resumes at the exact sample."""
    progress = tqdm(
        range(run.total_steps),
        initial=state.global_step,
        desc="train",
        unit="step",
        disable=not accelerator.is_local_main_process,
    )
    while state.global_step < run.total_steps and state.epoch < cfg.training.num_train_epochs:
        train_epoch(cfg, accelerator, run, state, stop, timer, command, progress)
    progress.close()


def train_epoch(
    cfg: TrainConfig,
    accelerator: Accelerator,
    run: Run,
    state: TrainState,
    stop: StopRequest,
    timer,
    command: str,
    progress,
) -> None:
    """The rest of the current epoch (all of it unless resumed mid-epoch); returns early at the last step."""
    run.train_data.set_epoch(state.epoch)
    run.dataloader.set_epoch(state.epoch)
    if run.bucket_sampler is not None:  # under several processes accelerate's shard hides it from set_epoch
        run.bucket_sampler.set_epoch(state.epoch)
    loader = run.dataloader
    if state.batches_in_epoch:
        loader = accelerator.skip_first_batches(run.dataloader, state.batches_in_epoch)
    micro_losses: list[float] = []
    for batch in timed_batches(loader, timer):
        position = state.epoch * run.num_batches + state.batches_in_epoch
        generator = step_generator(cfg.training.seed, position, accelerator.process_index, accelerator.device)
        with accelerator.accumulate(*run.trained):
            loss = training_loss(run.models, run.unet, run.text_encoder, batch, cfg.training, generator, timer)
            with timer.phase("unet_forward_backward"):
                accelerator.backward(loss)
            with timer.phase("optimizer_step"):
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(run.params, cfg.training.max_grad_norm)
                run.optimizer.step()
                run.lr_scheduler.step()
                run.optimizer.zero_grad(set_to_none=True)
        state.batches_in_epoch += 1
        micro_losses.append(accelerator.gather(loss.detach().float().reshape(1)).mean().item())
        if not accelerator.sync_gradients:
            continue
        # The step's loss is the mean over its micro-batches (and processes), as the gradient is.
        timer.steps += 1
        step_loss, micro_losses = sum(micro_losses) / len(micro_losses), []
        after_optimizer_step(cfg, accelerator, run, state, step_loss, progress)
        if stop_requested(accelerator, stop):
            stop_and_exit(cfg, accelerator, run, state, stop, command)
        if state.global_step >= run.total_steps:
            return
    state.epoch, state.batches_in_epoch, state.steps_in_epoch = state.epoch + 1, 0, 0


def after_optimizer_step(
    cfg, accelerator: Accelerator, run: Run, state: TrainState, step_loss: float, progress
) -> None:
    """Record, log, check, checkpoint and validate after each optimizer step."""
    state.global_step += 1
    state.steps_in_epoch += 1
    learning_rate = run.lr_scheduler.get_last_lr()[0]
    state.loss_history.append({"step": state.global_step, "loss": step_loss, "lr": learning_rate})
    check_finite(step_loss, state, cfg, accelerator.mixed_precision)
    accelerator.log({"train/loss": step_loss, "train/lr": learning_rate}, step=state.global_step)
    progress.update(1)
    progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{learning_rate:.2e}")
    if run.ema is not None:
        run.ema.update(state.global_step)
    validate_now = bool(cfg.validation.validation_steps) and state.global_step % cfg.validation.validation_steps == 0
    if validate_now and run.held_out is not None:
        with run.averaged_weights():  # before the checkpoint of this step, which stores the value
            measure_held_out_loss(accelerator, run, state)
    if cfg.training.checkpointing_steps and state.global_step % cfg.training.checkpointing_steps == 0:
        save_training_state(cfg, accelerator, state, run.fingerprint)
    # The last step's grid is the final one, which write_outputs renders: drawing it here too would cost as much again.
    if validate_now and accelerator.is_main_process and state.global_step < run.total_steps:
        with run.averaged_weights():
            run_validation(cfg, accelerator, run.models, run.unet, run.text_encoder, state.global_step, final=False)


def measure_held_out_loss(accelerator: Accelerator, run: Run, state: TrainState) -> float:
    """The held-out loss of the weights now in the modules, recorded and logged at this step (main process)."""
    unwrap = accelerator.unwrap_model
    value = run.held_out.compute(
        unwrap(run.unet), unwrap(run.text_encoder), run.layout.micro_batch_size, accelerator.autocast
    )
    state.validation_history.append({"step": state.global_step, "loss": value})
    accelerator.log({"validation/loss": value}, step=state.global_step)
    return value


def stop_and_exit(
    cfg: TrainConfig, accelerator: Accelerator, run: Run, state: TrainState, stop: StopRequest, command: str
) -> None:
    """Pre-emption or Ctrl-C: checkpoint at this step and say how to resume."""
    where = save_training_state(cfg, accelerator, state, run.fingerprint)
    accelerator.print(
        f"Stopped by {stop.signal_name} after step {state.global_step}; saved {where}. Resume with:\n  "
        f"{command} --resume_from_checkpoint latest"
    )
    accelerator.end_training()
    raise SystemExit(128 + signal.Signals[stop.signal_name or "SIGTERM"].value)


def write_outputs(
    cfg: TrainConfig,
    accelerator: Accelerator,
    run: Run,
    state: TrainState,
    data: TrainingData,
    clock: WallClock,
    command: str,
    precision: PrecisionChoice,
) -> Path:
    """Save the adapter and everything the card, docs and Hub need (main process), each file atomically."""
    out = Path(cfg.output.output_dir)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out
    if run.ema is not None:
        if cfg.training.save_raw_weights:
            save_adapter_folder(cfg, accelerator, run, out / RAW_WEIGHTS_DIR)
        run.ema.copy_to_params()  # from here on the modules hold the average: the adapter, validation, held-out loss
    adapter = save_adapter_folder(cfg, accelerator, run, out)
    step = state.global_step
    validation = run_validation(cfg, accelerator, run.models, run.unet, run.text_encoder, step, final=True)
    last_measured = state.validation_history[-1]["step"] if state.validation_history else None
    if run.held_out is not None and last_measured != step:
        measure_held_out_loss(accelerator, run, state)
    outputs.write_loss_history(out, state.loss_history, state.validation_history)
    outputs.plot_loss_curve(out, state.loss_history, state.validation_history)
    finished = time.time()
    summary = TrainSummary(
        base_model=cfg.model.pretrained_model_name_or_path,
        dataset=cfg.data.dataset_name or cfg.data.train_data_dir,
        num_samples=len(data.rows),
        global_step=state.global_step,
        num_train_epochs=cfg.training.num_train_epochs,
        lora_trainable_parameters=run.lora_parameters,
        adapter_file_bytes=adapter.stat().st_size,
        train_seconds=round(finished - clock.train_started, 2),  # validation included, as the card says
        final_loss=state.loss_history[-1]["loss"] if state.loss_history else None,
        command=command,
        mixed_precision=accelerator.mixed_precision,
        precision_choice=precision.reason,
        num_processes=accelerator.num_processes,
        micro_batch_size=run.layout.micro_batch_size,
        gradient_accumulation_steps=run.layout.gradient_accumulation_steps,
        gradient_checkpointing=run.layout.gradient_checkpointing,
        auto_micro_batch=run.layout.auto,
        learned_words=list(cfg.lora.train_token_embeddings),
        validation=validation,
        instance_prompt=trigger_word(cfg.data.caption_prefix),
        license=resolve_license(cfg.model.pretrained_model_name_or_path, None)[0],
        data_source=data.source,
        bucket_histogram=data.bucket_histogram,
        truncated_captions=run.truncated_captions,
        validation_loss=state.validation_history[-1]["loss"] if run.held_out is not None else None,
        validation_rows=len(run.held_out) if run.held_out is not None else None,
        optimizer=cfg.training.optimizer,
        ema_decay=cfg.training.ema_decay if run.ema is not None else None,
        wall_split=clock.split(finished),
    )
    write_summary(out, summary)
    write_model_card(out)
    if cfg.output.export_kohya:
        # The captions give the kohya file its tag frequencies (galleries show them).
        export_kohya(out, captions=data.rows[data.caption_column])
    outputs.clean_temporary_files(out)
    accelerator.print(f"Saved {adapter} ({adapter.stat().st_size:,} bytes) and its model card in {out}.")
    return out


def save_adapter_folder(cfg: TrainConfig, accelerator: Accelerator, run: Run, folder: Path) -> Path:
    """The LoRA file and the learned words (this run's and any inherited) of the weights now in the modules."""
    text_encoder_to_save = accelerator.unwrap_model(run.text_encoder) if cfg.lora.train_text_encoder else None
    adapter = outputs.save_adapter_atomic(folder, accelerator.unwrap_model(run.unet), text_encoder_to_save)
    learned = dict(run.inherited_words)
    if run.token_offsets is not None:
        learned.update(zip(run.token_offsets.words, run.token_offsets.rows(), strict=True))
    if learned:
        save_learned_embeds(folder, list(learned), torch.stack(list(learned.values())))
    return adapter


def publish(cfg: TrainConfig, accelerator: Accelerator, out: Path) -> None:
    """Push the finished output folder to the Hub when asked (main process; the local output is already complete)."""
    if cfg.output.push_to_hub and accelerator.is_main_process:
        accelerator.print(f"Pushed to {push_adapter(out, cfg.output.hub_model_id, cfg.output.hub_private)}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry: bad input exits 2 with one clear message, before any model is loaded."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        cfg = parse_args(argv)
        if cfg.output.push_only:
            print(f"Pushed to {push_adapter(cfg.output.output_dir, cfg.output.hub_model_id, cfg.output.hub_private)}")
        else:
            train(cfg, argv)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDivergedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except PushError as error:  # the local output is complete; the message says how to retry the push
        print(f"error: {error}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    exit_now(main())
