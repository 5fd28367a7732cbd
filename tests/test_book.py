"""The Jupyter Book: sources, vendored assets, and a warning-free smoke build.

The build test runs ``jupyter-book build . -W -n --keep-going`` at smoke size
(``DERPROP_SIZE=smoke``) into ``_build/smoke`` (its own execution cache,
kept between runs; wiped when ``derprop/``, ``configs/`` or ``data_prep/``
change, since jupyter-cache only keys on the notebook text). ``make book``
builds the full-size book into ``_build/html`` separately.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from derprop.provenance import source

BOOK = source() / "book"
SMOKE_OUT = source() / "_build" / "smoke"
SMOKE_HTML = SMOKE_OUT / "_build" / "html"
JB = Path(sys.executable).with_name("jupyter-book")
VENDOR = BOOK / "_static" / "vendor"

REMOTE = re.compile(r"""<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*["']?(https?:)?//""", re.I)
CDN = re.compile(r"cdn\.jsdelivr|unpkg\.com|cdnjs\.cloudflare|https://cdn", re.I)


def chapters() -> list[Path]:
    return sorted(BOOK.glob("*.md"))


def toc_files() -> list[str]:
    toc = yaml.safe_load((source() / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part.get("chapters", [])]
    return files


def front_matter(path: Path) -> dict:
    text = path.read_text()
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    return yaml.safe_load(m.group(1)) if m else {}


def code_cells(path: Path) -> list[tuple[str, str]]:
    """(options block, source) of each ```{code-cell} in a MyST notebook."""
    cells = []
    for m in re.finditer(r"```\{code-cell\}[^\n]*\n(.*?)```", path.read_text(), re.S):
        body = m.group(1)
        opts = "\n".join(line for line in body.splitlines() if line.startswith(":"))
        cells.append((opts, body))
    return cells


def repo_files() -> list[Path]:
    """Files git would commit: tracked plus untracked-but-not-ignored."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=source(),
                             capture_output=True, check=True).stdout
        return [source() / p for p in out.decode().split("\0") if p and (source() / p).exists()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".venv", "_build", ".git", "runs", "data", "node_modules"}
        return [p for p in source().rglob("*") if p.is_file() and not skip & set(p.relative_to(source()).parts)]


# --------------------------------------------------------------------------- #
# sources
# --------------------------------------------------------------------------- #
def test_no_notebook_in_the_repo_has_outputs(repo):
    bad = []
    for path in repo_files():
        if path.suffix != ".ipynb":
            continue
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb.get("cells", [])):
            if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
                bad.append(f"{path.relative_to(repo)} cell {i}")
    assert not bad, "notebooks must be committed without outputs (jupyter nbconvert --clear-output): " + ", ".join(bad)


def test_book_has_no_ipynb_chapters():
    assert not list(BOOK.glob("*.ipynb")), "chapters are MyST markdown (jupytext), never .ipynb"


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.name)
def test_chapter_has_jupytext_header(path):
    fm = front_matter(path)
    assert fm.get("jupytext", {}).get("text_representation", {}).get("format_name") == "myst", \
        f"{path.name}: missing the jupytext MyST header (jupytext --set-formats md:myst)"
    assert fm.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"


def test_toc_lists_exactly_the_chapters(repo):
    listed = {f"{f}.md" if not f.endswith(".md") else f for f in toc_files()}
    present = {str(p.relative_to(repo)) for p in chapters()}
    assert listed == present, f"only in _toc.yml: {sorted(listed - present)}; not in _toc.yml: {sorted(present - listed)}"


@pytest.mark.parametrize("path", [p for p in chapters() if len(code_cells(p)) > 1], ids=lambda p: p.name)
def test_computational_chapter_conventions(path):
    text = path.read_text()
    cells = code_cells(path)
    params = [src for opts, src in cells if "parameters" in opts]
    assert len(params) == 1, f"{path.name}: needs exactly one code cell tagged `parameters`"
    assert 'SIZE = os.environ.get("DERPROP_SIZE", "small")' in params[0], f"{path.name}: the size switch"
    assert re.search(r"^(from|import) derprop", "\n".join(src for _, src in cells), re.M), \
        f"{path.name}: chapters import their maths from derprop"
    assert "What you will learn" in text and "What you need" in text, f"{path.name}: opening admonitions"
    assert re.search(r"eq\. \d+|\{eq\}`paper-eq-\d+`", text), f"{path.name}: cite the paper's equation numbers"
    for forbidden in (r"^\s*class \w+\(.*nn\.Module", r"^\s*def (propagate|derivative|derivative_loss)\b"):
        assert not re.search(forbidden, text, re.M), f"{path.name}: no notebook-local model/propagation/loss code"


CODE_COLUMNS = 88
"""The widest line of a code cell: what fits the text column at 1280 px and at 800 px without scrolling."""


@pytest.mark.parametrize("path", [p for p in chapters() if code_cells(p)], ids=lambda p: p.name)
def test_code_cells_fit_the_column(path):
    """Every line of every code cell (hidden ones too: a reader opens them in JupyterLab), its YAML header
    (cell options, figure captions) aside, is at most :data:`CODE_COLUMNS` characters."""
    long = []
    text = path.read_text()
    for m in re.finditer(r"```\{code-cell\}[^\n]*\n(.*?)```", text, re.S):
        body = m.group(1)
        header = re.match(r"---\n.*?\n---\n", body, re.S)
        first = text[:m.start(1)].count("\n") + 1 + (header.group(0).count("\n") if header else 0)
        lines = body[header.end():].splitlines() if header else body.splitlines()
        long += [f"line {first + k}: {len(line)} columns" for k, line in enumerate(lines) if len(line) > CODE_COLUMNS]
    assert not long, f"{path.name}: code wider than {CODE_COLUMNS} columns:\n" + "\n".join(long)


def test_chapters_are_in_story_order():
    """The maths, the release against the paper, training, rectification, ablations, then the GPU appendix."""
    order = [f.removeprefix("book/") for f in toc_files()]
    story = ["ill_posed", "derivative_loss", "paper_vs_code", "training_cpu", "rectification", "dlp_regime",
             "ablations_cpu",
             "reproduction"]
    assert [f for f in order if f in story] == story, order
    toc = yaml.safe_load((source() / "_toc.yml").read_text())
    appendix = next(p for p in toc["parts"] if p["caption"] == "Appendices")
    assert "book/reproduction" in [c["file"] for c in appendix["chapters"]]


PAPER_EQUATIONS = range(1, 13)
CODE_UNDER = {2: "derivative", 4: "_propagate_paper", 5: "blend", 7: "weighted_sum", 9: "derivative_loss"}
"""Equations of the paper whose implementing function the book shows right below them (Annotated-Transformer style)."""


def test_every_paper_equation_is_displayed_once_with_its_number():
    labels = [(path, m) for path in chapters() for m in re.finditer(r"^:label: paper-eq-(\d+)$", path.read_text(), re.M)]
    numbers = sorted(int(m.group(1)) for _, m in labels)
    assert numbers == list(PAPER_EQUATIONS), f"each of eq. 1-12 labelled exactly once (paper-eq-N), found {numbers}"
    for path, m in labels:
        n = int(m.group(1))
        if n in CODE_UNDER:
            shown = re.search(r"```\{literalinclude\}[^\n]*\n:pyobject: ([\w.]+)", path.read_text()[m.end():])
            assert shown and shown.group(1) == CODE_UNDER[n], \
                f"{path.name}: the first code shown below eq. {n} must be {CODE_UNDER[n]}, found {shown and shown.group(1)}"


def test_api_pages_are_the_parts(repo):
    """One API page per part of the package (``tests/test_imports.py``'s MAY_IMPORT), each opening with the part's
    own docstring, and one page for the base and the commands; every module on exactly one page, under its part."""
    from test_imports import MAY_IMPORT, MODULES, module_name, part_of

    pages = {p.stem: re.findall(r"^\.\. automodule:: (\S+)$", p.read_text(), re.M)
             for p in (BOOK / "api").glob("*.md") if p.stem != "topics"}
    parts = set(MAY_IMPORT) - {"base", "commands"}
    assert set(pages) == parts | {"commands"}
    for part in parts:
        assert pages[part][0] == f"derprop.{part}", f"api/{part}.md opens with the part's docstring"
    for path in MODULES:
        name = module_name(path)
        page = part_of(name) if part_of(name) in parts else "commands"
        dotted = "derprop" if name == "__init__" else f"derprop.{name}"
        assert sum(dotted in documented for documented in pages.values()) == 1 and dotted in pages[page], dotted
    toc = (repo / "_toc.yml").read_text()
    assert all(f"book/api/{p}" in toc for p in pages)


def test_config_offline_settings(repo):
    cfg = yaml.safe_load((repo / "_config.yml").read_text())
    sphinx = cfg["sphinx"]["config"]
    assert cfg["only_build_toc_files"] is True
    assert cfg["execute"]["execute_notebooks"] == "cache"
    assert not (repo / "_static").exists(), "a root _static/ makes Jupyter Book inject every .js in it into every page"
    assert (BOOK / "_static" / sphinx["mathjax_path"]).is_file()
    for js in sphinx["nb_ipywidgets_js"]:
        assert (BOOK / "_static" / js).is_file(), js
        assert "//" not in js


def test_vendored_assets_match_their_checksums():
    sums = (VENDOR / "SHA256SUMS").read_text().splitlines()
    assert sums
    for line in sums:
        digest, name = line.split(maxsplit=1)
        path = VENDOR / name.lstrip("*")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{name} differs from SHA256SUMS"
    listed = {VENDOR / line.split(maxsplit=1)[1].lstrip("*") for line in sums}
    present = {p for p in VENDOR.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert present == listed, f"unlisted vendored files: {sorted(map(str, present - listed))}"


# --------------------------------------------------------------------------- #
# the build
# --------------------------------------------------------------------------- #
SMOKE_ENV = {"DERPROP_SIZE": "smoke", "MPLBACKEND": "module://matplotlib_inline.backend_inline", "PYTHONHASHSEED": "0"}
"""The kernels' environment: the inline backend, so that ``plt.show()`` leaves a figure in the page."""


def source_stamp() -> str:
    """Hash of the code the chapters execute and their environment; a change invalidates the execution cache."""
    h = hashlib.sha256(json.dumps(SMOKE_ENV, sort_keys=True).encode())
    for folder in ("derprop", "configs", "data_prep", "pipelines"):
        for p in sorted((source() / folder).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".txt") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(source())).encode())
                h.update(p.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def build_smoke_book() -> tuple[int, str, float]:
    """Build the book at smoke size into _build/smoke (once per test session)."""
    stamp_file = SMOKE_OUT / ".source-stamp"
    stamp = source_stamp()
    if stamp_file.is_file() and stamp_file.read_text() != stamp:
        shutil.rmtree(SMOKE_OUT / "_build" / ".jupyter_cache", ignore_errors=True)
        shutil.rmtree(SMOKE_OUT / "_build" / ".doctrees", ignore_errors=True)
    SMOKE_OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SMOKE_ENV}
    t0 = time.time()
    proc = subprocess.run([str(JB), "build", ".", "--path-output", str(SMOKE_OUT), "-W", "-n", "--keep-going"],
                          cwd=source(), env=env, capture_output=True, text=True, timeout=1500)
    wall = time.time() - t0
    log = proc.stdout + proc.stderr
    (SMOKE_OUT / "build.log").write_text(log)
    if proc.returncode == 0:
        stamp_file.write_text(stamp)
    return proc.returncode, log, wall


def built_pages() -> list[Path]:
    return [SMOKE_HTML / f"{f.removesuffix('.md')}.html" for f in toc_files()]


@pytest.mark.slow
@pytest.mark.timeout(1600)
def test_book_builds_without_warnings(repo):
    rc, log, wall = build_smoke_book()
    # Sphinx's own messages ("path:line: WARNING: ..."), not kernels' log lines ("[IPKernelApp] WARNING | ...")
    warnings = [line for line in log.splitlines() if re.search(r"(^|: )(WARNING|ERROR|CRITICAL|SEVERE):", line)]
    assert rc == 0 and not warnings, f"jupyter-book build failed (rc={rc}, {wall:.0f} s):\n" + \
        "\n".join(warnings[:40] or log.splitlines()[-60:])
    for page in built_pages():
        assert page.is_file(), f"missing page {page.relative_to(repo)}"


@pytest.mark.slow
def test_built_html_references_no_remote_scripts():
    rc, _, _ = build_smoke_book()
    assert rc == 0
    bad = []
    for page in SMOKE_HTML.rglob("*.html"):
        html = page.read_text(errors="replace")
        for m in REMOTE.finditer(html):
            bad.append(f"{page.relative_to(SMOKE_HTML)}: {m.group(0)[:120]}")
        for tag in re.findall(r"<script\b[^>]*>.*?</script>", html, re.S):
            if CDN.search(tag) and "application/vnd.jupyter.widget" not in tag:
                bad.append(f"{page.relative_to(SMOKE_HTML)}: {tag[:120]}")
    assert not bad, "remote scripts in the built book:\n" + "\n".join(bad[:20])


@pytest.mark.slow
def test_built_chapters_show_no_errors():
    rc, _, _ = build_smoke_book()
    assert rc == 0
    for page in built_pages():
        html = page.read_text()
        assert "Traceback (most recent call last)" not in html, page.name
        assert 'class="output traceback' not in html, page.name
    widgets = (SMOKE_HTML / "book" / "rectification.html").read_text()
    assert "static fallback" in widgets.lower() or "<img" in widgets


RAW_FENCE = "```{"
HIDDEN = re.compile(r"<(script|style)\b.*?</\1>|<(span|div)\b[^>]*class=\"[^\"]*\bmath\b[^>]*>.*?</\2>", re.S)
CODE = re.compile(r"<(pre|code)\b.*?</\1>|<dt\b[^>]*class=\"sig\b[^>]*>.*?</dt>", re.S)  # code, API signatures


def raw_markup(html: str) -> list[str]:
    """Markup a reader sees as characters: a MyST fence that did not parse (anywhere, code included: a broken
    directive turns into a code block) and a ``^`` of TeX outside maths and code (API signatures are code)."""
    text = HIDDEN.sub(" ", html)
    found = [f"raw fence: …{text[m.start() - 30:m.start() + 50]}…" for m in re.finditer(re.escape(RAW_FENCE), text)]
    prose = re.sub(r"<[^>]+>", " ", CODE.sub(" ", text))
    found += [f"raw TeX: …{' '.join(prose[m.start() - 40:m.start() + 30].split())}…" for m in re.finditer(r"\^", prose)]
    return found


def test_raw_markup_is_found():
    assert raw_markup('<p>```{table} `configs/x.yaml` A caption</p>')
    assert raw_markup("<p>‖Δ^q v‖ / ‖v‖</p>")
    assert not raw_markup('<p><span class="math notranslate nohighlight">\\(\\Delta^q v\\)</span> and '
                          '<code class="docutils">2 ^ 3</code></p><pre>x ^ y</pre>')
    assert not raw_markup('<dt class="sig sig-object py"><em class="property">= re.compile(\'^a\')</em></dt>')


@pytest.mark.slow
def test_built_pages_show_no_raw_fence_or_tex():
    rc, _, _ = build_smoke_book()
    assert rc == 0
    bad = [f"{page.relative_to(SMOKE_HTML)}: {p}" for page in sorted(SMOKE_HTML.joinpath("book").rglob("*.html"))
           for p in raw_markup(page.read_text())]
    bad += [f"index: {p}" for p in raw_markup((SMOKE_HTML / "index.html").read_text())] \
        if (SMOKE_HTML / "index.html").is_file() else []
    assert not bad, "markup shown as characters in the built book:\n" + "\n".join(bad[:30])


def test_every_chapter_that_plots_shows_its_figures():
    rc, _, _ = build_smoke_book()
    assert rc == 0
    missing = []
    for chapter in chapters():
        shows = chapter.read_text().count("plt.show()")
        if shows:
            page = SMOKE_HTML / "book" / f"{chapter.stem}.html"
            if page.read_text().count("<img") < shows:
                missing.append(f"{page.name}: {shows} plt.show() calls, fewer images")
    assert not missing, "figures missing from the built book (a non-inline matplotlib backend?):\n" + "\n".join(missing)
