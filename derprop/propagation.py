"""Derivative label propagation (DLP): rectify logits with feature similarities.

Explained in the book chapter *Derivative label propagation* (``book/propagation.md``).

Shapes: logits ``L`` are ``(B, C, M)``, features ``f1, f2`` are ``(B, D, M)``;
``M`` pixels on the feature grid, ``C`` classes, ``D`` channels.

Two forms:

``mode="paper"`` (eq. 4)
    ``L̃ = L (S + Δ¹S)`` with ``S = V1ᵀV2`` and ``Δ¹S = (ΔV1)ᵀ(ΔV2)`` of
    L1-normalised features, literal and unscaled. It is evaluated as
    ``(L V1ᵀ) V2 + (L ΔV1ᵀ) ΔV2``: ``O(M·D·C)`` work, no ``M × M`` matrix.
    Being linear in ``L``, its magnitude grows with ``M``.

``mode="official"`` (what the released code does, SPEC §2)
    ``s_ij = f1_iᵀ f2_j / √D + Δf1_iᵀ Δf2_j / √D₁``, ``A = softmax_j(s)``,
    ``L̃_j = Σ_i sg(L)_i A_ij``. The softmax normalises over ``j`` but the sum
    runs over ``i``: the transpose of ordinary attention. Rows of ``A`` are
    independent, so ``chunk=k`` computes ``A`` ``k`` rows at a time, forward
    and backward, in ``O(k·M)`` memory with the same result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from derprop.derivatives import derivative
from derprop.features import normalize_features

MODES = ("official", "paper")


def _check_shapes(logits: Tensor, f1: Tensor, f2: Tensor) -> None:
    if logits.dim() != 3 or f1.dim() != 3 or f2.dim() != 3:
        raise ValueError(
            "propagate expects logits (B, C, M) and features (B, D, M); got shapes "
            f"{tuple(logits.shape)}, {tuple(f1.shape)}, {tuple(f2.shape)}"
        )
    if f1.shape != f2.shape:
        raise ValueError(f"f1 and f2 must have the same shape, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    if logits.shape[0] != f1.shape[0] or logits.shape[2] != f1.shape[2]:
        raise ValueError(
            "logits and features must agree on batch B and pixels M: logits "
            f"{tuple(logits.shape)} vs features {tuple(f1.shape)}"
        )


def propagate(
    logits: Tensor,
    f1: Tensor,
    f2: Tensor | None = None,
    *,
    mode: str = "official",
    op: str = "forward",
    chunk: int | None = None,
) -> Tensor:
    """Propagate logits along pixel similarities of features and their derivatives (eq. 4).

    Args:
        logits: ``L``, shape ``(B, C, M)``.
        f1: ``V1`` (paper) or ``f1`` (release), shape ``(B, D, M)``.
        f2: ``V2`` or ``f2``; ``None`` means ``f1`` (a symmetric similarity).
        mode: ``"paper"`` (eq. 4, factorised) or ``"official"`` (row softmax).
        op: derivative operator used for ``Δ`` (eq. 2, 10, 11 or 12).
        chunk: official mode only: rows of the ``M × M`` matrix per tile;
            ``None`` materialises it whole.

    Returns:
        ``L̃``, shape ``(B, C, M)``. In official mode ``L`` is detached and
        gradients reach ``f1`` and ``f2`` only, as in the release.
    """
    f2 = f1 if f2 is None else f2
    _check_shapes(logits, f1, f2)
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows or None, got {chunk}")
    if mode == "paper":
        return _propagate_paper(logits, f1, f2, op)
    if mode == "official":
        return _propagate_official(logits, f1, f2, op, chunk)
    raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


def _propagate_paper(logits: Tensor, f1: Tensor, f2: Tensor, op: str) -> Tensor:
    v1 = normalize_features(f1, "l1")
    v2 = v1 if f2 is f1 else normalize_features(f2, "l1")
    dv1 = derivative(v1, 1, op)
    dv2 = dv1 if v2 is v1 else derivative(v2, 1, op)
    return (logits @ v1.transpose(1, 2)) @ v2 + (logits @ dv1.transpose(1, 2)) @ dv2


def official_similarity_factors(f1: Tensor, f2: Tensor, op: str = "forward") -> tuple[Tensor, Tensor]:
    """Factors ``g1, g2`` with ``s = g1ᵀ g2`` for the release's scaled similarity.

    ``g1 = [f1/√D ; Δf1/√D₁]`` and ``g2 = [f2 ; Δf2]`` stacked along channels, so
    ``g1_iᵀ g2_j = f1_iᵀ f2_j/√D + Δf1_iᵀ Δf2_j/√D₁``.
    """
    d1f1 = derivative(f1, 1, op)
    d1f2 = derivative(f2, 1, op)
    g1 = torch.cat([f1 / math.sqrt(f1.shape[1]), d1f1 / math.sqrt(d1f1.shape[1])], dim=1)
    g2 = torch.cat([f2, d1f2], dim=1)
    return g1, g2


def _propagate_official(logits: Tensor, f1: Tensor, f2: Tensor, op: str, chunk: int | None) -> Tensor:
    g1, g2 = official_similarity_factors(f1, f2, op)
    labels = logits.detach()
    if chunk is None or chunk >= g1.shape[2]:
        attn = (g1.transpose(1, 2) @ g2).softmax(dim=-1)
        return labels @ attn
    # One dtype inside the custom Function (autocast is off there): under AMP the
    # features may be half precision while the detached logits are float32.
    dtype = torch.promote_types(labels.dtype, g1.dtype)
    return _TiledRowSoftmaxPropagation.apply(labels.to(dtype), g1.to(dtype), g2.to(dtype), chunk)


class _TiledRowSoftmaxPropagation(torch.autograd.Function):
    """``L @ softmax_rows(g1ᵀ g2)`` computed ``chunk`` rows at a time.

    Forward keeps only the row log-sum-exps; backward recomputes each tile of
    ``A`` from them instead of storing it, so memory stays ``O(chunk · M)``. ``L`` receives no gradient (it is detached by the
    caller, as in the release).
    """

    @staticmethod
    def forward(ctx, labels: Tensor, g1: Tensor, g2: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        ctx.chunk = chunk
        out = labels.new_zeros(labels.shape)
        lse = labels.new_empty(g1.shape[0], g1.shape[2], 1)
        g1t = g1.transpose(1, 2)
        with torch.autocast(g1.device.type, enabled=False):
            for start in range(0, g1.shape[2], chunk):
                rows = slice(start, start + chunk)
                scores = g1t[:, rows] @ g2
                lse[:, rows] = scores.logsumexp(dim=-1, keepdim=True)
                out.baddbmm_(labels[:, :, rows], scores.sub_(lse[:, rows]).exp_())
        ctx.save_for_backward(labels, g1, g2, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        labels, g1, g2, lse = ctx.saved_tensors
        grad_g1 = torch.empty_like(g1)
        grad_g2 = torch.zeros_like(g2)
        g1t = g1.transpose(1, 2)
        for start in range(0, g1.shape[2], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            attn = (g1t[:, rows] @ g2).sub_(lse[:, rows]).exp_()
            grad_attn = labels[:, :, rows].transpose(1, 2) @ grad_out
            grad_s = attn * (grad_attn - (grad_attn * attn).sum(dim=-1, keepdim=True))
            grad_g1[:, :, rows] = g2 @ grad_s.transpose(1, 2)
            grad_g2.baddbmm_(g1[:, :, rows], grad_s)
        return None, grad_g1, grad_g2, None


def propagation_weights(f1: Tensor, f2: Tensor | None = None, *, mode: str = "official",
                        op: str = "forward") -> Tensor:
    """The ``M × M`` matrix ``W`` with ``L̃ = L·W`` (eq. 1, 4): ``W_ij`` is what pixel ``j`` takes from pixel ``i``.

    ``official``: ``W = A = softmax_j(s)``; ``paper``: ``W = S + Δ¹S``. For diagnostics and figures
    (chapter *Pseudo-label rectification*), where a small image's whole matrix fits; training never builds it.
    Shape ``(B, M, M)``.
    """
    f2 = f1 if f2 is None else f2
    if mode == "official":
        g1, g2 = official_similarity_factors(f1, f2, op)
        return (g1.transpose(1, 2) @ g2).softmax(dim=-1)
    if mode == "paper":
        v1 = normalize_features(f1, "l1")
        v2 = v1 if f2 is f1 else normalize_features(f2, "l1")
        dv1, dv2 = derivative(v1, 1, op), derivative(v2, 1, op)
        return v1.transpose(1, 2) @ v2 + dv1.transpose(1, 2) @ dv2
    raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


def attention_shares(weights: Tensor, labels: Tensor, *, background: int | None = 0,
                     ignore_index: int = 255) -> tuple[Tensor, Tensor, Tensor]:
    """How class-aware the propagation weights are, per receiving pixel (chapter *Pseudo-label rectification*).

    ``weights`` ``(B, M, M)`` with ``L̃ = L·W``, ``labels`` ``(B, M)`` the true classes on the feature grid.
    Pixel ``j`` takes the normalised weights ``p_ij = |W_ij| / Σ_i |W_ij|`` (over labeled ``i``). Returns,
    for every labeled ``j`` whose class is not ``background``, three flat tensors: the **own-class share**
    ``Σ_{i: y_i = y_j} p_ij``, the share that uniform weights would give (the class's fraction of the
    image) and the **effective support** ``1 / Σ_i p_ij²`` (``M`` for uniform weights, 1 for a single pixel).
    """
    valid = labels != ignore_index
    p = weights.abs() * valid.unsqueeze(-1).to(weights.dtype)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-30)
    same = (labels.unsqueeze(-1) == labels.unsqueeze(1)) & valid.unsqueeze(-1)  # [b, i, j]: y_i = y_j
    own = (p * same).sum(1)
    uniform = same.sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
    support = 1.0 / (p * p).sum(1).clamp_min(1e-30)
    pick = valid & (labels != background) if background is not None else valid
    return own[pick], uniform[pick], support[pick]
