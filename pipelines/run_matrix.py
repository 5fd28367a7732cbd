#!/usr/bin/env python
"""Run the paper's experiment matrix (Tables 1–4) through the papermill pipeline.

Explained in the book chapter *Full reproduction on a GPU* (``book/reproduction.md``).

::

    python -m pipelines.run_matrix one configs/voc_92.yaml [--ablation wo_dlp] [--size full] [--gpus N] [--force]
    python -m pipelines.run_matrix all [--tables 1 3] [--size full] [--gpus N] [--force] [--dry-run]
    python -m pipelines.run_matrix list

``one`` trains one configuration: ``pipelines/train.ipynb`` is executed by
papermill into ``<runs-root>/<size>/<name>/train.ipynb``; the notebook starts the
training processes (``--gpus N``, default one per visible GPU; ``torchrun`` for more
than one) and streams their log into itself, and the trainer writes its run files
(``results.json``, ``last.pt``, ``metrics.jsonl`` …) next to it. Each size has its own
folder, so a ``small`` check run never stands in for the ``full`` run. A finished
run (a ``results.json`` whose recorded config has the entry's settings) is skipped,
an interrupted one resumes from its ``last.pt``; a folder whose ``results.json``
came from another config is refused (``list`` shows it as ``other``); ``--force``
trains it again from scratch (its run files deleted first).
``all`` does that for every entry of :data:`derprop.training.tables.MATRIX`; interrupted, it
can simply be started again. After each finished run a summary with the run's
provenance (:data:`derprop.provenance.KEYS`) is copied to
``<results-root>/<size>/<name>.json`` (``results/matrix/``, tracked in git), which
the book's results table reads. ``list`` prints every entry's state at each size.

A run that fails ends ``one`` with one ``error:`` line (the run's last error line and
where its executed notebook is) and exit status 2; ``all`` goes on with the next
entry and names the failed ones at the end (exit status 1).

Every entry is a config file under ``configs/`` plus, where no file exists for
an ablation, the overrides of :data:`derprop.training.tables.ABLATIONS`. This script
runs the notebook; the notebook imports only :mod:`derprop` (its overrides come
from :func:`derprop.training.tables.overrides_for`), never this script.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from derprop.errors import ConfigError, DerPropError
from derprop.provenance import KEYS, project_root, source
from derprop.training import atomic, cli
from derprop.training.config import flatten, resolved
from derprop.training.configfile import given_keys, load_config
from derprop.training.distributed import GPU_LAYOUTS, check_gpu_run
from derprop.training.rundir import describe_changes
from derprop.training.tables import ABLATIONS, MATRIX, SIZES, Entry, overrides_for, run_name, run_path

PIPELINE = source() / "pipelines" / "train.ipynb"
RUNS_DIR = Path("runs") / "matrix"
RESULTS_DIR = Path("results") / "matrix"


class RunError(DerPropError):
    """A run of the matrix could not start or failed; the message is its last error line."""


def resolve_config(config: str, ablation: str) -> tuple[str, str]:
    """Prefer a dedicated config file ``configs/<name>.yaml``; else the base config plus the ablation's overrides."""
    dedicated = Path(config).with_name(f"{run_name(config, ablation)}.yaml")
    if ablation and (project_root() / dedicated).is_file():
        return str(dedicated), ""
    return config, ablation


def _in_repo(path: str | Path) -> Path:
    """A relative ``--runs-root``/``--results-root`` is relative to the project folder, like the notebook's paths."""
    return Path(path) if Path(path).is_absolute() else project_root() / path


MAY_DIFFER = ("data.root", "data.num_workers")
"""Settings of a finished run that may differ from its entry's: where the data was, how it was loaded."""


def differences(run_dir: Path, config: str, overrides: Sequence[str]) -> dict[str, list]:
    """The settings that ``config`` with ``overrides`` sets (:func:`derprop.training.configfile.given_keys`) whose values
    differ in the run's ``results.json``, as ``{key: [recorded, expected]}``; an unreadable file differs in all."""
    path = project_root() / config
    with contextlib.chdir(project_root()):  # where the notebook reads the config (a scenes tree's classes)
        expected = flatten(resolved(load_config(path, list(overrides))))
    try:
        recorded = flatten(json.loads((run_dir / "results.json").read_text()).get("config") or {})
    except (OSError, ValueError, AttributeError):
        recorded = {}
    return {k: [recorded.get(k), expected[k]] for k in sorted(given_keys(path, list(overrides)) - set(MAY_DIFFER))
            if k in expected and recorded.get(k) != expected[k]}


def state(run_dir: Path, config: str, overrides: Sequence[str]) -> str:
    """``done`` (a ``results.json`` of ``config`` with ``overrides``), ``other`` (a ``results.json`` of another
    config), ``partial`` (``last.pt``) or ``todo``."""
    if (run_dir / "results.json").is_file():
        return "other" if differences(run_dir, config, overrides) else "done"
    if (run_dir / "last.pt").is_file():
        return "partial"
    return "todo"


def run_one(config: str, *, ablation: str = "", size: str = "full", gpus: int = -1, runs_root: str | Path = RUNS_DIR,
            device: str = "", profile: str = "", force: bool = False, extra: Sequence[str] = (),
            results_root: str | Path | None = RESULTS_DIR) -> Path:
    """Train one configuration through papermill (skipped when finished, unless ``force``); returns its run folder.

    Raises:
        RunError: papermill is missing, or the run failed (the message is its last error line).
    """
    name = run_name(config, ablation)
    cfg_file, abl = resolve_config(config, ablation)
    root = project_root()  # where the notebook runs
    if not (root / cfg_file).is_file():
        raise ConfigError(f"config {root / cfg_file} does not exist; name one of the files under {root / 'configs'}")
    # before papermill starts: a VOC/Cityscapes run without a GPU is one line, not a notebook's traceback
    check_gpu_run(load_config(root / cfg_file, list(extra)).data.layout, device or None)
    run_dir = run_path(config, ablation, size, _in_repo(runs_root))
    overrides = overrides_for(profile=profile, ablation=abl, size=size, extra=extra)  # what the notebook trains
    now = state(run_dir, cfg_file, overrides)
    if now == "done" and not force:
        print(f"[skip] {size}/{name}: {run_dir / 'results.json'} exists (--force trains it again)")
        return run_dir
    if now == "other" and not force:
        changed = describe_changes(dict(list(differences(run_dir, cfg_file, overrides).items())[:4]))
        raise RunError(f"{run_dir} holds a finished run of another config (recorded → this entry: {changed}); "
                       f"--force trains {size}/{name} there anew (deleting that run's files), or choose another "
                       "--runs-root")
    run_dir.mkdir(parents=True, exist_ok=True)
    params = {"CONFIG": cfg_file, "OUT_DIR": str(run_dir), "ABLATION": abl, "SIZE": size, "GPUS": gpus,
              "RESUME": "overwrite" if force else "auto", "DEVICE": device, "PROFILE": profile,
              "OVERRIDES": list(extra)}
    print(f"[run] {size}/{name}: {cfg_file} {('+ ' + abl) if abl else ''} ({'forced' if force else now})", flush=True)
    execute(run_dir / "train.ipynb", params, f"{size}/{name}")
    if results_root is not None:
        publish(run_dir, name, config=cfg_file, ablation=abl, size=size, results_dir=_in_repo(results_root) / size)
    return run_dir


def execute(notebook: Path, params: dict, label: str) -> None:
    """Run :data:`PIPELINE` into ``notebook``; a failed run is one :class:`RunError` with its last error line."""
    try:
        import papermill
    except ImportError:
        raise RunError(f"papermill is not installed for {sys.executable}: run `make setup`, or beside a "
                       f"preinstalled torch `{sys.executable} -m pip install papermill ipykernel`") from None
    try:
        papermill.execute_notebook(str(PIPELINE), str(notebook), parameters=params, kernel_name="python3",
                                   cwd=str(project_root()), progress_bar=False, log_output=True)
    except papermill.PapermillExecutionError as err:
        raise RunError(f"{label} failed: {err.evalue} (executed notebook: {notebook})") from None


def publish(run_dir: Path, name: str, *, config: str, ablation: str, size: str, results_dir: Path) -> Path:
    """Copy the run's headline results and provenance (no per-class tables) to ``results_dir/<name>.json``."""
    res = json.loads((run_dir / "results.json").read_text())
    summary = {
        "name": name, "config": config, "ablation": ablation, "size": size,
        "date": _dt.date.today().isoformat(),
        **{k: res.get(k) for k in ("miou", "miou_net", "miou_mode", "epochs", "iters_per_epoch", "wall_time_s")},
        **{k: res.get(k) for k in KEYS},
        "final": {net: {mode: {"miou": r.get("miou"), "pixel_acc": r.get("pixel_acc")} for mode, r in modes.items()}
                  for net, modes in (res.get("final") or {}).items()},
        "profile": (res.get("config") or {}).get("profile"),
    }
    path = results_dir / f"{name}.json"
    atomic.write_json(path, summary)
    return path


def entry(e: Entry, size: str) -> tuple[str, list[str]]:
    """The config file and overrides of matrix entry ``e`` at ``size`` (without a command's --profile or extras)."""
    cfg_file, abl = resolve_config(e.config, e.ablation)
    return cfg_file, overrides_for(ablation=abl, size=size)


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
    lst = sub.add_parser("list", help="print the matrix and each run's state at every size")
    for p in (one, every, lst):
        p.add_argument("--runs-root", default=str(RUNS_DIR), help=f"run folders: <runs-root>/<size>/<name> "
                                                                   f"(default {RUNS_DIR})")
    for p in (one, every):
        p.add_argument("--size", default="full", choices=list(SIZES))
        p.add_argument("--gpus", type=int, default=-1, metavar="N",
                       help="training processes: one per visible GPU (default), N > 1 with torchrun")
        p.add_argument("--device", default="")
        p.add_argument("--profile", default="", choices=["", "official", "paper"])
        p.add_argument("--force", action="store_true", help="train again from scratch even if results.json exists")
        p.add_argument("--results-root", default=str(RESULTS_DIR),
                       help=f"summaries: <results-root>/<size>/<name>.json (default {RESULTS_DIR})")
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill logs the run's lines as they come
    return cli.run(lambda: _run(args), interrupted=lambda: "every finished epoch is kept in its run folder; run the "
                                                             "same command again to resume")


def _run(args: argparse.Namespace) -> None:
    runs_root = Path(args.runs_root)
    if args.cmd == "list":
        entries = _unique_runs(MATRIX)
        width = max(len(e.name) for e in entries)
        print(f"{'entry':{width}s}  " + "  ".join(f"{size:8s}" for size in SIZES))
        for e in entries:
            states = [state(run_path(e.config, e.ablation, size, _in_repo(runs_root)), *entry(e, size))
                      for size in SIZES]
            print(f"{e.name:{width}s}  " + "  ".join(f"{s:8s}" for s in states))
        return
    options = dict(size=args.size, gpus=args.gpus, runs_root=runs_root, device=args.device, profile=args.profile,
                   force=args.force, extra=args.overrides, results_root=args.results_root)
    if args.cmd == "one":
        run_one(args.config_opt or args.config, ablation=args.ablation, **options)
        return
    if not args.dry_run:  # every entry of the matrix is a VOC or Cityscapes run
        check_gpu_run(GPU_LAYOUTS[0], args.device or None)
    failed = []
    for e in _unique_runs([e for e in MATRIX if e.table in args.tables]):
        if args.dry_run:
            cfg_file, abl = resolve_config(e.config, e.ablation)
            where = run_path(e.config, e.ablation, args.size, _in_repo(runs_root))
            print(f"{state(where, *entry(e, args.size)):8s} {args.size}/{e.name}: {cfg_file}"
                  f"{' + ' + abl if abl else ''}")
            continue
        try:
            run_one(e.config, ablation=e.ablation, **options)
        except Exception as exc:  # keep going: the matrix is resumable, report at the end
            print(f"[fail] {e.name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
            failed.append(e.name)
    if failed:
        raise DerPropError(f"{len(failed)} run(s) failed (see the [fail] lines above): {', '.join(failed)}; "
                           "run the same command again to resume them")


if __name__ == "__main__":
    raise SystemExit(main())
