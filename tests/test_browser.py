"""The built book and the rectification viewer in a real browser (headless Debian chromium).

* Every chapter of the smoke build (tests/test_book.py builds it into
  ``_build/smoke``) loads from a local http.server with no console error,
  no failed request and no request leaving 127.0.0.1; its maths is typeset by
  the vendored MathJax (no raw TeX left); every image has decoded.
* Every page, at 1280 px and at 800 px, its hidden cells opened: no table,
  cell output, cell code or shell command block is wider than the text column
  (``scrollWidth > clientWidth``: clipped or scrolled), no image is shown at
  less than 75 % of its natural width (a figure drawn wider than the column,
  its text shrunk with it), and no printed repr such as
  ``<torch._C.Generator at 0x…>`` is on the page. Listings of ``derprop``'s own
  source (``literalinclude``) may scroll sideways like in an editor.
* *Pseudo-label rectification*: its viewers work without a kernel (picking
  another image or epoch, or moving the κ slider, shows another pre-rendered
  panel), and its static fallback figure is there.
* JupyterLab runs that chapter (converted to .ipynb with jupytext) cell by
  cell; moving the epoch slider and picking another image changes the
  displayed picture, and no cell errors.
* A one-page book built with the book's settings from poisoned results files
  (``tests.fixtures.poisoned_results``: HTML and Markdown where the files hold
  text) runs no injected script, and shows those texts character for
  character, through ``derprop.book.display.table``, ``derprop.book.report.cpu_findings``
  and the rectification viewer.

Skipped, with a message, when no chromium is installed
(``apt-get install -y chromium``). ``DERPROP_BOOK_HTML=_build/html`` tests an
existing build (e.g. ``make book``'s) instead of the smoke build.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from derprop.provenance import source

CHROMIUM = os.environ.get("DERPROP_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no chromium at {CHROMIUM} (apt-get install -y chromium)"),
]
playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

# Console messages that are not errors of the book: ajv's schema warnings inside the
# ipywidgets bundle are logged at "warning" level and are not collected.
IGNORED_CONSOLE = ()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def book_html():
    """The smoke build of tests/test_book.py, or an already built book named by $DERPROP_BOOK_HTML."""
    if os.environ.get("DERPROP_BOOK_HTML"):
        html = Path(os.environ["DERPROP_BOOK_HTML"])
        assert (html / "index.html").is_file(), f"DERPROP_BOOK_HTML={html} holds no built book"
        return html
    from test_book import SMOKE_HTML, build_smoke_book

    rc, log, _ = build_smoke_book()
    if rc != 0:
        pytest.fail("the smoke build of the book failed (see tests/test_book.py):\n" + log[-3000:])
    return SMOKE_HTML


@pytest.fixture(scope="module")
def server(book_html):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(book_html)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class PageWatch:
    """Console errors, page errors, failed requests and requests that leave localhost."""

    def __init__(self, page, origin: str):
        self.errors: list[str] = []
        self.remote: list[str] = []
        page.on("console", lambda m: m.type == "error" and not any(s in m.text for s in IGNORED_CONSOLE)
                and self.errors.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: r.url.startswith(origin) and self.errors.append(f"failed: {r.url}"))

        def route(r):
            if r.request.url.startswith(origin) or r.request.url.startswith(("data:", "blob:")):
                r.continue_()
            else:
                self.remote.append(r.request.url)
                r.abort()

        page.route("**/*", route)


def chapter_paths() -> list[str]:
    from test_book import toc_files

    return [f"{f.removesuffix('.md')}.html" for f in toc_files()]


def page_paths() -> list[str]:
    """Every page of _toc.yml, sections (the API's layer pages) included."""
    import yaml

    toc = yaml.safe_load((source() / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        for chapter in part.get("chapters", []):
            files += [chapter["file"], *(s["file"] for s in chapter.get("sections", []))]
    return [f"{f.removesuffix('.md')}.html" for f in files]


LAYOUT = r"""() => {
  document.querySelectorAll('details').forEach((d) => { d.open = true; });  // hidden inputs count too
  const column = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const right = column.getBoundingClientRect().right + 1;
  const wide = (e) => e.scrollWidth > e.clientWidth + 1 || e.getBoundingClientRect().right > right;
  const what = (e) => (e.innerText || '').trim().slice(0, 70).replace(/\s+/g, ' ');
  const found = [];
  column.querySelectorAll('table').forEach((t) => {
    const box = t.closest('.pst-scrollable-table-container') || t;
    if (wide(box) || wide(t)) found.push(`table ${Math.round(t.scrollWidth)} px in ${Math.round(box.clientWidth)} px: ${what(t)}`);
  });
  // results (cell outputs), the code of cells, and commands to copy (shell blocks); listings of derprop's own
  // source (literalinclude) may scroll sideways like in an editor
  column.querySelectorAll('.cell_output pre, .cell_input pre, div[class*="highlight-bash"] pre, '
                          + 'div[class*="highlight-shell"] pre, div[class*="highlight-console"] pre').forEach((p) => {
    const kind = p.closest('.cell_output') ? 'output' : p.closest('.cell_input') ? 'code' : 'command';
    if (wide(p)) found.push(`${kind} ${p.scrollWidth} px in ${p.clientWidth} px: ${what(p)}`);
  });
  // a figure drawn wider than the column is shrunk, and its text with it (book_style draws at the column's width)
  column.querySelectorAll('img').forEach((img) => {
    if (!img.offsetParent || !img.naturalWidth || img.closest('.derprop-frames figure[hidden]')) return;
    const shown = img.getBoundingClientRect().width;
    if (shown < 0.75 * img.naturalWidth) {
      found.push(`image shown at ${Math.round(100 * shown / img.naturalWidth)} % of its ${img.naturalWidth} px: `
                 + `${(img.closest('figure, .cell_output') || img).innerText.trim().slice(0, 60) || img.src.slice(-40)}`);
    }
  });
  const reprs = (column.innerText.match(/<[\w.]+(?: object)? at 0x[0-9a-fA-F]+>/g) || []);
  return found.concat(reprs.map((r) => `printed repr: ${r}`));
}"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("width", [1280, 800])
@pytest.mark.parametrize("path", page_paths())
def test_every_table_code_output_and_figure_fits_its_column(server, browser, path, width):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto(f"{server}/{path}", wait_until="load")
    problems = page.evaluate(LAYOUT)
    page.close()
    assert not problems, f"{path} at {width} px:\n" + "\n".join(problems)


def _shown_frame(viewer) -> tuple[str, str]:
    shown = viewer.locator("figure[data-key]:not([hidden])")
    assert shown.count() == 1, f"{shown.count()} frames shown at once"
    return shown.get_attribute("data-key"), shown.locator("img").get_attribute("src")


@pytest.mark.timeout(120)
def test_rectification_viewer_works_without_a_kernel(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    watch = PageWatch(page, server)
    page.goto(f"{server}/book/rectification.html", wait_until="networkidle")
    # the static fallback: the figure right after its heading is an image that decoded
    assert page.locator("h2", has_text="Static fallback").count() == 1
    fallback = page.locator("section:has(> h2:has-text('Static fallback')) img")
    assert fallback.count() >= 1 and fallback.first.evaluate("i => i.naturalWidth") > 0
    # the viewer: its pre-rendered frames, switched by book/_static/frame-viewer.js
    viewers = page.locator(".derprop-frames")
    assert viewers.count() == 2, "the kernel-free forms of the epoch and κ viewers are not on the page"
    viewer = viewers.first
    image = viewer.locator("select[data-axis='0']")
    page.wait_for_function("s => !s.disabled", arg=image.element_handle(), timeout=10000)
    key, src = _shown_frame(viewer)
    image.select_option(index=1)
    key2, src2 = _shown_frame(viewer)
    assert key2 != key and src2 != src, "picking another image left the panel as it was"
    slider = viewer.locator("input[type=range]")
    slider.evaluate("s => { s.value = '0'; s.dispatchEvent(new Event('input', {bubbles: true})); }")
    key3, _ = _shown_frame(viewer)
    caption = viewer.locator("figure[data-key]:not([hidden]) figcaption").inner_text()
    assert key3 == key2.split(",")[0] + ",0" and caption.startswith("epoch 0"), "moving the epoch slider did nothing"
    assert viewer.locator("output").inner_text() == slider.evaluate("s => JSON.parse(s.dataset.labels)[0]")
    kappa = viewers.nth(1)
    kappa_slider = kappa.locator("input[type=range]")
    page.wait_for_function("s => !s.disabled", arg=kappa_slider.element_handle(), timeout=10000)
    first_key, _ = _shown_frame(kappa)
    kappa_slider.evaluate("s => { s.value = s.max; s.dispatchEvent(new Event('input', {bubbles: true})); }")
    last_key, _ = _shown_frame(kappa)  # the pictures may coincide: a smoke-size network can predict one class
    caption = kappa.locator("figure[data-key]:not([hidden]) figcaption").inner_text()
    assert last_key != first_key and caption.startswith("κ = 20"), "moving the κ slider did nothing"
    assert not watch.errors and not watch.remote, watch.errors + watch.remote
    page.close()


# --------------------------------------------------------------------------- #
# A page built from poisoned results files
# --------------------------------------------------------------------------- #
POISONED_PAGE = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3 (ipykernel)
  language: python
  name: python3
---

# Results files of another hand

```{code-cell} ipython3
from pathlib import Path

from derprop.book.display import box, table
from derprop.book.report import cpu_findings, matrix_results
from derprop.book.viewer import make_viewer

ROOT = Path("ROOT_DIR")
table([{"run": name, "device": m["device"], "date": m["date"]} for name, m in matrix_results(ROOT / "results").items()])
```

```{code-cell} ipython3
box("Findings", cpu_findings(ROOT / "results"))
```

```{code-cell} ipython3
make_viewer(ROOT / "run")
```
"""


@pytest.fixture(scope="module")
def poisoned_book(tmp_path_factory):
    """The one-page book of :data:`POISONED_PAGE`, built as the book is (its ``_config.yml``, extensions and
    static files) from :func:`tests.fixtures.poisoned_results`; returns its html folder."""
    from tests.fixtures import poisoned_results

    work = poisoned_results(tmp_path_factory.mktemp("poisoned"))
    (work / "book").mkdir()
    for name in ("_ext", "_static"):
        (work / "book" / name).symlink_to(source() / "book" / name)
    shutil.copy(source() / "_config.yml", work / "_config.yml")
    (work / "_toc.yml").write_text("format: jb-book\nroot: book/poisoned\n")
    (work / "book" / "poisoned.md").write_text(POISONED_PAGE.replace("ROOT_DIR", str(work)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source()), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([str(Path(sys.executable).with_name("jupyter-book")), "build", ".", "-W", "-n",
                           "--keep-going"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return work / "_build" / "html"


@pytest.mark.timeout(1000)
def test_a_page_built_from_poisoned_results_runs_no_injected_script(poisoned_book, browser):
    from tests.fixtures import PAYLOAD

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(poisoned_book)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(f"http://127.0.0.1:{srv.server_address[1]}/book/poisoned.html", wait_until="networkidle")
        page.wait_for_timeout(500)
        assert page.evaluate("window.pwned") is None and not dialogs, "an injected script ran"
        injected = page.evaluate("""() => [...document.querySelectorAll('img[src="x"], [onerror], script')]
                                   .filter(e => e.tagName !== 'SCRIPT' || (/javascript|^$/.test(e.type)
                                                                           && e.textContent.includes('pwned')))
                                   .map(e => e.outerHTML.slice(0, 80))""")  # widget state is JSON, not code
        assert not injected, injected
        text = " ".join(page.locator("article").inner_text().split())
        visible = " ".join(PAYLOAD.replace("|", "").split())  # a table cell's pipe is its border
        assert text.count(visible) >= 3, "the table, the findings and the viewer show the files' text as it is"
        assert page.locator("article table").count() >= 1 and page.locator(".derprop-frames figcaption").count() == 4
    finally:
        page.close()
        srv.shutdown()


# --------------------------------------------------------------------------- #
# JupyterLab: run the rectification chapter and drive its viewer
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def lab(tmp_path_factory, book_html):
    import jupytext

    work = tmp_path_factory.mktemp("lab")
    nb = jupytext.read(source() / "book" / "rectification.md")
    jupytext.write(nb, work / "rectification.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    jupyter = Path(sys.executable).with_name("jupyter")
    env = {**os.environ, "DERPROP_SIZE": "smoke", "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "JUPYTER_CONFIG_DIR": str(work / ".jupyter"), "JUPYTER_RUNTIME_DIR": str(work / ".runtime")}
    proc = subprocess.Popen(
        [str(jupyter), "lab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={work}", "--ServerApp.open_browser=False", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
         *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("jupyter lab exited:\n" + (proc.stdout.read() if proc.stdout else ""))
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("jupyter lab did not start within 60 s")
    yield base, token
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(work / ".runtime", ignore_errors=True)


def _picture_src(page) -> str:
    img = page.locator(".jp-OutputArea-output .widget-image, .jp-OutputArea-output .jupyter-widgets img").first
    img.wait_for(timeout=30000)
    return img.get_attribute("src") or ""


def _wait_changed(page, old: str, what: str) -> str:
    deadline = time.time() + 30
    while time.time() < deadline:
        src = _picture_src(page)
        if src and src != old:
            return src
        time.sleep(0.25)
    raise AssertionError(f"the viewer's picture did not change after {what}")


@pytest.mark.timeout(240)
def test_jupyterlab_runs_the_rectification_chapter_and_its_viewer_reacts(lab, browser):
    base, token = lab
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{base}/lab/tree/rectification.ipynb?token={token}", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook", timeout=60000)
    # the kernel has started and connected: the status bar reads "Python 3 (ipykernel) | Idle"
    page.get_by_text(re.compile(r"\| Idle")).first.wait_for(timeout=90000)

    def run_all():
        page.click(".jp-Notebook")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

    run_all()
    started = time.time()
    error_sel = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']"
    deadline = time.time() + 180
    finished = False
    while time.time() < deadline and not finished:
        time.sleep(1)
        prompts = [p.strip() for p in page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]
        if all(p == "[ ]:" for p in prompts) and time.time() - started > 15:  # the click came too early
            run_all()
            started = time.time()
        idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count() > 0
        finished = (idle and prompts and re.fullmatch(r"\[\d+\]:", prompts[-1]) is not None
                    and not any("*" in p for p in prompts)) or page.locator(error_sel).count() > 0
    errors = page.locator(error_sel).all_inner_texts()
    assert not errors, "cell errors:\n" + "\n".join(e[-1500:] for e in errors)
    assert finished, f"the notebook did not finish running: prompts {prompts}"

    first = _picture_src(page)
    # move the epoch slider one step to the left (keyboard on the slider handle)
    handle = page.locator(".jp-OutputArea-output .widget-slider .noUi-handle, "
                          ".jp-OutputArea-output .widget-hslider .noUi-handle").first
    handle.focus()
    handle.press("Home")
    second = _wait_changed(page, first, "moving the epoch slider")
    # pick another image
    page.locator(".jp-OutputArea-output .widget-dropdown select").first.select_option(index=1)
    _wait_changed(page, second, "picking another image")
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']").all_inner_texts()
    assert not errors, errors
    page.close()
