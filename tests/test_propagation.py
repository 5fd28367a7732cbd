"""derprop.propagation against straightforward dense float64 references."""

import math

import pytest
import torch

from derprop.derivatives import derivative
from derprop.propagation import attention_shares, propagate, propagation_weights
from derprop.reference import propagate_literal


def dense_official(logits, f1, f2, op="forward"):
    """SPEC §2 element by element: s_ij, softmax over j, L̃_j = Σ_i L_i A_ij."""
    d = f1.shape[1]
    d1f1, d1f2 = derivative(f1, 1, op), derivative(f2, 1, op)
    s = torch.einsum("bdi,bdj->bij", f1, f2) / math.sqrt(d) + torch.einsum(
        "bdi,bdj->bij", d1f1, d1f2
    ) / math.sqrt(d1f1.shape[1])
    a = torch.exp(s - s.amax(-1, keepdim=True))
    a = a / a.sum(-1, keepdim=True)
    return torch.einsum("bci,bij->bcj", logits.detach(), a)


def dense_paper(logits, f1, f2, op="forward"):
    """Eq. 4 with explicit L1 normalisation and both M×M matrices."""
    v1 = f1 / f1.abs().sum(1, keepdim=True)
    v2 = f2 / f2.abs().sum(1, keepdim=True)
    s = torch.einsum("bdi,bdj->bij", v1, v2)
    ds = torch.einsum("bdi,bdj->bij", derivative(v1, 1, op), derivative(v2, 1, op))
    return torch.einsum("bci,bij->bcj", logits, s + ds)


def make(b=2, c=4, d=6, m=37, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, m, generator=g, dtype=torch.float64)
    f1 = torch.randn(b, d, m, generator=g, dtype=torch.float64).requires_grad_(grad)
    f2 = torch.randn(b, d, m, generator=g, dtype=torch.float64).requires_grad_(grad)
    return logits, f1, f2


@pytest.mark.parametrize("op", ["forward", "central", "sum", "second"])
def test_paper_mode_is_factorised_eq4(op):
    logits, f1, f2 = make()
    expected = dense_paper(logits, f1, f2, op)
    torch.testing.assert_close(propagate(logits, f1, f2, mode="paper", op=op), expected)
    torch.testing.assert_close(propagate_literal(logits, f1, f2, op=op), expected)


@pytest.mark.parametrize("op", ["forward", "second"])
@pytest.mark.parametrize("chunk", [None, 1, 5, 37, 100])
def test_official_mode_matches_release_formula(op, chunk):
    logits, f1, f2 = make()
    torch.testing.assert_close(propagate(logits, f1, f2, op=op, chunk=chunk), dense_official(logits, f1, f2, op))


@pytest.mark.parametrize("chunk", [3, 16])
def test_official_chunked_gradients_equal_dense(chunk):
    logits, f1, f2 = make(m=41)
    weight = torch.randn(logits.shape, dtype=torch.float64)
    dense = torch.autograd.grad((propagate(logits, f1, f2) * weight).sum(), (f1, f2))
    tiled = torch.autograd.grad((propagate(logits, f1, f2, chunk=chunk) * weight).sum(), (f1, f2))
    for a, b in zip(dense, tiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def test_gradcheck_tiled_official():
    logits, f1, f2 = make(b=1, c=3, d=4, m=9)
    assert torch.autograd.gradcheck(lambda a, b: propagate(logits, a, b, chunk=4), (f1, f2))


def test_gradcheck_paper_all_inputs():
    logits, f1, f2 = make(b=1, c=3, d=4, m=9)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda l, a, b: propagate(l, a, b, mode="paper"), (logits, f1, f2))


def test_official_detaches_logits():
    logits, f1, f2 = make()
    logits.requires_grad_(True)
    out = propagate(logits, f1, f2, chunk=8)
    grads = torch.autograd.grad(out.sum(), (logits, f1), allow_unused=True)
    assert grads[0] is None and grads[1] is not None


def test_f2_none_means_symmetric():
    logits, f1, _ = make()
    for mode in ("paper", "official"):
        torch.testing.assert_close(propagate(logits, f1, mode=mode), propagate(logits, f1, f1, mode=mode))


def test_official_rows_are_a_convex_combination():
    """Each A row sums to one, so propagating a constant logit map returns it."""
    _, f1, f2 = make(grad=False)
    ones = torch.ones(2, 1, 37, dtype=torch.float64)
    torch.testing.assert_close(propagate(ones, f1, f2, chunk=6).sum(-1), torch.full((2, 1), 37.0, dtype=torch.float64))


def test_literal_eq4_grows_with_m():
    """SPEC §4: unnormalised eq. 4 scales like M for constant features."""
    pixel = torch.rand(1, 5, 1, dtype=torch.float64)
    norms = []
    for m in [16, 64, 256]:
        logits = torch.ones(1, 2, m, dtype=torch.float64)
        f = pixel.expand(1, 5, m)
        norms.append(propagate(logits, f, mode="paper").abs().mean().item())
    assert norms[1] / norms[0] == pytest.approx(4.0) and norms[2] / norms[1] == pytest.approx(4.0)


def test_float32_tiled_matches_dense():
    logits, f1, f2 = (t.float().detach() for t in make(m=200, d=21, c=21))
    torch.testing.assert_close(propagate(logits, f1, f2, chunk=32), propagate(logits, f1, f2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "literal"}, "mode must be one of"),
        ({"chunk": 0}, "chunk must be a positive"),
        ({"op": "nope"}, "op must be one of"),
    ],
)
def test_bad_arguments(kwargs, message):
    logits, f1, f2 = make(grad=False)
    with pytest.raises(ValueError, match=message):
        propagate(logits, f1, f2, **kwargs)


def test_bad_shapes():
    logits, f1, f2 = make(grad=False)
    with pytest.raises(ValueError, match="agree on batch B and pixels M"):
        propagate(logits[..., :-1], f1, f2)
    with pytest.raises(ValueError, match="same shape"):
        propagate(logits, f1, f2[:, :-1])
    with pytest.raises(ValueError, match=r"logits \(B, C, M\)"):
        propagate(logits[0], f1, f2)
    with pytest.raises(ValueError, match="order 1"):
        propagate(logits, f1[:, :1], f2[:, :1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tiled_matches_dense():
    logits, f1, f2 = (t.float().detach().cuda() for t in make(m=1681, d=21, c=21))
    torch.testing.assert_close(propagate(logits, f1, f2, chunk=256), propagate(logits, f1, f2), rtol=1e-4, atol=1e-4)


def test_tiled_under_autocast_matches_float32():
    logits, f1, f2 = (t.float().detach() for t in make(m=64, d=8, c=5))
    f1.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = propagate(logits, f1.bfloat16(), f2.bfloat16(), chunk=16)
    out.sum().backward()
    reference = propagate(logits, f1.bfloat16().float(), f2.bfloat16().float())
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    assert f1.grad is not None and torch.isfinite(f1.grad).all()


@pytest.mark.parametrize("mode", ["official", "paper"])
def test_propagation_weights_reproduce_propagate(mode):
    logits, f1, f2 = make(grad=False)
    w = propagation_weights(f1, f2, mode=mode)
    assert torch.allclose(logits @ w, propagate(logits, f1, f2, mode=mode), atol=1e-10)


def test_attention_shares_uniform_and_class_only_weights():
    labels = torch.tensor([[0, 1, 1, 2, 2, 2, 255]])
    m = labels.shape[1]
    own, uniform, support = attention_shares(torch.ones(1, m, m, dtype=torch.float64), labels)
    expect = torch.tensor([2 / 6, 2 / 6, 3 / 6, 3 / 6, 3 / 6], dtype=torch.float64)
    assert torch.allclose(own, expect) and torch.allclose(uniform, expect)  # foreground pixels only
    assert torch.allclose(support, torch.full((5,), 6.0, dtype=torch.float64))  # six labeled pixels
    same = (labels.T == labels).double().unsqueeze(0)  # each pixel takes from its own class only
    own, _, support = attention_shares(same, labels)
    assert torch.allclose(own, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(support, torch.tensor([2.0, 2.0, 3.0, 3.0, 3.0], dtype=torch.float64))
