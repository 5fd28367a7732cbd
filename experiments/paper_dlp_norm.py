"""Does the paper profile train? Eq. 4 literal against its normalisations, on the CPU default.

    python -m experiments.paper_dlp_norm [--norms none row_sum mean] [--epochs 3] [--iters 25]

Trains ``profile=paper`` on ``configs/cpu_scenes.yaml`` once per
``method.paper_dlp_norm`` and records, per epoch, the labeled cross-entropy on
``L`` and on the propagated ``L̃`` (``train_ce_x``, ``train_ce_x_prop``). Literal
eq. 4 (``none``) sums over all ``M`` pixels, so ``softmax(L̃)`` saturates and
its cross-entropy is large; a usable normalisation gives a finite, falling one.
A run whose ``results.json`` exists is reused. Writes
``results/paper_dlp_norm.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.common import RESULTS, machine_info, print_table, write_results
from derprop.method.propagation import PAPER_NORMS
from derprop.provenance import project_root
from derprop.training.config import resolved
from derprop.training.configfile import load_config
from derprop.training.trainer import Trainer


def run(config: str, norm: str, runs_dir: Path, overrides: Sequence[str]) -> dict:
    """Train (or reuse) one run; its per-epoch cross-entropies and final mIoU."""
    out = runs_dir / norm
    cfg = load_config(config, ["profile=paper", f"method.paper_dlp_norm={norm}", *overrides])
    if not (out / "results.json").is_file():
        print(f"== paper_dlp_norm={norm}", file=sys.stderr, flush=True)
        Trainer(cfg, out).fit()
    res = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "norm": norm,
        "epochs": [{"epoch": r["epoch"], "ce_x": r["train_ce_x"], "ce_x_prop": r["train_ce_x_prop"]} for r in rows],
        "miou": res["miou"],
        "wall_time_s": res["wall_time_s"],
        "config": resolved(cfg),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.paper_dlp_norm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/cpu_scenes.yaml")
    ap.add_argument("--norms", nargs="+", choices=PAPER_NORMS, default=list(PAPER_NORMS))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=25, help="iterations per epoch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs-dir", default="runs/paper_dlp_norm")
    ap.add_argument("--out", default=str(RESULTS / "paper_dlp_norm.json"))
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = [f"optim.epochs={args.epochs}", f"optim.iters_per_epoch={args.iters}", "data.diag_images=0",
                 f"eval.every={args.epochs}", *args.overrides]
    t0 = time.time()
    runs = [run(args.config, n, project_root() / args.runs_dir, overrides) for n in args.norms]
    payload = {
        "what": "profile=paper on the CPU default, one run per method.paper_dlp_norm: labeled CE on L and on "
                "the propagated L̃ per epoch, and the final mIoU",
        "command": "python -m experiments.paper_dlp_norm " + " ".join(sys.argv[1:] if argv is None else argv),
        "config_file": args.config,
        "runs": runs,
        "machine": machine_info("cpu"),
        "total_wall_time_s": time.time() - t0,
    }
    payload = write_results(Path(args.out), payload)
    print_table([{"norm": r["norm"], "epoch": e["epoch"], "ce_x": e["ce_x"], "ce_x_prop": e["ce_x_prop"]}
                 for r in runs for e in r["epochs"]],
                [("norm", "paper_dlp_norm", "s"), ("epoch", "epoch", "d"), ("ce_x", "CE on L", ".3f"),
                 ("ce_x_prop", "CE on L̃", ".3f")])
    return payload


if __name__ == "__main__":
    main()
