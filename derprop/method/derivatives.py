"""Discrete derivatives of pixel feature vectors along the channel axis.

Explained in the book chapter *Derivative operators* (``book/derivatives.md``).

Each operator maps a feature vector ``v`` of length ``D`` to a shorter vector;
applying it ``q`` times gives the ``q``-order derivative ``Δ^q v``:

======== ======= ============================================== ===============
``op``   eq.     one application                                length change
======== ======= ============================================== ===============
forward  eq. 2   ``v(i+1) - v(i)``                              ``D -> D-1``
central  eq. 10  ``(v(i+2) - v(i)) / 2``                        ``D -> D-2``
sum      eq. 11  ``v(i+1) + v(i)``                              ``D -> D-1``
second   eq. 12  ``v(i+1) + v(i-1) - 2 v(i)``, ``i = 1..D-2``   ``D -> D-2``
======== ======= ============================================== ===============

All four are linear, so ``Δ^q V = K_q V`` for a ``(D_q, D)`` matrix ``K_q``
(:func:`derivative_matrix`); the book uses it for frequency responses.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

OPS: dict[str, tuple[float, ...]] = {
    "forward": (-1.0, 1.0),
    "central": (-0.5, 0.0, 0.5),
    "sum": (1.0, 1.0),
    "second": (1.0, -2.0, 1.0),
}
"""Stencil of each operator: output ``i`` is ``sum_k w[k] * v(i + k)``."""


def _stencil(op: str) -> tuple[float, ...]:
    try:
        return OPS[op]
    except KeyError:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}") from None


def derivative_length(length: int, order: int, op: str = "forward") -> int:
    """Length ``D_q`` of ``Δ^q v`` for a vector of ``length`` entries."""
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    return length - order * (len(_stencil(op)) - 1)


def derivative(x: Tensor, order: int = 1, op: str = "forward", dim: int = 1) -> Tensor:
    """Apply the derivative operator ``op`` ``order`` times along ``dim`` (eq. 2, 10, 11, 12).

    ``order=0`` returns ``x`` itself (``Δ^0 v = v``).

    Raises:
        ValueError: if ``op`` is unknown, ``order`` is negative, or ``order``
            applications leave no element along ``dim``.
    """
    weights = _stencil(op)
    n = x.shape[dim]
    out_len = derivative_length(n, order, op)
    if out_len < 1:
        raise ValueError(
            f"a {op} derivative of order {order} needs more than {n - out_len} entries "
            f"along dim {dim}, but the input has {n}; lower `order` or use more channels"
        )
    width = len(weights)
    for _ in range(order):
        m = x.shape[dim] - width + 1
        y = weights[0] * x.narrow(dim, 0, m)
        for k in range(1, width):
            if weights[k]:
                y = y + weights[k] * x.narrow(dim, k, m)
        x = y
    return x


def derivative_matrix(length: int, order: int = 1, op: str = "forward", *, dtype: torch.dtype = torch.float64) -> Tensor:
    """The matrix ``K_q`` with ``Δ^q v = K_q v`` for vectors of ``length`` entries."""
    return derivative(torch.eye(length, dtype=dtype), order, op, dim=0)


def similarity_symmetries(length: int, max_order: int, op: str = "forward") -> list[torch.Tensor]:
    """Every orthogonal ``T`` that keeps the similarities of orders ``0..max_order`` of any features.

    ``T`` keeps them when ``Tᵀ K_qᵀ K_q T = K_qᵀ K_q`` for every ``q``: then ``(Δ^q TV)ᵀ(Δ^q TV) = (Δ^q V)ᵀ(Δ^q V)``
    for every ``V``. Order 0 makes ``T`` orthogonal; order 1 makes it commute with ``K_1ᵀK_1``, whose eigenvalues
    are distinct for the forward difference, so ``T = U diag(±1) Uᵀ`` in its eigenbasis ``U``: the ``2^length``
    candidates are tested against the higher orders. Theorem 1 asks for uniqueness; chapter *Theorems 1 and 2,
    checked* finds 8 such maps for every ``length`` tried. Needs ``max_order >= 1``.

    Raises:
        ValueError: if ``max_order < 1`` (order 0 alone keeps a continuous family) or ``K_1ᵀK_1`` of ``op`` has
            a repeated eigenvalue (the candidates are then not a finite list).
    """
    if max_order < 1:
        raise ValueError(f"max_order must be >= 1, got {max_order}: order 0 alone keeps every orthogonal map")
    grams = [derivative_matrix(length, q, op).T @ derivative_matrix(length, q, op) for q in range(max_order + 1)]
    evals, basis = torch.linalg.eigh(grams[1])
    if float(torch.diff(evals).min()) <= 1e-9:
        raise ValueError(f"K_1ᵀK_1 of the {op} difference has a repeated eigenvalue at length {length}")
    found = []
    for signs in itertools.product((1.0, -1.0), repeat=length):
        t = basis @ torch.diag(torch.tensor(signs, dtype=basis.dtype)) @ basis.T
        if all(torch.allclose(t.T @ g @ t, g, atol=1e-9) for g in grams):
            found.append(t)
    return found
