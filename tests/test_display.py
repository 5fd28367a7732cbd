"""How the book shows results (derprop.book.display): Markdown tables, boxes, and colours no class uses."""

from __future__ import annotations

import numpy as np

from derprop.book.display import (BROKEN_RGB, CHANGE_COLOURS, FIXED_RGB, UNCHANGED_RGB, Markdown, box, change_image,
                                  class_colours, code, colorize, column_format, escape_html, mean_std, table)
from derprop.data.labels import VOC_CLASSES, voc_palette
from tests.fixtures import PAYLOAD, render_myst, shows_as_text


def test_table_renders_markdown_with_headers_formats_and_alignment():
    t = table([{"run": "full", "miou": 0.4321, "n": 3}, {"run": "w/o DLP", "miou": None, "n": 3}],
              ["run", "miou=mIoU", "n=seeds"], fmt={"miou": ".1%"})
    lines = t._repr_markdown_().splitlines()
    assert lines[0] == "| run | mIoU | seeds |"
    assert lines[1] == "|---|---:|---:|"  # numbers (and missing values) right-aligned, text left
    assert lines[2] == "| full | 43.2% | 3 |" and lines[3] == "| w/o DLP | – | 3 |"


def test_table_escapes_pipes_transposes_and_captions():
    t = table([["a|b", 1.0]], ["x=|x|", "y"], transpose=True, caption="A caption")
    text = t._repr_markdown_()
    assert text.startswith(":::{table} A caption\n") and text.endswith("\n:::")
    assert "| \\|x\\| | a\\|b |" in text and "| y | 1 |" in text


def test_box_is_an_admonition_of_bullets():
    text = box("What you saw", ["one", "two $x$"])._repr_markdown_()
    assert text == ":::{admonition} What you saw\n:class: tip\n- one\n- two $x$\n:::"


def test_change_colours_are_no_class_colour():
    palette = {tuple(c) for c in np.array(voc_palette()).reshape(-1, 3)[: len(VOC_CLASSES)]}
    assert not {FIXED_RGB, BROKEN_RGB, UNCHANGED_RGB} & palette
    img = change_image(np.array([[True, False]]), np.array([[False, True]]))
    assert img[0, 0].tolist() == list(FIXED_RGB) and img[0, 1].tolist() == list(BROKEN_RGB)
    assert set(CHANGE_COLOURS.values()) == {FIXED_RGB, BROKEN_RGB, UNCHANGED_RGB}


def test_class_colours_follow_colorize():
    names = ["background", "cat", "dog"]
    colours = class_colours(names, [0, 2])
    assert list(colours) == ["background", "dog"]
    assert colorize(np.array([[2]]))[0, 0].tolist() == list(colours["dog"])


def test_a_cell_read_from_a_file_shows_its_characters_and_a_chapter_cell_its_markdown():
    text = table([{"device": PAYLOAD, "n": 1}], ["device", "n"])._repr_markdown_()
    rendered = render_myst(text)
    assert "<table>" in rendered and shows_as_text(rendered, PAYLOAD.replace("|", "").strip()), rendered
    ours = render_myst(table([{"key": code("optim.lr"), "v": Markdown("**fails**"), "c": code(PAYLOAD)}])._repr_markdown_())
    assert "<code>optim.lr</code>" in ours and "<strong>fails</strong>" in ours
    assert "<img" not in ours and "<script" not in ours and "&lt;script&gt;" in ours  # code shows any text as code
    headed = render_myst(table([{"eta": 0.5}], ["eta=$\\eta_{ep}$"])._repr_markdown_())
    assert 'class="math' in headed  # a header is the chapter's Markdown


def test_escape_html_leaves_no_tag():
    assert escape_html(PAYLOAD).count("<") == 0 and escape_html('"x"') == "&quot;x&quot;"


def test_a_caption_with_code_and_maths_renders_as_a_caption():
    text = table([{"a": 1}], caption="`configs/cpu_scenes.yaml` as $\\Delta^q v$ resolves it")._repr_markdown_()
    # a backtick fence cannot carry a caption with backticks (CommonMark): the reader saw "```{table} `configs…"
    assert text.startswith(":::{table} `configs/cpu_scenes.yaml` as") and text.endswith("\n:::")


def test_each_column_reads_one_way():
    assert column_format([0, 1, 2, 6]) == ".0f" and column_format([0.0, 1.0, 6.0]) == ".0f"  # orders q
    assert column_format([1.0, 10.0, 1000.0]) == ".0f" and column_format([1681, 20000]) == ",.0f"  # pixels M
    assert column_format([43.21, 0.05]) == ".2f"  # three digits of the largest, one of the smallest
    assert column_format([0.123, 0.5]) == ".3f" and column_format([150.5, 20.25]) == ".0f"
    assert column_format([1e-13, 0.4]) == ".2e" and column_format([2.5e6, 1.5]) == ".2e"  # only where needed
    assert column_format(["a", None]) is None
    t = table([{"q": 0, "M": 1.0, "x": 1e-13}, {"q": 6, "M": 1000.0, "x": 0.25}])._repr_markdown_()
    assert "| 0 | 1 | 1.00e−13 |" in t and "| 6 | 1000 | 2.50e−01 |" in t


def test_one_seed_has_no_spread_to_show():
    assert mean_std(35.2, 0.0, 1) == "35.20 (n = 1)" and mean_std(35.2, 1.04, 3) == "35.20 ± 1.04"
    assert mean_std(-0.5, 0.1, 2, ".1f") == "\u22120.5 ± 0.1"
