"""The DLP map of a trained run: propagation weights from the learned ones to an oracle's, and what each fixes.

    python -m experiments.dlp_map                                   # the book's DerProp run of the CPU default
    python -m experiments.dlp_map --run runs/book/small/cpu_dlp --row "paper profile=runs/x" --row ...

On the run's diagnostic images (the first ``data.diag_images`` unlabeled images, whose labels are known)
the back-propagation network Θb of ``last.pt`` (the one whose weak-view pseudo-labels DLP rectifies)
gives ``L``, ``L̃`` and its similarity logits once; :mod:`derprop.book.dlp_map` then scores the families
``kappa``, ``alpha`` and ``temperature`` between the learned and the oracle weights: own-class share,
fixed / broken / net pixels at ``η`` = 0.5, 0.75, 1 on the grid points and at full resolution,
pseudo-label accuracy and mIoU. Also: the break-even share of each family, the oracle's ceiling (errors
that are whole class regions against boundary and interior pixels) and, for every ``--row NAME=RUN``,
where that trained run's own learned weights sit (its own network and images). Writes
``results/dlp_map.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.common import RESULTS, machine_info, print_table, repo_path, write_results
from derprop.book import dlp_map
from derprop.book.sources import fingerprint
from derprop.predict import load_model
from derprop.provenance import project_root
from derprop.training.config import resolved
from derprop.training.configfile import load_config
from derprop.training.loaders import diagnostic_set


def inputs_of(run: Path, images: int | None) -> tuple[dlp_map.MapInputs, dict[str, Any]]:
    """Θb of ``run/last.pt`` over the run's diagnostic images (``images`` of them, default its own count)."""
    cfg = load_config(run / "config.yaml", [] if images is None else [f"data.diag_images={images}"])
    diag = diagnostic_set(cfg)
    if diag is None:
        raise SystemExit(f"error: {run}: its config has no diagnostic images with labels (data.diag_images)")
    net, _ = load_model(run / "last.pt", which="model")
    return dlp_map.collect(net, diag, cfg), resolved(cfg)


def position(run: Path, images: int | None) -> dict[str, Any]:
    """Where a trained run's own learned weights sit on the map."""
    inputs, cfg = inputs_of(run, images)
    return {"run": repo_path(run), "dlp_form": cfg["method"]["dlp_form"], "grid": list(inputs.grid),
            **dlp_map.score(inputs, inputs.weights)}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.dlp_map", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=project_root() / "runs" / "book" / "small" / "cpu_dlp",
                    help="a finished run of the release's softmax form (default: the book's DerProp run)")
    ap.add_argument("--row", action="append", default=[], metavar="NAME=RUN",
                    help="a trained run to place on the map (repeatable)")
    ap.add_argument("--images", type=int, default=None, help="diagnostic images (default: the run's data.diag_images)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "dlp_map.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    inputs, cfg = inputs_of(args.run, args.images)
    whole = dlp_map.full_map(inputs)
    families = whole["families"]
    rows = {}
    for spec in args.row:
        name, _, run = spec.partition("=")
        if not run:
            raise SystemExit(f"error: --row takes NAME=RUN, got {spec!r}")
        rows[name] = position(Path(run), args.images)
    payload = {
        "what": "pseudo-labels of the run's diagnostic images by its trained network, propagated with weights "
                "between the learned ones (value 0 / T = 1) and the oracle's (same-class mean); own-class share, "
                "fixed/broken/net pixels per eta on the grid points and at full resolution, accuracy, mIoU",
        "command": "python -m experiments.dlp_map " + " ".join(sys.argv[1:] if argv is None else argv),
        "run": repo_path(args.run),
        "run_fingerprint": fingerprint(args.run),  # the book recomputes the map when the run is another
        **whole,
        "rows": rows,
        "config": cfg,
        "machine": machine_info("cpu"),
        "torch_version": str(torch.__version__),
        "total_wall_time_s": time.time() - t0,
    }
    payload = write_results(Path(args.out), payload)
    table = [{"family": f, "value": p["value"], "share": p["own_share"], "ratio": p["share_ratio"],
              **{f"full{e}": p["full"][e]["net"] for e in ("0.5", "0.75", "1")},
              **{f"grid{e}": p["grid"][e]["net"] for e in ("0.5", "1")}}
             for f, points in families.items() for p in points]
    table += [{"family": f"row: {name}", "value": None, "share": r["own_share"], "ratio": r["share_ratio"],
               **{f"full{e}": r["full"][e]["net"] for e in ("0.5", "0.75", "1")},
               **{f"grid{e}": r["grid"][e]["net"] for e in ("0.5", "1")}} for name, r in rows.items()]
    print_table(table, [("family", "family", "s"), ("value", "value", "g"), ("share", "own share", ".3f"),
                        ("ratio", "× uniform", ".2f"), ("full0.5", "net full η=.5", "+d"),
                        ("full0.75", "η=.75", "+d"), ("full1", "η=1", "+d"), ("grid0.5", "net grid η=.5", "+d"),
                        ("grid1", "η=1", "+d")])
    print(f"break-even own-class share (full resolution, η = 0.5): {payload['break_even_share']}")
    print(f"ceiling: {payload['ceiling']}")
    d = payload["detail"]
    print(f"detail-preserving upsampling: oracle net at full resolution, η = 0.5: "
          f"{d['oracle']['full']['0.5']['net']:+d}; break-even share {d['break_even_share']}")
    return payload


if __name__ == "__main__":
    main()
