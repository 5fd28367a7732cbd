"""Shared fixtures: a tiny scenes tree, built once per test session.

The suite runs on the CPU also on a GPU box: it hides the GPUs from itself and from every process it starts
(``CUDA_VISIBLE_DEVICES`` is empty before torch can look), because its bit-exact tests assume CPU kernels and its
fixtures CPU tensors. ``make gpu-check`` runs ``tests/test_cuda.py`` with ``DERPROP_TEST_CUDA=1``, which keeps them.
"""

from __future__ import annotations

import os

if os.environ.get("DERPROP_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import subprocess
import sys
from pathlib import Path

import pytest

from derprop.book.runs import BOOK_RUNS
from derprop.provenance import source

TINY_SCENES = BOOK_RUNS["smoke"]["data_args"]  # the tree configs/cpu_scenes_tiny.yaml expects


@pytest.fixture(scope="session")
def scenes_tiny(tmp_path_factory) -> Path:
    """24 training and 8 validation scenes of 48×48, all ten classes (``python -m data_prep.scenes``), read-only."""
    root = tmp_path_factory.mktemp("data") / "scenes_tiny"
    subprocess.run(
        [sys.executable, "-m", "data_prep.scenes", "--root", str(root), *TINY_SCENES, "--workers", "1", "--quiet"],
        cwd=source(), check=True,
    )
    return root


@pytest.fixture(scope="session")
def repo() -> Path:
    """The checkout under test: where derprop was imported from (``derprop.provenance.source``)."""
    return source()
