"""Training precision: refuse one that cannot work on the machine at hand, and choose one for `auto`.

fp16: accelerate turns it into autocast plus loss scaling on GPUs only; on a CPU it silently runs no autocast,
the frozen weights are cast to fp16 and the first UNet matmul fails ("mat1 and mat2 must have the same dtype").
`check_precision_fits` stops such a run before any model loads.

`--mixed_precision auto` (`decide_precision`, a pure function of the facts it is given):

- CUDA GPU with native bf16 (Ampere or newer; `torch.cuda.is_bf16_supported(including_emulation=False)`): bf16.
- older CUDA GPU: fp16 (accelerate adds loss scaling).
- CPU without native bf16: no (fp32); bf16 would be emulated in fp32 arithmetic plus conversions.
- CPU with native bf16: a probe times the run's own UNet step in fp32 and under bf16 autocast, interleaved,
  and bf16 is chosen when it is at least `BF16_MIN_SPEEDUP` times faster in the best passes and in every
  fp32/bf16 pair, and the passes of each precision agree within `MAX_PASS_SPREAD`. On a machine busy with other
  work, threads wait on each other and a pass can take tens of times its quiet duration (seen on a shared
  2-core machine), in either precision; fp32, which rounds nothing, is the safe side of a doubtful measurement.
  No fixed rule fits: on an AMX CPU bf16 speeds up the BK-SDM-Tiny architecture and slows down the tiny
  embedded UNet, whose matmuls are too small to repay the casts around them (issue 22).
- any other device (mps, xpu, ...): no, for want of measurements; pass bf16 or fp16 to use one.
- resuming: the checkpoint's precision, so a resumed run never changes precision silently.

Native bf16 on a CPU means the avx512_bf16 or amx_bf16 flags (x86) or bf16 (Arm) in /proc/cpuinfo; where there
is no /proc/cpuinfo, torch's own x86 checks. `torch.backends.cpu.get_cpu_capability()` is not used: it names the
vector ISA torch dispatches to ("AVX512"), which AVX-512 CPUs without bf16 report too.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, parse_flag_from_env
from diffusers import UNet2DConditionModel
from diffusers.training_utils import cast_training_params

from lorakit import checkpoint as ckpt
from lorakit import probe_cache
from lorakit.config import ConfigError, TrainConfig
from lorakit.lora import make_lora_config
from lorakit.training import load_tokenizer, vae_scale_factor_from_config

# bf16 must beat fp32 by this factor: it also rounds the frozen weights, so a tie goes to fp32.
BF16_MIN_SPEEDUP = 1.05
# Slowest over fastest pass of one precision above this: other work disturbed the probe, its ratio is not trusted.
MAX_PASS_SPREAD = 1.5
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# Timed passes per precision after one warm-up each: 3 when a pass is quick, down to 2 (one disturbed pass on a
# shared machine must not decide alone) when one step is slow (a large model at full resolution).
PROBE_PASSES = (2, 3)
PROBE_BUDGET_SECONDS = 3.0
ACCELERATE_SOURCE = "accelerate: launch flag, config file or ACCELERATE_MIXED_PRECISION"


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision to train in (None: leave it to accelerate) and how it was chosen, in words."""

    mixed_precision: str | None
    reason: str


@dataclass(frozen=True)
class DeviceFacts:
    """What `auto` knows about the training device before measuring anything."""

    kind: str  # torch device type: cuda, cpu, mps, ...
    name: str
    native_bf16: bool
    evidence: str  # what says so, for the printed reason


@dataclass(frozen=True)
class ProbeTimings:
    """Seconds of each timed UNet forward+backward, per precision, in pairs run back to back; the whole probe's."""

    fp32_seconds: tuple[float, ...]
    bf16_seconds: tuple[float, ...]
    cost_seconds: float = 0.0

    @property
    def bf16_speedup(self) -> float:
        """fp32 time over bf16 time, best passes (the least disturbed by other work)."""
        return min(self.fp32_seconds) / min(self.bf16_seconds)

    @property
    def pair_speedups(self) -> list[float]:
        return [fp32 / bf16 for fp32, bf16 in zip(self.fp32_seconds, self.bf16_seconds, strict=True)]

    @property
    def spread(self) -> float:
        """Slowest over fastest pass, in the less steady precision (1.0: every pass alike)."""
        return max(max(passes) / min(passes) for passes in (self.fp32_seconds, self.bf16_seconds))


def process_state() -> PartialState:
    """accelerate's process state, built before the Accelerator exactly as the Accelerator would build it:
    AcceleratorState reads ACCELERATE_USE_CPU (CPU DDP) and passes it on, PartialState alone does not."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def requested_choice(requested: str | None) -> PrecisionChoice:
    """A precision given by flag or preset, or (None) left to accelerate's own setting."""
    if requested:
        return PrecisionChoice(requested, f"asked: --mixed_precision {requested}")
    return PrecisionChoice(None, ACCELERATE_SOURCE)


def check_precision_fits(mixed_precision: str | None, device_type: str, source: str) -> None:
    """Raise ConfigError for a precision the device cannot train in (fp16 on a CPU), naming what to use instead."""
    if mixed_precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            f"This run would train in fp16 ({source}) on the CPU, where accelerate has no fp16 mixed precision "
            "(the first step would fail with a dtype mismatch). Use --mixed_precision bf16 (fast on CPUs with "
            "native bf16: AMX or AVX512-BF16), no (fp32), or auto (picks for this machine)."
        )


def cpu_bf16_flags(cpuinfo: str) -> list[str]:
    """Native-bf16 flags in /proc/cpuinfo text: x86 `flags` lines, Arm `Features` lines."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found.update(CPU_BF16_FLAGS.intersection(value.split()))
    return sorted(found)


def cpu_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[bool, str]:
    """(native bf16?, evidence) for this CPU."""
    if cpuinfo.is_file():
        flags = cpu_bf16_flags(cpuinfo.read_text(errors="replace"))
        if flags:
            return True, f"{', '.join(flags)} in {cpuinfo}"
        return False, f"no {', '.join(sorted(CPU_BF16_FLAGS))} flag in {cpuinfo}"
    # No /proc (macOS, Windows): torch's x86 checks, private helpers, so looked up defensively.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = [name.strip("_") for name in checks if getattr(torch.cpu, name, lambda: False)()]
    return bool(found), f"torch.cpu: {', '.join(found) or 'no avx512_bf16 or amx'}"


def device_facts(device: torch.device) -> DeviceFacts:
    """Facts about the device accelerate trains on."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return DeviceFacts("cuda", torch.cuda.get_device_name(device), native, f"compute capability {major}.{minor}")
    if device.type == "cpu":
        native, evidence = cpu_native_bf16()
        return DeviceFacts("cpu", "CPU", native, evidence)
    return DeviceFacts(device.type, device.type, False, "")


def needs_probe(facts: DeviceFacts) -> bool:
    """Only a CPU with native bf16 has no rule: the model decides, so it is measured."""
    return facts.kind == "cpu" and facts.native_bf16


def decide_precision(facts: DeviceFacts, timings: ProbeTimings | None = None) -> PrecisionChoice:
    """`auto`'s choice from device facts and, for a CPU with native bf16, the probe's timings."""
    if facts.kind == "cuda":
        if facts.native_bf16:
            return PrecisionChoice("bf16", f"GPU: {facts.name} has native bf16 ({facts.evidence})")
        return PrecisionChoice("fp16", f"GPU: {facts.name} has no native bf16 ({facts.evidence})")
    if facts.kind != "cpu":
        return PrecisionChoice("no", f"{facts.kind}: no measured rule; pass --mixed_precision bf16 or fp16 to try one")
    if not facts.native_bf16:
        return PrecisionChoice("no", f"CPU without native bf16 ({facts.evidence})")
    if timings is None:
        raise ValueError("a CPU with native bf16 is decided by the probe: pass its timings")
    return decide_from_probe(timings)


def decide_from_probe(timings: ProbeTimings) -> PrecisionChoice:
    """bf16 only for a clear win that every pair of passes shows on a steady machine; fp32 otherwise."""
    speedup = timings.bf16_speedup
    measured = (
        f"fp32 {min(timings.fp32_seconds) * 1000:.0f} ms, bf16 {min(timings.bf16_seconds) * 1000:.0f} ms per "
        f"UNet step; probe {timings.cost_seconds:.1f} s"
    )
    if speedup < BF16_MIN_SPEEDUP:
        return PrecisionChoice(
            "no", f"probe: bf16 {speedup:.2f}x the speed of fp32, below {BF16_MIN_SPEEDUP}x ({measured})"
        )
    if timings.spread > MAX_PASS_SPREAD:
        return PrecisionChoice(
            "no",
            f"probe: bf16 {speedup:.2f}x faster than fp32, but passes varied {timings.spread:.1f}x: the "
            f"machine is busy, fp32 kept ({measured})",
        )
    if min(timings.pair_speedups) < BF16_MIN_SPEEDUP:
        pairs = ", ".join(f"{ratio:.2f}x" for ratio in timings.pair_speedups)
        return PrecisionChoice(
            "no", f"probe: bf16 {speedup:.2f}x faster than fp32 but not in every pair ({pairs}; {measured})"
        )
    return PrecisionChoice("bf16", f"probe: bf16 {speedup:.2f}x faster than fp32 ({measured})")


def probe_unets(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The run's UNet with its LoRA, twice: fp32, and frozen weights in bf16 with fp32 LoRA as the run holds them.

    The LoRA is attached (not a plain UNet) because its fp32 weights are cast at every call under autocast:
    on a small model that overhead is what decides between the precisions. Gradient checkpointing and
    channels_last follow the run; --compile does not (compiling both copies would cost more than the probe).
    """
    model = cfg.model
    unet = UNet2DConditionModel.from_pretrained(
        model.pretrained_model_name_or_path,
        subfolder="unet",
        revision=model.revision,
        variant=model.variant,
        use_safetensors=True,
    )
    unet.requires_grad_(False)
    unet.add_adapter(
        make_lora_config(cfg.lora.rank, cfg.lora.lora_alpha, cfg.lora.lora_dropout, cfg.lora.target_modules)
    )
    if cfg.training.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.training.channels_last:
        unet.to(memory_format=torch.channels_last)
    low = copy.deepcopy(unet).bfloat16()  # attach_lora's cast, minus diffusers' warning on `.to(dtype)`
    cast_training_params(low, dtype=torch.float32)
    return unet, low


def probe_inputs(cfg: TrainConfig, unet: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Noisy latents, timesteps and text states at the run's micro-batch and latent size (values do not matter)."""
    batch = cfg.training.train_batch_size
    side = cfg.data.resolution // vae_scale_factor_from_config(cfg.model)
    tokens = load_tokenizer(cfg.model).model_max_length
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, unet.config.in_channels, side, side, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    states = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=generator)
    return latents, timesteps, states


def timed_step(unet: torch.nn.Module, inputs: tuple[torch.Tensor, ...], bf16: bool) -> float:
    """Seconds of one forward+backward as the training step runs it (bf16: under accelerate's CPU autocast)."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        prediction = unet(*inputs, return_dict=False)[0]
    prediction.float().square().mean().backward()
    unet.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def probe_unet_step(cfg: TrainConfig) -> ProbeTimings:
    """Time the run's UNet step on the CPU in fp32 and bf16: one warm-up each, then timed passes in fp32/bf16
    pairs (a burst of load from elsewhere hits both of a pair), as many as the time budget allows."""
    start = time.perf_counter()
    fp32_unet, bf16_unet = probe_unets(cfg)
    inputs = probe_inputs(cfg, fp32_unet)
    warm_up = timed_step(fp32_unet, inputs, False) + timed_step(bf16_unet, inputs, True)
    passes = max(PROBE_PASSES[0], min(PROBE_PASSES[1], int(PROBE_BUDGET_SECONDS / warm_up)))
    fp32, bf16 = [], []
    for _ in range(passes):
        fp32.append(timed_step(fp32_unet, inputs, False))
        bf16.append(timed_step(bf16_unet, inputs, True))
    return ProbeTimings(tuple(fp32), tuple(bf16), time.perf_counter() - start)


def step_shape(cfg: TrainConfig) -> dict:
    """What the probe's step looks like besides the architecture: the keys under which its timings are kept."""
    return {
        "batch": cfg.training.train_batch_size,
        "resolution": cfg.data.resolution,
        "lora": [cfg.lora.rank, cfg.lora.lora_alpha, sorted(cfg.lora.target_modules)],
        "gradient_checkpointing": cfg.training.gradient_checkpointing,
        "channels_last": cfg.training.channels_last,
    }


def probe_timings(cfg: TrainConfig) -> tuple[ProbeTimings, str]:
    """The probe's timings and a note on where they came from: kept ones when this machine has measured this
    architecture at this step shape before (steady measurements only), else a fresh probe."""
    model = cfg.model
    unet_config = UNet2DConditionModel.load_config(
        model.pretrained_model_name_or_path, subfolder="unet", revision=model.revision
    )
    key = probe_cache.probe_key(dict(unet_config), step_shape(cfg))
    kept = probe_cache.load_timings(key)
    if kept is not None:
        timings = ProbeTimings(tuple(kept["fp32_seconds"]), tuple(kept["bf16_seconds"]), kept.get("cost_seconds", 0))
        where = probe_cache.shown_cache_path()
        return timings, f"; timings measured {kept['measured']}, kept in {where} (delete it to measure again)"
    timings = probe_unet_step(cfg)
    if timings.spread > MAX_PASS_SPREAD:  # a busy machine: say so, or the user expects the next run to skip the probe
        return timings, f"; not kept for later runs (passes varied {timings.spread:.1f}x)"
    probe_cache.store_timings(key, timings.fp32_seconds, timings.bf16_seconds, timings.cost_seconds)
    return timings, ""


def checkpoint_choice(cfg: TrainConfig) -> tuple[PrecisionChoice | None, str]:
    """The precision of the checkpoint this run resumes from, if any; else (None, a note for an old checkpoint)."""
    checkpoint = ckpt.resolve_resume_dir(cfg.output.output_dir, cfg.training.resume_from_checkpoint)
    if checkpoint is None:
        return None, ""
    saved = ckpt.read_train_state(checkpoint).get("mixed_precision")
    if saved is None:
        return None, f"; {checkpoint.name} does not record its precision"
    return PrecisionChoice(saved, f"checkpoint: {checkpoint.name} was trained in {saved}"), ""


def resolve_auto(cfg: TrainConfig, device: torch.device) -> PrecisionChoice:
    """`auto` on this process: the resumed checkpoint's precision, else the device rule, else the probe."""
    kept, note = checkpoint_choice(cfg)
    if kept is not None:
        return kept
    facts = device_facts(device)
    timings = None
    if needs_probe(facts):
        try:
            timings, cached = probe_timings(cfg)
        except RuntimeError as error:  # a bf16 op missing on this CPU: training in bf16 would fail the same way
            return PrecisionChoice("no", f"probe failed in bf16 ({error}){note}")
        note = cached + note
    choice = decide_precision(facts, timings)
    return PrecisionChoice(choice.mixed_precision, choice.reason + note)


def choose_precision(cfg: TrainConfig, state: PartialState) -> PrecisionChoice:
    """The precision to build the Accelerator with; `auto` is decided once, on the main process, for all."""
    if cfg.training.mixed_precision != "auto":
        return requested_choice(cfg.training.mixed_precision)
    choice = [resolve_auto(cfg, state.device) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(choice)  # processes that trained in different precisions would not stay in step
    return choice[0]
