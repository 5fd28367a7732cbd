"""Sphinx extension: the paper's equations carry the paper's numbers.

A displayed equation labelled ``paper-eq-<n>`` (``{math}`` with ``:label: paper-eq-4``) is numbered ``(4)``
whichever chapter shows it, and a reference to it with the ``eq`` role reads "eq. 4" (``math_eqref_format``), so the book,
the paper and the docstrings of ``derprop`` use one numbering. Each equation is displayed once, in the
chapter that explains it; other chapters link to it. Needs ``math_numfig: false`` (Sphinx would otherwise
number equations per chapter, 3.1, 3.2, ...).
"""

from __future__ import annotations

import re

from docutils import nodes

PAPER_LABEL = re.compile(r"^paper-eq-(\d+)$")


def _renumber(app, doctree) -> None:
    domain = app.env.get_domain("math")
    for node in doctree.findall(nodes.math_block):
        m = PAPER_LABEL.match(node.get("label") or "")
        if m:
            node["number"] = int(m.group(1))
            domain.equations[node["label"]] = (app.env.docname, int(m.group(1)))


def setup(app):
    app.connect("doctree-read", _renumber)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
