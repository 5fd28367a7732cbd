"""Literal dense transcriptions of the equations, for checking the fast paths.

Explained in the book chapter *Derivative label propagation*, which times them
against :mod:`derprop.propagation` and :mod:`derprop.losses`; the benchmarks in
``benchmarks/`` use them as the baseline. They build every ``M × M`` matrix, as
the paper writes the maths and the release computes it.
"""

from __future__ import annotations

from torch import Tensor

from derprop.derivatives import derivative
from derprop.features import normalize_features


def propagate_literal(logits: Tensor, f1: Tensor, f2: Tensor | None = None, *, op: str = "forward") -> Tensor:
    """Eq. 4 as written: ``L̃ = L (S + Δ¹S)`` with the two ``M × M`` matrices formed."""
    v1 = normalize_features(f1, "l1")
    v2 = v1 if f2 is None else normalize_features(f2, "l1")
    s = v1.transpose(1, 2) @ v2
    ds = derivative(v1, 1, op).transpose(1, 2) @ derivative(v2, 1, op)
    return logits @ (s + ds)
