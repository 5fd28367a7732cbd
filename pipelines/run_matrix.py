#!/usr/bin/env python
"""Run the paper's experiment matrix (Tables 1–4) through the papermill pipeline.

Explained in the book chapter *Full reproduction on a GPU* (``book/reproduction.md``).

::

    python pipelines/run_matrix.py one configs/voc_92.yaml [--ablation wo_dlp] [--size full]
    python pipelines/run_matrix.py all [--tables 1 3] [--size full] [--dry-run]
    python pipelines/run_matrix.py list

``one`` trains one configuration: ``pipelines/train.ipynb`` is executed by
papermill into ``<runs-root>/<name>/train.ipynb`` and the trainer writes its
run files (``results.json``, ``last.pt``, ``metrics.jsonl`` …) next to it.
``all`` does that for every entry of :data:`MATRIX`, skipping entries whose
``results.json`` exists and resuming (``--resume``, i.e. the pipeline's
``RESUME=auto``) those that have a ``last.pt``; interrupted, it can simply be
started again. After each finished run a summary is copied to
``results/matrix/<name>.json`` (tracked in git), which the book's results
table reads. ``list`` prints the matrix and the state of each entry.

Every entry is a config file under ``configs/`` plus, where no file exists for
an ablation, the overrides of :data:`ABLATIONS`. The paper's numbers
(:data:`MATRIX`, SPEC §5) are here only to lay out the table: they are never
written into ``results/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "train.ipynb"
RUNS_ROOT = Path("runs") / "matrix"
RESULTS_DIR = Path("results") / "matrix"

ABLATIONS: dict[str, list[str]] = {
    # Table 1 / 2 rows (the paper's "Ablation Study": w/o DLP and w/o L_Der also drop the momentum net)
    "wo_dlp": ["method.dlp=false", "method.derivative_loss=false", "method.momentum=false"],
    "wo_der": ["method.derivative_loss=false", "method.momentum=false"],
    "wo_momentum": ["method.momentum=false"],
    # Table 3: eq. 9 with Q = 0..3, with and without the sparsity term
    **{f"Q{q}": [f"method.Q={q}"] for q in range(4)},
    **{f"Q{q}_nosparsity": [f"method.Q={q}", "method.sparsity=false"] for q in range(4)},
    # Table 4: the derivative operator (eq. 10, 11, 12 instead of eq. 2)
    "op_central": ["method.op=central"],
    "op_sum": ["method.op=sum"],
    "op_second": ["method.op=second"],
}
"""Ablation name → config overrides (the same switches as the ``configs/*_<ablation>.yaml`` files)."""

SIZES: dict[str, list[str]] = {
    "smoke": ["optim.epochs=1", "optim.iters_per_epoch=2", "data.val_limit=4", "data.diag_images=2"],
    "small": ["optim.epochs=4", "data.val_limit=100"],
    "full": [],
}
"""Run size → overrides. ``full`` is the config as written (the paper's schedule)."""


@dataclass(frozen=True)
class Entry:
    """One cell of the paper's tables: a config (plus ablation) and the paper's number for it."""

    table: str
    row: str
    column: str
    config: str
    ablation: str = ""
    paper: float | None = None

    @property
    def name(self) -> str:
        return run_name(self.config, self.ablation)


def _entries() -> list[Entry]:
    out: list[Entry] = []
    voc = ["92", "183", "366", "732", "1464"]
    t1 = {
        "DerProp": ("", [77.6, 78.7, 80.5, 81.3, 82.2]),
        "w/o DLP": ("wo_dlp", [66.6, 77.8, 78.3, 79.8, None]),
        "w/o L_Der": ("wo_der", [72.9, 77.0, 77.5, 78.8, 81.0]),
        "w/o momentum": ("wo_momentum", [75.1, 78.0, 79.6, 78.8, 81.9]),
    }
    for row, (abl, nums) in t1.items():
        for split, num in zip(voc, nums):
            if abl == "wo_dlp" and split == "1464":
                continue  # not applicable: fully supervised, no pseudo-labels (paper, Ablation)
            out.append(Entry("1", row, split, f"configs/voc_{split}.yaml", abl, num))
    city = [("186", "cityscapes_186"), ("372", "cityscapes_372"), ("744", "cityscapes_744")]
    t2 = {
        "DerProp": ("", [60.1, 61.8, 62.1]),
        "w/o DLP": ("wo_dlp", [59.1, 60.4, 60.9]),
        "w/o L_Der": ("wo_der", [57.1, 60.5, 61.0]),
        "w/o momentum": ("wo_momentum", [57.6, 60.4, 61.6]),
    }
    for row, (abl, nums) in t2.items():
        for (split, stem), num in zip(city, nums):
            out.append(Entry("2", row, split, f"configs/{stem}.yaml", abl, num))
    t3 = {0: (74.1, 75.1), 1: (77.0, 77.6), 2: (76.0, 76.9), 3: (76.4, 76.7)}
    for q, (without, with_) in t3.items():
        out.append(Entry("3", f"L_{q}", "w/o sparsity", "configs/voc_92.yaml", f"Q{q}_nosparsity", without))
        out.append(Entry("3", f"L_{q}", "w/ sparsity", "configs/voc_92.yaml", f"Q{q}", with_))
    t4 = {"eq. 10": ("op_central", (76.1, 78.6)), "eq. 11": ("op_sum", (76.4, 77.1)),
          "eq. 12": ("op_second", (76.8, 78.5)), "eq. 2": ("", (77.6, 78.7))}
    for row, (abl, nums) in t4.items():
        for split, num in zip(("92", "183"), nums):
            out.append(Entry("4", row, split, f"configs/voc_{split}.yaml", abl, num))
    return out


MATRIX: list[Entry] = _entries()
"""Every cell of Tables 1–4 with the paper's value (SPEC §5; ``None`` = not reported)."""


def run_name(config: str, ablation: str = "") -> str:
    """``voc_92`` + ``wo_dlp`` → ``voc_92_wo_dlp``; ``Q1`` with sparsity is the main run (same name)."""
    stem = Path(config).stem
    if ablation in ("", "Q1"):  # Q = 1 with sparsity is DerProp itself
        return stem
    return f"{stem}_{ablation}"


def resolve_config(config: str, ablation: str) -> tuple[str, str]:
    """Prefer a dedicated config file ``configs/<name>.yaml``; else the base config plus the ablation's overrides."""
    dedicated = Path(config).with_name(f"{run_name(config, ablation)}.yaml")
    if ablation and (ROOT / dedicated).is_file():
        return str(dedicated), ""
    return config, ablation


def overrides_for(*, split: str = "", profile: str = "", ablation: str = "", size: str = "full", seed: int = -1,
                  data_root: str = "", extra: Sequence[str] = ()) -> list[str]:
    """Dotted config overrides for the pipeline's parameters (see ``pipelines/train.ipynb``)."""
    if ablation and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    out: list[str] = []
    if profile:
        out.append(f"profile={profile}")
    if split:
        out.append(f'data.split="{split}"')
    out += ABLATIONS.get(ablation, [])
    out += SIZES[size]
    if seed is not None and int(seed) >= 0:
        out.append(f"seed={int(seed)}")
    if data_root:
        out.append(f"data.root={data_root}")
    return out + list(extra)


def state(run_dir: Path) -> str:
    if (run_dir / "results.json").is_file():
        return "done"
    if (run_dir / "last.pt").is_file():
        return "partial"
    return "todo"


def run_one(config: str, *, ablation: str = "", size: str = "full", runs_root: Path = RUNS_ROOT,
            device: str = "", profile: str = "", force: bool = False, extra: Sequence[str] = (),
            results_dir: Path | None = RESULTS_DIR) -> Path:
    """Train one configuration through papermill; returns the run directory."""
    import papermill

    name = run_name(config, ablation)
    cfg_file, abl = resolve_config(config, ablation)
    run_dir = (ROOT / runs_root / name) if not Path(runs_root).is_absolute() else Path(runs_root) / name
    if state(run_dir) == "done" and not force:
        print(f"[skip] {name}: {run_dir / 'results.json'} exists")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    params = {"CONFIG": cfg_file, "OUT_DIR": str(run_dir), "ABLATION": abl, "SIZE": size, "RESUME": "auto",
              "DEVICE": device, "PROFILE": profile, "OVERRIDES": list(extra)}
    print(f"[run] {name}: {cfg_file} {('+ ' + abl) if abl else ''} size={size} ({state(run_dir)})", flush=True)
    papermill.execute_notebook(str(PIPELINE), str(run_dir / "train.ipynb"), parameters=params,
                               kernel_name="python3", cwd=str(ROOT), progress_bar=False, log_output=True)
    if results_dir is not None:
        publish(run_dir, name, config=cfg_file, ablation=abl, size=size,
                results_dir=ROOT / results_dir if not Path(results_dir).is_absolute() else Path(results_dir))
    return run_dir


def publish(run_dir: Path, name: str, *, config: str, ablation: str, size: str, results_dir: Path) -> Path:
    """Copy the run's headline results (no per-class tables of every epoch) to ``results/matrix/<name>.json``."""
    res = json.loads((run_dir / "results.json").read_text())
    summary = {
        "name": name, "config": config, "ablation": ablation, "size": size,
        "date": _dt.date.today().isoformat(),
        **{k: res.get(k) for k in ("miou", "miou_net", "miou_mode", "device", "epochs", "iters_per_epoch",
                                   "global_batch", "world_size", "wall_time_s", "torch_version")},
        "final": {net: {mode: {"miou": r.get("miou"), "pixel_acc": r.get("pixel_acc")} for mode, r in modes.items()}
                  for net, modes in (res.get("final") or {}).items()},
        "profile": (res.get("config") or {}).get("profile"),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def _unique_runs(entries: Sequence[Entry]) -> list[Entry]:
    seen, out = set(), []
    for e in entries:
        if e.name not in seen:
            seen.add(e.name)
            out.append(e)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pipelines/run_matrix.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one", help="train one configuration")
    one.add_argument("config", nargs="?", help="config file (or --config)")
    one.add_argument("--config", dest="config_opt", default=None, help=argparse.SUPPRESS)
    one.add_argument("--ablation", default="", choices=["", *ABLATIONS])
    every = sub.add_parser("all", help="train every entry of Tables 1-4 that is not finished")
    every.add_argument("--tables", nargs="*", default=["1", "2", "3", "4"], choices=["1", "2", "3", "4"])
    every.add_argument("--dry-run", action="store_true", help="only print what would run")
    lst = sub.add_parser("list", help="print the matrix and the state of each run")
    for p in (one, every, lst):
        p.add_argument("--runs-root", default=str(RUNS_ROOT))
    for p in (one, every):
        p.add_argument("--size", default="full", choices=list(SIZES))
        p.add_argument("--device", default="")
        p.add_argument("--profile", default="", choices=["", "official", "paper"])
        p.add_argument("--force", action="store_true", help="retrain even if results.json exists")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = ap.parse_args(argv)
    runs_root = Path(args.runs_root)

    if args.cmd == "one":
        config = args.config_opt or args.config
        if not config:
            ap.error("one: a config file is required")
        run_one(config, ablation=args.ablation, size=args.size, runs_root=runs_root, device=args.device,
                profile=args.profile, force=args.force, extra=args.overrides)
        return 0
    entries = _unique_runs([e for e in MATRIX if args.cmd == "list" or e.table in args.tables])
    if args.cmd == "list":
        for e in entries:
            print(f"{state(ROOT / runs_root / e.name):8s} {e.name}")
        return 0
    failed = []
    for e in entries:
        if args.dry_run:
            cfg_file, abl = resolve_config(e.config, e.ablation)
            print(f"{state(ROOT / runs_root / e.name):8s} {e.name}: {cfg_file}{' + ' + abl if abl else ''}")
            continue
        try:
            run_one(e.config, ablation=e.ablation, size=args.size, runs_root=runs_root, device=args.device,
                    profile=args.profile, force=args.force, extra=args.overrides)
        except Exception as exc:  # keep going: the matrix is resumable, report at the end
            print(f"[fail] {e.name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  file=sys.stderr)
            failed.append(e.name)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
