"""Markdown that lorakit writes: tables, and generated blocks re-rendered from result files.

    markdown_table(["setting", "value"], [["rank", 8], ["lr", None]])
    markdown_table(["case", "s/step"], rows, align=["---", "---:"])   # second column right-aligned
    render_blocks(text, {"train-run": train_run})   # every <!-- generated:NAME --> body from its renderer

Every table of the model card, the eval and bench reports and the docs is built by `markdown_table`. Pages with
numbers (README.md, the docs/ pages) keep their prose as Markdown and each figure in a block
`<!-- generated:NAME -->` ... `<!-- /generated:NAME -->`; `render_blocks` replaces only those bodies
(`python docs/build.py --blocks` for every page). Pure string work: no I/O, no third-party imports.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

MISSING = "–"  # what an empty cell shows (None, an empty list)
ALIGNMENT = re.compile(r":?-{3,}:?")
BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.DOTALL)
OPENING = re.compile(r"<!-- generated:([\w-]+) -->")


def table_cell(value: Any) -> str:
    """One cell's text: None and empty lists as MISSING, lists joined by commas, `|` escaped, newlines folded."""
    if value is None:
        return MISSING
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value) if value else MISSING
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A Markdown table, no trailing newline; `align` holds one delimiter per column ("---", "---:", ":---:")."""
    width = len(header)
    align = ["---"] * width if align is None else list(align)
    if len(align) != width:
        raise ValueError(f"{len(align)} alignments for {width} columns")
    bad = [a for a in align if not ALIGNMENT.fullmatch(a)]
    if bad:
        raise ValueError(f"alignments must look like ---, ---: or :---:, not {bad}")
    lines = [_row(header), "|" + "|".join(align) + "|"]
    for number, row in enumerate(rows, 1):
        if len(row) != width:
            raise ValueError(f"row {number} has {len(row)} cells for {width} columns: {list(row)}")
        lines.append(_row(row))
    return "\n".join(lines)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(table_cell(c) for c in cells) + " |"


def block_names(text: str) -> list[str]:
    """Names of the generated blocks in `text`, in order."""
    return OPENING.findall(text)


def render_blocks(text: str, renderers: Mapping[str, Callable[[], str]]) -> str:
    """`text` with every generated block's body replaced by its renderer's output."""
    opened = block_names(text)
    closed = [m.group("name") for m in BLOCK.finditer(text)]
    if opened != closed:
        unclosed = sorted(set(opened) - set(closed))
        raise ValueError(f"Generated block(s) without a matching closing marker: {unclosed}")
    unknown = sorted(set(opened) - set(renderers))
    if unknown:
        raise ValueError(f"No renderer for generated block(s) {unknown}; known: {sorted(renderers)}")

    def replace(match: re.Match) -> str:
        body = renderers[match.group("name")]().strip("\n")
        return f"{match.group(1)}{body}\n{match.group(4)}"

    return BLOCK.sub(replace, text)
