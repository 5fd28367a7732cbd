"""Segmentation metrics from a confusion matrix (book chapters *Training on a CPU* and *Full reproduction on a GPU*).

``ConfusionMatrix.mat[t, p]`` counts pixels of target class ``t`` predicted
as ``p``; pixels whose target is ``ignore_index`` (255: VOC borders,
Cityscapes void) are skipped.

IoU of class c = TP / (TP + FP + FN) = mat[c,c] / (row_c + col_c − mat[c,c]).

**Absent classes**: a class with TP + FP + FN = 0 (neither in the targets nor
in the predictions seen so far) has no IoU: :meth:`ConfusionMatrix.iou_per_class`
gives NaN for it and :meth:`ConfusionMatrix.miou` averages over the other
classes. This equals torchmetrics' ``MulticlassJaccardIndex(average="macro")``
(which drops such classes from the mean; its ``average="none"`` reports 0 for
them). UniMatch's evaluation instead divides by (union + 1e-10), i.e. counts
them as 0 in the mean; over a whole validation set every class occurs, so the
two agree there.

The state is one int64 tensor, so the counts of several workers add up:
:meth:`reduce_` sums them with an all-reduce under DDP.
"""

from __future__ import annotations

import torch
from torch import Tensor

from derprop.data.labels import IGNORE_INDEX
from derprop.training.distributed import all_reduce


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix over batches."""

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX,
                 device: torch.device | str | None = None):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch. ``pred``: class indices shaped like ``target``, or logits
        with one extra class dimension at dim 1 (argmax is taken). ``target``:
        integer labels in [0, C) or ``ignore_index``; anything else raises."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        c = self.num_classes
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        if target.numel() and bool(((target < 0) | (target >= c)).any()):
            bad = torch.unique(target[(target < 0) | (target >= c)])[:10].tolist()
            raise ValueError(f"target labels {bad} outside [0, {c}) and not ignore_index={self.ignore_index}")
        if pred.numel() and bool(((pred < 0) | (pred >= c)).any()):
            raise ValueError(f"predicted classes outside [0, {c})")
        self.mat += torch.bincount(target * c + pred, minlength=c * c).view(c, c)

    # ------------------------------------------------------------------ #
    def _counts(self) -> tuple[Tensor, Tensor]:
        m = self.mat.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return tp, union

    def iou_per_class(self) -> Tensor:
        """(C,) float64 IoU per class; NaN for classes absent from targets and predictions."""
        tp, union = self._counts()
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        """Mean IoU over classes that occur (see module doc); NaN if nothing was counted."""
        iou = self.iou_per_class()
        present = ~torch.isnan(iou)
        return float(iou[present].mean()) if bool(present.any()) else float("nan")

    def pixel_accuracy(self) -> float:
        """Correct pixels / counted pixels (ignore_index excluded)."""
        total = self.mat.sum()
        return float(self.mat.diag().sum().double() / total) if int(total) else float("nan")

    # ------------------------------------------------------------------ #
    def reduce_(self) -> "ConfusionMatrix":
        """Sum the counts over all DDP ranks (in place; :func:`derprop.training.distributed.all_reduce`); no-op without an
        initialised process group."""
        self.mat = all_reduce(self.mat, "sum")
        return self

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.mat.sum())}, miou={self.miou():.4f})"
