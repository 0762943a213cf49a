"""A plain folder of images with a caption file beside each one, and kohya's `N_words` repeat folders.

    my-data/
      10_naruto/            images here count 10 times per epoch; "naruto" captions those without a file
        img001.png  img001.txt
      1_background/
        wide_scene.webp  wide_scene.txt

The scan reads the tree once, before any model loads, and reports every problem with the files it concerns;
nothing is written. `lorakit.data` decides when a folder is read this way (see `is_sidecar_folder`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# Files `datasets` reads as rows; a folder holding one of them is a dataset in one of the older formats.
DATA_FILE_NAMES = frozenset({"metadata.jsonl", "metadata.csv"})
DATA_FILE_EXTENSIONS = frozenset({".parquet", ".arrow", ".jsonl", ".csv"})
# kohya's convention: a leading number, an underscore, then the class words. A sign is matched so that
# "-1_name" is reported as a bad repeat count instead of silently repeating once.
REPEAT_FOLDER = re.compile(r"^(-?\d+)_(.+)$")
SHOWN_PATHS = 5


class SidecarError(ValueError):
    """The folder cannot be trained on as it is; `lorakit.data` re-raises it as a DataError."""


@dataclass
class SidecarScan:
    """What the scan found: one entry per image (not yet repeated) and the counts the run reports."""

    images: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)
    folder_captions: int = 0  # images in a repeat folder without a caption file: captioned by the folder's words
    skipped_files: int = 0  # files that are neither images nor caption files
    orphan_captions: int = 0  # caption files with no image beside them

    @property
    def rows(self) -> int:
        """Samples in one epoch: every image times its folder's repeats."""
        return sum(self.repeats)

    def report(self) -> dict[str, int]:
        """The counts printed at the start and kept in the run summary."""
        return {
            "images": len(self.images),
            "rows": self.rows,
            "folder_captions": self.folder_captions,
            "skipped_files": self.skipped_files,
            "orphan_captions": self.orphan_captions,
        }


def _walk(root: Path) -> list[tuple[str, list[str]]]:
    """(folder, sorted file names) for every folder under `root`, in a stable order; hidden entries skipped."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.append((folder, sorted(name for name in files if not name.startswith("."))))
    return found


def is_sidecar_folder(root: Path, caption_extension: str) -> bool:
    """A folder of images with caption files (or repeat folders), and no data files of the older formats.

    Detection order, for `--train_data_dir`: a `save_to_disk` folder; then data files (`metadata.jsonl`/`.csv`,
    parquet, arrow) read by `datasets`; then this format; else `datasets`' imagefolder (which needs captions).
    """
    has_caption = False
    for folder, files in _walk(root):
        for name in files:
            suffix = Path(name).suffix.lower()
            if name in DATA_FILE_NAMES or suffix in DATA_FILE_EXTENSIONS:
                return False
            has_caption = has_caption or suffix == caption_extension
        if folder != str(root) and REPEAT_FOLDER.match(Path(folder).name):
            has_caption = True
    return has_caption


def repeat_folder(relative: Path) -> tuple[int, str] | None:
    """(repeats, class words) of the innermost `N_words` folder holding a file, None outside any."""
    for part in reversed(relative.parts[:-1]):
        match = REPEAT_FOLDER.match(part)
        if match:
            return int(match.group(1)), match.group(2).replace("_", " ")
    return None


def read_caption(path: Path) -> str:
    """The caption file's text, stripped, line breaks joined by spaces (some captioners wrap long lines)."""
    return " ".join(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _listing(paths: list[str], total: int) -> str:
    shown = "\n  ".join(paths[:SHOWN_PATHS])
    more = f"\n  ... and {total - SHOWN_PATHS} more" if total > SHOWN_PATHS else ""
    return f"\n  {shown}{more}\n"


def scan_folder(root: Path, caption_extension: str) -> SidecarScan:
    """Images, their captions and repeats under `root`. Raises SidecarError naming the files and the fix."""
    scan = SidecarScan()
    uncaptioned, empty, bad_repeats = [], [], set()
    caption_stems: set[str] = set()
    image_stems: set[str] = set()
    for folder, files in _walk(root):
        names = set(files)
        for name in files:
            path = Path(folder) / name
            suffix = path.suffix.lower()
            if suffix == caption_extension:
                caption_stems.add(str(path.with_suffix("")))
                continue
            if suffix not in IMAGE_EXTENSIONS:
                scan.skipped_files += 1
                continue
            relative = path.relative_to(root)
            image_stems.add(str(path.with_suffix("")))
            repeat = repeat_folder(relative)
            if repeat is not None and repeat[0] < 1:
                bad_repeats.add(str(Path(*relative.parts[:-1])))
                continue
            caption_name = path.stem + caption_extension
            if caption_name in names:
                caption = read_caption(Path(folder) / caption_name)
                if not caption:
                    empty.append(str(relative.with_suffix(caption_extension)))
                    continue
            elif repeat is not None:
                caption, scan.folder_captions = repeat[1], scan.folder_captions + 1
            else:
                uncaptioned.append(str(relative))
                continue
            scan.images.append(str(path))
            scan.captions.append(caption)
            scan.repeats.append(repeat[0] if repeat is not None else 1)
    scan.orphan_captions = len(caption_stems - image_stems)
    if bad_repeats:
        folders = sorted(bad_repeats)
        raise SidecarError(
            f"{len(folders)} repeat folder(s) under {root} ask for fewer than 1 repeat:"
            f"{_listing(folders, len(folders))}"
            "A folder named N_words repeats its images N times per epoch; rename it with N of 1 or more."
        )
    if uncaptioned:
        raise SidecarError(
            f"{len(uncaptioned)} image(s) under {root} have no {caption_extension} caption file and are not in a "
            f"repeat folder:{_listing(uncaptioned, len(uncaptioned))}Write a caption file beside each (same name, "
            f"{caption_extension}), or move them into a folder named N_words, whose words caption them."
        )
    if empty:
        raise SidecarError(
            f"{len(empty)} caption file(s) under {root} are empty:{_listing(empty, len(empty))}"
            "Write the caption into each, or delete the file inside a repeat folder to use the folder's words."
        )
    if not scan.images:
        raise SidecarError(
            f"{root} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) to train on; "
            f"{scan.skipped_files} other file(s) were skipped. Check --train_data_dir."
        )
    return scan
