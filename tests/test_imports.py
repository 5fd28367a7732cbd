"""Imports between derprop's modules go one way: from the maths up to the runs and the book.

A module may import only modules of lower layers. ``ModelConfig`` is a config section, so the config
sits below the model that it builds. The tools on top (``data_prep``, ``pipelines``, ``benchmarks``,
``scripts``) import derprop and are never imported by it. A new module fails here until it is given a
layer, which is the moment to decide where it belongs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from derprop.provenance import source

PACKAGE = source() / "derprop"

LAYERS: list[tuple[str, ...]] = [
    # the base of every error a user can cause, and what made a run (version, commit, devices)
    ("errors", "provenance"),
    # what nothing else in derprop is needed for: file writes, label conventions, the paper's tables,
    # the derivative operators, seeds and processes, progress lines, the EMA of the weights,
    # starting the processes of a run, the command-line front, the book's sentences made of numbers
    ("atomic", "labels", "tables", "derivatives", "features", "distributed", "progress", "momentum", "launch", "cli",
     "findings"),
    # the maths of the paper, the first readers and writers, and how the book shows results
    ("losses", "propagation", "checkpoint", "metrics", "data", "display"),
    ("backbones", "augment", "paths", "sources"),
    ("config",),
    ("configfile", "model", "rundir"),
    ("evaluate", "pseudo_labels", "schedule", "loaders", "guards"),
    ("objective", "predict", "examples"),
    ("diagnostics", "report"),
    ("dlp_map",),
    ("trainer",),
    # the runs: the command line, the book's CPU runs, the book's viewer, the package's front door
    ("train", "book_runs", "viewer", "glance", "__init__"),
]
TOOLS = ("data_prep", "pipelines", "benchmarks", "scripts", "tests")


def _layer_of() -> dict[str, int]:
    return {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports(path: Path) -> set[str]:
    """Top-level package names and derprop modules (``derprop.x``) that ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.name}: relative import; write `from derprop.{node.module or ''} import ...`")
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "derprop":
                found |= {f"derprop.{a.name}" for a in node.names}
            else:
                parts = node.module.split(".")
                found.add(".".join(parts[:2]) if parts[0] == "derprop" else parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.add(".".join(parts[:2]) if parts[0] == "derprop" else parts[0])
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    placed = set(_layer_of())
    assert modules - placed == set(), f"give these modules a layer in LAYERS: {sorted(modules - placed)}"
    assert placed - modules == set(), f"LAYERS names modules that do not exist: {sorted(placed - modules)}"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.stem)
def test_imports_point_down(path):
    layer = _layer_of()
    here = layer[path.stem]
    imported = _imports(path)
    for name in sorted(imported):
        if name.startswith("derprop."):
            dep = name.split(".")[1]
            assert layer[dep] < here, (f"derprop.{path.stem} (layer {here}) imports derprop.{dep} (layer {layer[dep]}): "
                                       "a back-edge; move the shared code down, or the importer up")
    tools = sorted(set(TOOLS) & imported)
    assert not tools, f"derprop.{path.stem} imports {tools}: tools import derprop, never the other way"


def test_a_back_edge_is_caught(tmp_path):
    path = tmp_path / "model.py"
    path.write_text("from derprop.trainer import Trainer\n")
    with pytest.raises(AssertionError, match="back-edge"):
        test_imports_point_down(path)

