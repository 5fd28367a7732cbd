"""Derivative losses: L1 distances between similarity matrices of every order.

Explained in the book chapters *Derivative label propagation* and *Theorems 1
and 2, checked*; the release's variant in *Paper vs released code*.

Every similarity matrix here is a product of two factors, ``S = x1ᵀ x2`` with
``x1, x2`` of shape ``(B, D, M)``. Targets are passed as factors too: a
labeled target ``S_GT = YᵀY`` has the one-hot ``Y`` as both factors, an
unlabeled target is the weak view's ``VᵀV``. :func:`similarity_l1` can then
work on ``k`` rows of ``x1ᵀx2 − y1ᵀy2`` at a time and never hold the
``M × M`` difference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from derprop.method.derivatives import derivative
from derprop.method.features import NORMALIZATIONS, normalize_features

REDUCTIONS = ("mean", "sum")


def _check_factors(x1: Tensor, x2: Tensor, y1: Tensor, y2: Tensor) -> None:
    for name, t in (("x1", x1), ("x2", x2), ("y1", y1), ("y2", y2)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (B, D, M), got {tuple(t.shape)}")
    if x1.shape != x2.shape:
        raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    if y1.shape != y2.shape:
        raise ValueError(f"y1 and y2 must have the same shape, got {tuple(y1.shape)} and {tuple(y2.shape)}")
    if (x1.shape[0], x1.shape[2]) != (y1.shape[0], y1.shape[2]):
        raise ValueError(
            "prediction and target factors must agree on batch B and pixels M: "
            f"{tuple(x1.shape)} vs {tuple(y1.shape)}"
        )


def similarity_l1(
    x1: Tensor,
    x2: Tensor,
    y1: Tensor,
    y2: Tensor,
    *,
    reduction: str = "mean",
    chunk: int | None = None,
) -> Tensor:
    """``Σ_ij |x1_iᵀ x2_j − y1_iᵀ y2_j|`` over the batch (the terms of eq. 3 and 9).

    Args:
        x1, x2: prediction factors ``(B, D, M)``.
        y1, y2: target factors ``(B, D', M)``; ``D'`` may differ from ``D``.
        reduction: ``"sum"``, or ``"mean"`` over the ``B·M²`` entries.
        chunk: rows per tile; ``None`` materialises the ``M × M`` matrices.
            With a chunk the exact gradient ``x2 sign(E)ᵀ`` / ``x1 sign(E)``,
            ``E = x1ᵀx2 − y1ᵀy2``, is computed tile by tile (chapter
            *Derivative label propagation* measures its memory).
    """
    _check_factors(x1, x2, y1, y2)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows or None, got {chunk}")
    batch, _, pixels = x1.shape
    # float32 at least, autocast off: |x1ᵀx2 − y1ᵀy2| cancels two similar numbers.
    dtype = torch.promote_types(torch.promote_types(x1.dtype, y1.dtype), torch.float32)
    x1, x2, y1, y2 = (t.to(dtype) for t in (x1, x2, y1, y2))
    with torch.autocast(x1.device.type, enabled=False):
        if chunk is None or chunk >= pixels:
            total = (x1.transpose(1, 2) @ x2 - y1.transpose(1, 2) @ y2).abs().sum()
        else:
            total = _TiledSimilarityL1.apply(x1, x2, y1, y2, chunk)
    return total / (batch * pixels * pixels) if reduction == "mean" else total


def _tile_error(x1t: Tensor, x2: Tensor, y1t: Tensor, y2: Tensor, rows: slice) -> Tensor:
    """Rows ``rows`` of ``E = x1ᵀx2 − y1ᵀy2``, with one fused multiply-add."""
    return torch.baddbmm(y1t[:, rows] @ y2, x1t[:, rows], x2, beta=-1)


class _TiledSimilarityL1(torch.autograd.Function):
    """Sum of ``|x1ᵀx2 − y1ᵀy2|`` over ``chunk``-row tiles, with a tiled exact backward."""

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, y1: Tensor, y2: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x1, x2, y1, y2)
        ctx.chunk = chunk
        total = x1.new_zeros(())
        x1t, y1t = x1.transpose(1, 2), y1.transpose(1, 2)
        for start in range(0, x1.shape[2], chunk):
            rows = slice(start, start + chunk)
            total += _tile_error(x1t, x2, y1t, y2, rows).abs().sum()
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):  # type: ignore[override]
        x1, x2, y1, y2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = [torch.zeros_like(t) if need[k] else None for k, t in enumerate((x1, x2, y1, y2))]
        x1t, y1t = x1.transpose(1, 2), y1.transpose(1, 2)
        with torch.autocast(x1.device.type, enabled=False):
            for start in range(0, x1.shape[2], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                sign = _tile_error(x1t, x2, y1t, y2, rows).sign() * grad_total
                if need[0]:
                    grads[0][:, :, rows] = x2 @ sign.transpose(1, 2)
                if need[1]:
                    grads[1].baddbmm_(x1[:, :, rows], sign)
                if need[2]:
                    grads[2][:, :, rows] = -(y2 @ sign.transpose(1, 2))
                if need[3]:
                    grads[3].baddbmm_(y1[:, :, rows], sign, alpha=-1)
        return (*grads, None)


def _order_factor(f: Tensor, q: int, op: str, normalize: str) -> Tensor:
    """The factor of the order-``q`` similarity ``Δ^q S``, before the ``1/√dim`` scale.

    ``"l1"``/``"none"`` (paper): normalise ``v``, then differentiate. ``"softmax"``
    (release): differentiate the raw features, then take the channel softmax
    (the release's ``model/semseg/segmentation.py``, ``Corr.forward``), so every
    order's factors are distributions over channels.
    """
    if normalize == "softmax":
        return derivative(f, q, op).softmax(dim=1)
    return derivative(normalize_features(f, normalize), q, op)


def _scale(dim: int, normalize: str) -> float:
    """The release divides every similarity by ``√dim`` of its factors."""
    return 1.0 / math.sqrt(dim) if normalize == "softmax" else 1.0


def derivative_loss(
    f1: Tensor,
    f2: Tensor,
    t1: Tensor,
    t2: Tensor,
    *,
    Q: int = 1,
    eta: float = 0.5,
    op: str = "forward",
    sparsity: bool = True,
    labeled: bool = False,
    normalize: str = "l1",
    detach_labeled: bool = False,
    spatial_softmax_sparsity: bool = False,
    mask: Tensor | None = None,
    chunk: int | None = None,
) -> Tensor:
    """General derivative loss ``L_Q`` of eq. 9 for one batch (eq. 3 and 8 are ``Q = 1``).

    ``Σ_{q=0..Q} mean|S_q − T_q| + η · mean|Δ^{Q+1} V|`` where ``S_q`` is the
    order-``q`` similarity of the predicted features:

    * ``normalize="l1"`` (paper) or ``"none"``: ``S_q = (Δ^q V1)ᵀ(Δ^q V2)`` of
      the normalised features ``V = f/‖f‖₁``;
    * ``normalize="softmax"`` (release, ``Corr.forward``): ``S_q = σ(Δ^q f1)ᵀ σ(Δ^q f2) / √D_q``,
      ``σ`` the channel softmax of the *differentiated raw* features, ``D_q``
      their length. The sparsity term is then ``mean|Δ^{Q+1} f|`` of the raw
      features (the softmax of a derivative has a constant L1 norm).

    Args:
        f1, f2: predicted features ``(B, D, M)``; pass the same tensor twice
            for a symmetric ``S = VᵀV``.
        t1, t2: target factors ``(B, D', M)``. ``labeled=True``: one-hot ``Y``
            (both factors), and ``T_q = YᵀY`` for every ``q`` as eq. 9 writes it
            (``YᵀY/√D'`` under ``"softmax"``). ``labeled=False``: weak-view
            features (detach them first), and ``T_q`` is their ``S_q``.
        Q: highest derivative order supervised.
        eta: weight ``η`` of the sparsity term.
        op: derivative operator (eq. 2, 10, 11 or 12).
        sparsity: add ``η ‖Δ^{Q+1} V‖₁`` (averaged over ``f1`` and ``f2`` when
            they differ).
        normalize: ``"l1"`` (paper), ``"softmax"`` (release) or ``"none"``.
        detach_labeled: the release detaches the labeled prediction
            similarities, so the labeled terms give no gradient.
        spatial_softmax_sparsity: the release takes the sparsity term's
            softmax over pixels; its mean is the constant ``1/M`` (no gradient).
        mask: optional ``(B, M)`` booleans; pixels outside it (ignored labels)
            drop out of every similarity, and each term is the mean over the
            remaining ``Σ_b n_b²`` pairs.
        chunk: rows per tile for :func:`similarity_l1`.
    """
    if Q < 0:
        raise ValueError(f"Q must be >= 0, got {Q}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}")
    keep = None if mask is None else mask.unsqueeze(1).to(f1.dtype)
    pairs = f1.shape[0] * f1.shape[2] ** 2 if keep is None else keep.sum((1, 2)).square().sum().clamp_min(1)

    def factors(a: Tensor, b: Tensor, q: int) -> tuple[Tensor, Tensor]:
        fa = _order_factor(a, q, op, normalize)
        if keep is not None:
            fa = fa * keep
        if b is a:
            return fa, fa
        fb = _order_factor(b, q, op, normalize)
        return fa, (fb if keep is None else fb * keep)

    if labeled:
        y1, y2 = (t1, t2) if keep is None else (t1 * keep, t2 * keep)
    total = f1.new_zeros(())
    for q in range(Q + 1):
        p1, p2 = factors(f1, f2, q)
        if labeled and detach_labeled:
            p1, p2 = p1.detach(), p2.detach()
        if not labeled:
            y1, y2 = factors(t1, t2, q)
        diff = similarity_l1(p1 * _scale(p1.shape[1], normalize), p2, y1 * _scale(y1.shape[1], normalize), y2,
                             reduction="sum", chunk=chunk)
        total = total + diff / pairs
    if sparsity:
        total = total + eta * _sparsity(f1, f2, Q + 1, op, normalize, spatial_softmax_sparsity)
    return total


def _sparsity(f1: Tensor, f2: Tensor, order: int, op: str, normalize: str, spatial_softmax: bool) -> Tensor:
    """``mean|Δ^order V|`` (eq. 9's last term), averaged over the two heads."""
    heads = (f1,) if f2 is f1 else (f1, f2)
    terms = []
    for f in heads:
        dv = derivative(f if normalize == "softmax" else normalize_features(f, normalize), order, op)
        if spatial_softmax:
            dv = dv.softmax(dim=-1)
        terms.append(dv.abs().mean())
    return torch.stack(terms).mean()
