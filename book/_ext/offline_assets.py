"""Sphinx extension: keep the built book free of remote scripts.

Jupyter Book 1 always loads ``sphinx_thebe``, which writes the unpkg URL of
thebe into an inline script on every page (loaded only when a "live code"
button is pressed; this book has none). We drop those two scripts so the
HTML references only files under ``_static/``; the MathJax and ipywidgets
scripts are pointed at vendored copies in ``_config.yml``.
"""

from __future__ import annotations


def _is_thebe(js) -> bool:
    filename = getattr(js, "filename", js) or ""
    body = getattr(js, "attributes", {}).get("body", "") if hasattr(js, "attributes") else ""
    return str(filename).endswith("sphinx-thebe.js") or "THEBE_JS_URL" in body


def _drop_thebe(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if scripts:
        context["script_files"] = [js for js in scripts if not _is_thebe(js)]


def setup(app):
    app.connect("html-page-context", _drop_thebe, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
