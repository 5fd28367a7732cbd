"""The optimiser and its schedule: SGD with a head learning-rate multiplier and the release's poly decay.

Explained in the book chapter *Training on a CPU*.

``lr_it = lr · (1 − it/total)^power`` at iteration ``it`` of ``total = epochs × iters_per_epoch``
(UniMatch's and the release's schedule), or of a longer span that a warm start began
(``optim.schedule_iters``, ``optim.schedule_offset``); the decoder and the heads train at ``head_lr_mult × lr``
(:meth:`derprop.training.model.DerPropNet.param_groups`). With ``optim.ref_batch`` set, ``lr`` is scaled
linearly to the global batch ``optim.batch_size`` first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import PolynomialLR

from derprop.errors import ConfigError
from derprop.training.config import OptimConfig
from derprop.training.model import DerPropNet


def build_optimizer(net: DerPropNet, o: OptimConfig) -> torch.optim.SGD:
    """SGD over ``net``'s backbone and head parameter groups at the (batch-scaled) ``o.lr``."""
    lr = o.lr * (o.batch_size / o.ref_batch if o.ref_batch else 1.0)
    return torch.optim.SGD(net.param_groups(lr, o.head_lr_mult), lr=lr, momentum=o.momentum,
                           weight_decay=o.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig, run_iters: int) -> PolynomialLR:
    """The poly decay over ``o.schedule_iters`` (default ``run_iters``) iterations, stepped once per iteration,
    already ``o.schedule_offset`` iterations in (:class:`derprop.training.config.OptimConfig`)."""
    total = o.schedule_iters or run_iters
    if o.schedule_offset + run_iters > total:
        raise ConfigError(f"optim.schedule_offset ({o.schedule_offset}) + this run's {run_iters} iterations exceed "
                         f"optim.schedule_iters ({total}); make the span at least their sum")
    scheduler = PolynomialLR(optimizer, total_iters=total, power=o.poly_power)
    if o.schedule_offset:
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * (1.0 - o.schedule_offset / total) ** o.poly_power
        scheduler.last_epoch = o.schedule_offset
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return scheduler


def apply_settings(optimizer: torch.optim.Optimizer, scheduler: PolynomialLR, fresh: list[dict[str, Any]],
                   total: int, power: float) -> None:
    """Put a new config's lr, momentum, weight decay and schedule over a state restored from a checkpoint.

    ``fresh``: the param groups the new config built; ``total``/``power``: its schedule. Loading the
    checkpoint restored the old schedule, and :class:`PolynomialLR` steps multiplicatively from the
    current lr, so the lr is set to the new schedule's value at this iteration and continues from there.
    """
    for group, new in zip(optimizer.param_groups, fresh):
        group.update({k: v for k, v in new.items() if k != "params" and k != "lr"})
    scheduler.base_lrs = [g["initial_lr"] for g in fresh]
    scheduler.total_iters, scheduler.power = total, power
    factor = max(0.0, 1.0 - scheduler.last_epoch / total) ** power
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor
