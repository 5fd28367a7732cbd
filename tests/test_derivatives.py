"""derprop.method.derivatives against the element-wise definitions of eq. 2, 10, 11, 12."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from derprop.method.derivatives import OPS, derivative, derivative_length, derivative_matrix


def naive(v: list[float], order: int, op: str) -> list[float]:
    """One application at a time, exactly as the equations index it."""
    for _ in range(order):
        n = len(v)
        if op == "forward":
            v = [v[i + 1] - v[i] for i in range(n - 1)]
        elif op == "central":
            v = [(v[i + 2] - v[i]) / 2 for i in range(n - 2)]
        elif op == "sum":
            v = [v[i + 1] + v[i] for i in range(n - 1)]
        elif op == "second":
            v = [v[i + 1] + v[i - 1] - 2 * v[i] for i in range(1, n - 1)]
    return v


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_matches_definition(op, order):
    torch.manual_seed(order)
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    out = derivative(x, order, op, dim=1)
    expected = torch.tensor(
        [[naive(x[b, :, m].tolist(), order, op) for m in range(5)] for b in range(2)], dtype=torch.float64
    ).permute(0, 2, 1)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def test_lengths_shrink_as_documented():
    x = torch.randn(1, 10, 3)
    assert derivative(x, 2, "forward").shape[1] == 8
    assert derivative(x, 2, "central").shape[1] == 6
    assert derivative(x, 2, "sum").shape[1] == 8
    assert derivative(x, 2, "second").shape[1] == 6
    assert derivative_length(10, 3, "second") == 4


def test_other_dims():
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    torch.testing.assert_close(derivative(x, 1, dim=-1), x[..., 1:] - x[..., :-1])
    torch.testing.assert_close(derivative(x, 1, dim=0), x[1:] - x[:-1])


def test_intro_example_first_derivative_is_zero():
    """Δ¹ of a constant vector such as the paper's [1, 1, 1] vanishes (chapter *The ill-posed problem*)."""
    assert torch.count_nonzero(derivative(torch.ones(1, 3, 1), 1)) == 0


@pytest.mark.parametrize("op", sorted(OPS))
def test_matrix_form(op):
    x = torch.randn(7, 4, dtype=torch.float64)
    torch.testing.assert_close(derivative_matrix(7, 2, op) @ x, derivative(x, 2, op, dim=0))


@pytest.mark.parametrize(
    ("length", "order", "op"), [(3, 3, "forward"), (4, 2, "central"), (2, 1, "second"), (1, 1, "sum")]
)
def test_order_too_high_is_a_clear_error(length, order, op):
    with pytest.raises(ValueError, match=f"order {order}.*has {length}"):
        derivative(torch.zeros(1, length, 2), order, op)


def test_bad_op_and_order():
    with pytest.raises(ValueError, match="op must be one of"):
        derivative(torch.zeros(1, 4, 2), 1, "backward")
    with pytest.raises(ValueError, match="order must be >= 0"):
        derivative(torch.zeros(1, 4, 2), -1)


@settings(max_examples=40, deadline=None)
@given(
    op=st.sampled_from(sorted(OPS)),
    p=st.integers(0, 2),
    q=st.integers(0, 2),
    length=st.integers(9, 12),
)
def test_orders_compose(op, p, q, length):
    """Δ^p(Δ^q v) = Δ^{p+q} v, and every operator is linear."""
    x, y = torch.randn(1, length, 3, dtype=torch.float64), torch.randn(1, length, 3, dtype=torch.float64)
    torch.testing.assert_close(derivative(derivative(x, q, op), p, op), derivative(x, p + q, op))
    torch.testing.assert_close(derivative(2 * x - y, p, op), 2 * derivative(x, p, op) - derivative(y, p, op))


def test_similarity_symmetries_are_the_eight_maps_of_theorem_1():
    from derprop.method.derivatives import similarity_symmetries

    for d in (3, 5, 6):
        assert len(similarity_symmetries(d, 1)) == 2**d  # orders 0-1: a sign per eigenvector of K1ᵀK1
        found = similarity_symmetries(d, d - 1)
        assert len(found) == 8
        reversal = torch.eye(d, dtype=torch.float64).flip(0)
        assert any(torch.allclose(t, reversal, atol=1e-9) for t in found)
        assert any(torch.allclose(t, -torch.eye(d, dtype=torch.float64), atol=1e-9) for t in found)
    with pytest.raises(ValueError, match="max_order"):
        similarity_symmetries(4, 0)
