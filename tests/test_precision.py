"""Precision (issue 22): fp16 where it cannot work stops before any model loads; `auto` picks by rule or probe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import tiny_train_args
from diffusers import UNet2DConditionModel

import train_lora
from lorakit import precision
from lorakit.config import parse_args
from lorakit.precision import DeviceFacts, ProbeTimings, cpu_bf16_flags, decide_precision, needs_probe

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")
REPO_ROOT = Path(__file__).resolve().parent.parent
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 works on a CUDA GPU")

FASTER_BF16 = ProbeTimings((0.141, 0.15), (0.1, 0.11), 0.8)
SLOWER_BF16 = ProbeTimings((0.1, 0.1), (0.2, 0.2))
AMPERE = DeviceFacts("cuda", "NVIDIA A100", True, "compute capability 8.0")
TURING = DeviceFacts("cuda", "Tesla T4", False, "compute capability 7.5")
CPU_BF16 = DeviceFacts("cpu", "CPU", True, "amx_bf16 in /proc/cpuinfo")
CPU_PLAIN = DeviceFacts("cpu", "CPU", False, "no amx_bf16, avx512_bf16 or bf16 flag in /proc/cpuinfo")


@pytest.fixture
def models_must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the precision was checked")

    monkeypatch.setattr(train_lora, "load_models", refuse)


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


@cpu_only
@pytest.mark.usefixtures("models_must_not_load")
def test_fp16_flag_on_a_cpu_stops_before_the_data_is_read(
    capsys, monkeypatch, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    def refuse(*args, **kwargs):
        raise AssertionError("the data was read before the precision was checked")

    monkeypatch.setattr(train_lora, "prepare_dataset", refuse)
    flags = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out", "--mixed_precision", "fp16")
    code = train_lora.main(flags)
    err = capsys.readouterr().err
    assert code == 2
    assert "would train in fp16 (asked: --mixed_precision fp16) on the CPU" in err
    assert "--mixed_precision bf16" in err and "no (fp32)" in err and "auto" in err
    assert not (tmp_path / "out").exists()


@cpu_only
@pytest.mark.usefixtures("models_must_not_load")
def test_fp16_from_accelerate_launch_on_a_cpu_stops_before_the_models_load(
    capsys, monkeypatch, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    # `accelerate launch --mixed_precision fp16` (or its config file) hands the precision over in this variable.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    code = train_lora.main(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    assert "would train in fp16 (accelerate: launch flag, config file or ACCELERATE_MIXED_PRECISION)" in err


@pytest.mark.parametrize(
    ("facts", "timings", "expected", "reason"),
    [
        (AMPERE, None, "bf16", "GPU: NVIDIA A100 has native bf16 (compute capability 8.0)"),
        (TURING, None, "fp16", "GPU: Tesla T4 has no native bf16 (compute capability 7.5)"),
        (CPU_PLAIN, None, "no", "CPU without native bf16 (no amx_bf16"),
        (CPU_BF16, FASTER_BF16, "bf16", "probe: bf16 1.41x faster than fp32 (fp32 141 ms, bf16 100 ms"),
        (CPU_BF16, ProbeTimings((0.057, 0.06), (0.1, 0.1), 0.7), "no", "probe: bf16 0.57x the speed of fp32, below"),
        (CPU_BF16, ProbeTimings((0.104,), (0.1,)), "no", "probe: bf16 1.04x"),  # a near tie keeps fp32
        # a busy machine: one precision's passes far apart (as measured here: 2628 and 588 ms), fp32 kept
        (
            CPU_BF16,
            ProbeTimings((2.628, 0.588), (0.841, 0.374)),
            "no",
            "probe: bf16 1.57x faster than fp32, but passes varied 4.5x",
        ),
        # steady passes, but a pair below the margin: too close to call, fp32 kept
        (
            CPU_BF16,
            ProbeTimings((0.1, 0.1), (0.093, 0.097)),
            "no",
            "probe: bf16 1.08x faster than fp32 but not in every pair (1.08x, 1.03x",
        ),
        (DeviceFacts("mps", "mps", False, ""), None, "no", "mps: no measured rule"),
    ],
)
def test_auto_decides_from_device_facts_and_probe_timings(facts, timings, expected, reason):
    choice = decide_precision(facts, timings)
    assert choice.mixed_precision == expected and choice.reason.startswith(reason)


def test_only_a_cpu_with_native_bf16_is_probed():
    assert [needs_probe(f) for f in (AMPERE, TURING, CPU_PLAIN, CPU_BF16)] == [False, False, False, True]
    with pytest.raises(ValueError, match="decided by the probe"):
        decide_precision(CPU_BF16)


def test_native_bf16_flags_are_read_from_cpuinfo():
    x86 = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"
    old_x86 = "flags\t\t: fpu sse avx2 avx512f avx512bw\nbugs\t\t: bf16_made_up\n"  # flags only, whole words
    assert cpu_bf16_flags(x86) == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_flags(arm) == ["bf16"]
    assert cpu_bf16_flags(old_x86) == []


def test_probe_runs_the_unet_at_the_runs_batch_and_latent_size(
    tiny_pipeline_dir, tiny_dataset_dir, tmp_path, monkeypatch
):
    shapes = []
    forward = UNet2DConditionModel.forward

    def recorded(self, sample, *args, **kwargs):
        shapes.append((tuple(sample.shape), self.dtype, torch.is_autocast_enabled("cpu")))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recorded)
    cfg = parse_args(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "--train_batch_size", "3"))
    timings = precision.probe_unet_step(cfg)
    assert len(timings.fp32_seconds) == len(timings.bf16_seconds) >= 2 and timings.cost_seconds > 0
    assert {shape for shape, _, _ in shapes} == {(3, 4, 8, 8)}  # batch 3, 32 px / VAE factor 4
    modes = [(dtype, autocast) for _, dtype, autocast in shapes]
    assert modes[:2] == [(torch.float32, False), (torch.bfloat16, True)]  # warm-up, then interleaved
    assert modes.count((torch.float32, False)) == modes.count((torch.bfloat16, True)) >= 2


def fake_probe(monkeypatch, timings: ProbeTimings) -> None:
    """This CPU, as far as `auto` knows: native bf16 and the given probe timings."""
    monkeypatch.setattr(precision, "device_facts", lambda device: CPU_BF16)
    monkeypatch.setattr(precision, "probe_unet_step", lambda cfg: timings)


@pytest.mark.parametrize(("timings", "expected"), [(FASTER_BF16, "bf16"), (SLOWER_BF16, "no")])
def test_auto_builds_the_accelerator_in_the_precision_it_chose(
    monkeypatch, tiny_pipeline_dir, tiny_dataset_dir, tmp_path, timings, expected
):
    fake_probe(monkeypatch, timings)
    built = []
    accelerator_class = train_lora.Accelerator

    def recording(*args, **kwargs):
        built.append(kwargs["mixed_precision"])
        return accelerator_class(*args, **kwargs)

    monkeypatch.setattr(train_lora, "Accelerator", recording)
    out = tmp_path / "out"
    flags = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--mixed_precision", "auto")
    result = train_lora.train(parse_args([*flags, "--max_train_steps", "1"]))
    assert built == [expected]
    frozen = {p.dtype for name, p in result.unet.named_parameters() if "lora_" not in name}
    assert frozen == {torch.bfloat16 if expected == "bf16" else torch.float32}
    assert summary(out)["mixed_precision"] == expected
    assert summary(out)["precision_choice"] == decide_precision(CPU_BF16, timings).reason


@cpu_only
def test_auto_on_this_cpu_records_a_concrete_precision_and_why(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, capsys):
    out = tmp_path / "out"
    flags = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--mixed_precision", "auto")
    train_lora.train(parse_args([*flags, "--max_train_steps", "1"]))
    recorded = summary(out)
    assert recorded["mixed_precision"] in ("no", "bf16")
    assert recorded["precision_choice"].startswith(("probe: bf16", "CPU without native bf16"))
    assert (
        f"Mixed precision {recorded['mixed_precision']} ({recorded['precision_choice']})." in capsys.readouterr().out
    )
    card = (out / "README.md").read_text()
    assert f"| Precision chosen by | {recorded['precision_choice']} |" in card
    assert "mixed_precision` | auto |" in card  # the card's settings table keeps what was asked


def test_resume_with_auto_keeps_the_checkpoints_precision(
    monkeypatch, capsys, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    out = tmp_path / "out"
    flags = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--checkpointing_steps", "2")
    train_lora.train(parse_args([*flags, "--mixed_precision", "bf16", "--max_train_steps", "2"]))
    state = json.loads((out / "checkpoint-2" / "train_state.json").read_text())
    assert state["mixed_precision"] == "bf16"
    fake_probe(monkeypatch, SLOWER_BF16)  # a fresh decision would now say fp32
    AcceleratorState._reset_state(reset_partial_state=True)
    resume = ["--mixed_precision", "auto", "--resume_from_checkpoint", "latest", "--max_train_steps", "4"]
    result = train_lora.train(parse_args([*flags, *resume]))
    assert result.state.global_step == 4
    assert summary(out)["mixed_precision"] == "bf16"
    assert summary(out)["precision_choice"] == "checkpoint: checkpoint-2 was trained in bf16"
    AcceleratorState._reset_state(reset_partial_state=True)  # an explicit precision may change it, said aloud
    capsys.readouterr()
    train_lora.train(parse_args([*flags, "--mixed_precision", "no", "--resume_from_checkpoint", "latest"]))
    assert "Note: checkpoint-4 was trained in bf16; it continues in no, as asked." in capsys.readouterr().out
    assert summary(out)["mixed_precision"] == "no"


def test_a_probe_that_fails_in_bf16_leaves_fp32(monkeypatch, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    def fails(cfg):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'BFloat16'")

    monkeypatch.setattr(precision, "device_facts", lambda device: CPU_BF16)
    monkeypatch.setattr(precision, "probe_unet_step", fails)
    cfg = parse_args(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "--mixed_precision", "auto"))
    choice = precision.resolve_auto(cfg, torch.device("cpu"))
    assert choice.mixed_precision == "no" and choice.reason.startswith("probe failed in bf16 (")


def test_without_proc_cpuinfo_torchs_own_checks_decide(tmp_path):
    native, evidence = precision.cpu_native_bf16(tmp_path / "no-cpuinfo")
    assert isinstance(native, bool) and evidence.startswith("torch.cpu: ")


@pytest.mark.parametrize("preset", ["shapes.yaml", "bk-sdm-tiny-naruto.yaml"])
def test_presets_leave_the_precision_to_auto(preset):
    # The naruto preset said fp16, which crashed on a CPU at the first step; auto never picks fp16 on a CPU.
    cfg = parse_args(["--config", str(REPO_ROOT / "configs" / preset)])
    assert cfg.training.mixed_precision == "auto"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_a_cuda_gpu_follows_its_bf16_support(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "out"
    flags = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--mixed_precision", "auto")
    train_lora.train(parse_args([*flags, "--max_train_steps", "1"]))
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert summary(out)["mixed_precision"] == expected and summary(out)["precision_choice"].startswith("GPU: ")


@pytest.mark.slow
def test_two_processes_train_in_the_precision_the_main_process_chose(tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    out = tmp_path / "out"
    # DDP on CPU (gloo), as the README documents; the main process decides, the other receives its choice.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--dynamo_backend", "no"]  # fmt: skip
    flags = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, out, "--mixed_precision", "auto")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [*launcher, str(REPO_ROOT / "train_lora.py"), *flags, "--max_train_steps", "2"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    recorded = summary(out)
    assert recorded["num_processes"] == 2 and recorded["global_step"] == 2
    assert recorded["mixed_precision"] in ("no", "bf16") and recorded["precision_choice"]
    assert completed.stdout.count("Mixed precision ") == 1  # printed once, by the main process


def test_probe_timings_are_kept_per_machine_and_step_shape(monkeypatch, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    from lorakit import probe_cache

    probes = []
    monkeypatch.setattr(precision, "device_facts", lambda device: CPU_BF16)
    monkeypatch.setattr(precision, "probe_unet_step", lambda cfg: probes.append(cfg) or FASTER_BF16)
    flags = tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "--mixed_precision", "auto")
    first = precision.resolve_auto(parse_args(flags), torch.device("cpu"))
    again = precision.resolve_auto(parse_args(flags), torch.device("cpu"))
    assert len(probes) == 1 and first.mixed_precision == again.mixed_precision == "bf16"
    assert first.reason == decide_precision(CPU_BF16, FASTER_BF16).reason
    assert again.reason.startswith(first.reason) and f"kept in {probe_cache.shown_cache_path()}" in again.reason
    precision.resolve_auto(parse_args([*flags, "--train_batch_size", "3"]), torch.device("cpu"))
    assert len(probes) == 2  # another micro-batch is another measurement
    probe_cache.cache_path().write_text("{not json")  # damaged by hand: measured again, not a crash
    assert precision.resolve_auto(parse_args(flags), torch.device("cpu")).reason == first.reason
    assert len(probes) == 3


def test_a_disturbed_probe_is_not_kept(monkeypatch, tiny_pipeline_dir, tiny_dataset_dir, tmp_path):
    busy = ProbeTimings((0.1, 0.45), (0.05, 0.06))  # fp32 passes 4.5x apart: another job was running
    probes = []
    monkeypatch.setattr(precision, "device_facts", lambda device: CPU_BF16)
    monkeypatch.setattr(precision, "probe_unet_step", lambda cfg: probes.append(cfg) or busy)
    cfg = parse_args(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "--mixed_precision", "auto"))
    for _ in range(2):
        choice = precision.resolve_auto(cfg, torch.device("cpu"))
        assert choice.mixed_precision == "no" and choice.reason.endswith(
            "; not kept for later runs (passes varied 4.5x)"
        )
    assert len(probes) == 2


def test_a_disturbed_probe_that_finds_bf16_slower_says_it_is_not_kept(
    monkeypatch, tiny_pipeline_dir, tiny_dataset_dir, tmp_path
):
    # bf16 slower decides alone, so the decision does not mention the spread; the note must
    busy = ProbeTimings((0.05, 0.2), (0.1, 0.11))
    monkeypatch.setattr(precision, "device_facts", lambda device: CPU_BF16)
    monkeypatch.setattr(precision, "probe_unet_step", lambda cfg: busy)
    cfg = parse_args(tiny_train_args(tiny_pipeline_dir, tiny_dataset_dir, tmp_path, "--mixed_precision", "auto"))
    reason = precision.resolve_auto(cfg, torch.device("cpu")).reason
    assert "varied" not in decide_precision(CPU_BF16, busy).reason
    assert "not kept for later runs (passes varied 4.0x)" in reason


def test_the_note_on_kept_timings_names_the_home_folder_as_tilde(monkeypatch, tmp_path):
    from lorakit import probe_cache

    monkeypatch.setenv("HOME", str(tmp_path / "ada"))
    monkeypatch.delenv(probe_cache.CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    # the note lands in cards that get pushed: no user name in it
    assert probe_cache.shown_cache_path() == "~/.cache/lorakit/precision_probe.json"
    monkeypatch.setenv(probe_cache.CACHE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert probe_cache.shown_cache_path() == str(tmp_path / "elsewhere" / "precision_probe.json")
