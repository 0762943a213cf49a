"""Sharpen the CLIP judge's eyes: a deeper vision tower trained against the frozen text tower.

Stage 1 (`train_clip`) trains both towers jointly; its text tower becomes the pipeline's text encoder.
This stage keeps that text tower fixed (so judge and pipeline still share it) and trains a 4-layer vision
tower plus both projections on fresh images, until shapes, not just colours, are told apart reliably.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from embedded import world
from embedded.train_clip import TEXT_LENGTH, caption_table, contrastive_loss, normalise

VISION_LAYERS = 4


def deeper_judge(stage1: CLIPModel, seed: int) -> CLIPModel:
    """A CLIPModel with a fresh `VISION_LAYERS`-layer vision tower and stage 1's text tower, frozen."""
    config = stage1.config.to_dict()
    config["vision_config"]["num_hidden_layers"] = VISION_LAYERS
    torch.manual_seed(seed)
    judge = CLIPModel(CLIPConfig(**{k: config[k] for k in ("text_config", "vision_config", "projection_dim")}))
    judge.text_model.load_state_dict(stage1.text_model.state_dict())
    judge.text_projection.load_state_dict(stage1.text_projection.state_dict())
    judge.logit_scale.data.copy_(stage1.logit_scale.data)
    judge.text_model.requires_grad_(False)
    return judge


def train_judge(stage1_dir: Path, out_dir: Path, steps: int, pool_size: int, batch_size: int = 128,
                lr: float = 2e-3, seed: int = 0) -> dict:
    """Train the deeper vision tower and save the judge (model + processor) to `out_dir`."""
    start = time.time()
    judge = deeper_judge(CLIPModel.from_pretrained(stage1_dir), seed)
    processor = CLIPProcessor.from_pretrained(stage1_dir)
    concepts = world.all_concepts()
    rows = world.sample(concepts, pool_size, seed=seed + 301)
    pixels = normalise(world.to_array([image for image, _, _ in rows]))
    owners = torch.tensor([concepts.index(concept) for _, _, concept in rows])
    texts, text_owner = caption_table(concepts)
    tokens = processor.tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, return_tensors="pt")
    with torch.no_grad():  # the text tower is frozen: its pooled states are computed once
        pooled = judge.text_model(input_ids=tokens["input_ids"]).pooler_output
    trainable = [p for p in judge.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    generator = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        batch = torch.randint(len(rows), (batch_size,), generator=generator)
        image_emb = judge.get_image_features(pixel_values=pixels[batch]).pooler_output
        loss = contrastive_loss(image_emb, judge.text_projection(pooled), owners[batch], text_owner, judge.logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    judge.requires_grad_(True)
    judge.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return {"steps": steps, "final_loss": float(np.mean(losses[-20:])), "seconds": time.time() - start}


def main(argv: list[str] | None = None) -> None:
    """CLI: --stage1 DIR (from train_clip) -> --out DIR, one thread by default."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stage1", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--pool_size", type=int, default=14400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(train_judge(args.stage1, args.out, args.steps, args.pool_size, seed=args.seed))


if __name__ == "__main__":
    main()
