"""DLP forward+backward: factorised vs literal eq. 4, tiled vs dense release form.

    python -m benchmarks.dlp [--device cuda] [--sizes 1681 4225 10201] [--chunk 256]

Prints a table and writes the ``dlp`` section of ``results/bench_core.json``.
Targets (issue 3): factorised ≥ 20× faster than literal at M = 1681 and ≥ 100×
at M = 10201; tiled official ≤ 1/10 of the dense peak memory at ≤ 1.5× its time
at M = 10201.
"""

from __future__ import annotations

import torch

from benchmarks.common import core_args, finish_core, measure, run_cases
from derprop.propagation import propagate
from derprop.reference import propagate_literal

IMPLS = {
    "paper-factorised": lambda logits, f1, f2, chunk: propagate(logits, f1, f2, mode="paper"),
    "paper-literal": lambda logits, f1, f2, chunk: propagate_literal(logits, f1, f2),
    "official-dense": lambda logits, f1, f2, chunk: propagate(logits, f1, f2, mode="official"),
    "official-tiled": lambda logits, f1, f2, chunk: propagate(logits, f1, f2, mode="official", chunk=chunk),
}


def run_case(case: dict) -> dict:
    """Time one implementation at one size, forward + backward into the features."""
    torch.manual_seed(0)
    device, m, b, c, d = case["device"], case["M"], case["B"], case["C"], case["D"]
    logits = torch.randn(b, c, m, device=device)
    f1 = torch.randn(b, d, m, device=device, requires_grad=True)
    f2 = torch.randn(b, d, m, device=device, requires_grad=True)
    weight = torch.randn(b, c, m, device=device)
    impl = IMPLS[case["impl"]]

    def step() -> None:
        f1.grad = f2.grad = None
        (impl(logits, f1, f2, case["chunk"]) * weight).sum().backward()

    return {**case, **measure(step, device, case["repeats"])}


def main(argv: list[str] | None = None) -> dict:
    args = core_args(__doc__, run_case, argv)
    if args is None:
        return {}
    cases = [{"impl": impl, "M": m, "B": 2, "C": 21, "D": 21, "chunk": args.chunk,
              "device": args.device, "repeats": args.repeats} for m in args.sizes for impl in IMPLS]
    rows = run_cases("benchmarks.dlp", cases, run_case)
    ratios = []
    for m in args.sizes:
        by = {r["impl"]: r for r in rows if r["M"] == m}
        ratios.append({
            "M": m,
            "paper_speedup": by["paper-literal"]["seconds"] / by["paper-factorised"]["seconds"],
            "official_time_ratio": by["official-tiled"]["seconds"] / by["official-dense"]["seconds"],
            "official_memory_ratio": by["official-tiled"]["peak_mib"] / max(by["official-dense"]["peak_mib"], 1e-9),
        })
    return finish_core(args, "dlp", rows, ratios, [
        ("M", "M", "d"), ("paper_speedup", "factorised speed-up", ".1f"),
        ("official_time_ratio", "tiled/dense time", ".2f"), ("official_memory_ratio", "tiled/dense memory", ".3f")])


if __name__ == "__main__":
    main()
