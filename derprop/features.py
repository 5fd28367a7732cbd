"""Normalisation of pixel feature vectors before similarities are taken.

Explained in the book chapters *The ill-posed problem* and *Paper vs released code*.

The paper assumes L1-normalised features (``‖v‖₁ = 1``, Theorem 1); the released
code applies a softmax over channels and calls it "L1 normalisation". Both are
here so the two profiles can be compared.
"""

from __future__ import annotations

from torch import Tensor

NORMALIZATIONS = ("l1", "softmax", "none")

EPS = 1e-12


def normalize_features(v: Tensor, how: str = "l1", dim: int = 1) -> Tensor:
    """Normalise each pixel's feature vector along the channel axis ``dim``.

    ``"l1"``: ``v / ‖v‖₁`` (the paper); ``"softmax"``: softmax over channels (the
    release); ``"none"``: unchanged. An all-zero vector stays zero under ``"l1"``.
    """
    if how == "l1":
        return v / v.abs().sum(dim=dim, keepdim=True).clamp_min(EPS)
    if how == "softmax":
        return v.softmax(dim=dim)
    if how == "none":
        return v
    raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {how!r}")
