"""The colour confusion table: which colour the judge sees for each prompted colour."""

from __future__ import annotations

import pytest

from embedded.world import parse_caption
from eval.confusion import colour_shares, confusion_markdown, confusion_report


def test_shares_count_the_judged_colour_per_prompted_colour():
    prompts = ["a blue square", "a blue star on white", "blue circle", "a red cross", "zorblax"]
    judged = [
        "a blue square on a white background",
        "a purple star on a white background",
        "a purple circle on a black background",
        "a red cross on a black background",
        "a red cross on a black background",  # an unreadable prompt is left out
    ]
    shares = colour_shares(prompts, judged, parse_caption)
    assert shares == {"blue": {"blue": pytest.approx(1 / 3), "purple": pytest.approx(2 / 3)}, "red": {"red": 1.0}}


def test_unreadable_judged_caption_counts_as_unknown():
    assert colour_shares(["a red circle"], ["something else"], parse_caption) == {"red": {"?": 1.0}}


def test_table_shows_bleeding_off_the_diagonal():
    prompts = ["a blue square", "a blue star"]
    report = confusion_report(
        prompts,
        ["a blue square on a white background", "a blue star on a white background"],
        ["a blue square on a white background", "a purple star on a white background"],
        parse_caption,
    )
    assert report["images"] == {"blue": 2}
    table = confusion_markdown(report)
    row = next(line for line in table.splitlines() if line.startswith("| blue (2)"))
    assert "**1.00 → 0.50**" in row and "0.00 → 0.50" in row
