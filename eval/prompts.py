"""Prompt files: plain text, one prompt a line; blank lines and `#` comments are ignored."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorakit.paths import EMBEDDED_PROMPTS

# Files in the embedded prompt folder that list candidate captions rather than prompts to generate.
CANDIDATE_FILE_NAMES = ("candidates.txt", "world_captions.txt", "captions.txt")


class EvalInputError(ValueError):
    """Bad input to the evaluation, found before any model runs."""


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one file, named after it (`heldout.txt` -> `heldout`)."""

    name: str
    path: Path
    prompts: tuple[str, ...]


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts in `path`; raises EvalInputError if the file is missing or holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"Prompt file not found: {path}. Pass --prompts with existing files, one prompt a line.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise EvalInputError(f"Prompt file {path} is empty: write one prompt per line.")
    return prompts


def load_prompt_sets(paths: list[str | Path]) -> list[PromptSet]:
    """One PromptSet per file, in the order given; file stems must be distinct."""
    if not paths:
        raise EvalInputError("No prompt files: pass --prompts FILE [FILE ...] (one prompt a line).")
    sets = [PromptSet(Path(p).stem, Path(p), tuple(read_prompt_file(p))) for p in paths]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise EvalInputError(f"Prompt files need distinct names (the report keys on them): {names}")
    return sets


def default_prompt_files(folder: Path = EMBEDDED_PROMPTS) -> list[Path]:
    """The embedded prompt sets (every *.txt but candidate lists), sorted by name."""
    return sorted(p for p in folder.glob("*.txt") if p.name not in CANDIDATE_FILE_NAMES)


def default_candidates_file(folder: Path = EMBEDDED_PROMPTS) -> Path | None:
    """The embedded world's full caption list, if the embedded world ships one."""
    for name in CANDIDATE_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    return None


def candidate_prompts(
    prompt_sets: list[PromptSet], candidates_file: str | Path | None, extra_texts: Sequence[str] = ()
) -> list[str]:
    """R-precision candidates: given texts and file, plus every evaluated prompt; duplicates removed."""
    extra = list(extra_texts) + (read_prompt_file(candidates_file) if candidates_file is not None else [])
    evaluated = [prompt for prompt_set in prompt_sets for prompt in prompt_set.prompts]
    return list(dict.fromkeys([*extra, *evaluated]))


def embedded_world_captions() -> list[str]:
    """Every caption the embedded world knows (hard-negative blobs included), if its code is importable."""
    try:
        from embedded.measure import candidate_captions
    except ImportError:
        return []
    return list(candidate_captions())


def embedded_world_language() -> tuple[Callable[[str, str], bool] | None, Callable[[str], object] | None]:
    """The embedded world's `same_meaning` and `parse_caption`, if its code is importable; else (None, None).

    With them, a freely phrased prompt is judged by what it says (colour, shape and, if named, background) and
    the report gains the colour confusion table.
    """
    try:
        from embedded.world import parse_caption, same_meaning
    except ImportError:
        return None, None
    return same_meaning, parse_caption
