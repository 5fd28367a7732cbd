"""Sphinx extension: the API reference links what its docstrings name.

``derprop``'s docstrings cite the paper's equations ("eq. 4", "eq. 2, 10, 11 or 12") and name the chapter
that explains them in italics (*Derivative operators*). In the API pages (autodoc) each cited equation
becomes a link to the place the book displays it (labels ``paper-eq-<n>``, see ``paper_equations.py``) and
each chapter title a link to the chapter. Text inside double backquotes is code and stays as it is. The
docstrings themselves stay plain text, readable with ``help()``.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

EQ_LIST = re.compile(r"(?<![\w`])(eqs?\.|Eqs?\.)\s(\d+(?:(?:,\s|\sor\s|\sand\s|/|–)\d+)*)")
NUMBER = re.compile(r"\d+")
ITALIC = re.compile(r"(?<![*\w`])\*([^*`\n]+?)\*(?![*\w])")
PAPER_EQUATIONS = range(1, 13)
TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _chapters(root: Path) -> dict[str, str]:
    """Chapter title → document name (``/book/derivatives``), from ``_toc.yml`` and each file's first heading."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [toc["root"], *(c["file"] for part in toc.get("parts", []) for c in part.get("chapters", []))]
    out = {}
    for f in files:
        path = root / f"{f.removesuffix('.md')}.md"
        title = next((line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# ")), None)
        if title:
            out[title] = "/" + f.removesuffix(".md")
    return out


def _link_equations(text: str) -> str:
    def numbers(m: re.Match) -> str:
        linked = NUMBER.sub(lambda n: f":eq:`paper-eq-{n.group(0)}`" if int(n.group(0)) in PAPER_EQUATIONS
                            else n.group(0), m.group(2))
        return linked if linked != m.group(2) else m.group(0)

    return EQ_LIST.sub(numbers, text)


def _link(text: str, chapters: dict[str, str]) -> str:
    parts = re.split(r"(``.*?``)", text)
    for i in range(0, len(parts), 2):  # even parts lie outside ``code``
        parts[i] = _link_equations(parts[i])
        parts[i] = ITALIC.sub(lambda m: f":doc:`{m.group(1)} <{chapters[m.group(1)]}>`" if m.group(1) in chapters
                              else m.group(0), parts[i])
    return "".join(parts)


def setup(app):
    chapters: dict[str, str] = {}

    def read_chapters(app) -> None:
        chapters.update(_chapters(Path(app.srcdir)))

    def process(app, what, name, obj, options, lines) -> None:
        borders = 0  # a simple RST table has three ==== borders; its columns must keep their widths
        for i, line in enumerate(lines):
            if TABLE_BORDER.match(line):
                borders += 1
            elif borders % 3 == 0:
                lines[i] = _link(line, chapters)

    app.connect("builder-inited", read_chapters)
    app.connect("autodoc-process-docstring", process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
