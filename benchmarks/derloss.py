"""similarity_l1 forward+backward: tiled vs dense.

    python -m benchmarks.derloss [--device cuda] [--sizes 1681 4225 10201] [--chunk 512]

Prints a table and writes the ``derloss`` section of ``results/bench_core.json``.
Target (issue 3): at M = 10201 the tiled loss uses ≤ 1/10 of the dense peak
memory at ≤ 1.5× its time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import RESULTS, machine_info, measure, print_table, run_isolated, update_results
from derprop.losses import similarity_l1


def run_case(case: dict) -> dict:
    """One similarity_l1 call against a weak-view style target, gradients into both factors."""
    torch.manual_seed(0)
    device, m, b, d = case["device"], case["M"], case["B"], case["D"]
    x1 = torch.randn(b, d, m, device=device, requires_grad=True)
    x2 = torch.randn(b, d, m, device=device, requires_grad=True)
    y1 = torch.randn(b, d, m, device=device)
    y2 = torch.randn(b, d, m, device=device)
    chunk = case["chunk"] if case["impl"] == "tiled" else None

    def step() -> None:
        x1.grad = x2.grad = None
        similarity_l1(x1, x2, y1, y2, chunk=chunk).backward()

    return {**case, **measure(step, device, case["repeats"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1681, 4225, 10201])
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "bench_core.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return {}

    rows = []
    for m in args.sizes:
        for impl in ("dense", "tiled"):
            case = {"impl": impl, "M": m, "B": 2, "D": 21, "chunk": args.chunk,
                    "device": args.device, "repeats": args.repeats}
            rows.append(run_isolated("benchmarks.derloss", case) if args.device == "cpu" else run_case(case))
            print(f"  {impl:6s} M={m:6d}  {rows[-1]['seconds'] * 1e3:9.1f} ms  {rows[-1]['peak_mib']:8.1f} MiB", flush=True)
    ratios = []
    for m in args.sizes:
        by = {r["impl"]: r for r in rows if r["M"] == m}
        ratios.append({
            "M": m,
            "time_ratio": by["tiled"]["seconds"] / by["dense"]["seconds"],
            "memory_ratio": by["tiled"]["peak_mib"] / max(by["dense"]["peak_mib"], 1e-9),
        })
    print()
    print_table(ratios, [("M", "M", "d"), ("time_ratio", "tiled/dense time", ".2f"),
                         ("memory_ratio", "tiled/dense memory", ".3f")])
    section = {"machine": machine_info(args.device), "config": vars(args) | {"case": None},
               "rows": rows, "ratios": ratios}
    update_results(Path(args.out), "derloss", section)
    print(f"\nwrote {args.out}")
    return section


if __name__ == "__main__":
    main()
