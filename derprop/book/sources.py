"""Where a number on a book page comes from: a committed results file, the reader's own build, or the page.

Explained in the book chapter *Results at a glance*, which lists every headline number with its source; every
chapter that shows a measured number names its source with :func:`committed` or :func:`this_build`.

* **committed**: a file under ``results/`` that a benchmark wrote on some day, on some machine, with some
  number of threads, and that git keeps. Its numbers are the same in every build of the book.
* **this build**: a run folder under ``runs/book/<size>/`` that ``make demo`` (or the chapter itself) trained
  on the reader's machine. Its numbers are the reader's own and move with the machine and the thread count.

A file that was derived from a run folder (the DLP map scores a run's network) is only shown as that run's when
it records the run's :func:`fingerprint` and the fingerprint still matches (:func:`matches`); otherwise the
chapter recomputes it for the run at build time.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from derprop.book.display import code, escape_markdown

KINDS = ("committed", "this build")
"""The two sources of a measured number."""


@dataclass(frozen=True)
class Source:
    """One source of numbers: its kind (:data:`KINDS`), the file or folder (relative to the project), the date
    it was written, the machine and the CPU threads per run (``None``: not recorded)."""

    kind: str
    path: str
    date: str | None = None
    machine: str | None = None
    threads: int | tuple[int, ...] | None = None

    def details(self) -> str:
        """``date, machine, N thread(s)`` as far as they are known (``1 and 2 threads`` for a file that compares
        thread counts)."""
        counts = (self.threads,) if isinstance(self.threads, int) else self.threads
        threads = "threads not recorded" if not counts else \
            (f"{' and '.join(map(str, counts))} thread{'' if counts == (1,) else 's'}"
             f"{' per run' if self.kind == 'committed' else ''}")
        return ", ".join(p for p in (self.date, self.machine, threads) if p)

    def markdown(self) -> str:
        """``committed: `results/x.json` (2026-12-03, 2-core x86_64, 1 thread per run)`` (Markdown)."""
        return f"{self.kind}: {code(self.path)} ({escape_markdown(self.details())})"

    def __str__(self) -> str:
        return f"{self.kind}: {self.path} ({self.details()})"


def _relative(path: Path, root: Path | None) -> str:
    try:
        return str(path.resolve().relative_to((root or Path.cwd()).resolve()))
    except ValueError:
        return str(path)


def machine_words(machine: Mapping[str, Any]) -> str | None:
    """A results file's ``machine`` record in words: ``2-core x86_64`` or the GPU's name."""
    if not machine:
        return None
    if machine.get("device") not in (None, "cpu"):
        return str(machine.get("device_name") or machine["device"])
    cores = machine.get("cpu_count")
    name = machine.get("device_name") or "CPU"
    return f"{cores}-core {name}" if cores else str(name)


def committed(path: str | os.PathLike, data: Mapping[str, Any] | None = None, *,
              root: str | os.PathLike | None = None) -> Source:
    """The source of a committed results file (``data``: its parsed JSON, read from ``path`` when omitted).

    The date and machine come from its ``machine`` record; the threads per run from its ``threads`` field (the
    benchmarks' runs are one process each with that many threads). ``root``: the project folder that ``path`` is
    shown relative to (default: the current folder).
    """
    path = Path(path)
    if data is None:
        data = json.loads(path.read_text())
    machine = data.get("machine") or {}
    date = (machine.get("date") or data.get("date") or "")[:10] or None
    threads = data.get("threads")
    if not isinstance(threads, int) or isinstance(threads, bool):
        # a file that compares thread counts (``results/thread_noise.json``) records them per run
        threads = tuple(sorted({r["threads"] for r in data.get("runs") or [] if isinstance(r, Mapping)
                                and isinstance(r.get("threads"), int)})) or None
    return Source("committed", _relative(path, Path(root) if root else None), date, machine_words(machine),
                  threads)


def this_build(run_dir: str | os.PathLike, *, root: str | os.PathLike | None = None) -> Source:
    """The source of a run folder trained for this build: its ``results.json`` (the date it was written, the
    device and threads the run recorded)."""
    run = Path(run_dir)
    results = run / "results.json"
    data = json.loads(results.read_text()) if results.is_file() else {}
    date = _dt.datetime.fromtimestamp(results.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d") \
        if results.is_file() else None
    device = str(data.get("device") or "").split(" (")[0] or None
    threads = data.get("threads")
    return Source("this build", _relative(run, Path(root) if root else None), date,
                  "CPU" if device == "cpu" else device, threads if isinstance(threads, int) else None)


def fingerprint(run_dir: str | os.PathLike) -> str | None:
    """The sha256 of a run's ``last.pt`` (its final weights): what a file derived from the run records, so that a
    later build can tell whether the run it finds is the one the file scored. ``None`` without a checkpoint."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def matches(data: Mapping[str, Any], run_dir: str | os.PathLike) -> bool:
    """Whether a results file derived from a run (its ``run_fingerprint``) was derived from ``run_dir`` as it is
    now. A file without a fingerprint, or a run without a checkpoint, never matches: the chapter recomputes."""
    recorded = data.get("run_fingerprint")
    return bool(recorded) and recorded == fingerprint(run_dir)
