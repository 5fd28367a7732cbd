"""The poly schedule, and one schedule shared by a warm start and the run that continues it."""

from __future__ import annotations

import pytest
import torch

from derprop.training.config import OptimConfig
from derprop.training.schedule import build_scheduler


def lrs(o: OptimConfig, n: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=o.lr)
    sched = build_scheduler(opt, o, n)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_poly_decay_closed_form():
    got = lrs(OptimConfig(lr=0.01, poly_power=0.9), 10)
    assert got == pytest.approx([0.01 * (1 - i / 10) ** 0.9 for i in range(10)], rel=1e-12)


def test_warm_start_and_continuation_are_one_schedule():
    whole = lrs(OptimConfig(lr=0.01), 10)
    first = lrs(OptimConfig(lr=0.01, schedule_iters=10), 4)
    rest = lrs(OptimConfig(lr=0.01, schedule_iters=10, schedule_offset=4), 6)
    assert first + rest == pytest.approx(whole, rel=1e-12)


def test_span_too_short_is_refused():
    with pytest.raises(ValueError, match="optim.schedule_offset"):
        lrs(OptimConfig(lr=0.01, schedule_iters=10, schedule_offset=8), 4)
