"""The book's CPU runs: which runs, with what settings, and "load the run if it exists, else train it".

The training chapters (*Training on a CPU*, *Pseudo-label rectification, interactively*, *Ablations at CPU
scale*) call :func:`book_run`; ``python -m derprop.book.runs [SIZE]`` (what ``make demo`` runs) trains the shared
supervised warm start and then the runs of :data:`TRAINING_RUNS` side by side. Each size's data is
generated on first use (:func:`ensure_scenes`). :mod:`derprop.book.viewer` draws what these runs saved.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from derprop import provenance
from derprop.data.datasets import DatasetError
from derprop.errors import DerPropError
from derprop.provenance import project_root
from derprop.training import cli
from derprop.training.config import TrainConfig, flatten, resolved
from derprop.training.configfile import load_config
from derprop.training.rundir import config_changes, describe_changes
from derprop.training.tables import ABLATIONS
from derprop.training.trainer import Trainer

BOOK_RUNS: dict[str, dict] = {
    # The CPU runs of the book's training chapters, per size: config, data folder, the
    # arguments that generate that folder (python -m data_prep.scenes), the overrides that
    # size the runs, and those that size the supervised warm start they all begin from
    # (the two phases share one poly schedule: phase_overrides). "small" is the CPU default as
    # is: `make demo` trains exactly these runs (runs/book/small/cpu_warm, then cpu_dlp,
    # cpu_nodlp and cpu_sup, two at a time) before it builds the book. "smoke" takes the release's
    # profile like the default, so that the chapters' κ viewer has similarity logits to add κ to.
    "smoke": {"config": "configs/cpu_scenes_tiny.yaml", "data": "data/scenes_tiny",
              "data_args": ["--num-train", "24", "--num-val", "8", "--size", "48", "--classes", "all",
                            "--clutter", "--object-size", "0.3", "0.6", "--max-objects", "4"],
              "overrides": ["profile=official", "optim.epochs=2", "optim.iters_per_epoch=2"],
              "warm": ["profile=official", "optim.epochs=1", "optim.iters_per_epoch=2"]},
    "small": {"config": "configs/cpu_scenes.yaml", "data": "data/scenes", "data_args": [], "overrides": [],
              "warm": ["optim.epochs=2", "optim.iters_per_epoch=200"]},
    "full": {"config": "configs/cpu_scenes.yaml", "data": "data/scenes", "data_args": [],
             "overrides": ["optim.epochs=10", "optim.iters_per_epoch=100"],
             "warm": ["optim.epochs=4", "optim.iters_per_epoch=250"]},
}
"""Settings of the book's CPU runs (chapters *Training on a CPU*, *Pseudo-label rectification, interactively*,
*Ablations at CPU scale*)."""

WARM_RUN = "cpu_warm"
"""Run id of the supervised warm start that every book run of a size starts from (``optim.warm_start``)."""

SUPERVISED = ("method.semi_supervised=false",)
"""The labeled terms of eq. 7/8 only (CE on L and on L̃, labeled derivative loss): no unlabeled image."""

WARM_START = (*SUPERVISED, "method.momentum=false")
"""The warm start: :data:`SUPERVISED`, without Θm."""

WITHOUT_DLP = ABLATIONS["wo_dlp"].overrides
"""The paper's "w/o DLP" row (Table 1), as ``derprop.training.tables.ABLATIONS`` defines it."""

TRAINING_RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "DerProp": ("cpu_dlp", ()), "w/o DLP": ("cpu_nodlp", WITHOUT_DLP), "supervised + momentum": ("cpu_sup", SUPERVISED),
}
"""The runs of chapter *Training on a CPU*, label → (run id, overrides); ``make demo`` trains them. The last is the
baseline: the same steps from the same warm start with the same momentum network (eq. 6), labeled images only."""


MAY_MOVE = ("data.root", "optim.warm_start")
"""Paths in a finished run's config that differ when the checkout moves; no other setting may differ from the
book's for :func:`load_or_train` to load the run."""


def load_or_train(config: str | os.PathLike, out_dir: str | os.PathLike, overrides: Sequence[str] = (), *,
                  device: str = "cpu", progress: bool = False) -> dict:
    """The book's "load the run if it exists, else train" (UvA-notebook style).

    Returns the run's ``results.json`` content. If ``out_dir/results.json``
    exists nothing is trained (a run trained with other settings, such as an earlier CPU default, is
    refused with the keys that differ); if only ``last.pt`` exists training resumes
    from it; otherwise :class:`derprop.training.trainer.Trainer` trains ``config``
    with ``overrides`` into ``out_dir``. With ``progress`` one line is
    printed per finished epoch.
    """
    out = Path(out_dir)
    cfg = load_config(config, list(overrides))
    if (out / "results.json").is_file():
        results = json.loads((out / "results.json").read_text())
        # a setting added after the run was trained (not in its config), at its default, is the behaviour it had
        saved, defaults = flatten(results.get("config") or {}), flatten(resolved(TrainConfig()))
        differ = {k: v for part in config_changes(results.get("config") or {}, resolved(cfg)) for k, v in part.items()
                  if k not in MAY_MOVE and not (k not in saved and k in defaults and v[1] == defaults[k])}
        if differ:
            raise DerPropError(f"{out} was trained with other settings than the book's now "
                               f"({describe_changes(dict(list(differ.items())[:4]))}): remove the folder and "
                               "run `make demo` (or this chapter) again to train it anew")
        return results

    def hook(event, **info):
        if progress and event == "epoch_end":
            m = info["metrics"]
            shown = {k: round(v, 4) for k, v in m.items() if isinstance(v, float) and k in (
                "train_loss", "miou_momentum", "miou_backprop", "pl_acc_before", "pl_acc_after")}
            print(f"epoch {m['epoch']}: {shown}", flush=True)

    resume = out / "last.pt" if (out / "last.pt").is_file() else None
    return Trainer(cfg, out, resume=resume, device=device, hook=hook, progress=False).fit()


_SCENES_CHECKED: set[Path] = set()


def ensure_scenes(size: str) -> Path:
    """Generate the scenes data of ``BOOK_RUNS[size]`` unless it is there with these settings; returns its folder."""
    s = BOOK_RUNS[size]
    return make_scenes(project_root() / s["data"], s["data_args"])


def make_scenes(root: Path, data_args: Sequence[str]) -> Path:
    """``python -m data_prep.scenes --root root *data_args`` once per process (the generator itself does nothing
    when the folder's manifest matches these settings); returns ``root``."""
    if root not in _SCENES_CHECKED:
        _SCENES_CHECKED.add(root)
        made = subprocess.run([sys.executable, "-m", "data_prep.scenes", "--root", str(root), "--quiet",
                               *data_args], cwd=project_root(), stderr=subprocess.PIPE, text=True)
        if made.returncode != 0:  # its own one-line error, passed on
            lines = made.stderr.strip().splitlines() or [f"exit status {made.returncode}"]
            raise DatasetError(f"generating {root} failed: {lines[-1].removeprefix('error: ')}")
    return root


def phase_overrides(size: str, config: str | os.PathLike | None = None) -> tuple[list[str], list[str]]:
    """Overrides that size the warm start and a run of ``size`` (``BOOK_RUNS``), as one poly schedule.

    The warm start is the first ``W`` iterations of a ``W + S``-iteration schedule, and a run continues it
    at iteration ``W`` for its ``S`` (``optim.schedule_iters``, ``optim.schedule_offset``): the learning rate
    goes on decaying where the warm start left it instead of jumping back to ``optim.lr``. Returns
    ``(warm start overrides, run overrides)``; ``config`` defaults to the size's.
    """
    s = BOOK_RUNS[size]
    path = config or project_root() / s["config"]
    iters = []
    for phase in ([*WARM_START, *s["warm"]], s["overrides"]):
        o = load_config(path, list(phase)).optim
        if o.iters_per_epoch is None:
            raise ValueError(f"BOOK_RUNS[{size!r}] must fix optim.iters_per_epoch of both phases")
        iters.append(o.epochs * o.iters_per_epoch)
    w, total = iters[0], sum(iters)
    return ([*WARM_START, *s["warm"], "optim.schedule_offset=0", f"optim.schedule_iters={total}"],
            [*s["overrides"], f"optim.schedule_offset={w}", f"optim.schedule_iters={total}"])


def warm_start(size: str, *, progress: bool = False) -> Path:
    """Load or train the supervised warm start ``runs/book/<size>/cpu_warm``; returns its ``last.pt``."""
    data = ensure_scenes(size)
    out = project_root() / "runs" / "book" / size / WARM_RUN
    load_or_train(project_root() / BOOK_RUNS[size]["config"], out, [f"data.root={data}", *phase_overrides(size)[0]],
                  progress=progress)
    return out / "last.pt"


def run_overrides(size: str, extra: Sequence[str] = (), *, progress: bool = False) -> list[str]:
    """Overrides of a book run at ``size``: data folder, sizing, the shared warm start (trained if missing), ``extra``."""
    return [f"data.root={ensure_scenes(size)}", *phase_overrides(size)[1],
            f"optim.warm_start={warm_start(size, progress=progress)}", *extra]


def book_run(size: str, name: str, extra: Sequence[str] = (), *, progress: bool = False) -> tuple[Path, dict]:
    """Load or train the book's CPU run ``runs/book/<size>/<name>`` with ``extra`` overrides.

    Returns ``(run directory, results)``. The data and the warm start are made first if needed.
    """
    out = project_root() / "runs" / "book" / size / name
    results = load_or_train(project_root() / BOOK_RUNS[size]["config"], out, run_overrides(size, extra, progress=progress),
                            progress=progress)
    return out, results


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m derprop.book.runs [SIZE]``: train (or load) the warm start, then the runs of :data:`TRAINING_RUNS`
    at ``SIZE``, side by side in ``--jobs`` processes of one thread each, which end with it (Ctrl-C, a stop
    signal, or a kill -9)."""

    ap = cli.parser("derprop.book.runs", main.__doc__)
    ap.add_argument("size", nargs="?", default="small", choices=list(BOOK_RUNS))
    ap.add_argument("--root", default=None, help="project folder with configs/; runs/ and data/ go there (default: "
                                                  "$DERPROP_ROOT, else the checkout, else the current folder)")
    ap.add_argument("--jobs", type=cli.at_least(1), default=2, help="runs trained at once, one thread each (default 2)")
    ap.add_argument("--only", choices=[r for r, _ in TRAINING_RUNS.values()], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    with provenance.at_root(args.root):  # the runs' processes inherit it
        return cli.run(lambda: _train_runs(args), interrupted=lambda: (
            f"every finished epoch is kept under {project_root() / 'runs' / 'book' / args.size}; "
            f"run the same command again to go on"))


def check_project(size: str) -> Path:
    """The project folder (:func:`derprop.provenance.project_root`), checked before anything is written: a folder
    holding the config of ``size``."""
    root = project_root()
    config = root / BOOK_RUNS[size]["config"]
    if not root.is_dir():
        raise DerPropError(f"project folder {root} {'is not a folder' if root.exists() else 'does not exist'}; "
                           "pass --root with a checkout of derprop (the folder that holds configs/)")
    if not config.is_file():
        raise DerPropError(f"project folder {root} holds no {config.relative_to(root)}; pass --root with a checkout "
                           "of derprop (the folder that holds configs/), where runs/ and data/ will go")
    return root


def _train_runs(args: argparse.Namespace) -> int:
    check_project(args.size)
    runs = {label: run for label, run in TRAINING_RUNS.items() if args.only in (None, run[0])}
    if args.only is None:
        warm_start(args.size, progress=True)
    if args.only is None and args.jobs > 1:
        torch.set_num_threads(1)
        codes: dict[str, int] = {}
        waiting = [run_id for run_id, _ in runs.values()]  # longest first: DerProp, then the cheaper runs
        running: dict[str, subprocess.Popen] = {}
        try:
            while waiting or running:
                while waiting and len(running) < args.jobs:
                    run_id = waiting.pop(0)
                    running[run_id] = subprocess.Popen(
                        [sys.executable, "-m", "derprop.book.runs", args.size, "--only", run_id],
                        cwd=project_root(), env={**os.environ, "OMP_NUM_THREADS": "1"},
                        preexec_fn=cli.ends_with_parent())
                time.sleep(0.5)
                for run_id, proc in list(running.items()):
                    if proc.poll() is not None:
                        codes[run_id] = running.pop(run_id).returncode
        finally:
            cli.stop_children(running.values())  # Ctrl-C or a stop signal: each keeps its finished epochs
        failed = {run_id: rc for run_id, rc in codes.items() if rc != 0}
        if failed and set(failed.values()) == {cli.EXIT_ERROR}:
            return cli.EXIT_ERROR  # each printed its own error line
        if failed:
            raise DerPropError("; ".join(f"run {run_id} stopped with exit status {rc}" for run_id, rc in failed.items()))
    for label, (run_id, extra) in runs.items():
        if args.only is not None:
            torch.set_num_threads(1)
        out, results = book_run(args.size, run_id, extra, progress=True)
        if args.only is None:
            print(f"{label}: mIoU {results['miou']:.4f} in {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
