"""CPU evidence: DerProp with and without its parts on the scenes dataset, 3 seeds each.

    python -m benchmarks.cpu_evidence                      # 4 variants × 3 seeds of configs/cpu_scenes.yaml
    python -m benchmarks.cpu_evidence --jobs 2 --threads 1 # two runs at a time, one thread each
    python -m benchmarks.cpu_evidence --resnet101-smoke    # a few iterations of the full-size model

Variants (the paper's ablation rows, Table 1; "w/o DLP" and "w/o L_Der" also
drop the momentum network, as the paper says it did):

============  ==========================================================
full          the config as is
wo_dlp        ``method.dlp=false method.derivative_loss=false method.momentum=false``
wo_der        ``method.derivative_loss=false method.momentum=false``
wo_momentum   ``method.momentum=false``
============  ==========================================================

Same seed, data and iteration budget for every variant. The number reported
is the config's headline mIoU (``results.json``: the momentum net where it is
kept, else the back-propagation net, on ``eval.mode``), as mean ± sample
standard deviation over the seeds; both nets' mIoU and the last epoch's
pseudo-label diagnostics (before/after DLP) are kept per run. Runs whose
``results.json`` exists are reused, so an interrupted benchmark continues.

Output: ``results/cpu_evidence.json`` (and a table on stdout);
``--resnet101-smoke`` writes ``results/cpu_resnet101_smoke.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.common import RESULTS, ROOT, machine_info, print_table
from derprop import atomic
from derprop.config import load_config, resolved
from derprop.trainer import Trainer
from derprop.viewer import WITHOUT_DLP

VARIANTS: dict[str, list[str]] = {
    "full": [],
    "wo_dlp": list(WITHOUT_DLP),
    "wo_der": ["method.derivative_loss=false", "method.momentum=false"],
    "wo_momentum": ["method.momentum=false"],
}

SMOKE_OVERRIDES = [
    "profile=official", "model.backbone=resnet101", "model.pretrained=none", "model.deep_stem=true",
    "model.aspp_dilations=[12,24,36]", "data.crop_size=97", "eval.crop_size=97", "optim.batch_size=2",
    "optim.epochs=1", "optim.iters_per_epoch=3", "data.val_limit=4", "data.diag_images=2",
    "data.num_workers=0", "eval.every=1", "eval.final_modes=[original,center_crop]",
]


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std of the headline mIoU (and diagnostics) per variant."""
    out: dict[str, Any] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == variant]
        row: dict[str, Any] = {"variant": variant, "seeds": [r["seed"] for r in rs]}
        for key in ("miou", "miou_backprop", "miou_momentum", "pl_acc_before", "pl_acc_after",
                    "pl_miou_before", "pl_miou_after", "wall_time_s"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[f"{key}_mean"] = statistics.fmean(vals)
                row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[variant] = row
    return out


def _overrides(variant: str, seed: int, extra: Sequence[str]) -> list[str]:
    return [*VARIANTS[variant], f"seed={seed}", *extra]


def launch(config: str, variant: str, seed: int, runs_dir: Path, extra: Sequence[str], threads: int | None):
    """Start one run as ``python -m derprop.train`` in its own process (for ``--jobs`` > 1)."""
    out = runs_dir / f"{variant}_s{seed}"
    cmd = [sys.executable, "-m", "derprop.train", "--config", config, "--out", str(out),
           *(["--resume"] if (out / "last.pt").is_file() else []),
           *(["--threads", str(threads)] if threads else []), *_overrides(variant, seed, extra)]
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "train.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def run_one(config: str, variant: str, seed: int, runs_dir: Path, extra: Sequence[str]) -> dict[str, Any]:
    """Train one variant/seed in this process unless its ``results.json`` exists; return its numbers."""
    out = runs_dir / f"{variant}_s{seed}"
    cfg = load_config(config, _overrides(variant, seed, extra))
    if not (out / "results.json").is_file():
        Trainer(cfg, out, resume=(out / "last.pt").is_file()).fit()
    res = json.loads((out / "results.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = metrics[-1]
    mode = res["miou_mode"]
    return {
        "variant": variant,
        "seed": seed,
        "miou": res["miou"],
        "miou_net": res["miou_net"],
        "miou_backprop": res["final"]["backprop"][mode]["miou"],
        "miou_momentum": res["final"].get("momentum", {}).get(mode, {}).get("miou"),
        "pl_acc_before": last.get("pl_acc_before"),
        "pl_acc_after": last.get("pl_acc_after"),
        "pl_miou_before": last.get("pl_miou_before"),
        "pl_miou_after": last.get("pl_miou_after"),
        "wall_time_s": res["wall_time_s"],
        "run_dir": str(out),
        "config": resolved(cfg),
    }


def evidence(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    runs_dir = Path(args.runs_dir)
    todo = [(v, s) for s in args.seeds for v in args.variants]
    if args.jobs > 1:  # train several runs at once, each in its own process
        pending = [(v, s) for v, s in todo if not (runs_dir / f"{v}_s{s}" / "results.json").is_file()]
        running: list = []
        while pending or running:
            while pending and len(running) < args.jobs:
                v, s = pending.pop(0)
                print(f"== {v}, seed {s}", file=sys.stderr, flush=True)
                running.append(((v, s), launch(args.config, v, s, runs_dir, args.overrides, args.threads)))
            time.sleep(2)
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                if item[1].returncode != 0:
                    log = runs_dir / f"{item[0][0]}_s{item[0][1]}" / "train.log"
                    raise RuntimeError(f"run {item[0]} failed; see {log}")
    runs = []
    for v, s in todo:
        if args.jobs <= 1:
            print(f"== {v}, seed {s}", file=sys.stderr, flush=True)
        runs.append(run_one(args.config, v, s, runs_dir, args.overrides))
    summary = aggregate(runs)
    configs = {v: next(r["config"] for r in runs if r["variant"] == v) for v in args.variants}
    for r in runs:
        r.pop("config")
    payload = {
        "what": "headline mIoU (momentum net where kept, else back-prop net) on the scenes val set; "
                "mean ± sample std over seeds; same data, seeds and iteration budget per variant",
        "command": "python -m benchmarks.cpu_evidence " + " ".join(sys.argv[1:]),
        "config_file": args.config,
        "variants": VARIANTS,
        "summary": summary,
        "runs": runs,
        "configs": configs,
        "machine": machine_info("cpu"),
        "torch_version": str(torch.__version__),
        "total_wall_time_s": time.time() - t0,
    }
    atomic.write_json(Path(args.out), payload)
    rows = [{"variant": v, "miou": 100 * s["miou_mean"], "std": 100 * s["miou_std"],
             "acc_b": 100 * s.get("pl_acc_before_mean", float("nan")),
             "acc_a": 100 * s.get("pl_acc_after_mean", float("nan")), "n": len(s["seeds"])}
            for v, s in summary.items()]
    print_table(rows, [("variant", "variant", "s"), ("miou", "mIoU %", ".2f"), ("std", "± std", ".2f"),
                       ("acc_b", "PL acc before DLP %", ".2f"), ("acc_a", "PL acc after DLP %", ".2f"),
                       ("n", "seeds", "d")])
    return payload


def resnet101_smoke(args: argparse.Namespace) -> dict[str, Any]:
    """A few iterations of ResNet-101 (deep stem, OS 8, release profile) on CPU: the full-size path runs."""
    cfg = load_config(args.config, [*SMOKE_OVERRIDES, *args.overrides])
    out = Path(args.runs_dir) / "resnet101_smoke"
    t0 = time.time()
    trainer = Trainer(cfg, out, overwrite=True)  # a timing run: always trained again
    n_params = sum(p.numel() for p in trainer.net.parameters())
    res = trainer.fit()
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    payload = {
        "what": "ResNet-101 DeepLabV3+ (deep stem, output stride 8, ASPP 12/24/36), release profile with every "
                "extra term, random init, a few iterations on CPU: proves the full-size training path runs",
        "command": "python -m benchmarks.cpu_evidence " + " ".join(sys.argv[1:]),
        "params_millions": n_params / 1e6,
        "iterations": len(steps),
        "losses": [s["loss"] for s in steps],
        "seconds_per_iteration": metrics[0]["train_time_s"] / max(len(steps), 1),
        "epoch_metrics": metrics,
        "final": res["final"],
        "total_wall_time_s": time.time() - t0,
        "config": resolved(cfg),
        "machine": machine_info("cpu"),
        "torch_version": str(torch.__version__),
    }
    atomic.write_json(Path(args.smoke_out), payload)
    print(f"ResNet-101: {n_params / 1e6:.1f} M parameters, {len(steps)} iterations, losses "
          f"{[round(x, 3) for x in payload['losses']]}, {payload['seconds_per_iteration']:.1f} s/iteration")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_evidence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "cpu_scenes.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "cpu_evidence"))
    ap.add_argument("--out", default=str(RESULTS / "cpu_evidence.json"))
    ap.add_argument("--resnet101-smoke", action="store_true")
    ap.add_argument("--smoke-out", default=str(RESULTS / "cpu_resnet101_smoke.json"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, each in its own process")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resnet101_smoke:
        resnet101_smoke(args)
    else:
        evidence(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
