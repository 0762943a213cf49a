"""Markdown tables, the one builder every report, card and docs page of lorakit uses.

    markdown_table(["setting", "value"], [["rank", 8], ["lr", None]])
    markdown_table(["case", "s/step"], rows, align=["---", "---:"])   # second column right-aligned

Pure string work: no I/O, no third-party imports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

MISSING = "–"  # what an empty cell shows (None, an empty list)
ALIGNMENT = re.compile(r":?-{3,}:?")


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
