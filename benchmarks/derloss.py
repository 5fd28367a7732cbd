"""similarity_l1 forward+backward: tiled vs dense.

    python -m benchmarks.derloss [--device cuda] [--sizes 1681 4225 10201] [--chunk 512]

Prints a table and writes the ``derloss`` section of ``results/bench_core.json``.
Target (issue 3): at M = 10201 the tiled loss uses ≤ 1/10 of the dense peak
memory at ≤ 1.5× its time.
"""

from __future__ import annotations

import torch

from benchmarks.common import core_args, core_cases, core_ratios, finish_core, measure, run_cases
from derprop.method.losses import similarity_l1


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
    args = core_args(__doc__, run_case, argv)
    if args is None:
        return {}
    rows = run_cases("benchmarks.derloss", core_cases(args, ("dense", "tiled"), B=2, D=21), run_case)
    ratios = core_ratios(rows, lambda by: {
        "time_ratio": by["tiled"]["seconds"] / by["dense"]["seconds"],
        "memory_ratio": by["tiled"]["peak_mib"] / max(by["dense"]["peak_mib"], 1e-9),
    })
    return finish_core(args, "derloss", rows, ratios, [
        ("threads", "threads", "d"), ("M", "M", "d"), ("time_ratio", "tiled/dense time", ".2f"),
        ("memory_ratio", "tiled/dense memory", ".3f")])


if __name__ == "__main__":
    main()
