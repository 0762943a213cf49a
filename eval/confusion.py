"""Which colour the judge sees for each prompted colour, before and after the adapter.

A LoRA that teaches one concept can bleed into its neighbours: after a "purple" adapter, "a blue square" may come
out purple. The R-precision of the blue prompts shows that something went wrong; this table shows what: the share
of images of each prompted colour that the judge's best caption gives each colour. It needs a parser that reads a
colour out of a caption (the embedded world's `parse_caption`), so it exists only where one is given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from lorakit import markdown as md


class Described(Protocol):
    """What a caption parser returns: at least the colour a caption names."""

    colour: str


def colour_shares(
    prompts: Sequence[str], judged: Sequence[str], parse: Callable[[str], Described | None]
) -> dict[str, dict[str, float]]:
    """For each prompted colour, the share of its images whose judged caption names each colour.

    `judged[i]` is the candidate caption the judge ranked first for image i of `prompts[i]`; prompts the parser
    cannot read are left out, and a judged caption it cannot read counts as "?".
    """
    counts: dict[str, Counter] = {}
    for prompt, best in zip(prompts, judged, strict=True):
        wanted = parse(prompt)
        if wanted is None:
            continue
        seen = parse(best)
        counts.setdefault(wanted.colour, Counter())[seen.colour if seen else "?"] += 1
    return {colour: {k: n / sum(c.values()) for k, n in sorted(c.items())} for colour, c in sorted(counts.items())}


def confusion_report(
    prompts: Sequence[str],
    base_judged: Sequence[str],
    adapter_judged: Sequence[str],
    parse: Callable[[str], Described | None],
) -> dict:
    """Base and adapter colour shares, and how many images each prompted colour had."""
    images = Counter(parsed.colour for parsed in map(parse, prompts) if parsed is not None)
    return {
        "base": colour_shares(prompts, base_judged, parse),
        "adapter": colour_shares(prompts, adapter_judged, parse),
        "images": dict(sorted(images.items())),
    }


def confusion_markdown(confusion: dict) -> str:
    """Rows: prompted colour; columns: judged colour; each cell 'base -> LoRA' share (blank where both are 0)."""
    judged = sorted({c for side in ("base", "adapter") for row in confusion[side].values() for c in row})
    rows = []
    for colour, count in confusion["images"].items():
        cells = [f"{colour} ({count})"]
        for seen in judged:
            before = confusion["base"].get(colour, {}).get(seen, 0.0)
            after = confusion["adapter"].get(colour, {}).get(seen, 0.0)
            cell = f"{before:.2f} → {after:.2f}" if before or after else ""
            cells.append(f"**{cell}**" if seen == colour and cell else cell)
        rows.append(cells)
    table = md.markdown_table(["prompted (images)", *judged], rows, align=["---", *["---:"] * len(judged)])
    return (
        "Colour the judge sees, by prompted colour (share of images, base → base + LoRA; the diagonal is bold). "
        "A concept bleeding into a neighbour shows as a share moving off the diagonal.\n\n" + table
    )
