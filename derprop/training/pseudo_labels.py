"""Pseudo-labels of the unlabeled images: the eq. 5 blend, the confidence threshold, CorrMatch's region propagation.

Explained in the book chapters *Pseudo-label rectification, interactively* and *Paper vs released code*.

For a CutMixed batch the pseudo-label of a pixel inside the box is the
partner's, outside it the weak view's own (steps 4 and 5 of
:mod:`derprop.training.trainer`):

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
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

from derprop.data.labels import IGNORE_INDEX
from derprop.method.propagation import official_similarity_factors, propagate
from derprop.training.config import MethodConfig
from derprop.training.distributed import all_reduce
from derprop.training.model import SegOutput


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
    def update(self, probs: Tensor, ignore: Tensor) -> None:
        if self.kind != "ema":
            return
        conf, pred = probs.float().max(dim=1)
        c = probs.shape[1]
        valid = ignore != IGNORE_INDEX
        best = torch.full((c,), -1.0, device=probs.device)
        if bool(valid.any()):
            best.scatter_reduce_(0, pred[valid], conf[valid], reduce="amax", include_self=True)
        best = all_reduce(best, "max")
        present = best >= 0
        if bool(present.any()):
            self.value = self.momentum * self.value + (1 - self.momentum) * float(best[present].mean())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def similarity_features(out: SegOutput, temperature: float) -> tuple[Tensor, Tensor | None]:
    """``f1, f2`` flattened to ``(B, D, M)``, ``f1`` divided by the temperature (``method.dlp_temperature``): in
    the softmax form the similarity becomes ``s/T`` (Δ is linear). ``f2`` is None only for symmetric features at
    T = 1; at T ≠ 1 symmetric features give the undivided ``f1``."""
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


def dlp_options(m: MethodConfig) -> dict[str, Any]:
    """The settings of :func:`propagated_logits` that a config's ``method`` section gives, read in one place."""
    return dict(temperature=m.dlp_temperature, form=m.dlp_form, op=m.op, chunk=m.chunk,
                paper_norm=m.paper_dlp_norm, upsample=m.dlp_upsample)


def upsample_propagated(lt: Tensor, logits_grid: Tensor, logits: Tensor, upsample: str) -> Tensor:
    """``L̃`` ``(B, C, h, w)`` on the feature grid brought to the size of ``logits`` ``(B, C, H, W)``
    (``method.dlp_upsample``; chapter *Where DLP can help*).

    ``bilinear`` (paper and release): ``up(L̃)``, which replaces every pixel by an interpolation of grid
    points and so loses whatever the full-resolution ``L`` resolves between them (boundaries inside a cell).
    ``detail`` (this project's): ``L + up(L̃ − L_grid)``, only what propagation changed is upsampled; where
    ``W`` is the identity it gives back ``L`` exactly.
    """
    if upsample == "bilinear":
        return F.interpolate(lt.float(), size=logits.shape[-2:], mode="bilinear", align_corners=True)
    if upsample == "detail":
        change = F.interpolate(lt.float() - logits_grid.float(), size=logits.shape[-2:], mode="bilinear",
                               align_corners=True)
        return logits.float() + change
    raise ValueError(f"upsample must be 'bilinear' or 'detail', got {upsample!r}")


def propagated_logits(out: SegOutput, size: tuple[int, int], *, temperature: float, form: str, op: str,
                      chunk: int | None, paper_norm: str, upsample: str = "bilinear") -> Tensor:
    """``L̃`` (eq. 4) at the feature grid, brought to ``size`` by :func:`upsample_propagated` (the settings:
    :func:`dlp_options`); ``size`` is that of ``out.logits``."""
    with record_function("derprop.dlp"):  # the profiler's name for DLP (benchmarks.train_step splits a step by it)
        b, c, h, w = out.logits_grid.shape
        if tuple(out.logits.shape[-2:]) != tuple(size):
            raise ValueError(f"L̃ is brought to the logits' size {tuple(out.logits.shape[-2:])}, asked for {tuple(size)}")
        f1, f2 = similarity_features(out, temperature)
        lt = propagate(out.logits_grid.flatten(2), f1, f2, form=form, op=op, chunk=chunk, paper_norm=paper_norm)
        return upsample_propagated(lt.view(b, c, h, w), out.logits_grid, out.logits, upsample)


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
                         threshold: Threshold, *, consistent_targets: bool,
                         features: tuple[Tensor, Tensor, tuple[int, int]] | None, samples: int,
                         op: str) -> PseudoLabels:
    """Pseudo-labels of the CutMixed strong view from the weak view's ``p_w`` and the partner's ``p_mix``.

    Updates ``threshold`` first, from the weak view's confidences. Where they count follows
    ``consistent_targets``: off (the release, whose ``thresh_update`` gets ``ignore_mask_cutmixed1``), over the
    CutMixed ignore mask; on (paper profile), over the weak view's own.
    ``consistent_targets`` (``method.cutmix_consistent_targets``): the soft targets are cut like the images.
    ``features``: :func:`weak_features` of the weak view, for region propagation (``method.region_propagation``)
    from ``samples`` rows (``method.region_samples``) with the derivative ``op``; None: no region propagation.
    """
    conf_mix, mask_mix = p_mix.max(1)
    conf_w, mask_w = p_w.max(1)
    mask_c = torch.where(box, mask_mix, mask_w)
    conf_c = torch.where(box, conf_mix, conf_w)
    ign_c = torch.where(box, ign_mix, ign)
    target = torch.where(box.unsqueeze(1), p_mix, p_w) if consistent_targets else p_w
    threshold.update(p_w, ign if consistent_targets else ign_c)
    tau = threshold.value
    keep_c = (conf_c >= tau) & (ign_c != IGNORE_INDEX)
    keep_w = (conf_w >= tau) & (ign != IGNORE_INDEX)
    keep_cu = keep_c
    if features is not None:
        f1, f2, grid = features
        rows = torch.randint(0, f1.shape[-1], (samples,), device=f1.device)
        with record_function("derprop.region_propagation"):
            mask_c, keep_cu = region_propagation(f1, f2, grid, rows, mask_c, keep_c, box, ign_c, tau, op,
                                                 p_w.shape[1])
    return PseudoLabels(target, mask_c, keep_c, keep_cu, ign_c != IGNORE_INDEX, mask_w, keep_w, ign != IGNORE_INDEX, tau)


REGION_BLOCK_PIXELS = 1 << 22
"""Crop pixels × sampled rows per block of region maps (16 MiB of float32 maps): region propagation never holds
more, so at crop 801 a block is 6 rows and at crop 321 40."""

REGION_WEIGHT_MAX = 255
"""At most this many rows per block: a region's position in its block is a ``uint8``."""


@torch.no_grad()
def region_propagation(f1: Tensor, f2: Tensor, grid: tuple[int, int], rows: Tensor, mask_c: Tensor, keep_c: Tensor,
                       box: Tensor, ign_c: Tensor, tau: float, op: str, num_classes: int) -> tuple[Tensor, Tensor]:
    """CorrMatch's region-level label propagation (the release keeps it), in ``O(K·M)`` memory.

    ``f1, f2``: ``(B, D, M)`` features of the unlabeled weak view on the ``grid = (h, w)``;
    ``rows``: ``K`` grid pixels (:func:`cutmix_pseudo_labels` draws ``method.region_samples``). The
    row of the similarity softmax ``A`` (release form, eq. 4 with the
    derivative term) of each is upsampled to the crop, min-max normalised and
    thresholded at 0.5: a region. Regions are restricted to valid pixels
    outside the CutMix box. A region whose confident fraction is ≥ τ and
    whose confident pixels agree on one class for more than τ of them gets
    that class everywhere, and all its pixels count as confident.

    Difference from the release: the class counts of every region are
    taken from the pseudo-label before any region is applied (the release
    updates the label map region by region, so later regions see earlier
    ones); where accepted regions overlap the last one wins, as there. The
    release also never draws the last grid pixel (``randint(0, M − 1)``).

    Computed per image and per block of sampled rows (:data:`REGION_BLOCK_PIXELS`), so nothing of size
    ``K × crop`` exists. The allowed pixels of an image are sorted once by their class (confident ones;
    then the unconfident, then the rest), so each region's class counts are sums over contiguous slices.
    """
    g1, g2 = official_similarity_factors(f1, f2, op)
    attn = (g1[:, :, rows].transpose(1, 2) @ g2).softmax(-1)  # (B, K, M): the sampled rows of A
    b, k, _ = attn.shape
    h, w = grid
    size = mask_c.shape[-2:]
    pixels = size[0] * size[1]
    block = max(1, min(k, REGION_WEIGHT_MAX, REGION_BLOCK_PIXELS // pixels))
    mask = mask_c.flatten(1).clone()
    keep = keep_c.flatten(1).clone()
    allowed = (~box & (ign_c != IGNORE_INDEX)).flatten(1)
    for i in range(b):
        # bucket c < C: a confident pixel of class c; C: unconfident; C + 1: in the box or ignored (never relabelled)
        bucket = torch.where(allowed[i], torch.where(keep[i], mask[i], num_classes), num_classes + 1)
        ends = torch.bincount(bucket, minlength=num_classes + 2).cumsum(0).tolist()
        picked = torch.argsort(bucket, stable=True)[:ends[num_classes]]
        spans = list(zip([0, *ends[:num_classes]], ends[:num_classes + 1]))
        last = torch.zeros(pixels, dtype=torch.long, device=attn.device)  # 1-based; 0: no accepted region
        top_cls = []
        for start in range(0, k, block):
            maps = F.interpolate(attn[i, start:start + block].view(-1, 1, h, w), size=size, mode="bilinear",
                                 align_corners=True).view(-1, pixels)
            regions = maps >= _half_range_threshold(maps)
            # pixel-major, so that grouping the allowed pixels by bucket copies whole rows
            grouped = regions.t().contiguous().index_select(0, picked)
            counts = torch.stack([grouped[s:e].sum(0) for s, e in spans], -1)  # (block, C + 1)
            n_seg, n_ori = counts[:, :num_classes].sum(-1).float(), counts.sum(-1).float()
            top_n, cls = counts[:, :num_classes].max(-1)
            top_cls.append(cls)
            accept = (n_seg > 0) & (n_seg / n_ori.clamp_min(1) >= tau) & (top_n.float() / n_seg.clamp_min(1) > tau)
            if bool(accept.any()):
                order = (torch.arange(1, accept.numel() + 1, device=attn.device) * accept).to(torch.uint8)
                newest = (regions * order.unsqueeze(1)).amax(0)
                last = torch.where(newest > 0, newest.long() + start, last)
        covered = (last > 0) & allowed[i]
        mask[i] = torch.where(covered, torch.cat(top_cls)[(last - 1).clamp_min(0)], mask[i])
        keep[i] |= covered
    return mask.view_as(mask_c), keep.view_as(keep_c)


def _half_range_threshold(maps: Tensor) -> Tensor:
    """Per row of non-negative ``maps``, the smallest ``t`` with ``(t − lo) / max(hi − lo, 1e-12) > 0.5`` in float32.

    ``(m − lo) / r`` rounded is non-decreasing in ``m``, so ``maps ≥ t`` is bit for bit the thresholded
    min-max normalisation of CorrMatch without its two full-size passes (``+inf`` where no value passes).
    Bisection over the bit patterns, which order non-negative floats as their values; the number of halvings
    that the widest row needs is read once, so the loop does not ask the device after every halving (on a GPU
    each question is a host sync).
    """
    lo, hi = maps.amin(-1, keepdim=True), maps.amax(-1, keepdim=True)  # two passes: aminmax is 10× slower here
    span = (hi - lo).clamp_min(1e-12)

    def passes(t: Tensor) -> Tensor:
        return (t - lo) / span > 0.5

    below, above = lo.view(torch.int32).clone(), hi.view(torch.int32).clone()  # passes(lo) is False
    none = ~passes(hi)
    for _ in range(int((above - below).max()).bit_length()):  # a gap of g needs ⌈log2 g⌉ ≤ bit_length(g) halvings
        mid = below + (above - below) // 2
        up = passes(mid.view(torch.float32))
        above = torch.where(up, mid, above)
        below = torch.where(up, below, mid)
    return above.view(torch.float32).masked_fill(none, float("inf"))
