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
``all`` does that for every entry of :data:`derprop.tables.MATRIX`, skipping
entries whose ``results.json`` exists and resuming (``--resume``, i.e. the
pipeline's ``RESUME=auto``) those that have a ``last.pt``; interrupted, it can
simply be started again. After each finished run a summary is copied to
``results/matrix/<name>.json`` (tracked in git), which the book's results
table reads. ``list`` prints the matrix and the state of each entry.

Every entry is a config file under ``configs/`` plus, where no file exists for
an ablation, the overrides of :data:`derprop.tables.ABLATIONS`. This script
runs the notebook; the notebook imports only :mod:`derprop` (its overrides come
from :func:`derprop.tables.overrides_for`), never this script.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Sequence

from derprop import atomic, cli
from derprop.errors import ConfigError, DerPropError
from derprop.tables import ABLATIONS, MATRIX, SIZES, Entry, run_name

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipelines" / "train.ipynb"
RUNS_ROOT = Path("runs") / "matrix"
RESULTS_DIR = Path("results") / "matrix"


def resolve_config(config: str, ablation: str) -> tuple[str, str]:
    """Prefer a dedicated config file ``configs/<name>.yaml``; else the base config plus the ablation's overrides."""
    dedicated = Path(config).with_name(f"{run_name(config, ablation)}.yaml")
    if ablation and (ROOT / dedicated).is_file():
        return str(dedicated), ""
    return config, ablation


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
    name = run_name(config, ablation)
    cfg_file, abl = resolve_config(config, ablation)
    if not (ROOT / cfg_file).is_file():  # the notebook runs from ROOT
        raise ConfigError(f"config {ROOT / cfg_file} does not exist; name one of the files under {ROOT / 'configs'}")
    run_dir = (ROOT / runs_root / name) if not Path(runs_root).is_absolute() else Path(runs_root) / name
    if state(run_dir) == "done" and not force:
        print(f"[skip] {name}: {run_dir / 'results.json'} exists")
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    params = {"CONFIG": cfg_file, "OUT_DIR": str(run_dir), "ABLATION": abl, "SIZE": size, "RESUME": "auto",
              "DEVICE": device, "PROFILE": profile, "OVERRIDES": list(extra)}
    print(f"[run] {name}: {cfg_file} {('+ ' + abl) if abl else ''} size={size} ({state(run_dir)})", flush=True)
    execute(run_dir / "train.ipynb", params)
    if results_dir is not None:
        publish(run_dir, name, config=cfg_file, ablation=abl, size=size,
                results_dir=ROOT / results_dir if not Path(results_dir).is_absolute() else Path(results_dir))
    return run_dir


def execute(notebook: Path, params: dict) -> None:
    """Run :data:`PIPELINE` into ``notebook``; an error in it (a bad config, dataset …) is one :class:`DerPropError`."""
    try:
        import papermill
    except ImportError:
        raise DerPropError("papermill is not installed: pip install 'derprop[book]' (or make setup)") from None
    try:
        papermill.execute_notebook(str(PIPELINE), str(notebook), parameters=params, kernel_name="python3",
                                   cwd=str(ROOT), progress_bar=False, log_output=True)
    except papermill.PapermillExecutionError as err:
        raise DerPropError(f"{err.ename}: {err.evalue} (the executed notebook: {notebook})") from None


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
    path = results_dir / f"{name}.json"
    atomic.write_json(path, summary)
    return path


def _unique_runs(entries: Sequence[Entry]) -> list[Entry]:
    seen, out = set(), []
    for e in entries:
        if e.name not in seen:
            seen.add(e.name)
            out.append(e)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = cli.parser("pipelines.run_matrix", __doc__.split("\n\n")[0])
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
    # argparse takes positionals in one run: key=value overrides after an option come back unparsed
    args, rest = ap.parse_known_args(argv)
    unknown = [t for t in rest if t.startswith("-") or "=" not in t or args.cmd == "list"]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    if args.cmd == "one" and not (args.config_opt or args.config):
        ap.error("one: a config file is required")
    return cli.run(lambda: _run(args), interrupted=lambda: "every finished epoch is kept in its run folder; run the "
                                                             "same command again to resume")


def _run(args: argparse.Namespace) -> None:
    runs_root = Path(args.runs_root)
    if args.cmd == "one":
        run_one(args.config_opt or args.config, ablation=args.ablation, size=args.size, runs_root=runs_root,
                device=args.device, profile=args.profile, force=args.force, extra=args.overrides)
        return
    entries = _unique_runs([e for e in MATRIX if args.cmd == "list" or e.table in args.tables])
    if args.cmd == "list":
        for e in entries:
            print(f"{state(ROOT / runs_root / e.name):8s} {e.name}")
        return
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
        raise DerPropError(f"{len(failed)} run(s) failed (see the [fail] lines above): {', '.join(failed)}; "
                           "run the same command again to resume them")


if __name__ == "__main__":
    raise SystemExit(main())
