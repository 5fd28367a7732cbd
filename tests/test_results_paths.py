"""Results files and the rendered book name no machine's folders: paths are written from the repository root."""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks.common import portable, repo_path
from derprop.provenance import source

ABSOLUTE = re.compile(r"""(?:^|[\s="'(\[{,])(/[A-Za-z0-9_.~-][^\s"',]*)""")
"""A string that holds an absolute path: one at its start or after a space, ``=``, a quote or a bracket."""

WRITERS = sorted([*(source() / "benchmarks").glob("*.py"), *(source() / "experiments").glob("*.py")])
"""The modules that write results files: the benchmarks and the experiments."""


def strings(obj, where=""):
    """(JSON path, string) of every key and string value in ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{where}.{k}", k
            yield from strings(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from strings(v, f"{where}[{i}]")
    elif isinstance(obj, str):
        yield where, obj


@pytest.mark.parametrize("path", sorted((source() / "results").rglob("*.json")), ids=lambda p: p.name)
def test_results_files_name_no_absolute_paths(path):
    bad = [f"{where}: {m.group(1)}" for where, s in strings(json.loads(path.read_text()))
           for m in ABSOLUTE.finditer(s)]
    assert not bad, f"{path.relative_to(source())} names absolute paths (write it with benchmarks.common.write_results):\n" \
        + "\n".join(bad[:20])


def test_repo_path_writes_paths_from_the_repository_root():
    tmp = Path(tempfile.gettempdir())
    assert repo_path(source() / "configs" / "cpu_scenes.yaml") == "configs/cpu_scenes.yaml"
    assert repo_path(source()) == "."
    assert repo_path(tmp / "r101" / "run") == "<tmp>/r101/run"
    assert repo_path(sys.executable) == "python"
    assert not repo_path("/no/such/machine/folder").startswith("/")


def test_portable_rewrites_paths_inside_strings_and_nothing_else():
    tmp = Path(tempfile.gettempdir())
    payload = {
        "command": f"python -m experiments.cpu_evidence --resnet101-smoke --runs-dir {tmp}/r101",
        "overrides": [f"data.root={tmp}/bench_scenes_x/scenes", f"optim.warm_start={source()}/runs/w/last.pt"],
        "argv": (sys.executable, "-m", "pytest"),
        "traceback": f'File "{source()}/derprop/training/trainer.py", line 3',
        "text": "1/4 labeled, tiled/dense memory, https://example.org/a, images / s, (a + b)/2",
        "n": 3,
    }
    out = portable(payload)
    assert out == {
        "command": "python -m experiments.cpu_evidence --resnet101-smoke --runs-dir <tmp>/r101",
        "overrides": ["data.root=<tmp>/bench_scenes_x/scenes", "optim.warm_start=runs/w/last.pt"],
        "argv": ["python", "-m", "pytest"],
        "traceback": 'File "derprop/training/trainer.py", line 3',
        "text": payload["text"],
        "n": 3,
    }
    assert portable(out) == out


def test_benchmarks_and_experiments_write_results_through_write_results():
    direct = [p.name for p in WRITERS if p.name != "common.py" and re.search(r"\batomic\.write_", p.read_text())]
    assert not direct, f"write results with benchmarks.common.write_results (it makes paths portable): {direct}"


@pytest.mark.slow
def test_built_book_prints_no_machine_paths():
    from test_book import SMOKE_HTML, build_smoke_book  # the smoke build, shared with tests/test_book.py

    rc, _, _ = build_smoke_book()
    assert rc == 0
    machine = {str(source()), str(source().resolve()), sys.prefix, str(Path(sys.prefix).resolve())}
    bad = [f"{page.name}: {folder}" for page in sorted((SMOKE_HTML / "book").glob("*.html"))
           for folder in machine if folder in page.read_text(errors="replace")]
    assert not bad, "the rendered book names this machine's folders (print paths from the repository root):\n" + \
        "\n".join(bad)
