"""CPU evidence: DerProp with and without its parts on the scenes dataset (Table 1's rows), 3 seeds each.

    python -m experiments.cpu_evidence                      # 4 variants × 3 seeds of the book's CPU runs
    python -m experiments.cpu_evidence --jobs 2             # two runs at a time, one thread each
    python -m experiments.cpu_evidence --resnet101-smoke    # a few iterations of the full-size model

Variants (the paper's ablation rows, Table 1; "w/o DLP" and "w/o L_Der" also
drop the momentum network, as the paper says it did):

============  ==========================================================
full          the config as is
wo_dlp        :data:`derprop.book.runs.WITHOUT_DLP`: no propagation, no derivative loss, no momentum,
              no region propagation (no similarity head anywhere)
wo_der        ``method.derivative_loss=false method.momentum=false``
wo_momentum   ``method.momentum=false``
============  ==========================================================

Every run is a book CPU run (:data:`derprop.book.runs.BOOK_RUNS`, ``--size``): it
starts from the supervised warm start of its seed (``warm_s<seed>``, trained
first, shared by all variants of that seed), or with ``--warm-start DIR`` from
one finished warm-start run for every seed (e.g. the book's
``runs/book/small/cpu_warm``; the seeds then vary the semi-supervised phase
only). So a difference between variants is the effect of the semi-supervised
phase alone. Same data, seed and
iteration budget for every variant. The number reported is the run's headline
mIoU (``results.json``: the momentum net where it is kept, else the
back-propagation net, at original size), as mean ± sample standard deviation
over the seeds, and the per-seed paired difference against ``full``; the last
epoch's diagnostics (pseudo-label accuracy before/after DLP, fixed and broken
pixels, own-class attention share) are kept per run. Runs whose
``results.json`` exists are reused, so an interrupted benchmark continues;
runs with identical resolved configs are trained once (``experiments.ablations_cpu``
shares them too).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.common import RESULTS, machine_info, print_table, repo_path, write_results
from derprop.book.runs import BOOK_RUNS, SUPERVISED, ensure_scenes, phase_overrides
from derprop.provenance import project_root
from derprop.training.config import resolved
from derprop.training.configfile import load_config
from derprop.training.tables import ABLATIONS
from derprop.training.trainer import Trainer

BASELINE = "supervised_momentum"
"""The strongest simple baseline: the labeled terms only (``method.semi_supervised=false``), with the same
momentum network (weight averaging, eq. 6) as DerProp; every row is paired against it."""

VARIANTS: dict[str, list[str]] = {
    "full": [], **{k: list(ABLATIONS[k].overrides) for k in ("wo_dlp", "wo_der", "wo_momentum")},
    BASELINE: list(SUPERVISED), "detail_upsample": ["method.dlp_upsample=detail"],
}
"""Table 1's rows (:data:`derprop.training.tables.ABLATIONS`), the baseline on top of the book's CPU run, and DerProp with
the detail-preserving upsampling of L̃ (chapter *Where DLP can help*; not run unless asked for)."""

DEFAULT_VARIANTS = ("full", "wo_dlp", "wo_der", "wo_momentum", BASELINE)
"""What ``--variants`` runs when not given: Table 1's rows and the baseline."""

MARGIN = 0.02
"""What the claim asks of DerProp on every held-out seed: its trained network beats the baseline's trained
network, and its momentum network the baseline's momentum network, each by this much (2 pp)."""


def claim(summary: dict[str, dict[str, Any]], seeds: Sequence[int], row: str = "full") -> dict[str, Any]:
    """Does ``row`` beat :data:`BASELINE` by :data:`MARGIN` on every one of ``seeds``, net by net?"""
    nets = summary.get(row, {}).get("nets", {})
    diffs = {net: {seed: nets[net]["diff_per_seed"].get(seed) for seed in seeds}
             for net in ("backprop", "momentum") if "diff_per_seed" in nets.get(net, {})}
    measured = len(diffs) == 2 and all(d is not None for per in diffs.values() for d in per.values())
    return {"row": row, "baseline": BASELINE, "margin": MARGIN, "seeds": list(seeds), "diff_per_seed": diffs,
            "measured": measured,
            "met": measured and all(d >= MARGIN for per in diffs.values() for d in per.values())}

DIAGNOSTICS = ("pl_acc_before", "pl_acc_after", "pl_miou_before", "pl_miou_after", "pl_fixed", "pl_broken",
               "attn_own_share", "attn_uniform_share", "attn_share_ratio", "attn_support")
"""Last-epoch diagnostics kept per run (absent without DLP: nothing propagates)."""

SMOKE_OVERRIDES = [
    "profile=official", "model.backbone=resnet101", "model.pretrained=none", "model.deep_stem=true",
    "model.aspp_dilations=[12,24,36]", "model.head_channels=256", "data.crop_size=97", "eval.crop_size=97",
    "optim.batch_size=2", "optim.epochs=1", "optim.iters_per_epoch=3", "data.val_limit=4", "data.diag_images=2",
    "data.num_workers=0", "eval.every=1", "eval.final_modes=[original,center_crop]",
]


@dataclass(frozen=True)
class Row:
    """A benchmark row: its run's overrides, and those of its own supervised warm start (none: it starts from
    the seed's shared one). A lever that changes the network or the labeled loss changes both."""

    run: tuple[str, ...]
    warm: tuple[str, ...] = ()


def as_row(row: Row | Sequence[str]) -> Row:
    return row if isinstance(row, Row) else Row(tuple(row))


class Plan:
    """The runs of a benchmark: warm starts per seed, then rows × seeds; identical configs share a run."""

    def __init__(self, size: str, config: str | None, runs_dir: Path, extra: Sequence[str],
                 warm_start: Path | None = None):
        self.size, self.runs_dir = size, runs_dir
        self.shared_warm = warm_start.resolve() if warm_start else None
        s = BOOK_RUNS[size]
        self.config = config or str(project_root() / s["config"])
        has_root = any(o.startswith("data.root=") for o in extra)
        warm, run = phase_overrides(size, self.config)
        self.base = [*([] if has_root else [f"data.root={ensure_scenes(size)}"]), *run]
        self.warm = warm
        self.extra = list(extra)
        # finished book runs (runs/book/<size>/*) whose resolved config a cell needs are reused as they are
        self._dirs: dict[str, Path] = {}
        for done in sorted((project_root() / "runs" / "book" / size).glob("*/results.json")):
            self._dirs.setdefault(_key(json.loads(done.read_text())["config"]), done.parent)

    def warm_dir(self, seed: int, warm: Sequence[str] = ()) -> Path:
        """The seed's shared warm start, or (``warm`` overrides) a row's own: ``warm_s<seed>[_<overrides>]``."""
        if not warm:
            return self.shared_warm or self.runs_dir / f"warm_s{seed}"
        return self.runs_dir / f"warm_s{seed}_{slug('_'.join(warm))}"

    def warm_overrides(self, seed: int, warm: Sequence[str] = ()) -> list[str]:
        return [*self.base, *self.warm, f"seed={seed}", *self.extra, *warm]

    def overrides(self, row: Row, seed: int) -> list[str]:
        return [*self.base, f"optim.warm_start={self.warm_dir(seed, row.warm) / 'last.pt'}", *row.warm, *row.run,
                f"seed={seed}", *self.extra]

    def run_dir(self, name: str, row: Row, seed: int) -> Path:
        """``runs_dir/<name>_s<seed>``, or the directory of an earlier row with the same resolved config."""
        key = _key(resolved(load_config(self.config, self.overrides(row, seed))))
        return self._dirs.setdefault(key, self.runs_dir / f"{slug(name)}_s{seed}")


def _key(config: dict[str, Any]) -> str:
    """What makes two runs the same: the resolved config without its name."""
    return json.dumps({k: v for k, v in config.items() if k != "name"}, sort_keys=True, default=str)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def train_all(config: str, jobs: list[tuple[Path, list[str]]], n_jobs: int, threads: int | None) -> None:
    """Train every ``(run dir, overrides)`` without a ``results.json``; ``n_jobs`` processes at a time.

    Each run is its own ``python -m derprop.train`` process (``--threads``): a benchmark's run is what that
    command gives a user, and an unfinished one resumes from its ``last.pt``.

    A run that fails does not stop the others; RuntimeError names every failed run's log at the end."""
    todo = list(dict((d, o) for d, o in jobs if not (d / "results.json").is_file()).items())
    running: list[tuple[Path, subprocess.Popen]] = []
    failed: list[Path] = []
    while todo or running:
        while todo and len(running) < n_jobs:
            out, overrides = todo.pop(0)
            print(f"== {out.name}", file=sys.stderr, flush=True)
            out.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "derprop.train", "--config", config, "--out", str(out),
                   *(["--resume"] if (out / "last.pt").is_file() else []),
                   *(["--threads", str(threads)] if threads else []), *overrides]
            with open(out / "train.log", "w") as log:
                running.append((out, subprocess.Popen(cmd, cwd=project_root(), stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            if item[1].returncode != 0:  # the other runs go on: one bad row should not waste the rest
                failed.append(item[0])
                print(f"== {item[0].name} failed (see {item[0] / 'train.log'})", file=sys.stderr, flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: " + ", ".join(f"{d / 'train.log'}" for d in failed))


def read_run(out: Path) -> dict[str, Any]:
    """Headline mIoU, both nets, per-class IoU, last-epoch diagnostics and wall time of a finished run."""
    res = json.loads((out / "results.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    mode = res["miou_mode"]
    head = res["final"][res["miou_net"]][mode]
    return {
        "miou": res["miou"], "miou_net": res["miou_net"], "miou_mode": mode,
        "miou_backprop": res["final"]["backprop"][mode]["miou"],
        "miou_momentum": res["final"].get("momentum", {}).get(mode, {}).get("miou"),
        "iou_per_class": head["iou_per_class"], "num_val_images": head["num_images"],
        **{k: metrics[-1][k] for k in DIAGNOSTICS if k in metrics[-1]},
        "wall_time_s": res["wall_time_s"], "run_dir": repo_path(out),
    }


NETS = {"backprop": "miou_backprop", "momentum": "miou_momentum", "headline": "miou"}
"""The three numbers of a run: the trained network Θb, the momentum network Θm (absent without it) and the
headline (``results.json``'s ``miou``: the better of the two under the release's ``best_of_both`` rule)."""


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]], reference: str = "full") -> dict[str, dict[str, Any]]:
    """Per row: each network's mIoU per seed (:data:`NETS`) with mean ± sample std, and its per-seed paired
    difference to the same network of ``reference`` (trained vs trained, momentum vs momentum, headline vs
    headline), over the seeds both have; plus the mean and std of the diagnostics and wall time."""
    ref = {(r["seed"], net): r[key] for r in runs if r["row"] == reference for net, key in NETS.items()}
    out: dict[str, dict[str, Any]] = {}
    for row in dict.fromkeys(r["row"] for r in runs):
        rs = [r for r in runs if r["row"] == row]
        s: dict[str, Any] = {"row": row, "seeds": [r["seed"] for r in rs], "reference": reference, "nets": {}}
        for net, key in NETS.items():
            per_seed = {r["seed"]: r[key] for r in rs if r.get(key) is not None}
            if not per_seed:
                continue
            entry: dict[str, Any] = {"per_seed": per_seed, **_stats(list(per_seed.values()))}
            diffs = {seed: v - ref[(seed, net)] for seed, v in per_seed.items() if ref.get((seed, net)) is not None}
            if diffs and row != reference:
                entry["diff_per_seed"] = diffs
                entry["diff"] = _stats(list(diffs.values()))
            s["nets"][net] = entry
        for key in (*DIAGNOSTICS, "wall_time_s"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                s[f"{key}_mean"] = statistics.fmean(vals)
                s[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out[row] = s
    return out


def measure(plan: Plan, rows: dict[str, Row | Sequence[str]], seeds: Sequence[int], n_jobs: int,
            threads: int | None, *, collect_only: bool = False) -> list[dict[str, Any]]:
    """Train the warm starts, then every row × seed (reusing finished runs); one record per finished run.

    ``collect_only``: train nothing, report the runs that have finished (an interrupted benchmark's part).
    """
    rows = {name: as_row(row) for name, row in rows.items()}
    cells = [(name, seed, plan.run_dir(name, row, seed), plan.overrides(row, seed))
             for seed in seeds for name, row in rows.items()]
    warms = dict.fromkeys((seed, row.warm) for seed in seeds for row in rows.values())
    if not collect_only:
        train_all(plan.config, [(plan.warm_dir(s, w), plan.warm_overrides(s, w)) for s, w in warms], n_jobs, threads)
        train_all(plan.config, [(d, o) for _, _, d, o in cells], n_jobs, threads)
    return [{"row": name, "seed": seed, **read_run(d)} for name, seed, d, _ in cells if (d / "results.json").is_file()]


def evidence(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    plan = Plan(args.size, args.config, Path(args.runs_dir), args.overrides, args.warm_start)
    rows = {v: VARIANTS[v] for v in args.variants}
    runs = measure(plan, rows, args.seeds, args.jobs, args.threads, collect_only=args.collect_only)
    warm = [{"seed": s, **read_run(plan.warm_dir(s))} for s in args.seeds if (plan.warm_dir(s) / "results.json").is_file()]
    held_out = [s for s in args.seeds if s in args.held_out]
    chosen = [s for s in args.seeds if s not in args.held_out]
    summary = summarise(runs, BASELINE)
    payload = {
        "what": "mIoU on the scenes val set (original size) of the trained network, the momentum network and the "
                "headline (best of both, the release's rule) after the semi-supervised phase; every run of a seed "
                f"starts from that seed's supervised warm start; per-seed paired differences to {BASELINE} "
                "(supervised, same momentum network, same steps), network by network; the setting was chosen on the "
                "selection seeds, the claim is judged on the held-out seeds",
        "command": "python -m experiments.cpu_evidence " + " ".join(sys.argv[1:]),
        "size": args.size, "base": BOOK_RUNS[args.size], "config_file": repo_path(plan.config),
        "variants": {v: VARIANTS[v] for v in args.variants}, "baseline": BASELINE,
        "seeds": {"selection": chosen, "held_out": held_out},
        "summary": summary,
        "summary_held_out": summarise([r for r in runs if r["seed"] in held_out], BASELINE),
        "summary_vs_full": summarise(runs, "full"),
        "claim": claim(summary, held_out),
        "runs": runs,
        "warm_start": {"overrides": plan.warm, "shared": str(args.warm_start) if args.warm_start else None,
                       "runs": warm},
        "configs": {v: resolved(load_config(plan.config, plan.overrides(as_row(VARIANTS[v]), args.seeds[0])))
                    for v in args.variants},
        "machine": machine_info("cpu"),
        "jobs": args.jobs, "threads": args.threads,
        "torch_version": str(torch.__version__),
        "total_wall_time_s": time.time() - t0,
    }
    payload = write_results(Path(args.out), payload)
    print_table(evidence_table(payload["summary"]), TABLE_COLUMNS)
    c = payload["claim"]
    print(f"claim (full − {BASELINE} ≥ {100 * MARGIN:.0f} pp on every held-out seed {c['seeds']}, both networks): "
          f"{'met' if c['met'] else 'not met' if c['measured'] else 'not measured'}")
    return payload


TABLE_COLUMNS = [("row", "row", "s"), ("backprop", "trained %", ".2f"), ("momentum", "momentum %", ".2f"),
                 ("headline", "headline %", ".2f"), ("d_backprop", "Δ trained", "+.2f"),
                 ("d_momentum", "Δ momentum", "+.2f"), ("n", "seeds", "d")]


def evidence_table(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One printable row per variant: each network's mean mIoU and mean paired difference, in percent."""
    out = []
    for row, s in summary.items():
        nets = s["nets"]
        out.append({"row": row, "n": len(s["seeds"]),
                    **{net: 100 * nets[net]["mean"] for net in NETS if net in nets},
                    **{f"d_{net}": 100 * nets[net]["diff"]["mean"] for net in NETS if "diff" in nets.get(net, {})}})
    return out


def resnet101_smoke(args: argparse.Namespace) -> dict[str, Any]:
    """A few iterations of ResNet-101 (deep stem, OS 8, release profile) on CPU: the full-size path runs."""
    config = args.config or str(project_root() / BOOK_RUNS[args.size]["config"])
    cfg = load_config(config, [*SMOKE_OVERRIDES, *args.overrides])
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
        "command": "python -m experiments.cpu_evidence " + " ".join(sys.argv[1:]),
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
    payload = write_results(Path(args.smoke_out), payload)
    print(f"ResNet-101: {n_params / 1e6:.1f} M parameters, {len(steps)} iterations, losses "
          f"{[round(x, 3) for x in payload['losses']]}, {payload['seconds_per_iteration']:.1f} s/iteration")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.cpu_evidence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", choices=list(BOOK_RUNS), help="book run settings (default small)")
    ap.add_argument("--config", default=None, help="config file (default: the size's, configs/cpu_scenes.yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--held-out", type=int, nargs="*", default=[3, 4, 5],
                    help="seeds that played no part in choosing the setting: the claim is judged on them")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(DEFAULT_VARIANTS))
    ap.add_argument("--runs-dir", default=None, help="default runs/cpu_bench/<size>")
    ap.add_argument("--out", default=str(RESULTS / "cpu_evidence.json"))
    ap.add_argument("--resnet101-smoke", action="store_true")
    ap.add_argument("--smoke-out", default=str(RESULTS / "cpu_resnet101_smoke.json"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, each in its own process")
    ap.add_argument("--collect-only", action="store_true", help="train nothing: report the runs that finished")
    ap.add_argument("--warm-start", type=Path, default=None,
                    help="a finished warm-start run folder shared by every seed (default: one per seed)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    args = ap.parse_args(argv)
    args.runs_dir = args.runs_dir or str(project_root() / "runs" / "cpu_bench" / args.size)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resnet101_smoke:
        resnet101_smoke(args)
    else:
        evidence(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
