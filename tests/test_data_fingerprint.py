"""The training data's fingerprint: what the latent cache and resume compare, computed from the rows' content."""

from __future__ import annotations

import json

from conftest import make_tiny_imagefolder
from PIL import Image

from lorakit.config import DataConfig
from lorakit.data import prepare_dataset


def _fingerprint(folder) -> str:
    return prepare_dataset(DataConfig(train_data_dir=str(folder), resolution=32), seed=0).fingerprint


def test_fingerprint_is_stable_and_follows_captions_and_pixels(tmp_path):
    folder = make_tiny_imagefolder(tmp_path / "data", rows=4)
    before = _fingerprint(folder)
    assert _fingerprint(folder) == before

    metadata = (folder / "metadata.jsonl").read_text()
    rows = [json.loads(line) for line in metadata.splitlines()]
    rows[2]["text"] = "a green square on a black background"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert _fingerprint(folder) != before
    (folder / "metadata.jsonl").write_text(metadata)
    assert _fingerprint(folder) == before

    image = Image.open(folder / "001.png").convert("RGB")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(folder / "001.png")
    assert _fingerprint(folder) != before
