"""derprop.method.momentum: eq. 6, Θm ← (Θm + Θb)/2, and its two schedules."""

import pytest
import torch
from torch import nn

from derprop.method.momentum import MomentumNetwork, unwrap


def net(value: float = 0.0) -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    fill(m, value)
    return m


def fill(m: nn.Module, value: float, mean: float | None = None, tracked: int | None = None) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
        bn = m[1]
        bn.running_mean.fill_(value if mean is None else mean)
        bn.running_var.fill_(1.0 + (value if mean is None else mean))
        bn.num_batches_tracked.fill_(0 if tracked is None else tracked)


def test_exact_averaging_rule():
    model = net(0.0)
    mom = MomentumNetwork(model)  # Θm = 0
    fill(model, 1.0)
    mom.update(model)  # (0 + 1)/2
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in mom.module.parameters())
    mom.update(model)  # (0.5 + 1)/2
    assert all(torch.equal(p, torch.full_like(p, 0.75)) for p in mom.module.parameters())
    fill(model, -3.0)
    mom.update(model)  # (0.75 - 3)/2
    assert all(torch.equal(p, torch.full_like(p, -1.125)) for p in mom.module.parameters())
    assert mom.num_updates == 3
    # the back-prop net is left alone
    assert all(torch.equal(p, torch.full_like(p, -3.0)) for p in model.parameters())


@pytest.mark.parametrize("include, mean, var", [(True, 2.0, 3.0), (False, 4.0, 5.0)])
def test_buffers_averaged_when_included_else_copied(include, mean, var):
    """Θm starts with running mean 0 and var 1; Θb has 4 and 5: included, (0 + 4)/2 and (1 + 5)/2."""
    model = net(0.0)
    mom = MomentumNetwork(model, include_buffers=include)
    fill(model, 1.0, mean=4.0, tracked=7)
    mom.update(model)
    bn = mom.module[1]
    assert torch.equal(bn.weight, torch.full((3,), 0.5))  # parameters are averaged either way
    assert torch.equal(bn.running_mean, torch.full((3,), mean))
    assert torch.equal(bn.running_var, torch.full((3,), var))
    assert int(bn.num_batches_tracked) == 7  # the integer counter is always the source's


@pytest.mark.parametrize("when", ["epoch_end", "epoch_start"])
def test_schedule(when):
    model = net(0.0)
    mom = MomentumNetwork(model, when=when)
    fill(model, 1.0)
    start, end = mom.on_epoch_start(model, 0), mom.on_epoch_end(model, 0)
    assert (start, end) == ((True, False) if when == "epoch_start" else (False, True))
    assert mom.num_updates == 1
    # a second call for the same epoch (e.g. after resuming) does nothing
    assert not mom.on_epoch_start(model, 0) and not mom.on_epoch_end(model, 0)
    assert mom.num_updates == 1
    hook = mom.on_epoch_start if when == "epoch_start" else mom.on_epoch_end
    assert hook(model, 1) and mom.num_updates == 2
    assert torch.equal(mom.module[0].bias, torch.full((3,), 0.75))


def test_bad_options():
    with pytest.raises(ValueError, match="when"):
        MomentumNetwork(net(), when="step")
    with pytest.raises(ValueError, match="include_buffers"):
        MomentumNetwork(net(), include_buffers="yes")


def test_frozen_eval_copy_and_call():
    model = net(0.5).train()
    mom = MomentumNetwork(model)
    assert not any(p.requires_grad for p in mom.module.parameters())
    assert not mom.module.training and model.training
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(mom.module.parameters(), model.parameters()))
    out = mom(torch.randn(4, 2))
    assert not out.requires_grad


def test_state_dict_round_trip():
    model = net(0.0)
    mom = MomentumNetwork(model, when="epoch_start")
    fill(model, 1.0)
    mom.on_epoch_start(model, 3)
    state = mom.state_dict()
    assert set(state) >= {"model", "num_updates", "last_update_epoch"}
    other = MomentumNetwork(net(9.0), when="epoch_start")
    other.load_state_dict(state)
    assert other.num_updates == 1 and other.last_update_epoch == 3
    assert torch.equal(other.module[0].weight, mom.module[0].weight)
    assert not other.on_epoch_start(model, 3)  # resumed: no second average for epoch 3
    bare = MomentumNetwork(net(9.0))
    bare.load_state_dict(mom.module.state_dict())
    assert torch.equal(bare.module[0].weight, mom.module[0].weight)


def test_unwraps_compiled_or_parallel_wrappers():
    inner = net(1.0)

    class Wrapper(nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert unwrap(Wrapper(inner)) is inner
    assert unwrap(nn.DataParallel(inner)) is inner
    mom = MomentumNetwork(Wrapper(net(0.0)))
    mom.update(Wrapper(inner))
    assert torch.equal(mom.module[0].weight, torch.full((3, 2), 0.5))


def test_key_mismatch_raises():
    mom = MomentumNetwork(net())
    with pytest.raises(ValueError, match="state dict keys"):
        mom.update(nn.Linear(2, 3))
