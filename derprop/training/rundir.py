"""The run folder: one writer at a time, one commit point per epoch, nothing stale.

Explained in the book chapter *Training on a CPU* (``book/training_cpu.md``).

A run folder holds ``config.yaml``, ``metrics.jsonl``, ``steps.jsonl``,
``last.pt``, ``best.pt``, ``pseudo_labels/epoch_XXX.npz`` and, once training
has finished, ``results.json``. The rules that keep it consistent:

- **Lock.** ``run.lock`` holds the pid and host of the process that writes
  the folder (:class:`RunLock`). A second run refuses with one line naming
  the holder; the lock of a process that is gone (same host) is taken over
  with a warning.
- **Commit point.** Each epoch writes its snapshot and appends its rows to
  the two logs first, then replaces ``last.pt`` (atomically): that rename
  commits the epoch. ``best.pt`` follows and can always be rebuilt from
  ``last.pt`` (an improved epoch's best weights are in it). On resume,
  :func:`truncate_logs` drops the rows of epochs after ``last.pt``'s, so a
  kill at any write leaves a folder that ``--resume`` completes exactly.
- **Fresh start.** A new run refuses a folder that holds a checkpoint or
  results, or files that no derprop run wrote (:func:`check_start`), unless
  told to overwrite it; then, and for the leftovers of a run that never
  finished an epoch, every file a run writes is removed, ``train.log`` and the
  event files in ``tensorboard/`` too, and nothing else (:func:`clear_run_files`).
  A run resumed from another folder's checkpoint starts in a folder of its own.
- **Temporaries.** ``.<name>.*.tmp`` files left by a kill are removed on
  start and on resume (:func:`remove_stale_temporaries`).
- **Resume.** A resumed run may change the settings of
  :data:`RESUME_MAY_CHANGE` (learning rate and schedule, where the data
  lives, how often to evaluate); :func:`config_changes` lists them, every other
  difference is refused, and so are a checkpoint with non-finite weights and
  a dataset whose manifest changed since (:func:`check_same_data`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any


from derprop.errors import DerPropError
from derprop.training import atomic
from derprop.training import checkpoint as ckpt_io
from derprop.training.config import SECTIONS, flatten
from derprop.training.progress import TENSORBOARD, TRAIN_LOG

log = logging.getLogger(__name__)

LOCK = "run.lock"
LOGS = ("metrics.jsonl", "steps.jsonl")
RUN_FILES = ("config.yaml", *LOGS, TRAIN_LOG, "last.pt", "best.pt", "results.json")
SNAPSHOTS = "pseudo_labels"

RESUME_MAY_CHANGE = (
    "name", "data.root", "data.num_workers", "eval.every", "eval.final_modes",
    "optim.lr", "optim.epochs", "optim.iters_per_epoch", "optim.momentum", "optim.weight_decay",
    "optim.head_lr_mult", "optim.poly_power", "optim.ref_batch",
)
"""Config keys a resumed run may change: none of them changes the model's shape or the data it sees."""

OPTIMIZER_KEYS = tuple(k for k in RESUME_MAY_CHANGE if k.startswith("optim."))


class RunDirError(DerPropError, RuntimeError):
    """The run folder cannot be used as asked; the one-line message says why and what to do."""


# --------------------------------------------------------------------------- #
# Before anything is built
# --------------------------------------------------------------------------- #


def resume_path(out: Path, resume: str | os.PathLike | bool | None) -> Path | None:
    """The checkpoint a run resumes from: ``out/last.pt`` for ``True``, the path given, or None for a fresh run."""
    if resume is None or resume is False:
        return None
    path = out / "last.pt" if resume is True else Path(resume)
    if not path.is_file():
        hint = (f"{out} holds no finished epoch: start the run again without --resume"
                if resume is True else "pass the last.pt of a run with --resume-from")
        raise ckpt_io.CheckpointError(f"cannot resume: checkpoint {path} does not exist; {hint}")
    return path
def check_start(out: Path, resume: str | os.PathLike | bool | None, overwrite: bool) -> None:
    """Refuse to start in ``out`` where that would replace what another run, or another program, keeps there.

    A fresh run (``resume`` None) refuses a folder holding a run's checkpoint or results, or files that no derprop
    run wrote (:func:`foreign_files`), unless ``overwrite``. A run resumed from a checkpoint of another folder
    refuses a folder holding a run, or such files, at all: it starts a run of its own."""
    if resume is True:
        return
    held = [name for name in ("results.json", "last.pt") if (out / name).is_file()]
    what = "a finished run" if "results.json" in held else "an unfinished run"
    if resume:
        source = Path(resume)
        if source.parent.resolve() == out.resolve():
            return
        if held or foreign_files(out):
            kept = f"{what} ({held[0]})" if held else f"files of another program ({', '.join(foreign_files(out)[:3])})"
            raise RunDirError(
                f"output folder {out} already holds {kept}; --resume-from starts a run from {source} in a folder of "
                f"its own: choose an empty --out{', or continue the run there with --resume' if held else ''}")
        return
    if overwrite:
        return
    if held:
        raise RunDirError(
            f"output folder {out} already holds {what} ({held[0]}); continue it with --resume, "
            "or start again with --overwrite (deletes its run files)"
        )
    foreign = foreign_files(out)
    if foreign:
        raise RunDirError(
            f"output folder {out} is not a derprop run folder and holds {len(foreign)} entries "
            f"({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}); choose an empty --out, or start there "
            f"with --overwrite (deletes only the files a run writes: {', '.join(RUN_FILES)}, its {SNAPSHOTS}/ "
            f"snapshots and {TENSORBOARD}/ event files)"
        )


BEFORE_THE_RUN = (LOCK, TRAIN_LOG, "train.ipynb")
"""What a run folder may hold before its run writes ``config.yaml``: the lock, the log a launcher sends the run's
output to (``experiments.cpu_evidence``), the notebook that papermill executes there (``pipelines/train.ipynb``)."""


def foreign_files(out: Path) -> list[str]:
    """The entries of ``out`` that show it is not a derprop run folder: none when it holds a derprop
    ``config.yaml`` (every run writes one before its first step), else every entry but temporaries and
    :data:`BEFORE_THE_RUN`."""
    if not out.is_dir() or is_run_config(out / "config.yaml"):
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name not in BEFORE_THE_RUN and not p.name.endswith(atomic.TMP_SUFFIX))


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is the ``config.yaml`` a derprop run writes: a resolved config, whose top-level keys are
    every section (read as text, not parsed: its first megabyte at most)."""
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1_000_000)
    except OSError:
        return False
    return set(SECTIONS) <= set(re.findall(r"^(\w+):", text, flags=re.M))


def check_unlocked(out: Path) -> None:
    """Refuse early (before data and model are built) when a live process holds ``out``'s lock."""
    holder = read_lock(out / LOCK)
    if holder is not None and _alive(holder):
        raise RunDirError(_in_use(out, holder))


# --------------------------------------------------------------------------- #
# Lock
# --------------------------------------------------------------------------- #
def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's ``{"pid", "host", "started"}``; ``{}`` for an unreadable one, None when there is none."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process may still run (on another host it cannot be told: assume so)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _in_use(out: Path, holder: dict[str, Any]) -> str:
    return (
        f"output folder {out} is in use by pid {holder.get('pid')} on host {holder.get('host')} "
        f"(since {holder.get('started', '?')}, lock file {out / LOCK}); wait for that run, choose another --out, "
        "or delete the lock file if that process is not running"
    )


class RunLock:
    """``run.lock`` in ``out`` while training writes the folder (a context manager)."""

    def __init__(self, out: Path):
        self.out = out
        self.path = out / LOCK
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Create the lock, taking over a stale one; raise :class:`RunDirError` if a live process holds it."""
        self.out.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            if self._create(me):
                self.held = True
                return
            holder = read_lock(self.path)
            if holder is None:
                continue
            if _alive(holder):
                raise RunDirError(_in_use(self.out, holder))
            log.warning("taking over the stale lock %s of pid %s on host %s (that process is gone)",
                        self.path, holder.get("pid", "?"), holder.get("host", "?"))
            self._break()
        raise RunDirError(f"could not take the lock {self.path}: another process keeps creating it")

    def _create(self, me: dict[str, Any]) -> bool:
        """Write the lock complete under a temporary name, then link it into place (fails if one exists)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{LOCK}.", suffix=atomic.TMP_SUFFIX, dir=self.out)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _break(self) -> None:
        aside = self.path.with_name(f".{LOCK}.stale.{os.getpid()}{atomic.TMP_SUFFIX}")
        try:
            os.replace(self.path, aside)  # only one of two racing takers finds the file to move
        except FileNotFoundError:
            return
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        if self.held and (read_lock(self.path) or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


# --------------------------------------------------------------------------- #
# Cleaning and reconciling (with the lock held)
# --------------------------------------------------------------------------- #
def remove_stale_temporaries(out: Path) -> int:
    """Delete ``.*.tmp`` files in ``out`` and ``out/pseudo_labels`` (left by a kill mid-write); returns the count."""
    stale = [p for folder in (out, out / SNAPSHOTS) if folder.is_dir()
             for p in folder.glob(f".*{atomic.TMP_SUFFIX}") if p.is_file()]
    size = 0
    for p in stale:
        size += p.stat().st_size
        p.unlink(missing_ok=True)
    if stale:
        log.info("removed %d stale temporary file(s) (%.1f MB) from %s", len(stale), size / 1e6, out)
    return len(stale)


def clear_run_files(out: Path) -> None:
    """Delete the files a run writes, and nothing else: other files a user keeps there stay, and so do the
    folders of other runs under ``tensorboard/`` (a run writes its event files into ``tensorboard/`` itself)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for folder, pattern in ((out / TENSORBOARD, "events.out.tfevents.*"), (out / SNAPSHOTS, "epoch_*.npz")):
        if folder.is_dir():
            for p in folder.glob(pattern):
                if p.is_file():
                    p.unlink()
    if (out / TENSORBOARD).is_dir() and not any((out / TENSORBOARD).iterdir()):
        (out / TENSORBOARD).rmdir()


def adopt(source: Path, out: Path) -> None:
    """A run resumed from another folder's checkpoint starts from that folder's logs and ``best.pt``."""
    if not source.is_dir() or source.resolve() == out.resolve():
        return
    for name in (*LOGS, "best.pt"):
        if (source / name).is_file() and not (out / name).exists():
            with open(source / name, "rb") as src, atomic.open_atomic(out / name, (source / name).stat().st_size) as f:
                shutil.copyfileobj(src, f)


def truncate_logs(out: Path, epochs_done: int) -> list[dict[str, Any]]:
    """Keep the log rows of the committed epochs 1…``epochs_done`` only; returns the metrics rows kept.

    ``metrics.jsonl`` rows carry the 1-based ``epoch``, ``steps.jsonl`` rows the 0-based one.
    """
    kept: dict[str, list[dict[str, Any]]] = {}
    for name in LOGS:
        path = out / name
        if not path.is_file():
            kept[name] = []
            continue
        shift = 1 if name == "steps.jsonl" else 0
        kept[name] = [r for r in atomic.read_jsonl(path) if isinstance(r.get("epoch"), int) and r["epoch"] + shift <= epochs_done]
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept[name]))
    return kept["metrics.jsonl"]


def prepare(out: Path, resume_from: Path | None, epochs_done: int, epochs: int, config_yaml: str) -> list[dict[str, Any]]:
    """Make ``out`` ready for training (the lock held): stale temporaries removed, then a fresh run's files
    cleared, or a resumed run's folder adopted and its logs cut back to the ``epochs_done`` committed
    epochs; ``config.yaml`` written. Returns the metrics rows kept."""
    remove_stale_temporaries(out)
    kept: list[dict[str, Any]] = []
    if resume_from is None:
        clear_run_files(out)
    else:
        adopt(resume_from.parent, out)
        kept = truncate_logs(out, epochs_done)
        if epochs_done < epochs:
            (out / "results.json").unlink(missing_ok=True)  # the run is unfinished again
    atomic.write_text(out / "config.yaml", config_yaml)
    return kept


def commit_epoch(out: Path, steps: list[dict[str, Any]], metrics: dict[str, Any], state: dict[str, Any]) -> None:
    """The epoch's log rows, then ``last.pt``: the commit point (a resume drops rows past the last commit)."""
    atomic.append_jsonl(out / "steps.jsonl", steps)
    atomic.append_jsonl(out / "metrics.jsonl", [metrics])
    ckpt_io.save(out / "last.pt", state)


def save_best(out: Path, epoch: int, net: str, miou: float, weights: dict[str, Any], provenance: dict[str, Any]) -> None:
    """``best.pt``: the weights of net ``net`` after ``epoch`` (1-based) and what made them."""
    ckpt_io.save(out / "best.pt", {"epoch": epoch, "net": net, "miou": miou, "model": weights, **provenance})


def non_finite_hint(out: Path, epoch: int) -> str:
    """What a run that became NaN/inf during ``epoch`` (0-based) leaves, and how to go on from it."""
    if epoch and (out / "last.pt").is_file():  # every finished epoch was committed
        return (f"the last finite checkpoint {out / 'last.pt'} (epoch {epoch}) is kept; continue it with a "
                "lower lr (--resume optim.lr=...) or start again (--overwrite optim.lr=...)")
    return "no checkpoint was written yet; start again with a lower optim.lr"


# --------------------------------------------------------------------------- #
# Resume policy
# --------------------------------------------------------------------------- #
def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, list], dict[str, list]]:
    """``(allowed, refused)``: dotted keys whose values differ between two resolved configs, as ``[saved, now]``."""
    fa, fb = flatten(saved), flatten(now)
    diff = {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}
    allowed = {k: v for k, v in diff.items() if k in RESUME_MAY_CHANGE}
    refused = {k: v for k, v in diff.items() if k not in RESUME_MAY_CHANGE}
    return allowed, refused


def describe_changes(changes: dict[str, list]) -> str:
    """``"optim.lr 0.01 → 0.001, optim.epochs 2 → 4"``."""
    return ", ".join(f"{k} {a!r} → {b!r}" for k, (a, b) in changes.items())


def resume_changes(path: Path | None, state: dict[str, Any], now: dict[str, Any]) -> dict[str, list]:
    """The allowed changes of a resume from checkpoint ``state`` to the resolved config ``now``.

    Raises:
        CheckpointError: the checkpoint holds weights only (a ``best.pt``), another key differs, or
            ``optim.epochs`` is below the epochs already done.
    """
    if "optimizer" not in state:
        raise ckpt_io.CheckpointError(
            f"checkpoint {path} holds a network's weights only (a best.pt), not the training state a resume needs; "
            f"resume from the run's last.pt (--resume-from {path.parent / 'last.pt'}), or start a new run from these "
            f"weights with optim.warm_start={path}")
    for net in ("model", "momentum"):
        weights = state.get(net)
        weights = weights.get("model") if net == "momentum" and isinstance(weights, dict) else weights
        bad = ckpt_io.first_non_finite(weights) if isinstance(weights, dict) else None
        if bad is not None:
            raise ckpt_io.CheckpointError(
                f"checkpoint {path} holds non-finite weights ({net} tensor {bad[0]} is {bad[1]}): no run can go on "
                "from it; start again (--overwrite, with a lower optim.lr), or resume from a copy of an earlier "
                "epoch")
    changed, refused = config_changes(state.get("config") or {}, now)
    if refused:
        raise ckpt_io.CheckpointError(
            f"checkpoint {path} was written with a different config: "
            + "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in list(refused.items())[:8])
            + ". Resume with the config it was written with (its config.yaml); a resume may change only "
            + ", ".join(RESUME_MAY_CHANGE)
        )
    done, epochs = int(state["epoch"]), int(now["optim"]["epochs"])
    if done > epochs:
        raise ckpt_io.CheckpointError(f"checkpoint {path} has finished epoch {done}, more than optim.epochs={epochs}; "
                                      f"resume with optim.epochs={done} or more")
    if changed:
        log.warning("resuming %s (epoch %d) with changed settings: %s", path, done, describe_changes(changed))
    return changed


def check_same_data(path: Path, state: dict[str, Any], data_sha256: str | None, allow: bool) -> None:
    """Refuse to resume checkpoint ``state`` (read from ``path``) on a dataset whose manifest differs from the
    one it was trained on (``data_sha256``: the manifest's hash now), unless ``allow``."""
    then = state.get("data_sha256")
    if allow or then is None or data_sha256 is None or then == data_sha256:
        return
    raise ckpt_io.CheckpointError(
        f"checkpoint {path} was trained on another dataset: its manifest had sha256 {then[:16]}…, the one of "
        f"data.root has {data_sha256[:16]}… (the tree was regenerated or changed); resume with the tree it was "
        "trained on, or pass --new-data to go on with this one")


def best_needs_rewrite(out: Path, best_epoch: int | None, committed: int) -> bool:
    """Whether ``best.pt`` lags the committed best (a kill after ``last.pt``); it can be rebuilt when that best
    is the committed epoch itself, whose weights ``last.pt`` holds. Any other mismatch is only reported."""
    if best_epoch is None:
        return False
    path = out / "best.pt"
    try:
        on_disk = ckpt_io.load(path).get("epoch")
    except ckpt_io.CheckpointError:
        on_disk = None
    if on_disk == best_epoch:
        return False
    if best_epoch == committed:
        log.warning("rewriting %s: it holds epoch %s, the run's best is epoch %s (stopped before it was written)",
                    path, on_disk, best_epoch)
        return True
    log.warning("%s holds epoch %s but the run's best is epoch %s, whose weights are lost", path, on_disk, best_epoch)
    return False
