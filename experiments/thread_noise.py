"""Run-to-run noise from the machine: the same seed of the CPU default's warm start at 1 and 2 threads, twice each.

    python -m experiments.thread_noise                      # threads 1 and 2, two runs each
    python -m experiments.thread_noise --threads 1 2 4 --repeats 3

Every run is the supervised warm start of the book's CPU default (``derprop.book.runs`` ``small``: 400 steps
on 62 labeled scenes) with one seed, trained by ``python -m derprop.train --threads N`` in a process of its
own (``OMP_NUM_THREADS=N``), one run at a time; ``runs/noise/t<N>_r<k>``. Same code, config and data: what
differs between two runs of one thread count is the machine's scheduling alone, and between thread counts
the order of floating-point sums. The seed spread beside it is that of the warm starts of
``results/cpu_evidence.json`` (seeds 0–5, one thread). Finished runs are reused. Writes
``results/thread_noise.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import RESULTS, machine_info, print_table, repo_path, write_results
from experiments.cpu_evidence import read_run
from derprop.book.runs import BOOK_RUNS, ensure_scenes, phase_overrides
from derprop.provenance import project_root


def train(out: Path, threads: int, seed: int) -> None:
    """The warm start of the CPU default with ``seed`` at ``threads`` threads into ``out`` (resumed if begun)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "derprop.train", "--config", str(project_root() / BOOK_RUNS["small"]["config"]),
           "--out", str(out), "--threads", str(threads), *(["--resume"] if (out / "last.pt").is_file() else []),
           f"data.root={ensure_scenes('small')}", *phase_overrides("small")[0], f"seed={seed}"]
    print(f"== {out.name}: {threads} thread(s)", file=sys.stderr, flush=True)
    with open(out / "train.out", "w") as log:
        subprocess.run(cmd, cwd=project_root(), stdout=log, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def seed_spread(path: Path) -> dict[str, Any] | None:
    """mIoU of the warm starts of ``results/cpu_evidence.json`` per seed (one thread), with their spread."""
    if not path.is_file():
        return None
    runs = {r["seed"]: r["miou"] for r in json.loads(path.read_text())["warm_start"]["runs"]}
    values = list(runs.values())
    return {"source": repo_path(path), "per_seed": runs, "mean": statistics.fmean(values),
            "std": statistics.stdev(values), "range": max(values) - min(values)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m experiments.thread_noise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs-dir", type=Path, default=project_root() / "runs" / "noise")
    ap.add_argument("--out", type=Path, default=RESULTS / "thread_noise.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    runs = []
    for repeat in range(args.repeats):  # interleaved: a slow spell of the machine does not fall on one count
        for threads in args.threads:
            out = args.runs_dir / f"t{threads}_r{repeat}"
            if not (out / "results.json").is_file():
                train(out, threads, args.seed)
            r = read_run(out)
            runs.append({"threads": threads, "repeat": repeat, "miou": r["miou"], "wall_time_s": r["wall_time_s"],
                         "run_dir": r["run_dir"]})
    by_threads = {}
    for threads in args.threads:
        values = [r["miou"] for r in runs if r["threads"] == threads]
        by_threads[str(threads)] = {"miou": values, "range": max(values) - min(values)}
    all_values = [r["miou"] for r in runs]
    payload = {
        "what": f"val mIoU of the CPU default's supervised warm start (400 steps, 62 labels, seed {args.seed}) trained "
                "again with the same code, config and data, at each thread count, one run at a time; beside it the "
                "spread over seeds of the same warm start",
        "command": "python -m experiments.thread_noise " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed, "runs": runs, "by_threads": by_threads,
        "machine_range": max(all_values) - min(all_values),
        "seed_spread": seed_spread(RESULTS / "cpu_evidence.json"),
        "machine": machine_info("cpu"),
        "total_wall_time_s": time.time() - t0,
    }
    payload = write_results(args.out, payload)
    print_table([{**r, "miou": 100 * r["miou"]} for r in runs],
                [("threads", "threads", "d"), ("repeat", "run", "d"), ("miou", "mIoU %", ".2f"),
                 ("wall_time_s", "wall s", ".0f")])
    for threads, b in by_threads.items():
        print(f"{threads} thread(s): range {100 * b['range']:.2f} pp")
    s = payload["seed_spread"]
    if s:
        print(f"seed spread (cpu_evidence warm starts): std {100 * s['std']:.2f} pp, range {100 * s['range']:.2f} pp")
    return payload


if __name__ == "__main__":
    main()
