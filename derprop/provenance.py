"""What made a run: the derprop version, the git commit, the software stack, the devices and the batch.

Explained in the book chapter *Full reproduction on a GPU*.

:func:`version` is the one place the package's version is read (``derprop.__version__`` and every
command's ``--version`` use it). :func:`record` is the flat dictionary that ``results.json``, every
checkpoint and ``results/matrix/*.json`` carry, so a number can always be traced to the code, the
software and the hardware that produced it and to the batch it was actually trained with.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterator, Sequence

NOT_INSTALLED = "unknown (derprop is not installed)"
NOT_A_CHECKOUT = "not a git checkout"

KEYS = ("derprop_version", "git_commit", "git_dirty", "python", "torch_version", "cuda_version", "cudnn_version",
        "device", "devices", "device_count", "threads", "world_size", "global_batch", "per_process_batch")
"""The fields of :func:`record`, in order."""


def version() -> str:
    """The installed ``derprop`` version (package metadata), or :data:`NOT_INSTALLED`."""
    try:
        return importlib.metadata.version("derprop")
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


ROOT_VARIABLE = "DERPROP_ROOT"
"""The environment variable that names the project folder (:func:`project_root`)."""


def source() -> Path:
    """The folder the running ``derprop`` package was imported from: a checkout, or site-packages.

    The code's own files live here (``configs/``, ``data_prep/splits``, ``pipelines/``, ``tests/``).
    """
    return Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The project folder, where ``runs/``, ``data/`` and ``results/`` go.

    ``$DERPROP_ROOT`` when set (``python -m derprop.book.runs --root DIR`` sets it while it runs: :func:`at_root`),
    else the checkout (:func:`source`, when it holds ``configs/``: an editable install or ``PYTHONPATH``),
    else the current folder: an installed package lives in site-packages.
    """
    if os.environ.get(ROOT_VARIABLE):
        return Path(os.environ[ROOT_VARIABLE]).resolve()
    return source() if (source() / "configs").is_dir() else Path.cwd()


@contextlib.contextmanager
def at_root(root: str | os.PathLike | None) -> Iterator[None]:
    """:func:`project_root` is ``root`` (with the processes started meanwhile) until the block ends; None: as it was.

    What a command's ``--root`` does: the environment is restored afterwards, so a caller in the same process
    (a test, a notebook) keeps its own project folder.
    """
    before = os.environ.get(ROOT_VARIABLE)
    if root is not None:
        os.environ[ROOT_VARIABLE] = str(Path(root).resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ROOT_VARIABLE, None)
        else:
            os.environ[ROOT_VARIABLE] = before


def git_state(root: Path | None = None) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the checkout at ``root`` (default :func:`source`); ``dirty``: a tracked file
    differs from the commit.

    ``(NOT_A_CHECKOUT, None)`` when ``root`` is not the top of a git work tree (an installed package) or
    git is missing.
    """
    root = root or source()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return NOT_A_CHECKOUT, None
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return NOT_A_CHECKOUT, None


def record(*, devices: Sequence[str], device_count: int, world_size: int, global_batch: int,
           per_process_batch: int) -> dict[str, Any]:
    """The provenance fields (:data:`KEYS`) of a run.

    ``devices``: the device name of each process in rank order (``devices[0]`` is ``device``);
    ``device_count``: how many distinct devices those processes used. ``threads``: the CPU threads of this
    process (``torch.get_num_threads``): on a CPU the same run with another thread count sums in another order
    and can end more than a point of mIoU apart (the book's CPU warm start: 40.33 with one thread, 38.48 with two).
    """
    import torch

    commit, dirty = git_state()
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "derprop_version": version(), "git_commit": commit, "git_dirty": dirty,
        "python": platform.python_version(), "torch_version": str(torch.__version__),
        "cuda_version": torch.version.cuda, "cudnn_version": cudnn,
        "device": devices[0], "devices": list(devices), "device_count": device_count,
        "threads": torch.get_num_threads(), "world_size": world_size, "global_batch": global_batch,
        "per_process_batch": per_process_batch,
    }
