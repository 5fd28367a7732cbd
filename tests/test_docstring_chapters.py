"""Every book chapter a ``derprop`` docstring names exists.

Docstrings name the chapter that explains them in one of two ways: its file,
``book/propagation.md``, or its exact title in italics after the word
"chapter(s)" (or just before it), *Derivative label propagation*, the first
``# `` heading of a file listed in ``_toc.yml``; a title followed by a file,
*Derivative operators* (``book/derivatives.md``), must be that file's. A
quoted name after "chapter" ("The network") is checked like a title. Modules
are found on disk, so a module added later is checked too.
"""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import derprop
from derprop.provenance import source


BOOK_PATH = re.compile(r"\bbook/[\w./-]+\.md\b")
ITALIC = r"\*(?!\*)([^*]+?)\*"
ITALICS = rf"{ITALIC}(?:(?:\s*,\s*|\s+and\s+|\s*,\s*and\s+){ITALIC})*"
AFTER = re.compile(rf"\bchapters?\s*\(?\s*({ITALICS})")
BEFORE = re.compile(rf"({ITALIC})\s+chapters?\b")
QUOTED = re.compile(r"\bchapters?\s*\(?\s*[\"“]([^\"”]+)[\"”]")
PAIRED = re.compile(rf"{ITALIC}\s*\(\s*``(book/[\w./-]+\.md)``\s*\)")


def toc_chapters() -> dict[str, str]:
    """``book/x.md`` → title (its first ``# `` heading), for every file of ``_toc.yml``."""
    toc = yaml.safe_load((source() / "_toc.yml").read_text())
    files = [toc["root"], *(c["file"] for part in toc.get("parts", []) for c in part.get("chapters", []))]
    out = {}
    for f in files:
        path = source() / (f if f.endswith(".md") else f"{f}.md")
        title = next(line[2:].strip() for line in path.read_text().splitlines() if line.startswith("# "))
        out[str(path.relative_to(source()))] = title
    return out


def modules() -> list[tuple[str, Path]]:
    """Every module of the package, found on disk (never a hard-coded list)."""
    found = []
    for info in pkgutil.walk_packages(derprop.__path__, "derprop."):
        origin = importlib.util.find_spec(info.name).origin
        if origin and origin.endswith(".py"):
            found.append((info.name, Path(origin)))
    return [("derprop", Path(derprop.__file__)), *found]


def docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring: module, class, function and attribute docstrings."""
    tree = ast.parse(path.read_text())
    return [(node.lineno, node.value.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)]


def named_chapters(text: str) -> tuple[list[str], list[str]]:
    """(book paths, chapter titles) that ``text`` names."""
    flat = " ".join(text.split())
    titles = [t for m in AFTER.finditer(flat) for t in re.findall(ITALIC, m.group(1))]
    titles += [re.findall(ITALIC, m.group(1))[0] for m in BEFORE.finditer(flat)]
    titles += [m.group(1) for m in QUOTED.finditer(flat)]
    return BOOK_PATH.findall(flat), [t.strip() for t in titles]


def test_the_patterns_catch_the_names_that_once_were_wrong():
    paths, titles = named_chapters('Explained in the book chapter *Training* (``book/training.md``).')
    assert paths == ["book/training.md"] and titles == ["Training"]
    assert named_chapters('Backbones (book chapter "The network").')[1] == ["The network"]
    assert named_chapters("chapters *Training on a CPU*, *Rectification*, *Ablations*")[1] == \
        ["Training on a CPU", "Rectification", "Ablations"]
    assert named_chapters("the chapters *The ill-posed\n    problem* and *Data*")[1] == ["The ill-posed problem", "Data"]
    assert named_chapters("the book's *Derivative label propagation* chapter")[1] == ["Derivative label propagation"]
    assert named_chapters("the chapter that explains it, ``*args``") == ([], [])
    assert PAIRED.findall("chapter *Training* (``book/training_cpu.md``)") == [("Training", "book/training_cpu.md")]


@pytest.mark.parametrize("name,path", modules(), ids=[m for m, _ in modules()])
def test_docstrings_name_only_chapters_of_the_book(repo, name, path):
    chapters = toc_chapters()
    titles = set(chapters.values())
    bad = []
    for line, text in docstrings(path):
        paths, named = named_chapters(text)
        bad += [f"line {line}: {p} is not in _toc.yml" for p in paths if p not in chapters]
        bad += [f"line {line}: *{t}* is no chapter title" for t in named if t not in titles]
        bad += [f"line {line}: *{t}* is not the title of {p}" for t, p in PAIRED.findall(" ".join(text.split()))
                if p in chapters and chapters[p] != t.strip()]
    assert not bad, f"{path.relative_to(repo)} names chapters that do not exist (titles: {sorted(titles)}):\n" + \
        "\n".join(bad)


def test_every_module_is_in_the_api_reference(repo):
    """A module missing from the API pages (``book/api/<part>.md``, one per part of the package) would be absent
    from the rendered API, and a docstring reference to it a broken link (a warning, so a failed ``-W`` build)."""
    pages = "".join(p.read_text() for p in (repo / "book" / "api").glob("*.md"))
    documented = set(re.findall(r"automodule:: (derprop[\w.]*)", pages))
    modules = {info.name for info in pkgutil.walk_packages(derprop.__path__, "derprop.")} | {"derprop"}
    assert modules - documented == set(), f"add to its part's page in book/api/: {sorted(modules - documented)}"


def test_no_reference_points_outside_what_a_reader_can_open(repo):
    """References are to a chapter, an equation or section of the paper, or a file of the release by path and
    function; never to the project's private design notes (once cited as "SPEC")."""
    files = [*repo.glob("derprop/**/*.py"), *repo.glob("configs/*.yaml"), *repo.glob("book/*.md"), repo / "README.md",
             *repo.glob("pipelines/*.ipynb"), *repo.glob("pipelines/*.py"),
             *(f for f in repo.glob("tests/*.py") if f.name != Path(__file__).name)]  # this file names the word
    cited = [f"{f.relative_to(repo)}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
             if re.search(r"\bSPEC\b", line)]
    assert not cited, f"references nobody can open: {cited}"
