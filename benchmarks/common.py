"""Timing, peak-memory, profiling and reporting helpers shared by the benchmarks; the results-file helpers
(:func:`write_results`, :func:`machine_info`) are also the experiments' (``experiments/``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU each case runs
in a fresh subprocess, resets the kernel's resident-size high-water mark just
before the measured call and reports the rise of that mark.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import math
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
from typing import Any, Sequence

import torch

from derprop.provenance import project_root
from derprop.training import atomic

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


def run_guarded(module: str, run_case: Callable[[dict], dict], case: dict, isolate: bool,
                keys: Sequence[str]) -> dict:
    """One case, in a fresh process (``python -m module --case``: CPU peak memory is per process) or here by
    ``run_case``; a failure (out of memory included) comes back as a row of the case's ``keys`` and an ``error``."""
    try:
        return run_isolated(module, case) if isolate else run_case(case)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        text = str(err).strip().splitlines() or [type(err).__name__]
        oom = "out of memory" in str(err).lower() or "OutOfMemoryError" in str(err)
        return {**{k: case.get(k) for k in keys}, "error": "out of memory" if oom else text[-1][-300:]}
    finally:
        if not isolate:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


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


# --------------------------------------------------------------------------- #
# a training step on a synthetic batch (train_step, release_step)
# --------------------------------------------------------------------------- #


def synthetic_batch(batch: int, crop: int, classes: int, seed: int = 0, device: str = "cpu"):
    """One batch shaped like the training loaders' ``((x, y), (u_w, u_s, ignore, box), (u_w', u_s', ignore', box'))``,
    on ``device`` (moved once, so that host-to-device copies are not part of a timed step)."""
    g = torch.Generator().manual_seed(seed)
    border = max(1, crop // 16)

    def images() -> torch.Tensor:
        return torch.randint(0, 256, (batch, 3, crop, crop), generator=g, dtype=torch.uint8)

    def ignore() -> torch.Tensor:
        ign = torch.zeros(batch, crop, crop, dtype=torch.uint8)
        ign[:, -border:, :] = 255  # padding at the bottom, as after a crop of a smaller image
        return ign

    def boxes() -> torch.Tensor:
        box = torch.zeros(batch, crop, crop, dtype=torch.bool)
        for i in range(batch):
            h, w = (int(v) for v in torch.randint(crop // 4, crop // 2 + 1, (2,), generator=g))
            y0, x0 = (int(v) for v in torch.randint(0, crop - max(h, w) + 1, (2,), generator=g))
            box[i, y0:y0 + h, x0:x0 + w] = True
        return box

    x = images()
    y = torch.randint(0, classes, (batch, crop, crop), generator=g, dtype=torch.long)
    y[:, -border:, :] = 255
    parts = (x, y), (images(), images(), ignore(), boxes()), (images(), images(), ignore(), boxes())
    return tuple(tuple(t.to(device) for t in part) for part in parts)


def step_fn(trainer, batch, epoch: int) -> Callable[[], float]:
    """One iteration of ``Trainer.fit`` without its logging: ``compute_loss``, then ``Trainer.optimize``; returns the loss."""

    def step() -> float:
        loss, _ = trainer.compute_loss(batch, epoch)
        trainer.optimize(loss, epoch, 0)
        return float(loss.detach())

    return step


def make_scenes(root: Path) -> None:
    """A tiny scenes tree at ``root``: the Trainer's constructor needs one (the steps run on synthetic batches)."""
    from data_prep import scenes

    from derprop.book.runs import BOOK_RUNS

    scenes.main(["--root", str(root), *BOOK_RUNS["smoke"]["data_args"], "--workers", "1", "--quiet"])


def gradient_gap(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How far the parameter gradients ``other`` are from ``ref``: ``‖other − ref‖ / ‖ref‖`` over the whole net
    (``global``); the largest gap of one parameter relative to ``max(‖ref_p‖, 1e-3·‖ref‖)`` (``max``, at
    ``worst``: the biases of convs followed by BatchNorm have a true gradient of 0, pure rounding noise); the
    parameters that only one side has (``missing``)."""
    shared = [n for n in ref if n in other]
    norm = math.sqrt(sum(float(g.norm()) ** 2 for g in ref.values()))
    gaps = {n: float((other[n] - ref[n]).norm()) for n in shared}
    per = {n: gaps[n] / max(float(ref[n].norm()), 1e-3 * norm, 1e-30) for n in shared}
    worst = max(per, key=per.__getitem__) if per else None
    return {"global": math.sqrt(sum(v ** 2 for v in gaps.values())) / max(norm, 1e-30), "max": per.get(worst, 0.0),
            "worst": worst, "missing": sorted(set(ref) ^ set(other)), "norm": norm, "compared": len(shared)}


# --------------------------------------------------------------------------- #
# where a step's time goes (train_step, gpu_check)
# --------------------------------------------------------------------------- #

#: ``record_function`` ranges of :mod:`derprop.training.trainer` -> the part of the step they time, forward and backward.
PARTS: dict[str, str] = {
    "derprop.forward": "backbone",
    "derprop.dlp": "dlp_derivative_loss",
    "derprop.derivative_loss": "dlp_derivative_loss",
    "derprop.region_propagation": "region_propagation",
    "derprop.optimizer": "optimizer",
}
SPLIT = ("backbone", "region_propagation", "dlp_derivative_loss", "optimizer", "other")
BACKWARD_NODE = "autograd::engine::evaluate_function: "


def split_step(step: Callable[[], float], device: str) -> dict[str, Any]:
    """One profiled step, its time split into :data:`SPLIT` by the package's ``record_function`` ranges
    (:func:`split_events`)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    return split_events(prof.events(), wall_us, device)


def split_events(events: Sequence[Any], wall_us: float, device: str) -> dict[str, Any]:
    """The time of a profiled step split into :data:`SPLIT` by the package's ``record_function`` ranges.

    Only the CPU-side events count: on CUDA the profiler also reports each range as a GPU user annotation of the
    same name, which would count it twice; a CPU-side event's device time covers the kernels launched under it.
    Forward: each range's own time (nested ranges counted where they are, e.g. DLP inside the CutMix partner's
    forward). Backward: each autograd node is charged to the range around the forward op that made it (the
    profiler's sequence numbers link the two). ``other`` is the rest: CE/KL terms, pseudo-labels, the autograd
    engine's bookkeeping. Shares are of the profiled step (eager code; a compiled model's backward is one node).
    """
    events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]

    def took(e) -> float:
        return e.device_time_total if device == "cuda" else e.cpu_time_total

    def label(e) -> str | None:
        while e is not None:
            if e.name in PARTS or e.name == "derprop.backward":
                return e.name
            e = e.cpu_parent
        return None

    made_by: dict[int, str | None] = {}  # forward sequence number -> the range around the op
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD_NODE) and e.sequence_nr not in made_by:
            made_by[e.sequence_nr] = label(e)
    us = dict.fromkeys(SPLIT, 0.0)
    calls = dict.fromkeys(PARTS, 0)
    for e in events:
        if e.name in PARTS:  # a range's own time: less the ranges nested in it, which count for themselves
            nested = label(e.cpu_parent)
            us[PARTS[e.name]] += took(e)
            if nested in PARTS:
                us[PARTS[nested]] -= took(e)
            calls[e.name] += 1
        elif e.name.startswith(BACKWARD_NODE) and label(e.cpu_parent) == "derprop.backward":
            owner = made_by.get(e.sequence_nr)
            if owner in PARTS:
                us[PARTS[owner]] += took(e)
    total = wall_us if device != "cuda" else max(wall_us, sum(us.values()))
    us["other"] = max(total - sum(us[k] for k in SPLIT if k != "other"), 0.0)
    return {"shares": {k: us[k] / total for k in SPLIT}, "profiled_s": total / 1e6,
            "dlp_loss_calls": calls["derprop.dlp"] + calls["derprop.derivative_loss"],
            "region_propagation_calls": calls["derprop.region_propagation"]}
