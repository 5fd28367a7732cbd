"""Normalisation of pixel feature vectors before similarities are taken.

Explained in the book chapters *The ill-posed problem* and *Paper vs released code*.

The paper assumes L1-normalised features (``‖v‖₁ = 1``, Theorem 1); the released
code applies a softmax over channels and calls it "L1 normalisation". Both are
here so the two profiles can be compared.
"""

from __future__ import annotations

from torch import Tensor

NORMALIZATIONS = ("l1", "softmax", "none")

EPS = 1e-4
"""Floor of ``‖v‖₁`` under ``"l1"``. The map's gradient is of order ``1/‖v‖₁``;
below the floor ``v`` is divided by ``EPS`` instead, which caps it at ``~2/EPS``
(features of a trained head have ``‖v‖₁`` of order ``D``)."""


def normalize_features(v: Tensor, how: str = "l1", dim: int = 1) -> Tensor:
    """Normalise each pixel's feature vector along the channel axis ``dim``.

    ``"l1"``: ``v / ‖v‖₁`` (the paper); ``"softmax"``: softmax over channels (the
    release); ``"none"``: unchanged. Under ``"l1"`` a vector with ``‖v‖₁ < EPS``
    is divided by :data:`EPS` (an all-zero vector stays zero, gradients stay finite).
    """
    if how == "l1":
        return v / v.abs().sum(dim=dim, keepdim=True).clamp_min(EPS)
    if how == "softmax":
        return v.softmax(dim=dim)
    if how == "none":
        return v
    raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {how!r}")
