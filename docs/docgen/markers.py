"""Generated blocks in Markdown: `<!-- generated:NAME -->` ... `<!-- /generated:NAME -->`, re-rendered from results."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)", re.DOTALL)
OPENING = re.compile(r"<!-- generated:([\w-]+) -->")


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
