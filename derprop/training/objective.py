"""The training objective, eq. 7/8, as pure functions of the network outputs and the pseudo-labels.

Explained in the book chapters *Training on a CPU* and *Paper vs released code*.

With ``B`` labeled images and the CutMixed unlabeled batch (for the release: the ``loss`` of
``main()`` in its ``main.py``)::

    L = scale · [ λCE·(CE_x + CE_x̃) + λCE/2·(CE_u + CE_ũ) + λKL·KL + λFP·CE_fp
                  + λDer·(L_Der,x + L_Der,u) ]

``CE_ũ`` is the strong view's propagated CE, averaged with the weak view's
(release, ``weak_propagated_ce``). Paper: λ = 0.5/0.25/0.5, η = 0.5, scale 1.
Release: λDer = 0.25 with η = 1 (its ``0.5·(S+ΔS)/2 + 0.25·sparsity``) and
scale 1/2. A term that a config switches off is absent from the dict, and so
from the sum (:func:`weighted_sum`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from derprop.data.labels import IGNORE_INDEX
from derprop.method.losses import derivative_loss
from derprop.training.config import LossConfig, MethodConfig
from derprop.training.model import SegOutput
from derprop.training.pseudo_labels import PseudoLabels


def ohem_ce(logits: Tensor, target: Tensor, thresh: float, min_kept: int) -> Tensor:
    """Online hard example mining CE: keep pixels whose true-class probability ≤ max(thresh, k-th smallest)."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none").flatten()
    valid = target.flatten() != IGNORE_INDEX
    if not bool(valid.any()):
        return ce.sum() * 0.0
    with torch.no_grad():
        prob = torch.exp(-ce.detach())
        p = prob[valid]
        k = min(min_kept, p.numel())
        cut = max(thresh, float(p.kthvalue(k).values)) if k > 0 else thresh
        keep = valid & (prob <= cut)
    return ce[keep].mean()


def masked_mean(per_pixel: Tensor, keep: Tensor, denom: Tensor) -> Tensor:
    """``Σ per_pixel·keep / Σ denom`` (the release divides by all non-ignored pixels, not the kept ones)."""
    return (per_pixel * keep).sum() / denom.sum().clamp_min(1)


def labeled_ce(lc: LossConfig) -> Callable[[Tensor, Tensor], Tensor]:
    """The labeled CE: plain, or OHEM (``loss.ohem``, the release's Cityscapes setting)."""
    if lc.ohem:
        return lambda logits, target: ohem_ce(logits, target, lc.ohem_thresh, lc.ohem_min_kept)
    return lambda logits, target: F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def label_on_grid(label: Tensor, size: tuple[int, int], how: str) -> Tensor:
    """Class indices ``(B, H, W)`` sampled on the ``h × w`` feature grid (eq. 8's ``Y``).

    The logits are upsampled from that grid with ``align_corners=True``, so
    grid point ``k`` sits at pixel ``k·(H−1)/(h−1)``. ``nearest`` takes the
    label of the pixel nearest to each grid point; ``bilinear`` (release)
    interpolates class indices there and truncates, which mixes neighbours
    into a wrong class (or a value ≥ C, then ignored) wherever grid points
    fall between pixels. At crops 321, 513 and 801 (stride 8) every grid point
    is a pixel and the two agree exactly.
    """
    if how == "bilinear":
        return F.interpolate(label.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=True)[:, 0].long()
    (h, w), (big_h, big_w) = size, label.shape[-2:]
    rows = torch.linspace(0, big_h - 1, h, device=label.device).round().long()
    cols = torch.linspace(0, big_w - 1, w, device=label.device).round().long()
    return label[:, rows][:, :, cols].long()


def derivative_options(m: MethodConfig, lc: LossConfig) -> dict[str, Any]:
    """The settings of :func:`~derprop.method.losses.derivative_loss` that a config gives, read in one place: what
    :func:`labeled_derivative_term` and :func:`unlabeled_derivative_term` pass on as ``options``."""
    return dict(Q=m.Q, eta=lc.eta, op=m.op, sparsity=m.sparsity, normalize=m.feature_norm, chunk=m.chunk,
                spatial_softmax_sparsity=m.spatial_softmax_sparsity)


def labeled_derivative_term(out: SegOutput, nb: int, y: Tensor, *, label_resize: str, detached: bool,
                            options: dict[str, Any]) -> Tensor:
    """Labeled derivative loss (eq. 8/9, S_GT = YᵀY) of the first ``nb`` images of ``out``.

    ``label_resize``: how the label reaches the feature grid (``method.label_resize``); ``detached``: no gradient
    through the predictions (``method.labeled_der_detached``); ``options``: :func:`derivative_options`.
    """
    c = out.logits.shape[1]
    h, w = out.f1.shape[-2:]
    # labeled target: the label on the feature grid, one-hot; ignore pixels drop out (mask)
    yg = label_on_grid(y, (h, w), label_resize).flatten(1)
    keep = yg < c
    onehot = F.one_hot(yg.clamp(0, c), c + 1)[..., :c].transpose(1, 2).float()
    f1x = out.f1[:nb].flatten(2).float()
    f2x = f1x if out.f2 is out.f1 else out.f2[:nb].flatten(2).float()
    return derivative_loss(f1x, f2x, onehot, onehot, labeled=True, mask=keep, detach_labeled=detached, **options)


def unlabeled_derivative_term(out_w: SegOutput, out_s: SegOutput, out_mix: SegOutput, nb: int, box: Tensor, *,
                              consistent_targets: bool, options: dict[str, Any]) -> Tensor:
    """Unlabeled derivative loss (eq. 8/9): the weak view's features are the target of the CutMixed strong view's.

    With ``consistent_targets`` (``method.cutmix_consistent_targets``) the partner's features are the target
    inside the box; ``options``: :func:`derivative_options`.
    """
    h, w = out_w.f1.shape[-2:]
    one_head = out_w.f2 is out_w.f1
    t1 = out_w.f1[nb:].detach().float()
    t2 = t1 if one_head else out_w.f2[nb:].detach().float()
    if consistent_targets:
        boxg = F.interpolate(box.unsqueeze(1).float(), size=(h, w), mode="nearest").bool()
        t1 = torch.where(boxg, out_mix.f1.float(), t1)
        t2 = t1 if one_head else torch.where(boxg, out_mix.f2.float(), t2)
    f1s = out_s.f1.flatten(2).float()
    f2s = f1s if one_head else out_s.f2.flatten(2).float()
    t1f = t1.flatten(2)
    t2f = t1f if one_head else t2.flatten(2)
    return derivative_loss(f1s, f2s, t1f, t2f, labeled=False, **options)


def unlabeled_terms(pred_us: Tensor, prop_s: Tensor | None, prop_uw: Tensor | None, logits_fp: Tensor | None,
                    pl: PseudoLabels, *, soft: bool, weak_propagated: bool) -> dict[str, Tensor]:
    """``CE_u``, ``CE_ũ``, ``KL`` and ``CE_fp`` of eq. 7 (the release's terms where its switches are on).

    ``pred_us``: logits of the CutMixed strong view; ``prop_s``/``prop_uw``: ``L̃`` of the strong and the
    weak view (None without DLP); ``logits_fp``: the feature-perturbation branch of the weak view.
    ``soft``: soft targets for ``CE_u`` (``method.unlabeled_ce``); ``weak_propagated``: ``CE_ũ`` on the weak
    view too (``method.weak_propagated_ce``).
    """
    terms: dict[str, Tensor] = {}
    log_s = F.log_softmax(pred_us, dim=1)
    if soft:
        ce_u = -(pl.target * log_s).sum(1)
    else:
        ce_u = F.nll_loss(log_s, pl.mask_c, reduction="none")
    terms["ce_u"] = masked_mean(ce_u, pl.keep_cu, pl.valid_c)
    if prop_s is not None:
        ce_us_prop = masked_mean(F.cross_entropy(prop_s, pl.mask_c, reduction="none"), pl.keep_cu, pl.valid_c)
        if weak_propagated:
            ce_uw_prop = masked_mean(F.cross_entropy(prop_uw, pl.mask_w, reduction="none"), pl.keep_w, pl.valid_w)
            terms["ce_u_prop"] = 0.5 * (ce_us_prop + ce_uw_prop)
        else:
            terms["ce_u_prop"] = ce_us_prop
    kl = (pl.target * (torch.log(pl.target.clamp_min(1e-8)) - log_s)).sum(1)
    terms["kl"] = masked_mean(kl, pl.keep_c, pl.valid_c)
    if logits_fp is not None:
        terms["ce_fp"] = masked_mean(F.cross_entropy(logits_fp, pl.mask_w, reduction="none"), pl.keep_w, pl.valid_w)
    return terms


def weighted_sum(terms: dict[str, Tensor], lc: LossConfig) -> Tensor:
    """Eq. 7 (with the release's extra terms and scale): the weighted sum of the ``terms`` present."""
    total = lc.lambda_ce * (terms["ce_x"] + terms.get("ce_x_prop", 0.0))
    if "ce_u" in terms:
        total = total + lc.lambda_ce / 2 * (terms["ce_u"] + terms.get("ce_u_prop", 0.0))
        total = total + lc.lambda_kl * terms["kl"]
    if "ce_fp" in terms:
        total = total + lc.lambda_fp * terms["ce_fp"]
    if "der_x" in terms:
        total = total + lc.lambda_der * (terms["der_x"] + terms.get("der_u", 0.0))
    return lc.scale * total
