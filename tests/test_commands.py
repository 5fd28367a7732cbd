"""Every command the README and the book show exists and accepts the flags shown.

Commands are read from ``bash``/``sh``/``console`` code blocks and from inline
code that starts with ``make``, ``python``, ``.venv/bin/python``, ``torchrun``
or ``papermill``. Then:

- ``make TARGET VAR=value ...``: ``make -n`` (nothing runs) must succeed and its
  recipe must use every value given (``ABLATION=wo_dlp`` must reach the command,
  ``FORCE=1`` must change it);
- ``python -m MODULE ...`` / ``python SCRIPT.py [SUBCOMMAND] ...`` (also under
  ``torchrun``): ``--help`` must exit 0 and list every ``--flag`` shown;
- ``papermill NOTEBOOK ... -p NAME value``: a notebook of the repository must
  define each ``NAME`` in its ``parameters`` cell.

``--help`` runs in this process (``runpy``), so the whole walk takes seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "book").glob("*.md"))]
PREFIXES = ("make ", "python ", "python3 ", ".venv/bin/python ", "torchrun ", "papermill ", ".venv/bin/papermill ")
FENCE = re.compile(r"^```(bash|sh|shell|console)\s*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def shown_commands() -> list[tuple[str, str]]:
    """(document, command line) for every command shown, comments stripped, in order, without repeats."""
    found: dict[tuple[str, str], None] = {}
    for doc in DOCS:
        text = doc.read_text()
        lines = [line for m in FENCE.finditer(text) for line in m.group(2).splitlines()]
        lines += [m.group(1) for m in INLINE.finditer(FENCE.sub("", text))]
        for line in lines:
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith(PREFIXES):
                found[(doc.name, line)] = None
    return list(found)


def _help(target: list[str]) -> str:
    """``--help`` of ``target = ["-m", MODULE, *sub]`` or ``["script", PATH, *sub]``."""
    kind, name, *sub = target
    argv0 = name if kind == "-m" else str(ROOT / name)
    source = (ROOT / name) if kind != "-m" else None
    if kind == "-m":
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"no module {name}"
        source = Path(spec.origin)
    assert "argparse" in source.read_text(), f"{name} has no command-line parser, so it has no --help"
    out = io.StringIO()
    saved = sys.argv
    sys.argv = [argv0, *sub, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before; harmless here
            if kind == "-m":
                runpy.run_module(name, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(ROOT / name), run_name="__main__")
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
    if tokens[0] == "-m":
        target, rest = ["-m", tokens[1]], tokens[2:]
    else:
        assert (ROOT / tokens[0]).is_file(), f"no script {tokens[0]}"
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
        proc = subprocess.run(["make", "-n", *target, *given], cwd=ROOT, capture_output=True, text=True)
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
    notebook = ROOT / tokens[0]
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
