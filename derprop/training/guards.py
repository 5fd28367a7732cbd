"""Stopping a run that became NaN or infinite, before the bad values reach the weights or a checkpoint.

Explained in the book chapter *Training on a CPU* (what a run does when its loss blows up).

Three checks, each naming where it failed and what the run folder still holds
(:func:`derprop.training.rundir.non_finite_hint`): the loss of every step (all processes), the
gradient norm before the optimiser step, and every parameter and buffer before an
epoch is evaluated and saved.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from derprop.errors import DerPropError
from derprop.training import checkpoint as ckpt_io
from derprop.training import rundir


class NonFiniteLossError(DerPropError, RuntimeError):
    """The loss, the gradient norm or a weight became NaN or infinite; the last finite checkpoint was kept."""


def stop(out: Path, value: float, epoch: int, step: int, global_step: int, what: str = "loss") -> None:
    """Raise :class:`NonFiniteLossError` for ``what`` at ``step`` of ``epoch`` (both 0-based; ``step = -1``:
    at the end of the epoch)."""
    where = f"at epoch {epoch + 1}, step {step + 1} (global step {global_step + 1})" if step >= 0 else \
        f"during epoch {epoch + 1}"
    raise NonFiniteLossError(f"{what} became {value} {where}; training stopped and "
                             f"{rundir.non_finite_hint(out, epoch)} (or try optim.amp=none)")


def check_loss(value: float, out: Path, epoch: int, step: int, global_step: int) -> None:
    if not math.isfinite(value):
        stop(out, value, epoch, step, global_step)


def check_grad_norm(net: nn.Module, out: Path, epoch: int, step: int, global_step: int) -> None:
    """A NaN/inf gradient stops training before the optimiser step can write it into the weights."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if not math.isfinite(norm):
        stop(out, norm, epoch, step, global_step, "gradient norm")


def check_weights(nets: dict[str, nn.Module], out: Path, epoch: int, global_step: int) -> None:
    """Every parameter and buffer of every net must be finite before an epoch can be evaluated and saved."""
    for name, net in nets.items():
        bad = ckpt_io.first_non_finite(net.state_dict())
        if bad is not None:
            stop(out, bad[1], epoch, -1, global_step, f"{name} network tensor {bad[0]}")
