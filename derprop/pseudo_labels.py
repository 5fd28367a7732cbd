"""Pseudo-labels of the unlabeled images: the eq. 5 blend, the confidence threshold, CorrMatch's region propagation.

Explained in the book chapters *Pseudo-label rectification, interactively* and *Paper vs released code*.

For a CutMixed batch the pseudo-label of a pixel inside the box is the
partner's, outside it the weak view's own (steps 4 and 5 of
:mod:`derprop.trainer`):

- eq. 5: ``P = (1−η_ep)·softmax(L) + η_ep·softmax(L̃)`` (``blend_space: prob``,
  the paper) or ``softmax((1−η_ep)·L + η_ep·L̃)`` (``logit``, the release);
  without DLP ``P = softmax(L)``;
- a pixel is confident when ``max P ≥ τ``; τ is fixed (0.95) or the release's
  EMA (:class:`Threshold`);
- region propagation (CorrMatch, kept by the release) may relabel whole
  regions and count them as confident (:func:`region_propagation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from derprop.config import MethodConfig
from derprop.distributed import Dist
from derprop.labels import IGNORE_INDEX
from derprop.model import SegOutput
from derprop.propagation import official_similarity_factors, propagate


class Threshold:
    """Confidence threshold τ: fixed, or the release's global EMA (CorrMatch).

    EMA update: for every class predicted somewhere in the batch (all ranks),
    take the highest confidence among its valid pixels; average over those
    classes; ``τ ← m·τ + (1−m)·that``.
    """

    def __init__(self, kind: str, value: float, init: float, momentum: float):
        self.kind, self.momentum = kind, momentum
        self.value = float(value if kind == "fixed" else init)

    @torch.no_grad()
    def update(self, probs: Tensor, ignore: Tensor, d: Dist) -> None:
        if self.kind != "ema":
            return
        conf, pred = probs.float().max(dim=1)
        c = probs.shape[1]
        valid = ignore != IGNORE_INDEX
        best = torch.full((c,), -1.0, device=probs.device)
        if bool(valid.any()):
            best.scatter_reduce_(0, pred[valid], conf[valid], reduce="amax", include_self=True)
        if d.distributed:
            dist.all_reduce(best, op=dist.ReduceOp.MAX)
        present = best >= 0
        if bool(present.any()):
            self.value = self.momentum * self.value + (1 - self.momentum) * float(best[present].mean())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def similarity_features(out: SegOutput, temperature: float) -> tuple[Tensor, Tensor | None]:
    """``f1, f2`` flattened to ``(B, D, M)`` (``f2`` None when symmetric), ``f1`` divided by the temperature
    (``method.dlp_temperature``): in the softmax form the similarity becomes ``s/T`` (Δ is linear)."""
    f1 = out.f1.flatten(2)
    if temperature == 1.0:
        return f1, None if out.f2 is out.f1 else out.f2.flatten(2)
    return f1 / temperature, f1 if out.f2 is out.f1 else out.f2.flatten(2)


def weak_features(out_w: SegOutput, nb: int, temperature: float) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """``(f1, f2, grid)`` of the unlabeled half (images ``nb…``) of ``out_w``, detached, fp32: region propagation's."""
    f1, f2 = similarity_features(out_w, temperature)
    f1 = f1[nb:].detach().float()
    f2 = f1 if f2 is None else f2[nb:].detach().float()
    return f1, f2, tuple(out_w.f1.shape[-2:])


def propagated_logits(out: SegOutput, size: tuple[int, int], m: MethodConfig) -> Tensor:
    """``L̃`` (eq. 4) at the feature grid, upsampled bilinearly to ``size``."""
    b, c, h, w = out.logits_grid.shape
    f1, f2 = similarity_features(out, m.dlp_temperature)
    lt = propagate(out.logits_grid.flatten(2), f1, f2, mode="official" if m.dlp_form == "softmax" else "paper",
                   op=m.op, chunk=m.chunk, paper_norm=m.paper_dlp_norm)
    return F.interpolate(lt.view(b, c, h, w).float(), size=size, mode="bilinear", align_corners=True)


def blend(logits: Tensor, prop: Tensor | None, eta: float, space: str) -> Tensor:
    """Pseudo-label probabilities (eq. 5) in ``space`` (``method.blend_space``); ``softmax(L)`` without ``L̃``."""
    logits = logits.float()
    if prop is None:
        return logits.softmax(1)
    if space == "logit":
        return ((1 - eta) * logits + eta * prop.float()).softmax(1)
    return (1 - eta) * logits.softmax(1) + eta * prop.float().softmax(1)


@dataclass
class PseudoLabels:
    """Targets of the unlabeled terms of eq. 7 for a CutMixed batch.

    ``_c``: the CutMixed image (the partner's label inside the box); ``_w``: the weak view's own.
    ``mask`` class indices, ``keep`` confident and valid pixels, ``valid`` not ignored;
    ``keep_cu`` is ``keep_c`` after region propagation (the CE terms use it, the KL term does not).
    ``target`` the soft target (KL, soft CE).
    """

    target: Tensor
    mask_c: Tensor
    keep_c: Tensor
    keep_cu: Tensor
    valid_c: Tensor
    mask_w: Tensor
    keep_w: Tensor
    valid_w: Tensor
    tau: float


@torch.no_grad()
def cutmix_pseudo_labels(p_w: Tensor, p_mix: Tensor, box: Tensor, ign: Tensor, ign_mix: Tensor,
                         threshold: Threshold, m: MethodConfig, d: Dist,
                         features: tuple[Tensor, Tensor, tuple[int, int]] | None = None) -> PseudoLabels:
    """Pseudo-labels of the CutMixed strong view from the weak view's ``p_w`` and the partner's ``p_mix``.

    Updates ``threshold`` first (on the weak view; the release counts the uncut ignore mask).
    ``features``: :func:`weak_features` of the weak view, for region propagation.
    """
    conf_mix, mask_mix = p_mix.max(1)
    conf_w, mask_w = p_w.max(1)
    mask_c = torch.where(box, mask_mix, mask_w)
    conf_c = torch.where(box, conf_mix, conf_w)
    ign_c = torch.where(box, ign_mix, ign)
    target = torch.where(box.unsqueeze(1), p_mix, p_w) if m.cutmix_consistent_targets else p_w
    threshold.update(p_w, ign if m.cutmix_consistent_targets else ign_c, d)
    tau = threshold.value
    keep_c = (conf_c >= tau) & (ign_c != IGNORE_INDEX)
    keep_w = (conf_w >= tau) & (ign != IGNORE_INDEX)
    keep_cu = keep_c
    if m.region_propagation:
        f1, f2, grid = features
        mask_c, keep_cu = region_propagation(f1, f2, grid, mask_c, keep_c, box, ign_c, tau, m.op, m.region_samples,
                                             p_w.shape[1])
    return PseudoLabels(target, mask_c, keep_c, keep_cu, ign_c != IGNORE_INDEX, mask_w, keep_w, ign != IGNORE_INDEX, tau)


@torch.no_grad()
def region_propagation(f1: Tensor, f2: Tensor, grid: tuple[int, int], mask_c: Tensor, keep_c: Tensor, box: Tensor,
                       ign_c: Tensor, tau: float, op: str, samples: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """CorrMatch's region-level label propagation (the release keeps it), compact version.

    ``f1, f2``: ``(B, D, M)`` features of the unlabeled weak view on the ``grid = (h, w)``.
    ``K = samples`` pixels are drawn at random on the feature grid; the
    row of the similarity softmax ``A`` (release form, with the derivative
    term) of each is upsampled to the crop, min-max normalised and
    thresholded at 0.5: a region. Regions are restricted to valid pixels
    outside the CutMix box. A region whose confident fraction is ≥ τ and
    whose confident pixels agree on one class for more than τ of them gets
    that class everywhere, and all its pixels count as confident.

    Difference from the release: the class counts of every region are
    taken from the pseudo-label before any region is applied (the release
    updates the label map region by region, so later regions see earlier
    ones); where accepted regions overlap the last one wins, as there.
    """
    k = samples
    g1, g2 = official_similarity_factors(f1, f2, op)
    b, _, mpix = g1.shape
    h, w = grid
    idx = torch.randint(0, mpix, (k,), device=g1.device)
    rows = (g1[:, :, idx].transpose(1, 2) @ g2).softmax(-1)  # (B, K, M)
    maps = F.interpolate(rows.view(b * k, 1, h, w), size=mask_c.shape[-2:], mode="bilinear", align_corners=True)
    maps = maps.view(b, k, -1)
    lo, hi = maps.amin(-1, keepdim=True), maps.amax(-1, keepdim=True)
    regions = (maps - lo) / (hi - lo).clamp_min(1e-12) > 0.5  # (B, K, HW)
    allowed = (~box & (ign_c != IGNORE_INDEX)).flatten(1).unsqueeze(1)
    regions &= allowed
    conf = keep_c.flatten(1).unsqueeze(1)
    seg = regions & conf
    n_seg, n_ori = seg.sum(-1).float(), regions.sum(-1).float()
    onehot = F.one_hot(mask_c.flatten(1), num_classes).float()  # (B, HW, C)
    counts = seg.float() @ onehot  # (B, K, C)
    top_n, top_cls = counts.max(-1)
    accept = (n_seg > 0) & (n_seg / n_ori.clamp_min(1) >= tau) & (top_n / n_seg.clamp_min(1) > tau)
    hit = regions & accept.unsqueeze(-1)  # (B, K, HW)
    order = torch.arange(1, k + 1, device=hit.device).view(1, k, 1)
    last = (hit * order).amax(1)  # (B, HW): 1-based index of the last accepted region covering a pixel
    covered = last > 0
    new_cls = torch.gather(top_cls, 1, (last - 1).clamp_min(0))
    flat = mask_c.flatten(1)
    mask_new = torch.where(covered, new_cls, flat).view_as(mask_c)
    keep_new = (keep_c.flatten(1) | covered).view_as(keep_c)
    return mask_new, keep_new
