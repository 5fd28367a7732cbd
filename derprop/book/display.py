"""How the book shows results: tables as Markdown, boxes of findings, figures in one legible style.

Explained in the book's start page *Start here* (``book/intro.md``), whose findings box and method figure
are made with it; every chapter uses it. Plain Python and numpy (matplotlib only inside the functions
that draw), so that :mod:`derprop.book.viewer` can use it without loading torch.

* :func:`table` turns records into a Markdown table. A notebook displays it as Markdown: in the built book
  it is a real table (MyST parses it, so ``$...$`` maths and ``{eq}`` references work in its headers and in
  the cells a chapter marks as :class:`Markdown`), never padded text that a narrow column clips.
* :func:`box` is an admonition of Markdown lines: the "What you saw" summary that ends a chapter, the
  findings on the start page.
* Everything read from a file is shown as text, never as markup: a cell of :func:`table` is escaped
  (:func:`escape_markdown`) unless the chapter wrote it as :class:`Markdown` or :func:`code`, and the
  sentences of :func:`derprop.book.report.cpu_findings` and the captions of :func:`derprop.book.viewer.status`
  escape the values they quote (:func:`escape_markdown`, :func:`escape_html`). A class name or a device name
  such as ``<img src=x onerror=…>`` in a results file shows as those characters, and runs nothing.
* :func:`book_style` sets matplotlib's fonts and sizes for figures that stay legible when a 1280 px wide
  browser scales them to the text column; :func:`colorize`, :func:`add_legend` and :data:`FIXED_RGB` /
  :data:`BROKEN_RGB` draw label maps with a class legend, and fixed / broken pixels in colours that no VOC
  class uses.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from derprop.data.labels import voc_palette

FIXED_RGB = (0, 150, 255)
"""Pixels DLP fixed (wrong before, right after): azure. VOC's classes use only the levels 0, 64, 128 and 192 of
each channel; azure and yellow stay apart for red-green colour blindness too."""
BROKEN_RGB = (255, 215, 0)
"""Pixels DLP broke (right before, wrong after): yellow, a colour no VOC class uses."""
UNCHANGED_RGB = (190, 190, 190)
"""Pixels DLP left as they were: a grey that no VOC class uses, on which azure and yellow both stand out."""

BOOK_RC: dict[str, Any] = {
    "figure.dpi": 100, "figure.figsize": (7.5, 3.6), "font.size": 12, "axes.titlesize": 12,
    "axes.labelsize": 12, "legend.fontsize": 11, "xtick.labelsize": 11, "ytick.labelsize": 11,
    "figure.titlesize": 13, "axes.spines.top": False, "axes.spines.right": False,
}
"""matplotlib settings of the book's figures. The text column is about 700 px wide at a 1280 px window and a
figure is ``100 · width`` px, so a figure at most 8 inches wide is shown at ≥ 85 % of its size: 12 pt stays
above 14 px on screen."""


def book_style() -> None:
    """Apply :data:`BOOK_RC` (each chapter's set-up cell calls it once)."""
    import matplotlib

    matplotlib.rcParams.update(BOOK_RC)


@dataclass(frozen=True)
class Markdown:
    """Markdown text that a notebook renders (``_repr_markdown_``) and a terminal prints as it is."""

    text: str

    def _repr_markdown_(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


MARKDOWN_SPECIAL = frozenset("\\`*_{}[]<>$|~&!")
"""The characters that start Markdown (and MyST) markup inside a line: emphasis, code, links and images,
roles and substitutions, maths, table cells, raw HTML and entities."""


def escape_markdown(value: Any) -> str:
    """``str(value)`` as Markdown that shows exactly these characters (each of :data:`MARKDOWN_SPECIAL`
    backslash-escaped, line breaks made spaces): for text read from a file."""
    return "".join(f"\\{c}" if c in MARKDOWN_SPECIAL else " " if c in "\r\n" else c for c in str(value))


def escape_html(value: Any) -> str:
    """``str(value)`` as HTML text (``& < > " '`` as entities): for text read from a file."""
    return html.escape(str(value), quote=True)


def code(*values: Any, sep: str = " ") -> Markdown:
    """Each value as inline code (a config key, a setting), whatever characters it holds, joined by ``sep``."""
    spans = []
    for value in values:
        text = str(value).replace("\r", " ").replace("\n", " ")
        fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
        pad = " " if text.startswith("`") or text.endswith("`") else ""
        spans.append(f"{fence}{pad}{text}{pad}{fence}")
    return Markdown(sep.join(spans))


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "–"
    if fmt and _is_number(value):
        return format(value, fmt).replace("-", MINUS)
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}".replace("-", MINUS)
    if isinstance(value, Markdown):
        return value.text.replace("|", "\\|").replace("\n", " ")
    return escape_markdown(value)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool))


MINUS = "\u2212"
"""The minus sign of numbers in tables (a hyphen is not a minus)."""


def column_format(values: Sequence[Any]) -> str | None:
    """The format of a column of numbers, chosen from all of them, so that one column reads one way.

    Integers (and floats that are all whole) as integers, thousands separated from 10,000 on; otherwise fixed
    decimals, enough for three significant digits of the largest value and one of the smallest non-zero value;
    scientific notation only where that would take more than four decimals or the values reach a million.
    ``None`` when the column holds no number.
    """
    nums = [float(v) for v in values if _is_number(v) and v is not None and np.isfinite(float(v))]
    if not nums:
        return None
    big = max(abs(v) for v in nums)
    if all(float(v).is_integer() for v in nums) and big < 1e15:
        return ",.0f" if big >= 10_000 else ".0f"
    small = min((abs(v) for v in nums if v != 0), default=big)
    if big >= 1e6:
        return ".2e"
    need_big = max(0, 2 - int(np.floor(np.log10(big)))) if big else 0
    need_small = max(0, -int(np.floor(np.log10(small)))) if small else 0
    decimals = max(need_big, need_small)
    return ".2e" if decimals > 4 else f".{decimals}f"


def mean_std(mean: float, std: float, n: int, spec: str = ".2f") -> str:
    """``mean ± std`` over ``n`` values, or ``mean (n = 1)`` where one value has no spread to show."""
    if n <= 1:
        return f"{format(mean, spec)} (n = 1)".replace("-", MINUS)
    return f"{format(mean, spec)} ± {format(std, spec)}".replace("-", MINUS)


def table(records: Sequence[Mapping[str, Any]] | Sequence[Sequence[Any]], columns: Sequence[str] | None = None, *,
          fmt: Mapping[str, str] | str | None = None, caption: str | None = None, transpose: bool = False) -> Markdown:
    """A Markdown table of ``records`` (dicts, or sequences in the order of ``columns``).

    ``columns`` picks and orders the keys of dict records (all keys, in first-seen order, by default) and
    names the columns; a header may differ from its key as ``"key=header"`` (Markdown: ``$...$`` works). A
    text cell shows its characters as they are (:func:`escape_markdown`); a :class:`Markdown` cell (or
    :func:`code`) is the chapter's own Markdown. ``fmt`` is a format spec for numbers, one for all or per key
    (``{"miou": ".1%"}``); a column without one is formatted as a whole (:func:`column_format`: integers as
    integers, scientific only where needed). ``None`` cells show "–". Numeric columns are right-aligned.
    ``transpose`` turns columns into rows, for records with many fields (one column per record). With a
    ``caption`` (the chapter's Markdown: code and maths work) the table is a numbered MyST ``{table}``.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for r in records for k in r)) if records and isinstance(records[0], Mapping) \
            else []
    keys = [c.split("=", 1)[0] for c in columns]
    heads = [_cell(Markdown(c.split("=", 1)[-1]), None) for c in columns]
    rows = [[r.get(k) for k in keys] if isinstance(r, Mapping) else list(r) for r in records]
    fmts = [fmt.get(k) if isinstance(fmt, Mapping) else fmt for k in keys]
    fmts = [f or column_format([row[j] for row in rows if j < len(row)]) for j, f in enumerate(fmts)]
    cells = [heads] + [[_cell(v, f) for v, f in zip(row, fmts)] for row in rows]
    is_num = [[False] * len(keys)] + [[_is_number(v) for v in row] for row in rows]
    if transpose:
        cells, is_num = [list(c) for c in zip(*cells)], [list(c) for c in zip(*is_num)]
    heads, cells = cells[0], cells[1:]
    numeric = [all(row[j] for row in is_num[1:]) and len(is_num) > 1 for j in range(len(heads))]
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    text = "\n".join(lines)
    if caption:
        text = f":::{{table}} {caption}\n{text}\n:::"  # a colon fence: a caption may hold `code`
    return Markdown(text)


def box(title: str, items: Sequence[str], *, kind: str = "tip") -> Markdown:
    """An admonition titled ``title`` with one bullet per item (Markdown): a chapter's "What you saw"."""
    body = "\n".join(f"- {item}" for item in items)
    return Markdown(f":::{{admonition}} {title}\n:class: {kind}\n{body}\n:::")


def colorize(label: np.ndarray, palette: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """RGB image of a label map; ``palette`` is a flat [r, g, b, r, g, b, ...] list (VOC's by default)."""
    if palette is None:
        palette = voc_palette()
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    if len(pal) < 256:
        pal = np.concatenate([pal, np.zeros((256 - len(pal), 3), np.uint8)])
    return pal[label.astype(np.int64) % 256]


def class_colours(names: Sequence[str], present: Sequence[int] | None = None,
                  palette: Sequence[int] | np.ndarray | None = None) -> dict[str, tuple[int, int, int]]:
    """``{class name: RGB}`` of the classes ``present`` (indices; all by default), in the palette's colours."""
    pal = np.asarray(voc_palette() if palette is None else palette, dtype=np.uint8).reshape(-1, 3)
    return {names[c]: tuple(int(x) for x in pal[c]) for c in (range(len(names)) if present is None else present)}


def add_legend(fig: Any, colours: Mapping[str, Sequence[int]], *, ncol: int | None = None, title: str | None = None,
               fontsize: float | None = None):
    """A legend of colour patches (``{label: RGB}``) below a figure's axes, off the data.

    The figure must use ``layout="constrained"``, which makes room for it.
    """
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=np.asarray(rgb) / 255, edgecolor="0.4", label=str(name).replace("$", r"\$"))
               for name, rgb in colours.items()]  # a class name is text, never maths
    return fig.legend(handles=handles, loc="outside lower center", ncol=ncol or min(len(handles), 6), title=title,
                      frameon=False, fontsize=fontsize)


def change_image(fixed: np.ndarray, broken: np.ndarray) -> np.ndarray:
    """RGB image of boolean ``fixed`` / ``broken`` maps: :data:`FIXED_RGB`, :data:`BROKEN_RGB`, else :data:`UNCHANGED_RGB`."""
    out = np.empty(fixed.shape + (3,), np.uint8)
    out[...] = UNCHANGED_RGB
    out[fixed] = FIXED_RGB
    out[broken] = BROKEN_RGB
    return out


CHANGE_COLOURS = {"fixed by DLP": FIXED_RGB, "broken by DLP": BROKEN_RGB, "unchanged": UNCHANGED_RGB}
"""The legend of :func:`change_image`."""


def integer_ticks(ax: Any, axis: str = "x") -> None:
    """Ticks at whole numbers only (epochs, counts) on ``axis`` of ``ax``."""
    from matplotlib.ticker import MaxNLocator

    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))
