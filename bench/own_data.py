"""Own-data cases of `python -m bench train`: folders of images with caption files, as users hold them.

    python -m bench train --cases own-data sidecar-scan --out bench/results/train-own-data-cpu.json

`own-data`: 1,000 mixed-aspect JPEGs (sides from 512 to 2048 px) with caption files, decoded, resized and
cropped every step with the default data settings, square and with `--enable_bucket`, on the embedded model and
the BK-SDM-Tiny architecture: the figure is the data wait as a share of step time. `sidecar-scan`: a generated
tree of 10,000 files (images and their captions in repeat folders), timed to the first training step.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from bench.data import draw_sample

# (width, height) shapes of the mixed-aspect folder: square, 3:2, 2:1 and their portrait turns.
ASPECTS = ((1, 1), (3, 2), (2, 3), (2, 1), (1, 2))
SIDES = (512, 2048)  # the longer side is drawn from this range


def make_mixed_aspect_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs of mixed aspect ratios with a `.txt` caption beside each, in one repeat folder; reused when
    complete (the caption files are written last, so a half-made folder is redone)."""
    images = folder / "1_shapes"
    if len(list(images.glob("*.txt"))) == count:
        return folder
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions = []
    for index in range(count):
        aspect_w, aspect_h = ASPECTS[index % len(ASPECTS)]
        scale = rng.randint(*SIDES) / max(aspect_w, aspect_h)
        colour, shape = rng.choice(["red", "green", "blue", "purple"]), rng.choice(["circle", "square"])
        # Noise drawn small and scaled up: a photo's decoding cost without minutes of generation.
        image = draw_sample(256, colour, shape, rng)
        image.resize((round(aspect_w * scale), round(aspect_h * scale)), Image.Resampling.BILINEAR).save(
            images / f"{index:05d}.jpg", quality=90
        )
        captions.append(f"a {colour} {shape} drawing")
    for index, caption in enumerate(captions):
        (images / f"{index:05d}.txt").write_text(caption)
    return folder


def make_scan_tree(folder: Path, files: int, seed: int = 0) -> Path:
    """`files` files: half small PNGs, half their captions, spread over ten repeat folders; reused when complete."""
    pairs = files // 2
    marker = folder / f".complete-{files}"
    if marker.is_file():
        return folder
    rng = random.Random(seed)
    for index in range(pairs):
        sub = folder / f"{1 + index % 10}_class{index % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        draw_sample(32, rng.choice(["red", "blue"]), "circle", rng).save(sub / f"{index:05d}.png")
        (sub / f"{index:05d}.txt").write_text(f"a drawing number {index}")
    marker.write_text("")
    return folder
