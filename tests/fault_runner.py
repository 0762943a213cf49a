"""Run train_lora.main with a fault injected, for the resume and multi-process tests.

    python tests/fault_runner.py FAULT[+FAULT...] -- TRAIN_ARGS...      (also under `accelerate launch`)

FAULT: kill_after_checkpoint:K | kill_inside_save:K | sigterm_at_step:K | kill_at_batch:N | record_indices:DIR |
oom_above:M[@RANK] | none
The faults are real: SIGKILL and SIGTERM are sent to this very process at the named point. oom_above makes
--auto_micro_batch's trial step run out of memory (an injected CUDA out-of-memory error) above micro-batch M,
on every process or on process RANK only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import train_lora  # noqa: E402
from lorakit import checkpoint, micro_batch  # noqa: E402


def kill_after_checkpoint(step: int) -> None:
    original = checkpoint.save_checkpoint

    def save_then_die(accelerator, output_dir, global_step, *args, **kwargs):
        path = original(accelerator, output_dir, global_step, *args, **kwargs)
        if global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpoint.save_checkpoint = save_then_die


def kill_inside_save(step: int) -> None:
    original = checkpoint.atomic_write_json

    def die_mid_write(path, obj):
        if Path(path).name == checkpoint.TRAIN_STATE_FILE and obj.get("global_step") == step:
            Path(path).write_text('{"global_step": ')  # a torn write, then the kill
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, obj)

    checkpoint.atomic_write_json = die_mid_write


def sigterm_at_step(step: int) -> None:
    original = train_lora.training_loss
    calls = {"n": 0}

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    train_lora.training_loss = loss_then_signal


def kill_at_batch(call: int) -> None:
    """SIGKILL as the loop asks for its N-th batch loss in this process (under accumulation: mid-step)."""
    original = train_lora.training_loss
    calls = {"n": 0}

    def die_before_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    train_lora.training_loss = die_before_loss


def record_indices(folder: str) -> None:
    from accelerate import PartialState

    original = train_lora.collate_examples

    def collate_and_record(examples):
        rank = PartialState().process_index
        with open(Path(folder) / f"indices-{rank}.jsonl", "a") as handle:
            handle.write(json.dumps([int(example["index"]) for example in examples]) + "\n")
        return original(examples)

    train_lora.collate_examples = collate_and_record


def oom_above(spec: str) -> None:
    limit, _, rank = spec.partition("@")
    original = micro_batch.trial_step

    def trial_or_oom(cfg, accelerator, models, micro):
        if micro > int(limit) and rank in ("", str(accelerator.process_index)):
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a micro-batch of {micro} (injected)")
        return original(cfg, accelerator, models, micro)

    micro_batch.trial_step = trial_or_oom


FAULTS = {
    "kill_after_checkpoint": lambda v: kill_after_checkpoint(int(v)),
    "kill_inside_save": lambda v: kill_inside_save(int(v)),
    "sigterm_at_step": lambda v: sigterm_at_step(int(v)),
    "kill_at_batch": lambda v: kill_at_batch(int(v)),
    "record_indices": record_indices,
    "oom_above": oom_above,
}

if __name__ == "__main__":
    fault, separator, *train_args = sys.argv[1:]
    assert separator == "--", "usage: fault_runner.py FAULT -- TRAIN_ARGS"
    for one in fault.split("+"):
        if one != "none":
            name, value = one.split(":", 1)
            FAULTS[name](value)
    sys.exit(train_lora.main(train_args))
