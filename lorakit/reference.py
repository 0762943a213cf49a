"""A real architecture (e.g. BK-SDM-Tiny) with random weights, from its config files alone.

The checkpoint cannot be downloaded here, so tests and benchmarks build the same modules from
`configs/architectures/bk-sdm-tiny/*.json`, add a locally made tokenizer, and save a diffusers folder that
goes through exactly the code path the real `nota-ai/bk-sdm-tiny` would.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lorakit.tokenizer import build_clip_tokenizer

# Caption words of the naruto BLIP captions' style, so reference runs tokenize like real ones.
REFERENCE_WORDS = ("a", "an", "the", "of", "with", "and", "man", "woman", "girl", "boy", "hair", "drawing", "anime")


def _config(folder: Path, component: str) -> dict:
    return json.loads((folder / f"{component}_config.json").read_text())


def build_reference_pipeline(config_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """Save a StableDiffusionPipeline with the reference configs and seeded random weights to `out_dir`."""
    config_dir = Path(config_dir)
    tokenizer = build_clip_tokenizer(list(REFERENCE_WORDS))
    text_config = {k: v for k, v in _config(config_dir, "text_encoder").items() if not k.startswith("_")}
    text_config.pop("architectures", None)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(_config(config_dir, "unet"))
    vae = AutoencoderKL.from_config(_config(config_dir, "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(_config(config_dir, "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
