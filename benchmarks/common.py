"""Timing, peak-memory and reporting helpers shared by the benchmarks.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU each case runs
in a fresh subprocess, resets the kernel's resident-size high-water mark just
before the measured call and reports the rise of that mark.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from derprop import atomic
from derprop.provenance import project_root

RESULTS = project_root() / "results"

ABSOLUTE_PATH = re.compile(r"""(?<![^\s="'(\[{,])/(?=[\w.~-])[^\s"'`,;:()\[\]{}<>|]*""")
"""An absolute POSIX path inside a string: at its start or after a space, ``=``, a quote or a bracket."""


def repo_path(path: str | Path) -> str:
    """``path`` as a results file records it: from the repository root, so that no file names a machine's folders.

    Outside the repository: ``python`` for the interpreter, ``<python>/…`` inside its environment,
    ``<tmp>/…`` in the temporary folder, ``~/…`` in the home folder, else ``<outside>/<name>``.
    """
    if str(path) == sys.executable:
        return "python"
    p = Path(os.path.abspath(path))
    for base, label in ((project_root(), ""), (Path(sys.prefix), "<python>"), (Path(tempfile.gettempdir()), "<tmp>"),
                        (Path.home(), "~")):
        # symlinks either side (a worktree's .venv, macOS's /tmp) must not hide that a path is inside
        for candidate, b in itertools.product((p, p.resolve()), (base, base.resolve())):
            if b != Path("/") and candidate.is_relative_to(b):
                rest = candidate.relative_to(b).as_posix()
                return rest if not label else label if rest == "." else f"{label}/{rest}"
    return f"<outside>/{p.name}"


def portable(obj: Any) -> Any:
    """A JSON payload with every absolute path in its strings (``--out /x``, ``data.root=/x``) as :func:`repo_path`."""
    if isinstance(obj, str):
        return ABSOLUTE_PATH.sub(lambda m: repo_path(m.group(0)), obj)
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj


def write_results(path: str | Path, payload: dict) -> dict:
    """Write a benchmark's results file atomically, its paths made :func:`portable`; returns what it wrote."""
    payload = portable(payload)
    atomic.write_json(path, payload)
    return payload


def machine_info(device: str) -> dict:
    """What a reader needs to compare numbers: device, versions, cores, date."""
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cpu":
        import psutil  # CPU figures only: a GPU box needs no psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    return info


def sync(device: str) -> None:
    """Wait for the device's queued work, so that a timer stops when the work is done (CUDA runs ahead)."""
    if device == "cuda":
        torch.cuda.synchronize()


def device_slug(device: str) -> str:
    """A file-name part naming the device: ``cpu``, or the CUDA device's name (``nvidia-h200``)."""
    if device != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-") or "cuda"


def _reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process (Linux ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_mib(step: Callable[[], None], device: str) -> float:
    """Peak memory of one call of ``step`` above what was held before it, MiB (CUDA: allocated; CPU: the rise
    of the resident-size high-water mark)."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        import psutil

        _reset_peak_rss()
        base = psutil.Process().memory_info().rss
        step()
        peak = _peak_rss() - base
    return max(peak, 0) / 2**20


def measure(step: Callable[[], None], device: str, repeats: int) -> dict:
    """Peak extra memory of one call of ``step`` (:func:`peak_mib`), then (after a warm-up call) its median wall time."""
    peak = peak_mib(step, device)
    step()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mib": peak, "repeats": repeats}


def run_isolated(module: str, case: dict, limit_gib: float | None = None) -> dict:
    """Run one case as ``python -m module --case JSON`` and return the JSON it prints last.

    ``limit_gib``: the process may hold at most this much data memory (``RLIMIT_DATA``: its allocations fail
    beyond it, so a case too large for the machine cannot push other work out of memory); a case that hits
    it returns ``{"error": "does not fit in N GiB", "limit_gib": N}``.
    """
    def limit() -> None:
        cap = int(limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))

    proc = subprocess.run(
        [sys.executable, "-m", module, "--case", json.dumps(case)],
        cwd=project_root(),
        # A fixed mmap threshold makes glibc hand large freed blocks straight back
        # to the kernel, so the resident size follows the tensors that are alive.
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=limit if limit_gib else None,
    )
    if proc.returncode != 0 and limit_gib and ("can't allocate memory" in proc.stderr or "MemoryError" in proc.stderr):
        return {"error": f"does not fit in {limit_gib:g} GiB", "limit_gib": limit_gib}
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def update_results(path: Path, key: str, section: dict) -> None:
    """Replace one benchmark's section of a shared results file, keeping the others."""
    payload = json.loads(path.read_text()) if path.exists() else {}
    payload[key] = section
    write_results(path, payload)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as an aligned table; ``columns`` are (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([format(row[key], fmt) if row.get(key) is not None else "-" for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def core_args(doc: str, run_case: Callable[[dict], dict], argv: list[str] | None) -> argparse.Namespace | None:
    """Parse the options shared by the core benchmarks (``dlp``, ``derloss``, ``region``).

    Returns ``None`` after running the one case that ``--case`` names (how
    :func:`run_isolated` measures each case in a fresh process) and printing it.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1681, 4225, 10201])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to measure at")
    parser.add_argument("--out", default=str(RESULTS / "bench_core.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        if case.get("threads"):
            torch.set_num_threads(case["threads"])
        print(json.dumps(run_case(case)))
        return None
    return args


def core_cases(args: argparse.Namespace, impls: Iterable[str], **shape: int) -> list[dict]:
    """One case per thread count (CPU), size and implementation."""
    threads = args.threads if args.device == "cpu" else [None]
    return [{"impl": impl, "M": m, **shape, "chunk": args.chunk, "threads": t, "device": args.device,
             "repeats": args.repeats} for t in threads for m in args.sizes for impl in impls]


def core_ratios(rows: list[dict], ratios: Callable[[dict[str, dict]], dict]) -> list[dict]:
    """``ratios(by_impl)`` for every (threads, M) of the rows, in order."""
    keys = list(dict.fromkeys((r["threads"], r["M"]) for r in rows))
    return [{"threads": t, "M": m, **ratios({r["impl"]: r for r in rows if (r["threads"], r["M"]) == (t, m)})}
            for t, m in keys]


def run_cases(module: str, cases: list[dict], run_case: Callable[[dict], dict]) -> list[dict]:
    """Run each case (isolated on CPU, in-process on CUDA) and print a line per case."""
    rows = []
    for case in cases:
        row = run_isolated(module, case) if case["device"] == "cpu" else run_case(case)
        print(f"  {row['impl']:17s} M={row['M']:6d}  {row['seconds'] * 1e3:9.1f} ms  {row['peak_mib']:8.1f} MiB",
              flush=True)
        rows.append(row)
    return rows


def finish_core(args: argparse.Namespace, key: str, rows: list[dict], ratios: list[dict],
                columns: list[tuple[str, str, str]], extra: dict | None = None) -> dict:
    """Print the ratio table and store this benchmark's section of ``bench_core.json``."""
    print()
    print_table(ratios, columns)
    config = vars(args) | {"case": None, "out": repo_path(args.out)}
    section = {"machine": machine_info(args.device), "config": config, "rows": rows, "ratios": ratios,
               **(extra or {})}
    update_results(Path(args.out), key, section)
    print(f"\nwrote {args.out}")
    return section
