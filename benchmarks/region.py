"""Region propagation (CorrMatch's, kept by the release) per image: time and peak memory at crops 321 to 801.

    python -m benchmarks.region [--sizes 1681 4225 10201] [--threads 1 2]

``--sizes`` are feature-grid pixels M, as in the other core benchmarks: 1681, 4225 and 10201 are crops 321,
513 and 801 (output stride 8). One call is :func:`derprop.training.pseudo_labels.region_propagation` on one unlabeled
image, 128 sampled rows, on the synthetic batch of :mod:`benchmarks.vs_release` (features that follow a blocky
class map, a pseudo-label with wrong blobs, a CutMix box, an ignored border), each case in a fresh process.
Prints a table and writes the ``region_propagation`` section of ``results/bench_core.json``.
Target (issue 20): under 100 MB of extra memory per image at crop 801. Its speed against the release's region
maps is :mod:`benchmarks.vs_release`'s (``*-region`` rows).
"""

from __future__ import annotations

import math

from benchmarks.common import core_args, core_cases, core_ratios, finish_core, measure, run_cases
from benchmarks.vs_release import make_inputs, region_step, to_device

MEMORY_TARGET_MB = 100.0  # per image at crop 801 (M = 10201)


def crop_of(pixels: int) -> int:
    """The crop whose output-stride-8 grid has ``pixels`` points (1681 → 321, 10201 → 801)."""
    return 8 * (math.isqrt(pixels) - 1) + 1


def run_case(case: dict) -> dict:
    """One region propagation call on one image: peak memory, then median time."""
    inp = to_device(make_inputs(1, crop_of(case["M"]), 21), case["device"])
    return {**case, "crop": crop_of(case["M"]), **measure(region_step(inp), case["device"], case["repeats"])}


def main(argv: list[str] | None = None) -> dict:
    args = core_args(__doc__, run_case, argv)
    if args is None:
        return {}
    rows = run_cases("benchmarks.region", core_cases(args, ("blockwise",)), run_case)
    ratios = core_ratios(rows, lambda by: {"crop": by["blockwise"]["crop"],
                                           "seconds_per_image": by["blockwise"]["seconds"],
                                           "peak_mb_per_image": by["blockwise"]["peak_mib"] * 2**20 / 1e6})
    targets = [{"target": f"< {MEMORY_TARGET_MB:g} MB extra per image at crop 801", "threads": r["threads"],
                "M": r["M"], "value": r["peak_mb_per_image"], "met": r["peak_mb_per_image"] < MEMORY_TARGET_MB}
               for r in ratios if r["M"] == 10201]
    section = finish_core(args, "region_propagation", rows, ratios, [
        ("threads", "threads", "d"), ("M", "M", "d"), ("crop", "crop", "d"),
        ("seconds_per_image", "s / image", ".3f"), ("peak_mb_per_image", "peak MB / image", ".1f")],
        extra={"targets": targets})
    for t in targets:
        print(f"  {'met    ' if t['met'] else 'NOT met'}  {t['target']} threads {t['threads']}: {t['value']:.1f} MB")
    return section


if __name__ == "__main__":
    main()
