"""Every command the README and the book show exists, accepts the flags shown, and runs on what ``make demo`` makes.

Commands are read from ``bash``/``sh``/``console`` code blocks and from inline
code that starts with ``make``, ``python``, ``.venv/bin/python``, ``torchrun``
or ``papermill``. Then:

- ``make TARGET VAR=value ...``: ``make -n`` (nothing runs) must succeed and its
  recipe must use every value given (``ABLATION=wo_dlp`` must reach the command,
  ``FORCE=1`` must change it);
- ``python -m MODULE ...`` / ``python SCRIPT.py [SUBCOMMAND] ...`` (also under
  ``torchrun``): ``--help`` must exit 0 and list every ``--flag`` shown; ``python -c CODE`` must compile;
- ``papermill NOTEBOOK ... -p NAME value``: a notebook of the repository must
  define each ``NAME`` in its ``parameters`` cell;
- the walk: every ``python`` command that uses a run or the CPU data (:data:`RUN`)
  runs, in this process, in a project folder like the one ``make demo`` leaves
  (the ``demo`` fixture: ``python -m derprop.book.runs small`` with the CPU
  default's config and data settings, at a tiny budget), and must succeed. The GPU
  examples' checkpoint and config stand for the demo's (:data:`SUBSTITUTE`). A
  command that is not run says why in :data:`NOT_RUN`.

``--help`` runs in this process (``runpy``), so that part takes seconds; the walk a minute or two.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from derprop.book import runs as book_runs
from derprop.provenance import source

DOCS = [source() / "README.md", *sorted((source() / "book").glob("*.md"))]
PREFIXES = ("make ", "python ", "python3 ", ".venv/bin/python ", "torchrun ", "papermill ", ".venv/bin/papermill ")
FENCE = re.compile(r"^```(bash|sh|shell|console)\s*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def shown_commands() -> list[tuple[str, str]]:
    """(document, command line) for every command shown, comments stripped, in order, without repeats."""
    found: dict[tuple[str, str], None] = {}
    for doc in DOCS:
        text = doc.read_text()
        # a backslash at the end of a line continues the command on the next (the book wraps long ones)
        lines = [line for m in FENCE.finditer(text) for line in re.sub(r"\\\n\s*", " ", m.group(2)).splitlines()]
        lines += [m.group(1) for m in INLINE.finditer(FENCE.sub("", text))]
        for line in lines:
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(PREFIXES):
                found[(doc.name, line)] = None
    return list(found)


def _help(target: list[str]) -> str:
    """``--help`` of ``target = ["-m", MODULE, *sub]`` or ``["script", PATH, *sub]``."""
    kind, name, *sub = target
    argv0 = name if kind == "-m" else str(source() / name)
    path = (source() / name) if kind != "-m" else None
    if kind == "-m":
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"no module {name}"
        path = Path(spec.origin)
    text = path.read_text()
    assert "argparse" in text or "cli.parser(" in text, f"{name} has no command-line parser, so it has no --help"
    out = io.StringIO()
    saved = sys.argv
    sys.argv = [argv0, *sub, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before; harmless here
            if kind == "-m":
                runpy.run_module(name, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(source() / name), run_name="__main__")
    finally:
        sys.argv = saved
    assert exit_info.value.code in (0, None), f"{' '.join([argv0, *sub])} --help exited {exit_info.value.code}"
    return out.getvalue()


_HELP_CACHE: dict[tuple[str, ...], str] = {}


def help_text(target: list[str]) -> str:
    key = tuple(target)
    if key not in _HELP_CACHE:
        _HELP_CACHE[key] = _help(target)
    return _HELP_CACHE[key]


def check_python(tokens: list[str]) -> None:
    if tokens[0] == "-c":  # a one-liner: it must at least be Python
        compile(tokens[1], "<shown command>", "exec")
        return
    if tokens[0] == "-m":
        target, rest = ["-m", tokens[1]], tokens[2:]
    else:
        assert (source() / tokens[0]).is_file(), f"no script {tokens[0]}"
        target, rest = ["script", tokens[0]], tokens[1:]
    usage = help_text(target)
    choices = re.search(r"\{([\w,-]+)\}", usage.split("\n\n")[0])
    if choices and rest and rest[0] in choices.group(1).split(","):
        target, rest = [*target, rest[0]], rest[1:]
        usage = help_text(target)
    for flag in {t.split("=")[0] for t in rest if t.startswith("--")}:
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", usage), f"{' '.join(target)} has no {flag}"


def check_make(tokens: list[str]) -> None:
    target = [t for t in tokens if "=" not in t]
    variables = [t for t in tokens if "=" in t]

    def recipe(given: list[str]) -> str:
        proc = subprocess.run(["make", "-n", *target, *given], cwd=source(), capture_output=True, text=True)
        assert proc.returncode == 0, f"make -n {' '.join(tokens)}: {proc.stderr.strip()}"
        return proc.stdout

    shown = recipe(variables)
    for var in variables:
        value = var.split("=", 1)[1]
        used = value in shown or recipe([v for v in variables if v != var]) != shown  # a switch such as FORCE=1
        assert used, f"make {' '.join(tokens)}: the recipe never uses {var}"


def notebook_parameters(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))


def check_papermill(tokens: list[str]) -> None:
    notebook = source() / tokens[0]
    if not notebook.is_file():
        return  # a notebook made on the fly (jupytext --to ipynb of a chapter): its parameters are the chapter's
    params = notebook_parameters(notebook)
    for i, t in enumerate(tokens):
        if t == "-p":
            assert re.search(rf"^{tokens[i + 1]}\s*=", params, re.M), f"{notebook.name} has no parameter {tokens[i + 1]}"


def check(line: str) -> None:
    tokens = shlex.split(line)
    head, rest = tokens[0], tokens[1:]
    if head == "make":
        check_make(rest)
    elif head.endswith("papermill"):
        check_papermill(rest)
    elif head == "torchrun":
        check_python(rest[rest.index("-m"):])
    else:
        check_python(rest)


COMMANDS = shown_commands()


def test_the_docs_show_the_main_commands():
    lines = [line for _, line in COMMANDS]
    for expected in ("make demo", "make gpu-check", "python -m derprop.predict", "python -m data_prep.weights",
                     "make reproduce CONFIG=configs/voc_92.yaml ABLATION=wo_dlp"):
        assert any(expected in line for line in lines), expected


@pytest.mark.parametrize("doc,line", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_shown_command_exists_and_accepts_its_flags(doc, line):
    check(line)


# --------------------------------------------------------------------------- #
# The walk: the shown commands that use a run or the CPU data, run on a demo project
# --------------------------------------------------------------------------- #
DEMO_RUN = "runs/book/small/cpu_dlp"
TINY_DATA = ["--num-train", "32", "--num-val", "4", "--size", "32", "--workers", "1"]
TINY_RUN = ["optim.epochs=1", "optim.iters_per_epoch=1", "data.diag_images=1"]

RUN = ("derprop.evaluate", "derprop.predict", "derprop.train", "pipelines/run_matrix.py list", "pipelines.run_matrix list",
       "pipelines/run_matrix.py all --tables 3 4 --dry-run")
"""Shown commands that the walk runs (by their start, after ``python``/``python -m``)."""

SUBSTITUTE = {"runs/matrix/full/voc_92/best.pt": f"{DEMO_RUN}/best.pt", "runs/voc_92/best.pt": f"{DEMO_RUN}/best.pt",
              "configs/voc_92.yaml": "configs/cpu_scenes.yaml"}
"""The GPU examples' checkpoint and config, and what stands for them in the walk: the same commands on the demo."""

EXTRA = {"derprop.train": TINY_RUN}
"""What the walk adds to a command: a training run's tiny budget."""

NOT_RUN = {
    "derprop.train --config ...": "a placeholder, not a command",
    "torchrun": "needs several processes (test_trainer_ddp trains with two)",
    "derprop.book.runs small": "the demo fixture runs it (at a tiny budget, in one process)",
    "data_prep.scenes": "shown without --root; the demo fixture runs it (through derprop.book.runs)",
    "data_prep.voc": "downloads 2 GB (test_data_prep runs it on archives in the real layout)",
    "data_prep.cityscapes": "needs a Cityscapes login (test_data_prep runs it on zips in the real layout)",
    "data_prep.weights": "needs the downloaded ResNet-101 checkpoint (test_weights)",
    "data_prep.folder": "appendix own_data runs it on its example folder as the book builds (test_data_folder)",
    "benchmarks.": "benchmarks and the GPU check (test_benchmarks, test_gpu_check, test_bench_train_step)",
    "experiments.": "the book's experiments train for hours (test_dlp_regime, test_fast_recipe, test_trainer run them tiny)",
    "scripts.ablation_configs": "rewrites configs/ (test_tables checks what it writes)",
    "-c ": "a one-liner that asks torch whether it sees a GPU (compiled, not run: the suite hides the GPUs)",
    "pipelines/run_matrix.py one": "trains a paper config through papermill (test_notebooks runs one)",
}
"""Shown commands that the walk does not run (by their start), and why."""


def walk_key(line: str) -> str:
    """A shown command without its interpreter: ``derprop.evaluate --checkpoint ...``, ``pipelines/run_matrix.py list``."""
    tokens = shlex.split(line)
    if tokens[0] == "torchrun":
        return line
    rest = tokens[1:]
    return " ".join(rest[1:] if rest[0] == "-m" else rest)


def runs_in_walk(line: str) -> bool:
    """Whether the walk runs ``line`` (:data:`NOT_RUN` wins over :data:`RUN`)."""
    key = walk_key(line)
    return key.startswith(RUN) and not key.startswith(tuple(NOT_RUN))


WALK = [(doc, line) for doc, line in COMMANDS if not line.startswith("make ") and "papermill" not in line.split()[0]]
RUN_IN_WALK = [(doc, line) for doc, line in WALK if runs_in_walk(line)]


def test_every_shown_command_runs_on_the_demo_or_says_why_not():
    for doc, line in WALK:
        assert walk_key(line).startswith((*RUN, *NOT_RUN)), (
            f"{doc}: `{line}`: add it to RUN (the walk runs it on the demo) or to NOT_RUN with the reason")
    assert any("derprop.evaluate --checkpoint runs/book/small/cpu_dlp/best.pt" in line for _, line in RUN_IN_WALK)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A project folder like the one ``make demo`` leaves: ``python -m derprop.book.runs small`` made the CPU
    default's data (its class settings, tiny scenes) and its runs (its config, a tiny budget); and an image."""
    root = tmp_path_factory.mktemp("demo")
    (root / "configs").symlink_to(source() / "configs")
    small = book_runs.BOOK_RUNS["small"]
    tiny = {**small, "data_args": [*small["data_args"], *TINY_DATA], "overrides": [*small["overrides"], *TINY_RUN],
            "warm": [*small["warm"], *TINY_RUN]}
    with pytest.MonkeyPatch.context() as m:
        m.setitem(book_runs.BOOK_RUNS, "small", tiny)
        m.chdir(root)
        assert book_runs.main(["small", "--root", str(root), "--jobs", "1"]) == 0
    shutil.copy(root / "data" / "scenes" / "JPEGImages" / "val_00000.jpg", root / "a.jpg")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("doc,line", RUN_IN_WALK, ids=[f"{d}:{c[:60]}" for d, c in RUN_IN_WALK])
def test_shown_command_runs_on_the_demo(demo, doc, line, monkeypatch, capsys):
    monkeypatch.chdir(demo)
    tokens = [SUBSTITUTE.get(t, t) for t in shlex.split(line)[1:]]
    module, argv = (tokens[1], tokens[2:]) if tokens[0] == "-m" else (tokens[0][:-3].replace("/", "."), tokens[1:])
    assert importlib.import_module(module).main([*argv, *EXTRA.get(module, [])]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    if module == "derprop.evaluate":
        assert "mIoU" in printed
    if module == "derprop.predict":
        assert (demo / "a.png").is_file() and (demo / "a_overlay.png").is_file()
