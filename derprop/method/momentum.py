"""The momentum network Θm of eq. 6 (book chapters *Paper vs released code* and *Ablations at CPU scale*).

Eq. 6: after each epoch, Θm ← (Θm + Θb)/2, where Θb are the weights of the
back-propagation network (the one the optimizer trains). Unrolled, Θm is an
exponential average over epochs with weight 1/2 on the newest epoch.

Paper vs released code (the switches of :class:`MomentumNetwork`):

====================  ===============================  ==========================================
                      paper (§1)                       release (§2, ``official``)
====================  ===============================  ==========================================
``when``              ``"epoch_end"``: after each      ``"epoch_start"``: at the start of each
                      epoch                            epoch, so Θm lags one epoch behind
``include_buffers``   not said (parameters Θ)          ``True``: the whole state dict, BN
                                                       running statistics too
pseudo-labels         the back-prop net                the back-prop net for the weak view; the
                                                       momentum net for the second (CutMix) batch
evaluated             only Θm                          both nets; the best checkpoint is kept
====================  ===============================  ==========================================

Buffers: with ``include_buffers=True`` floating-point buffers (BN running
mean/var) are averaged like parameters; with ``False`` they are *copied* from
the back-prop net (leaving them untouched would freeze the momentum net's BN
statistics at their initial values, since the momentum net never runs in
train mode). Integer buffers (``num_batches_tracked``) are always copied
from the back-prop net.

The wrapped copy is kept in eval mode with ``requires_grad=False``; calling
the wrapper runs it under ``torch.no_grad()``.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

WHEN = ("epoch_end", "epoch_start")


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class MomentumNetwork:
    """Θm: a frozen deep copy of the model, averaged with it by eq. 6.

    ``MomentumNetwork(model, include_buffers=True, when="epoch_end")``;
    call :meth:`on_epoch_start` and :meth:`on_epoch_end` from the training
    loop at every epoch: each applies :meth:`update` only if ``when`` says so,
    and at most once per epoch (a resumed run does not average twice).
    """

    def __init__(self, model: nn.Module, *, include_buffers: bool = True, when: str = "epoch_end"):
        if when not in WHEN:
            raise ValueError(f"momentum 'when' must be one of {list(WHEN)}, got {when!r}")
        if not isinstance(include_buffers, bool):
            raise ValueError(f"momentum 'include_buffers' must be true or false, got {include_buffers!r}")
        self.module = copy.deepcopy(unwrap(model))
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()
        self.include_buffers = include_buffers
        self.when = when
        self.num_updates = 0
        self.last_update_epoch: int | None = None

    # ------------------------------------------------------------------ #
    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Eq. 6: Θm ← (Θm + Θb)/2 (buffers: see the module docstring)."""
        src = unwrap(model).state_dict()
        dst = self.module.state_dict()
        if src.keys() != dst.keys():
            diff = sorted(set(src) ^ set(dst))
            raise ValueError(f"momentum network and model differ in state dict keys: {diff[:10]}")
        param_names = {n for n, _ in self.module.named_parameters()}
        for name, m in dst.items():
            b = src[name].to(device=m.device)
            if name in param_names or (self.include_buffers and m.is_floating_point()):
                m.add_(b.to(m.dtype)).mul_(0.5)
            else:
                m.copy_(b)
        self.num_updates += 1

    def on_epoch_start(self, model: nn.Module, epoch: int) -> bool:
        """Apply eq. 6 if ``when == "epoch_start"`` (release); returns whether it did."""
        return self._maybe_update(model, epoch, "epoch_start")

    def on_epoch_end(self, model: nn.Module, epoch: int) -> bool:
        """Apply eq. 6 if ``when == "epoch_end"`` (paper); returns whether it did."""
        return self._maybe_update(model, epoch, "epoch_end")

    def _maybe_update(self, model: nn.Module, epoch: int, hook: str) -> bool:
        if self.when != hook or self.last_update_epoch == epoch:
            return False
        self.update(model)
        self.last_update_epoch = epoch
        return True

    # ------------------------------------------------------------------ #
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> "MomentumNetwork":
        self.module.to(*args, **kwargs)
        return self

    def eval(self) -> "MomentumNetwork":
        self.module.eval()
        return self

    def state_dict(self) -> dict[str, Any]:
        """``{"model": weights, "num_updates", "last_update_epoch", "when", "include_buffers"}``."""
        return {
            "model": self.module.state_dict(),
            "num_updates": self.num_updates,
            "last_update_epoch": self.last_update_epoch,
            "when": self.when,
            "include_buffers": self.include_buffers,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (or from a bare model state dict)."""
        if "model" in state and isinstance(state["model"], Mapping):
            self.module.load_state_dict(state["model"])
            self.num_updates = int(state.get("num_updates", 0))
            self.last_update_epoch = state.get("last_update_epoch")
        else:
            self.module.load_state_dict(state)
