"""Imports between derprop's parts go one way (``derprop/__init__.py`` is the map).

The base (``errors``, ``provenance``) imports no other derprop module; ``method`` (the paper's equations) and
``data`` import only the base, and not each other; ``training`` imports the base, ``method`` and ``data``;
``book`` imports all of them. The commands (``train``, ``evaluate``, ``predict``) and ``__init__`` sit on top
and no part imports them. The tools (``data_prep``, ``pipelines``, ``benchmarks``, ``experiments``, ``scripts``)
import derprop and are never imported by it. A new module or part fails here until it is given its place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from derprop.provenance import source

PACKAGE = source() / "derprop"

BASE = ("errors", "provenance")
COMMANDS = ("train", "evaluate", "predict", "__init__")
MAY_IMPORT: dict[str, set[str]] = {
    "base": set(),
    "method": {"base"},
    "data": {"base"},
    "training": {"base", "method", "data"},
    "book": {"base", "method", "data", "training"},
    "commands": {"base", "method", "data", "training", "book"},
}
"""For each part, the parts its modules may import (besides their own)."""
TOOLS = ("data_prep", "pipelines", "benchmarks", "experiments", "scripts", "tests")


def part_of(module: str) -> str:
    """The part of ``module``, a dotted name below ``derprop`` (``training.trainer``, ``errors``, ``train``)."""
    head = module.split(".")[0]
    if head in BASE:
        return "base"
    if head in COMMANDS:
        return "commands"
    if head in MAY_IMPORT and (PACKAGE / head).is_dir():
        return head
    raise AssertionError(f"derprop.{module} has no part: put it in a subpackage named in MAY_IMPORT, or in BASE or "
                         "COMMANDS, the moment to decide where it belongs")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(path: Path) -> set[str]:
    """Top-level package names and derprop modules (``derprop.x.y``, dotted below derprop) that ``path`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.name}: relative import; write `from derprop.{node.module or ''} import ...`")
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] == "derprop":
                below = node.module.split(".")[1:]
                # `from derprop import x` and `from derprop.part import x` name modules; deeper, a module's names
                found |= ({f"derprop.{'.'.join([*below, a.name])}" for a in node.names} if len(below) < 2
                          else {f"derprop.{'.'.join(below)}"})
            else:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.add(alias.name if parts[0] == "derprop" else parts[0])
    return found


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_part():
    for path in MODULES:
        part_of(module_name(path))


def test_the_parts_are_the_subpackages_and_each_says_what_it_may_import():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(MAY_IMPORT) - {"base", "commands"}
    assert 3 <= len(subpackages) <= 5
    for name in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        assert "May import" in doc, f"derprop/{name}/__init__.py: say what belongs there and what it may import"


def check(path: Path, name: str) -> None:
    """``path``'s imports, read as the module ``derprop.<name>``, follow :data:`MAY_IMPORT`."""
    here = part_of(name)
    for imported in sorted(_imports(path)):
        if not imported.startswith("derprop.") or imported == "derprop":
            continue
        target = imported.removeprefix("derprop.")
        there = part_of(f"{target.split('.')[0]}.x" if target.split(".")[0] in MAY_IMPORT else target)
        assert there == here or there in MAY_IMPORT[here], (
            f"derprop.{name} ({here}) imports {imported} ({there}): a back-edge; move the shared code to a part "
            "that both may import, or the importer up")
    tools = sorted(set(TOOLS) & _imports(path))
    assert not tools, f"derprop.{name} imports {tools}: tools import derprop, never the other way"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_imports_follow_the_parts(path):
    check(path, module_name(path))


@pytest.mark.parametrize("text, message", [
    ("from derprop.training.trainer import Trainer\n", "back-edge"),
    ("from derprop.book import display\n", "back-edge"),
    ("from derprop import train\n", "back-edge"),
    ("import derprop.data.labels\n", "back-edge"),
    ("from experiments import cpu_evidence\n", "tools import derprop"),
])
def test_a_back_edge_is_caught(tmp_path, text, message):
    module = tmp_path / "propagation.py"
    module.write_text(text)
    with pytest.raises(AssertionError, match=message):
        check(module, "method.propagation")
