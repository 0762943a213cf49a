"""lorakit.markdown: the one table builder (escaping, empty cells, alignment, shape checks) and generated blocks."""

from __future__ import annotations

import pytest

from lorakit.markdown import block_names, markdown_table, render_blocks


def test_table_has_header_delimiter_and_rows():
    assert markdown_table(["a", "b"], [["1", 2], ["x", 3.5]]) == "| a | b |\n|---|---|\n| 1 | 2 |\n| x | 3.5 |"


def test_pipes_and_newlines_in_cells_cannot_break_the_table():
    text = markdown_table(["flag", "note"], [["bf16|fp16", "two\nlines"]])
    assert text.splitlines()[2] == "| bf16\\|fp16 | two lines |"
    assert markdown_table(["a|b"], []).splitlines()[0] == "| a\\|b |"


def test_none_and_empty_lists_show_a_dash_and_lists_are_joined():
    row = markdown_table(["a", "b", "c", "d"], [[None, [], ["to_q", "to_k"], 0]]).splitlines()[2]
    assert row == "| – | – | to_q, to_k | 0 |"


def test_alignment_per_column():
    text = markdown_table(["name", "count", "mid"], [["x", 1, "y"]], align=["---", "---:", ":---:"])
    assert text.splitlines()[1] == "|---|---:|:---:|"


def test_column_count_mismatch_raises():
    with pytest.raises(ValueError, match="row 2 has 1 cells for 2 columns"):
        markdown_table(["a", "b"], [["1", "2"], ["3"]])
    with pytest.raises(ValueError, match="1 alignments for 2 columns"):
        markdown_table(["a", "b"], [], align=["---:"])
    with pytest.raises(ValueError, match="alignments must look like"):
        markdown_table(["a"], [], align=["right"])


def test_rows_may_be_any_iterable_and_are_read_once():
    rows = ((str(i), i * i) for i in range(3))
    assert markdown_table(["n", "square"], rows).splitlines()[2:] == ["| 0 | 0 |", "| 1 | 1 |", "| 2 | 4 |"]


def test_render_blocks_replaces_only_the_body_and_rejects_broken_markers():
    text = "intro 3\n<!-- generated:x -->\nold 1\n<!-- /generated:x -->\noutro\n"
    expected = "intro 3\n<!-- generated:x -->\nnew 2\n<!-- /generated:x -->\noutro\n"
    assert render_blocks(text, {"x": lambda: "new 2"}) == expected
    with pytest.raises(ValueError, match="No renderer"):
        render_blocks(text, {})
    with pytest.raises(ValueError, match="closing marker"):
        render_blocks("<!-- generated:x -->\nold\n", {"x": lambda: "new"})
    assert block_names(text + "<!-- generated:y -->\n\n<!-- /generated:y -->\n") == ["x", "y"]


def test_an_empty_body_stays_stable():
    """A renderer with nothing to say (a condition not met) leaves an empty block that renders the same again."""
    once = render_blocks("<!-- generated:x -->\nold\n<!-- /generated:x -->\n", {"x": lambda: ""})
    assert once == "<!-- generated:x -->\n\n<!-- /generated:x -->\n"
    assert render_blocks(once, {"x": lambda: ""}) == once
