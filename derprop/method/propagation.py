"""Derivative label propagation (DLP): rectify logits with feature similarities.

Explained in the book chapter *Derivative label propagation* (``book/propagation.md``).

Shapes: logits ``L`` are ``(B, C, M)``, features ``f1, f2`` are ``(B, D, M)``;
``M`` pixels on the feature grid, ``C`` classes, ``D`` channels.

Two forms:

``form="linear"`` (eq. 4)
    ``L̃ = L (S + Δ¹S)`` with ``S = V1ᵀV2`` and ``Δ¹S = (ΔV1)ᵀ(ΔV2)`` of
    L1-normalised features. The derivative is linear, ``ΔV = K V``, so
    ``S + Δ¹S = V1ᵀ (I + KᵀK) V2`` and eq. 4 is evaluated as
    ``((L V1ᵀ)(I + KᵀK)) V2``: ``O(M·D·C)`` work, no ``M × M`` matrix and no
    derivative copies of the features. Literal (``paper_norm="none"``)
    it sums over all ``M`` pixels, so its magnitude grows with ``M`` and
    ``softmax(L̃)`` saturates; ``paper_norm`` names the normalisation that
    makes it trainable (:data:`PAPER_NORMS`).

``form="softmax"`` (what the released code does: the release's ``model/semseg/segmentation.py``, ``Corr.forward``)
    ``s_ij = f1_iᵀ f2_j / √D + Δf1_iᵀ Δf2_j / √D₁ = f1_iᵀ G f2_j`` with
    ``G = I/√D + KᵀK/√D₁``, ``A = softmax_j(s)``,
    ``L̃_j = Σ_i sg(L)_i A_ij``. The softmax normalises over ``j`` but the sum
    runs over ``i``: the transpose of ordinary attention. Rows of ``A`` are
    independent, so ``chunk=k`` computes ``A`` ``k`` rows at a time, forward
    and backward, in ``O(k·M)`` memory with the same result.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from derprop.method.derivatives import derivative, derivative_matrix
from derprop.method.features import normalize_features

FORMS = ("softmax", "linear")
"""The forms of :func:`propagate`, named as ``method.dlp_form`` names them: the release's row softmax and eq. 4."""

PAPER_NORMS = ("none", "row_sum", "mean")
"""Normalisations of the paper form, ``W = S + Δ¹S``:

``none``: eq. 4 as written. ``row_sum``: each source pixel ``i`` spreads its
logit with weights ``W_ij / Σ_k W_ik`` (the release's softmax normalises the
same axis); with one head ``W`` is symmetric and this is a weighted average
over similar pixels. ``mean``: ``W / M``, the average over the image."""

ROW_SUM_FLOOR = 0.1
"""Smallest row sum divided by, as a fraction of the image's mean ``|Σ_k W_ik|``:
signed similarities can cancel, and ``1/Σ_k W_ik`` would then blow up ``L̃`` and
the gradient of ``L``."""


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
    form: str = "softmax",
    op: str = "forward",
    chunk: int | None = None,
    paper_norm: str = "none",
) -> Tensor:
    """Propagate logits along pixel similarities of features and their derivatives (eq. 4).

    Args:
        logits: ``L``, shape ``(B, C, M)``.
        f1: ``V1`` (paper) or ``f1`` (release), shape ``(B, D, M)``.
        f2: ``V2`` or ``f2``; ``None`` means ``f1`` (a symmetric similarity).
        form: ``"linear"`` (eq. 4, factorised) or ``"softmax"`` (the release's row softmax).
        op: derivative operator used for ``Δ`` (eq. 2, 10, 11 or 12).
        chunk: softmax form only: rows of the ``M × M`` matrix per tile;
            ``None`` materialises it whole.
        paper_norm: linear form only: one of :data:`PAPER_NORMS`.

    Returns:
        ``L̃``, shape ``(B, C, M)``, in float32 (or float64 for float64
        inputs) whatever autocast says: scores, log-sum-exps and sums over
        ``M`` pixels lose whole logits in bfloat16. In the softmax form ``L`` is
        detached and gradients reach ``f1`` and ``f2`` only, as in the release.
    """
    f2 = f1 if f2 is None else f2
    _check_shapes(logits, f1, f2)
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows or None, got {chunk}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    if paper_norm not in PAPER_NORMS:
        raise ValueError(f"paper_norm must be one of {list(PAPER_NORMS)}, got {paper_norm!r}")
    dtype = torch.promote_types(torch.promote_types(logits.dtype, f1.dtype), torch.float32)
    symmetric = f2 is f1
    logits, f1 = logits.to(dtype), f1.to(dtype)
    f2 = f1 if symmetric else f2.to(dtype)
    with torch.autocast(logits.device.type, enabled=False):
        if form == "linear":
            return _propagate_paper(logits, f1, f2, op, paper_norm)
        return _propagate_official(logits, f1, f2, op, chunk)


@functools.lru_cache(maxsize=32)
def _gram(length: int, op: str, scaled: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Cached per device and dtype: every forward needs it, and a fresh host-to-device copy each time would be waste.
    k = derivative_matrix(length, 1, op)
    a, b = (1 / math.sqrt(length), 1 / math.sqrt(k.shape[0])) if scaled else (1.0, 1.0)
    return (a * torch.eye(length, dtype=torch.float64) + b * (k.T @ k)).to(device=device, dtype=dtype)


def similarity_gram(length: int, op: str, like: Tensor, *, scaled: bool) -> Tensor:
    """``G`` with ``vᵀ G w = vᵀw + (Δv)ᵀ(Δw)`` (eq. 4), or ``vᵀw/√D + (Δv)ᵀ(Δw)/√D₁`` (release) when ``scaled``."""
    return _gram(length, op, scaled, like.dtype, like.device)


def _floored_row_sums(rows: Tensor) -> Tensor:
    """Row sums ``Σ_j W_ij`` ``(B, M)``, floored at :data:`ROW_SUM_FLOOR` of the image's mean ``|Σ_j W_ij|``."""
    return torch.maximum(rows, ROW_SUM_FLOOR * rows.detach().abs().mean(-1, keepdim=True))


def _propagate_paper(logits: Tensor, f1: Tensor, f2: Tensor, op: str, norm: str) -> Tensor:
    v1 = normalize_features(f1, "l1")
    v2 = v1 if f2 is f1 else normalize_features(f2, "l1")
    gram = similarity_gram(v1.shape[1], op, v1, scaled=False)
    if norm == "mean":
        logits = logits / logits.shape[2]
    elif norm == "row_sum":
        rows = (v1 * (gram @ v2.sum(2, keepdim=True))).sum(1)  # Σ_j (S + Δ¹S)_ij
        logits = logits / _floored_row_sums(rows).unsqueeze(1)
    return ((logits @ v1.transpose(1, 2)) @ gram) @ v2


def propagate_literal(logits: Tensor, f1: Tensor, f2: Tensor | None = None, *, op: str = "forward") -> Tensor:
    """Eq. 4 as written, for checking the fast paths: ``L̃ = L (S + Δ¹S)`` with the two ``M × M`` matrices formed,
    as the paper writes the maths and the release computes it (the book times it against :func:`propagate`)."""
    v1 = normalize_features(f1, "l1")
    v2 = v1 if f2 is None else normalize_features(f2, "l1")
    s = v1.transpose(1, 2) @ v2
    ds = derivative(v1, 1, op).transpose(1, 2) @ derivative(v2, 1, op)
    return logits @ (s + ds)


def official_similarity_factors(f1: Tensor, f2: Tensor, op: str = "forward") -> tuple[Tensor, Tensor]:
    """Factors ``g1, g2`` with ``s = g1ᵀ g2`` for the release's scaled similarity.

    ``g1 = G f1`` with ``G = I/√D + KᵀK/√D₁`` (symmetric) and ``g2 = f2``, so
    ``g1_iᵀ g2_j = f1_iᵀ f2_j/√D + Δf1_iᵀ Δf2_j/√D₁``.
    """
    gram = similarity_gram(f1.shape[1], op, f1, scaled=True)
    return gram @ f1, f2


def _propagate_official(logits: Tensor, f1: Tensor, f2: Tensor, op: str, chunk: int | None) -> Tensor:
    g1, g2 = official_similarity_factors(f1, f2, op)
    labels = logits.detach()
    if chunk is None or chunk >= g1.shape[2]:
        attn = (g1.transpose(1, 2) @ g2).softmax(dim=-1)
        return labels @ attn
    return _TiledRowSoftmaxPropagation.apply(labels, g1, g2, chunk)


class _TiledRowSoftmaxPropagation(torch.autograd.Function):
    """``L @ softmax_rows(g1ᵀ g2)`` computed ``chunk`` rows at a time.

    Forward keeps only the row log-sum-exps; backward recomputes each tile of
    ``A`` from them instead of storing it, so memory stays ``O(chunk · M)``.
    Each tile is exponentiated once: ``Σ_i L_i A_ij = Σ_i (L_i / z_i) e^{s_ij − m_i}``
    rescales the ``C × chunk`` logits instead of the ``chunk × M`` tile. ``L``
    receives no gradient (it is detached by the caller, as in the release).
    """

    @staticmethod
    def forward(ctx, labels: Tensor, g1: Tensor, g2: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        ctx.chunk = chunk
        out = labels.new_zeros(labels.shape)
        lse = labels.new_empty(g1.shape[0], g1.shape[2], 1)
        g1t = g1.transpose(1, 2)
        for start in range(0, g1.shape[2], chunk):
            rows = slice(start, start + chunk)
            tile = g1t[:, rows] @ g2
            top = tile.amax(dim=-1, keepdim=True)
            tile = tile.sub_(top).exp_()
            total = tile.sum(dim=-1, keepdim=True)
            lse[:, rows] = top + total.log()
            out.baddbmm_(labels[:, :, rows] / total.transpose(1, 2), tile)
        ctx.save_for_backward(labels, g1, g2, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        labels, g1, g2, lse = ctx.saved_tensors
        grad_g1 = torch.empty_like(g1)
        grad_g2 = torch.zeros_like(g2)
        g1t = g1.transpose(1, 2)
        grad_out_t = grad_out.transpose(1, 2)
        with torch.autocast(g1.device.type, enabled=False):
            for start in range(0, g1.shape[2], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                attn = (g1t[:, rows] @ g2).sub_(lse[:, rows]).exp_()
                lab_t = labels[:, :, rows].transpose(1, 2)  # (B, k, C)
                # Σ_j (∂/∂A_ij) A_ij = L_iᵀ (A Gᵀ)_i: a (k × C) product instead of a (k × M) one
                centre = (lab_t * (attn @ grad_out_t)).sum(dim=-1, keepdim=True)
                grad_s = (lab_t @ grad_out).sub_(centre).mul_(attn)
                grad_g1[:, :, rows] = g2 @ grad_s.transpose(1, 2)
                grad_g2.baddbmm_(g1[:, :, rows], grad_s)
        return None, grad_g1, grad_g2, None


def propagation_weights(f1: Tensor, f2: Tensor | None = None, *, form: str = "softmax", op: str = "forward",
                        paper_norm: str = "none") -> Tensor:
    """The ``M × M`` matrix ``W`` with ``L̃ = L·W`` (eq. 1, 4): ``W_ij`` is what pixel ``j`` takes from pixel ``i``.

    ``softmax``: ``W = A = softmax_j(s)``; ``linear``: ``W = S + Δ¹S``, normalised as ``paper_norm`` says
    (:data:`PAPER_NORMS`). For diagnostics and figures (chapter *Pseudo-label rectification, interactively*),
    where a small image's whole matrix fits; training never builds it. Shape ``(B, M, M)``.
    """
    f2 = f1 if f2 is None else f2
    if form == "softmax":
        g1, g2 = official_similarity_factors(f1, f2, op)
        return (g1.transpose(1, 2) @ g2).softmax(dim=-1)
    if form != "linear":
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    v1 = normalize_features(f1, "l1")
    v2 = v1 if f2 is f1 else normalize_features(f2, "l1")
    w = v1.transpose(1, 2) @ similarity_gram(v1.shape[1], op, v1, scaled=False) @ v2
    if paper_norm == "mean":
        return w / w.shape[-1]
    if paper_norm == "row_sum":
        return w / _floored_row_sums(w.sum(-1)).unsqueeze(-1)
    return w


def attention_shares(weights: Tensor, labels: Tensor, *, background: int | None = 0,
                     ignore_index: int = 255) -> tuple[Tensor, Tensor, Tensor]:
    """How class-aware the propagation weights are, per receiving pixel.

    Shown in chapter *Pseudo-label rectification, interactively*.

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
    uniform = same.sum(1).to(p.dtype) / valid.sum(1, keepdim=True).clamp_min(1)
    support = 1.0 / (p * p).sum(1).clamp_min(1e-30)
    pick = valid & (labels != background) if background is not None else valid
    return own[pick], uniform[pick], support[pick]
