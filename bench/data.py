"""Image folders the bench makes itself (imagefolder + metadata.jsonl), so every case runs offline."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square")
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "purple": (140, 40, 170)}


def draw_sample(size: int, colour: str, shape: str, rng: random.Random) -> Image.Image:
    """A coloured shape on a noisy background: noise keeps JPEG decoding as costly as a photo's."""
    noise = Image.effect_noise((size, size), 64).convert("RGB")
    image = Image.blend(Image.new("RGB", (size, size), (rng.randint(0, 255),) * 3), noise, 0.3)
    draw = ImageDraw.Draw(image)
    margin = size // 4
    box = (margin, margin, size - margin, size - margin)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def make_image_folder(folder: str | Path, count: int, size: int, fmt: str = "png", seed: int = 0) -> Path:
    """Write `count` captioned images of `size` px (png or jpeg) with a metadata.jsonl; reuse a complete one.

    Callers put the count in the folder name: a folder is never rewritten with fewer images.
    """
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if metadata.is_file() and sum(1 for _ in metadata.open()) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    suffix = "jpg" if fmt == "jpeg" else "png"
    lines = []
    for index in range(count):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        name = f"{index:05d}.{suffix}"
        image = draw_sample(size, colour, shape, rng)
        image.save(folder / name, **({"quality": 90} if fmt == "jpeg" else {}))
        lines.append(json.dumps({"file_name": name, "text": f"a {colour} {shape} drawing"}))
    metadata.write_text("\n".join(lines) + "\n")
    return folder
