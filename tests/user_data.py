"""Helpers for the own-data tests: folders of images with caption files, in kohya's repeat-folder layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Sizes of the generated images: square, 2:1 and 1:2, each a little larger than its bucket so nothing upscales.
SQUARE, WIDE, TALL = (56, 56), (80, 40), (40, 80)
# Buckets the tiny pipeline (VAE factor 4) trains with: area at most 48², sides multiples of 16 in [16, 64],
# which gives an exact 2:1 (64x32), 1:2 (32x64) and square (48x48) bucket.
BUCKET_FLAGS = (
    "--resolution", "48", "--enable_bucket", "--bucket_reso_steps", "16", "--min_bucket_reso", "16",
    "--max_bucket_reso", "64",
)  # fmt: skip


def save_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A seeded noisy image in the format the suffix names (PNG, JPEG, WebP or BMP)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_repeat_tree(root: Path) -> Path:
    """The README's layout at toy scale: 3 images x 3 repeats (one captioned by its folder), 3 images x 1.

    3_red circle/  wide.png + .txt, tall.jpg + .txt, square.webp (no caption: "red circle")
    1_background/  wide.webp + .txt, nested/tall.png + .txt, square.jpg + .txt, notes.md (skipped)
    """
    repeat, once = root / "3_red circle", root / "1_background"
    save_image(repeat / "wide.png", WIDE, 0)
    (repeat / "wide.txt").write_text("a red square, on a white background\n")
    save_image(repeat / "tall.jpg", TALL, 1)
    (repeat / "tall.txt").write_text("a blue circle, on a black background")
    save_image(repeat / "square.webp", SQUARE, 2)
    save_image(once / "wide.webp", WIDE, 3)
    (once / "wide.txt").write_text("a green square")
    save_image(once / "nested" / "tall.png", TALL, 4)
    (once / "nested" / "tall.txt").write_text("a green circle")
    save_image(once / "square.jpg", SQUARE, 5)
    (once / "square.txt").write_text("a white background")
    (once / "notes.md").write_text("not an image")
    return root
