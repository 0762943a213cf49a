"""Helpers for the card/hub/kohya tests: a realistic trainer output folder and a recording fake `HfApi`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub.utils import filter_repo_objects
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image

from lorakit.filenames import (
    ADAPTER_FILE,
    CHECKPOINT_PREFIX,
    LOSS_CURVE_FILE,
    LOSS_HISTORY_FILE,
    TRAINING_CONFIG_FILE,
    VALIDATION_DIR,
    VALIDATION_GRID_FILE,
)
from lorakit.summary import TrainSummary, ValidationImage, write_summary

RANK = 4
LORA_ALPHA = 8.0  # deliberately != RANK, so a lost alpha changes the output
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
VALIDATION_PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
DATASET_ID = "someuser/tiny-shapes"


def make_run_folder(
    out: Path,
    base: Path,
    *,
    prompts: list[str] | None = None,
    license: str | None = None,
    base_name: str | None = None,
    instance_prompt: str | None = None,
    train_text_encoder: bool = False,
) -> Path:
    """Write what `train_lora.py` leaves in `--output_dir` (brief's contract), with a real tiny adapter.

    `base_name` is what the run records as its base (e.g. a Hub id standing in for the local tiny pipeline).
    """
    prompts = VALIDATION_PROMPTS if prompts is None else prompts
    base_name = base_name or str(base)
    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    torch.manual_seed(1)
    config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, init_lora_weights=False, target_modules=TARGETS)
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        # peft's init_lora_weights=False makes B small; scale it so the adapter visibly moves the output.
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.mul_(20.0)
    lora_params = sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    te_kwargs = {}
    if train_text_encoder:
        te_config = LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, init_lora_weights=False, target_modules=TEXT_TARGETS)
        # transformers 5's add_adapter wants peft >= 0.22; peft's own injection works with what is installed.
        inject_adapter_in_model(te_config, pipe.text_encoder)
        with torch.no_grad():
            for name, param in pipe.text_encoder.named_parameters():
                if "lora_B" in name:
                    param.mul_(20.0)
        lora_params += sum(p.numel() for n, p in pipe.text_encoder.named_parameters() if "lora_" in n)
        te_kwargs = {
            "text_encoder_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
            "text_encoder_lora_adapter_metadata": te_config.to_dict(),
        }
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True, **te_kwargs
    )
    adapter_bytes = (out / ADAPTER_FILE).stat().st_size
    training_config = {
        "model": {"pretrained_model_name_or_path": base_name, "revision": None, "variant": None},
        "data": {
            "dataset_name": DATASET_ID,
            "train_data_dir": None,
            "image_column": "image",
            "caption_column": "text",
            "resolution": 32,
        },
        "lora": {
            "rank": RANK,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": 0.0,
            "target_modules": TARGETS,
            "train_text_encoder": train_text_encoder,
        },
        "training": {
            "learning_rate": 1e-4,
            "train_batch_size": 2,
            "num_train_epochs": 3,
            "max_train_steps": 18,
            "seed": 1234,
            "mixed_precision": "no",
            "lr_scheduler": "constant",
        },
        "validation": {"validation_prompts": prompts, "num_validation_images": 1, "validation_steps": 5},
        "output": {
            "output_dir": str(out),
            "push_to_hub": True,
            "hub_model_id": None,
            "hub_private": False,
            "hub_push_checkpoints": False,
            "export_kohya": True,
        },
    }
    (out / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(training_config, sort_keys=False))
    history = [{"step": s, "loss": round(0.5 / s, 5), "lr": 1e-4} for s in range(1, 19)]
    (out / LOSS_HISTORY_FILE).write_text(json.dumps({"history": history}))
    Image.new("RGB", (64, 48), (200, 200, 255)).save(out / LOSS_CURVE_FILE)
    validation = []
    if prompts:
        (out / VALIDATION_DIR / "final").mkdir(parents=True)
        for index, prompt in enumerate(prompts):
            image = f"{VALIDATION_DIR}/final/{index:02d}.png"
            Image.new("RGB", (32, 32), (10 * index, 90, 30)).save(out / image)
            validation.append(ValidationImage(prompt=prompt, image=image))
        Image.new("RGB", (64, 32)).save(out / VALIDATION_DIR / "step-000005.png")
        Image.new("RGB", (64, 32)).save(out / VALIDATION_GRID_FILE)
    summary = TrainSummary(
        base_model=base_name,
        dataset=DATASET_ID,
        num_samples=12,
        global_step=18,
        num_train_epochs=3,
        lora_trainable_parameters=lora_params,
        adapter_file_bytes=adapter_bytes,
        train_seconds=12.5,
        final_loss=history[-1]["loss"],
        command=f"python train_lora.py --pretrained_model_name_or_path {base_name} --dataset_name {DATASET_ID} "
        f"--output_dir {out} --rank {RANK} --lora_alpha {LORA_ALPHA:g} --max_train_steps 18 --seed 1234",
        mixed_precision="no",
        validation=validation,
        instance_prompt=instance_prompt,
        license=license,
    )
    write_summary(out, summary)
    # What must never be pushed: checkpoints (with optimizer state), TensorBoard logs, temp files.
    checkpoint = out / f"{CHECKPOINT_PREFIX}5"
    checkpoint.mkdir()
    # Mirrors lorakit.checkpoint: accelerate state (pickles) plus the LoRA weights and a train_state.json.
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "scaler.pt"):
        (checkpoint / name).write_bytes(b"\0" * 16)
    shutil.copy(out / ADAPTER_FILE, checkpoint / ADAPTER_FILE)
    (checkpoint / "train_state.json").write_text(json.dumps({"global_step": 5}))
    (out / "logs").mkdir()
    (out / "logs" / "events.out.tfevents.1.host").write_bytes(b"tb")
    (out / ".README.md.abc123.tmp").write_text("half-written")
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to prove a failed push leaves the output untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeHfApi:
    """Records Hub calls; `upload_folder` filters files with huggingface_hub's own `filter_repo_objects`."""

    def __init__(self, user: str = "alice", fail: Exception | None = None, fail_on: str = "upload_folder"):
        self.user, self.fail, self.fail_on = user, fail, fail_on
        self.calls: list[tuple[str, dict]] = []
        self.commits: list[dict] = []

    def _maybe_fail(self, name: str) -> None:
        if self.fail is not None and name == self.fail_on:
            raise self.fail

    def whoami(self, **kwargs) -> dict:
        self.calls.append(("whoami", kwargs))
        self._maybe_fail("whoami")
        return {"name": self.user, "type": "user"}

    def create_repo(self, repo_id: str, **kwargs) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        self._maybe_fail("create_repo")
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id: str, **kwargs) -> None:
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))
        self._maybe_fail("create_branch")

    def upload_folder(
        self,
        *,
        repo_id: str,
        folder_path,
        path_in_repo=None,
        allow_patterns=None,
        ignore_patterns=None,
        revision=None,
        **kwargs,
    ):
        self.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path, **kwargs}))
        self._maybe_fail("upload_folder")
        folder = Path(folder_path)
        relative = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        # upload_folder always ignores .git/ and .cache/huggingface; the rest is the caller's patterns.
        kept = list(filter_repo_objects(relative, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        prefix = (path_in_repo.strip("/") + "/") if path_in_repo not in (None, "", ".") else ""
        self.commits.append(
            {
                "repo_id": repo_id,
                "revision": revision or "main",
                "files": sorted(prefix + name for name in kept),
                **kwargs,
            }
        )
        return f"https://huggingface.co/{repo_id}/commit/abc"

    def count(self, name: str) -> int:
        return sum(1 for call, _ in self.calls if call == name)


def environ_without_token() -> dict[str, str]:
    """A copy of the environment with no Hub token variables."""
    return {k: v for k, v in os.environ.items() if k not in {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}}
