"""Progress lines for runs nobody watches (book chapter *Training on a CPU*).

Under papermill, ``nohup`` or a batch scheduler there is no terminal for tqdm,
so the trainer also writes one line every ``log_every`` iterations::

    epoch 3/80 it 120/1830 (6.6%) loss 0.8123 ce_x 0.41 ... kl 0.03 lr 9.6e-04 threshold 0.873 mask_ratio 0.62 12.4 img/s ETA 2:16:40

to ``<run>/train.log`` (always) and to stdout (only when tqdm is not drawing
a bar, i.e. when stderr is not a terminal; the bar shows the epoch's progress,
the loss and τ). Loss terms are the ones
:meth:`derprop.training.trainer.Trainer.compute_loss` logs (eq. 7–9), averaged over the
iterations since the previous line; ``threshold`` and ``mask_ratio`` are the
confidence threshold and the share of unlabeled pixels above it; img/s counts
labeled + unlabeled images of all processes; the ETA covers the remaining
training iterations at the rate since the previous line (evaluation not
included). When the ``tensorboard`` package is installed, the same numbers go
to ``<run>/tensorboard/`` as scalars ``train/*`` (optional dependency ``derprop[tensorboard]``),
and each evaluation adds ``val/miou`` (the net that ``eval.select`` judges), ``val/miou_<net>``
for both networks and ``val/iou_per_class`` (a text table, one column per network)
(:meth:`ProgressLog.validation`). Only rank 0 writes.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

DEFAULT_EVERY = 50
TRAIN_LOG = "train.log"
TENSORBOARD = "tensorboard"
YEAR = 365 * 24 * 3600


def eta_text(seconds: float) -> str:
    """A remaining time as ``H:MM:SS`` (``N days, H:MM:SS``), or in years from 100 years on (a config with
    ``optim.epochs=10**20`` has an ETA, too)."""
    if seconds < 100 * YEAR:
        return str(_dt.timedelta(seconds=round(seconds)))
    return f"{seconds / YEAR:.3g} years"


def summary_writer(log_dir: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` into ``log_dir``, or None without the ``tensorboard`` package."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))


class ProgressLog:
    """Collects per-iteration logs and writes a line every ``every`` iterations (see module doc)."""

    def __init__(self, out_dir: str | Path, *, total_steps: int, steps_per_epoch: int, epochs: int,
                 images_per_step: int, every: int = DEFAULT_EVERY, echo: bool = True, enabled: bool = True,
                 bar: bool = False):
        if every < 1:
            raise ValueError(f"log_every must be a positive number of iterations, got {every}")
        self.out = Path(out_dir)
        self.total, self.per_epoch, self.epochs = total_steps, steps_per_epoch, epochs
        self.images_per_step, self.every, self.echo, self.enabled = images_per_step, every, echo, enabled
        self._sums: dict[str, float] = {}
        self._n = 0
        self._t = time.perf_counter()
        self._tb: Any = summary_writer(self.out / TENSORBOARD) if enabled else None
        self.bar, self._bar = bar and enabled, None

    def start_epoch(self, epoch: int) -> None:
        """Open the tqdm bar of epoch ``epoch`` (counted from 0) when a terminal shows one."""
        if self.bar:
            from tqdm import tqdm

            self._bar = tqdm(total=self.per_epoch, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def step(self, global_step: int, logs: dict[str, float], lr: float) -> str | None:
        """Record one iteration (``global_step`` counts from 1); returns the line when one is written."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{logs['loss']:.3f}", tau=f"{logs['threshold']:.3f}")
            self._bar.update(1)
        for k, v in logs.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._n += 1
        if global_step % self.every and global_step != self.total:
            return None
        now = time.perf_counter()
        rate = self._n / max(now - self._t, 1e-9)
        means = {k: v / self._n for k, v in self._sums.items()}
        line = self.format(global_step, means, lr, rate)
        self.note(line)
        if self._tb is not None:
            for k, v in means.items():
                self._tb.add_scalar(f"train/{k}", v, global_step)
            self._tb.add_scalar("train/lr", lr, global_step)
            self._tb.add_scalar("train/images_per_s", rate * self.images_per_step, global_step)
            self._tb.flush()
        self._sums, self._n, self._t = {}, 0, now
        return line

    def note(self, text: str) -> None:
        """A line to ``train.log``, and to stdout when no bar is drawn: a progress line, an epoch's peak memory."""
        if not self.enabled:
            return
        with open(self.out / TRAIN_LOG, "a", encoding="utf-8") as f:
            f.write(text + "\n")
        if self.echo:
            print(text, flush=True)

    def validation(self, global_step: int, miou: Mapping[str, float], headline: float,
                   iou_per_class: Mapping[str, Sequence[float]], class_names: Sequence[str]) -> None:
        """One evaluation to TensorBoard: ``miou`` and ``iou_per_class`` per network, ``headline`` as ``val/miou``."""
        if self._tb is None:
            return
        self._tb.add_scalar("val/miou", headline, global_step)
        for net, value in miou.items():
            self._tb.add_scalar(f"val/miou_{net}", value, global_step)
        nets = list(iou_per_class)
        rows = [f"| class | {' | '.join(nets)} |", "|---|" + "---|" * len(nets)]
        cell = {n: ["–" if v is None else f"{v:.4f}" for v in iou_per_class[n]] for n in nets}  # None: class absent
        rows += [f"| {name} | " + " | ".join(cell[n][c] for n in nets) + " |" for c, name in enumerate(class_names)]
        self._tb.add_text("val/iou_per_class", "\n".join(rows), global_step)
        self._tb.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (the end of training)."""
        self.end_epoch()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def format(self, global_step: int, means: dict[str, float], lr: float, steps_per_s: float) -> str:
        """One progress line (see module doc)."""
        epoch = min((global_step - 1) // max(self.per_epoch, 1) + 1, self.epochs)
        eta = eta_text((self.total - global_step) / max(steps_per_s, 1e-9))
        names = sorted(means, key=lambda k: k != "loss")  # the total first, then the terms as logged
        terms = " ".join(f"{k} {means[k]:.4g}" for k in names if k not in ("threshold", "mask_ratio"))
        return (f"epoch {epoch}/{self.epochs} it {global_step}/{self.total} "
                f"({100 * global_step / max(self.total, 1):.1f}%) {terms} lr {lr:.3g} "
                f"threshold {means.get('threshold', float('nan')):.3f} "
                f"mask_ratio {means.get('mask_ratio', float('nan')):.3f} "
                f"{steps_per_s * self.images_per_step:.1f} img/s ETA {eta}")
