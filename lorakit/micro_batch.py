"""The batch layout of a run: micro-batch, accumulation steps and gradient checkpointing (`--auto_micro_batch`).

With `--auto_micro_batch`, `--train_batch_size` x `--gradient_accumulation_steps` is the effective batch of one
optimizer step (per process), and the largest micro-batch that fits in memory is found by trial before the loop:

- Each candidate gets one forward and backward pass of the real models (LoRA attached, final precision, under
  the accelerator's autocast) on a synthetic batch of the run's size: random pixels at `--resolution` and
  full-length captions, so the VAE, text encoder and UNet see the shapes of a real step (with --cache_latents the
  real step skips the encoders: the trial is then an upper bound). The run itself is untouched: the trial's
  gradients are dropped, its random draws come from its own generator inside a forked RNG (LoRA dropout
  included), and the memory it held is handed back to the device, so a run whose layout does not change is the
  run it would have been without the flag. Not measured: validation images rendered during training, and any
  headroom beyond what the trial used.
- Candidates: the effective batch, then halving, keeping only divisors of it (micro x accumulation = effective),
  down to 1; if even 1 does not fit, the same sizes again with gradient checkpointing. The first that fits on
  every process is taken (processes try each candidate together). Out-of-memory errors are told apart from other
  errors by accelerate's `should_reduce_batch_size`; any other error stops the run. accelerate's
  `find_executable_batch_size` is not used: it halves without keeping divisors, and has neither the
  checkpointing fallback nor the agreement between processes.
- On a CPU the search starts at `--train_batch_size` instead: memory exhaustion there is usually the kernel's
  OOM killer (or swapping), not an error a trial can catch, so a larger micro-batch than asked for is never
  tried. With no accumulation asked for that is the effective batch; an explicit `--gradient_accumulation_steps`
  is kept.

One trial per candidate (usually one in all) is cheaper than any in-loop retry, which would have to undo a
half-taken optimizer step. The layout never changes the learning dynamics: same effective batch, same samples per
optimizer step (the shuffled order does not depend on the batch size), same number of steps and LR schedule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

from lorakit.config import ConfigError, TrainConfig, TrainingArgs
from lorakit.training import Models, training_loss


class MemoryFitError(ConfigError):
    """Not even a micro-batch of 1 with gradient checkpointing fits in the device's memory."""


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's samples are split into forward/backward passes on each process."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    auto: bool = False  # chosen by --auto_micro_batch (else: the flags as given)
    trials: tuple[str, ...] = ()  # what the search tried, in order, for the log

    @property
    def effective_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps

    def describe(self) -> str:
        """One line for the log: the layout and, when searched, how it was found."""
        checkpointing = "on" if self.gradient_checkpointing else "off"
        text = (
            f"Batch layout: micro-batch {self.micro_batch_size} x {self.gradient_accumulation_steps} accumulation "
            f"step(s) = {self.effective_batch_size} samples per optimizer step per process, gradient checkpointing "
            f"{checkpointing}"
        )
        return text + (f" (--auto_micro_batch tried {'; '.join(self.trials)})." if self.auto else ".")


def given_layout(training: TrainingArgs) -> BatchLayout:
    """The layout the flags state, used as is without --auto_micro_batch."""
    return BatchLayout(
        training.train_batch_size, training.gradient_accumulation_steps, training.gradient_checkpointing
    )


def micro_batch_sizes(effective: int, start: int) -> list[int]:
    """`start`, then repeatedly the largest divisor of `effective` at most half the previous size, down to 1."""
    sizes = [start]
    while sizes[-1] > 1:
        sizes.append(max(d for d in range(1, sizes[-1] // 2 + 1) if effective % d == 0))
    return sizes


def candidate_layouts(effective: int, start: int, checkpointing_forced: bool) -> list[tuple[int, bool]]:
    """(micro-batch, checkpointing) in the order tried: checkpointing only once every size failed without it."""
    modes = (True,) if checkpointing_forced else (False, True)
    return [(size, checkpointing) for checkpointing in modes for size in micro_batch_sizes(effective, start)]


def raises_on_out_of_memory(device: torch.device) -> bool:
    """Whether running out of memory on `device` is an error a trial can catch (GPUs), not a killed process."""
    return device.type != "cpu"


def choose_layout(
    cfg: TrainConfig, accelerator: Accelerator, models: Models, params: Iterable[torch.nn.Parameter]
) -> BatchLayout:
    """The flags' layout, or with --auto_micro_batch the largest micro-batch that fits (see the module doc)."""
    training = cfg.training
    if not training.auto_micro_batch:
        return given_layout(training)
    effective = training.train_batch_size * training.gradient_accumulation_steps
    start = effective if raises_on_out_of_memory(accelerator.device) else training.train_batch_size
    params = list(params)
    trials = []
    for micro, checkpointing in candidate_layouts(effective, start, training.gradient_checkpointing):
        set_gradient_checkpointing(models.unet, checkpointing)
        fits = fits_everywhere(accelerator, fits_in_memory(cfg, accelerator, models, params, micro))
        trials.append(
            f"{micro}{' with checkpointing' if checkpointing else ''}: {'fits' if fits else 'out of memory'}"
        )
        if fits:
            return BatchLayout(micro, effective // micro, checkpointing, auto=True, trials=tuple(trials))
    raise MemoryFitError(
        f"--auto_micro_batch: not even a micro-batch of 1 with gradient checkpointing fits in the memory of "
        f"{accelerator.device} at --resolution {cfg.data.resolution} (tried {'; '.join(trials)}). Lower "
        "--resolution, use --mixed_precision bf16 or fp16 on a GPU, or free memory held by other processes."
    )


def set_gradient_checkpointing(unet: torch.nn.Module, enabled: bool) -> None:
    if enabled:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


def fits_everywhere(accelerator: Accelerator, fits: bool) -> bool:
    """Every process must take the same layout (their accumulation steps must line up), so all must fit."""
    if accelerator.num_processes == 1:
        return fits
    flags = accelerator.gather(torch.tensor([float(fits)], device=accelerator.device))
    return bool(flags.min().item() > 0)


def fits_in_memory(
    cfg: TrainConfig, accelerator: Accelerator, models: Models, params: list[torch.nn.Parameter], micro: int
) -> bool:
    """One trial step at `micro`; False on an out-of-memory error, which is swallowed (any other is raised)."""
    try:
        trial_step(cfg, accelerator, models, micro)
        fits = True
    except RuntimeError as error:  # torch.OutOfMemoryError is one
        if not should_reduce_batch_size(error):
            raise
        fits = False
    # Outside the `except`: the error's traceback (and the tensors its frames hold) is gone by now.
    for param in params:
        param.grad = None
    clear_device_cache(garbage_collection=True)
    return fits


def trial_step(cfg: TrainConfig, accelerator: Accelerator, models: Models, micro: int) -> None:
    """Forward and backward of the training loss on a synthetic micro-batch, leaving the global RNG as it was."""
    device = accelerator.device
    generator = torch.Generator(device=device).manual_seed(cfg.training.seed)
    batch = synthetic_batch(models, cfg.data.resolution, micro, device, generator)
    forked = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=forked, device_type=device.type if forked else None):
        with accelerator.autocast():
            loss = training_loss(models, models.unet, models.text_encoder, batch, cfg.training, generator)
        loss.backward()


def synthetic_batch(
    models: Models, resolution: int, size: int, device: torch.device, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A batch shaped like the DataLoader's: pixels in [-1, 1] and captions padded to the tokenizer's length."""
    pixels = torch.rand((size, 3, resolution, resolution), generator=generator, device=device) * 2 - 1
    length = models.tokenizer.model_max_length
    input_ids = torch.full((size, length), models.tokenizer.pad_token_id, dtype=torch.long, device=device)
    return {"pixel_values": pixels, "input_ids": input_ids}
