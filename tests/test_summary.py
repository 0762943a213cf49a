"""train_summary.json's schema and the launch command it records."""

from __future__ import annotations

import json
import sys

import pytest

from lorakit import outputs
from lorakit.filenames import SUMMARY_FILE
from lorakit.summary import TrainSummary, ValidationImage, read_summary, write_summary

SUMMARY = TrainSummary(
    base_model="nota-ai/bk-sdm-tiny",
    dataset="my-data",
    num_samples=12,
    global_step=6,
    num_train_epochs=1,
    lora_trainable_parameters=4096,
    adapter_file_bytes=20_000,
    train_seconds=3.5,
    final_loss=0.12,
    command="accelerate launch train_lora.py",
    mixed_precision="bf16",
    num_processes=2,
    learned_words=["purple"],
    validation=[ValidationImage(prompt="a purple star", image="validation/final/00.png")],
)


def test_summary_round_trips_through_the_file(tmp_path):
    path = write_summary(tmp_path, SUMMARY)
    assert path == tmp_path / SUMMARY_FILE
    assert json.loads(path.read_text())["validation"] == [
        {"prompt": "a purple star", "image": "validation/final/00.png"}
    ]
    assert read_summary(tmp_path) == SUMMARY


def test_summary_ignores_unknown_keys_and_names_missing_ones(tmp_path):
    data = SUMMARY.to_dict() | {"written_by_a_newer_lorakit": 1}
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(data))
    assert read_summary(tmp_path) == SUMMARY
    del data["global_step"], data["command"]
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks global_step, command"):
        read_summary(tmp_path)


ACCELERATE = ["/venv/bin/python3", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "1"]


TORCHRUN = ["/venv/bin/torchrun", "--nproc_per_node", "2", "train_lora.py"]
LAUNCHERS = [
    (
        [ACCELERATE + ["train_lora.py", "--rank", "8"]],
        "accelerate launch --cpu --num_processes 1 train_lora.py --rank 8",
    ),
    ([["/venv/bin/python3", "-u", "train_lora.py"], TORCHRUN], "torchrun --nproc_per_node 2 train_lora.py"),
    (
        [["python", "-m", "accelerate.commands.launch", "train_lora.py"]],
        "python -m accelerate.commands.launch train_lora.py",
    ),
    ([["/bin/bash"], ["sshd"]], None),  # started by a shell: no launcher
    ([ACCELERATE + ["other_script.py"]], None),  # a launcher of something else
]


@pytest.mark.parametrize(("parents", "expected"), LAUNCHERS)
def test_launcher_is_found_among_the_parent_processes(parents, expected):
    found = outputs._launcher_command(parents, "train_lora.py")
    assert (" ".join(found) if found else None) == expected


def test_launch_command_records_what_was_run(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_lora.py", "--rank", "8"])
    monkeypatch.setattr(outputs, "_parent_command_lines", lambda: [ACCELERATE + ["train_lora.py", "--rank", "8"]])
    assert outputs.launch_command() == "accelerate launch --cpu --num_processes 1 train_lora.py --rank 8"
    monkeypatch.setattr(outputs, "_parent_command_lines", lambda: [["/bin/bash"]])
    assert outputs.launch_command() == "python train_lora.py --rank 8"
    # In-process callers (tests, the bench) pass their flags: recorded as the equivalent script call.
    assert outputs.launch_command(["--rank", "4", "--output_dir", "my out"]) == (
        "python train_lora.py --rank 4 --output_dir 'my out'"
    )


def test_launch_command_never_holds_a_token(monkeypatch):
    token = "hf_" + "a1B2" * 9
    monkeypatch.setenv("HF_TOKEN", token)
    assert token not in outputs.launch_command(["--hub_model_id", token])
