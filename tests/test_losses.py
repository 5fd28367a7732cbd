"""derprop.method.losses against dense float64 references (eq. 3, 8, 9).

Chapter *Paper vs released code* explains the release's form of the loss.
"""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from derprop.method.derivatives import derivative
from derprop.method.features import EPS, normalize_features
from derprop.method.losses import derivative_loss, similarity_l1


def rand(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def one_hot(labels, classes):
    return torch.nn.functional.one_hot(labels, classes).permute(0, 2, 1).double()


def dense_similarity_l1(x1, x2, y1, y2):
    return (torch.einsum("bdi,bdj->bij", x1, x2) - torch.einsum("bei,bej->bij", y1, y2)).abs()


def dense_derivative_loss(f1, f2, t1, t2, *, Q, eta, op, sparsity, labeled):
    """Eq. 9 with L1-normalised features, mean over entries, every matrix formed."""
    def l1(v):
        return v / v.abs().sum(1, keepdim=True)
    p1, p2 = l1(f1), l1(f2)
    y1, y2 = (t1, t2) if labeled else (l1(t1), l1(t2))
    total = 0.0
    for q in range(Q + 1):
        s = torch.einsum("bdi,bdj->bij", derivative(p1, q, op), derivative(p2, q, op))
        if labeled:
            target = torch.einsum("bci,bcj->bij", y1, y2)
        else:
            target = torch.einsum("bdi,bdj->bij", derivative(y1, q, op), derivative(y2, q, op))
        total = total + (s - target).abs().mean()
    if sparsity:
        heads = [p1] if f2 is f1 else [p1, p2]
        total = total + eta * sum(derivative(p, Q + 1, op).abs().mean() for p in heads) / len(heads)
    return total


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_similarity_l1_value(chunk, reduction):
    x1, x2, y1, y2 = rand(2, 5, 30, seed=1), rand(2, 5, 30, seed=2), rand(2, 3, 30, seed=3), rand(2, 3, 30, seed=4)
    dense = dense_similarity_l1(x1, x2, y1, y2)
    expected = dense.mean() if reduction == "mean" else dense.sum()
    torch.testing.assert_close(similarity_l1(x1, x2, y1, y2, reduction=reduction, chunk=chunk), expected)


@pytest.mark.parametrize("chunk", [4, 11])
def test_similarity_l1_chunked_gradients_equal_dense(chunk):
    x1, x2, y1, y2 = rand(2, 5, 33, seed=1), rand(2, 5, 33, seed=2), rand(2, 3, 33, seed=3), rand(2, 3, 33, seed=4)
    dense = torch.autograd.grad(similarity_l1(x1, x2, y1, y2), (x1, x2, y1, y2))
    tiled = torch.autograd.grad(similarity_l1(x1, x2, y1, y2, chunk=chunk), (x1, x2, y1, y2))
    for a, b in zip(dense, tiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_similarity_l1_exact_gradient_formula():
    """d/dV ‖VᵀV − G‖₁ = V(E + Eᵀ), E = sign(VᵀV − G): the tiled gradient of :func:`similarity_l1`."""
    v = rand(1, 4, 12, seed=5)
    g = rand(1, 2, 12, seed=6, grad=False)
    (grad,) = torch.autograd.grad(similarity_l1(v, v, g, g, reduction="sum", chunk=5), (v,))
    e = (v.transpose(1, 2) @ v - g.transpose(1, 2) @ g).sign()
    torch.testing.assert_close(grad, v.detach() @ (e + e.transpose(1, 2)))


def test_similarity_l1_gradcheck_tiled():
    args = (rand(1, 3, 8, seed=1), rand(1, 3, 8, seed=2), rand(1, 2, 8, seed=3), rand(1, 2, 8, seed=4))
    assert torch.autograd.gradcheck(lambda *a: similarity_l1(*a, chunk=3), args)


def test_similarity_l1_bad_input():
    x, y = rand(2, 5, 30, grad=False), rand(2, 3, 30, grad=False)
    with pytest.raises(ValueError, match="reduction must be one of"):
        similarity_l1(x, x, y, y, reduction="max")
    with pytest.raises(ValueError, match="agree on batch B and pixels M"):
        similarity_l1(x, x, y[..., :-1], y[..., :-1])
    with pytest.raises(ValueError, match=r"x1 must have shape \(B, D, M\)"):
        similarity_l1(x[0], x, y, y)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        similarity_l1(x, x, y, y, chunk=0)


@pytest.mark.parametrize("Q", [0, 1, 2, 3])
@pytest.mark.parametrize("op", ["forward", "central", "sum", "second"])
@pytest.mark.parametrize("labeled", [True, False])
def test_derivative_loss_matches_eq9(Q, op, labeled):
    f1, f2 = rand(2, 12, 20, seed=1), rand(2, 12, 20, seed=2)
    if labeled:
        t = one_hot(torch.randint(0, 5, (2, 20), generator=torch.Generator().manual_seed(0)), 5)
        t1 = t2 = t
    else:
        t1, t2 = rand(2, 12, 20, seed=3, grad=False), rand(2, 12, 20, seed=4, grad=False)
    kwargs = dict(Q=Q, eta=0.5, op=op, sparsity=True, labeled=labeled)
    expected = dense_derivative_loss(f1, f2, t1, t2, **kwargs)
    torch.testing.assert_close(derivative_loss(f1, f2, t1, t2, **kwargs), expected)
    torch.testing.assert_close(derivative_loss(f1, f2, t1, t2, chunk=6, **kwargs), expected)


def test_derivative_loss_symmetric_heads_and_no_sparsity():
    f, t = rand(1, 8, 15, seed=1), rand(1, 8, 15, seed=2, grad=False)
    expected = dense_derivative_loss(f, f, t, t, Q=1, eta=0.5, op="forward", sparsity=False, labeled=False)
    torch.testing.assert_close(derivative_loss(f, f, t, t, sparsity=False), expected)


def test_derivative_loss_chunked_gradients_equal_dense():
    f1, f2 = rand(2, 10, 40, seed=1), rand(2, 10, 40, seed=2)
    t1, t2 = rand(2, 10, 40, seed=3, grad=False), rand(2, 10, 40, seed=4, grad=False)
    for normalize in ("l1", "softmax", "none"):
        dense = torch.autograd.grad(derivative_loss(f1, f2, t1, t2, Q=2, normalize=normalize), (f1, f2))
        tiled = torch.autograd.grad(derivative_loss(f1, f2, t1, t2, Q=2, normalize=normalize, chunk=9), (f1, f2))
        for a, b in zip(dense, tiled):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_derivative_loss_gradcheck():
    f1, f2 = rand(1, 6, 7, seed=1), rand(1, 6, 7, seed=2)
    t = rand(1, 6, 7, seed=3, grad=False)
    assert torch.autograd.gradcheck(lambda a, b: derivative_loss(a, b, t, t, Q=2, chunk=3), (f1, f2))


def test_mask_drops_ignored_pixels():
    """Ignored pixels give no gradient, and the loss is the mean over the remaining pairs."""
    f1, f2 = rand(1, 6, 10, seed=1), rand(1, 6, 10, seed=2)
    y = one_hot(torch.randint(0, 3, (1, 10), generator=torch.Generator().manual_seed(1)), 3)
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, 7:] = False
    loss = derivative_loss(f1, f2, y, y, labeled=True, mask=mask, sparsity=False)
    (g1,) = torch.autograd.grad(loss, (f1,))
    assert torch.count_nonzero(g1[..., 7:]) == 0
    kept = derivative_loss(f1[..., :7], f2[..., :7], y[..., :7], y[..., :7], labeled=True, sparsity=False)
    torch.testing.assert_close(loss, kept)


def test_l1_normalisation_has_a_bounded_gradient_near_zero():
    """‖v‖₁ → 0: the output stays finite and so does the gradient (it grows like 1/‖v‖₁ without the floor)."""
    for norm in (4e-9, 0.0):
        v = torch.full((1, 21, 1), norm / 21, dtype=torch.float64)
        v[0, ::2] *= -1
        v.requires_grad_()
        out = normalize_features(v, "l1")
        (g,) = torch.autograd.grad(out[0, 0].sum(), (v,))
        assert torch.isfinite(out).all() and torch.isfinite(g).all()
        assert g.abs().max() <= 2 / EPS
    w = rand(1, 21, 5, seed=1)
    torch.testing.assert_close(normalize_features(w, "l1").abs().sum(1), torch.ones(1, 5, dtype=torch.float64))


def test_derivative_loss_bad_input():
    f = rand(1, 3, 5, grad=False)
    with pytest.raises(ValueError, match="Q must be >= 0"):
        derivative_loss(f, f, f, f, Q=-1)
    with pytest.raises(ValueError, match="normalize must be one of"):
        derivative_loss(f, f, f, f, normalize="l2")
    with pytest.raises(ValueError, match="order 3"):
        derivative_loss(f, f, f, f, Q=2)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 40), chunk=st.integers(1, 45), seed=st.integers(0, 10_000))
def test_chunked_equals_dense_property(m, chunk, seed):
    x1, x2 = rand(1, 4, m, seed=seed), rand(1, 4, m, seed=seed + 1)
    y1, y2 = rand(1, 2, m, seed=seed + 2), rand(1, 2, m, seed=seed + 3)
    torch.testing.assert_close(similarity_l1(x1, x2, y1, y2, chunk=chunk), similarity_l1(x1, x2, y1, y2))


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_similarity_l1_under_autocast_runs_in_float32(chunk, sigma):
    """Under bf16 autocast the loss is the float32 loss (a bf16 matmul misses by ~1e-2 relative)."""
    x1, x2 = (rand(2, 21, 300, seed=s).float() * sigma for s in (1, 2))
    y1, y2 = (rand(2, 21, 300, seed=s, grad=False).float() * sigma for s in (3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = similarity_l1(x1, x2, y1, y2, chunk=chunk)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, similarity_l1(x1, x2, y1, y2), rtol=1e-5, atol=0)
