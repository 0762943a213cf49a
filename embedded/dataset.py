"""Write a part of the world as an `imagefolder` (PNGs + metadata.jsonl) with a dataset card."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from embedded.world import Concept

CARD = """---
license: apache-2.0
pretty_name: "{title}"
task_categories:
- text-to-image
size_categories:
- n<1K
---

# {title}

{description}

- Rows: {rows} ({concepts} concepts), 32x32 RGB PNG, columns `image` and `text`.
- Made by `python -m embedded.build` (seeded, deterministic): shapes drawn at 256 px with PIL and downscaled
  with LANCZOS (anti-aliased), random size and position, captions drawn from a small grammar, such as
  "an orange star on a white background", "a red circle" or "a picture of a star in blue against black".
- Load: `datasets.load_dataset("imagefolder", data_dir="{folder}")`.
"""


def write_imagefolder(
    rows: list[tuple[Image.Image, str, Concept]], out_dir: Path, title: str, description: str
) -> int:
    """Save rows as `NNNNN.png` + `metadata.jsonl` + `README.md`; return the number of rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, caption, _) in enumerate(rows):
        name = f"{index:05d}.png"
        image.save(out_dir / name, optimize=True)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (out_dir / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    card = CARD.format(
        title=title,
        description=description,
        rows=len(rows),
        concepts=len({concept for _, _, concept in rows}),
        folder=out_dir.as_posix(),
    )
    (out_dir / "README.md").write_text(card.replace("n<1K", "n<1K" if len(rows) < 1000 else "1K<n<10K"))
    return len(rows)


def write_prompts(path: Path, prompts: list[str]) -> None:
    """One prompt a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(prompts) + "\n")
