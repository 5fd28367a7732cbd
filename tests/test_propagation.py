"""derprop.method.propagation against straightforward dense float64 references."""

import math

import pytest
import torch

from derprop.method.derivatives import derivative
from derprop.method.propagation import FORMS, attention_shares, propagate, propagate_literal, propagation_weights


def dense_official(logits, f1, f2, op="forward"):
    """The release's ``Corr.forward`` (``model/semseg/segmentation.py``) element by element: s_ij, softmax over j,
    L̃_j = Σ_i L_i A_ij."""
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
    torch.testing.assert_close(propagate(logits, f1, f2, form="linear", op=op), expected)
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
    assert torch.autograd.gradcheck(lambda l, a, b: propagate(l, a, b, form="linear"), (logits, f1, f2))


def test_official_detaches_logits():
    logits, f1, f2 = make()
    logits.requires_grad_(True)
    out = propagate(logits, f1, f2, chunk=8)
    grads = torch.autograd.grad(out.sum(), (logits, f1), allow_unused=True)
    assert grads[0] is None and grads[1] is not None


def test_f2_none_means_symmetric():
    logits, f1, _ = make()
    for form in FORMS:
        torch.testing.assert_close(propagate(logits, f1, form=form), propagate(logits, f1, f1, form=form))


def test_official_rows_are_a_convex_combination():
    """Each A row sums to one, so propagating a constant logit map returns it."""
    _, f1, f2 = make(grad=False)
    ones = torch.ones(2, 1, 37, dtype=torch.float64)
    torch.testing.assert_close(propagate(ones, f1, f2, chunk=6).sum(-1), torch.full((2, 1), 37.0, dtype=torch.float64))


def test_literal_eq4_grows_with_m():
    """Unnormalised eq. 4 scales like M for constant features (chapter *Derivative label propagation*)."""
    pixel = torch.rand(1, 5, 1, dtype=torch.float64)
    norms = []
    for m in [16, 64, 256]:
        logits = torch.ones(1, 2, m, dtype=torch.float64)
        f = pixel.expand(1, 5, m)
        norms.append(propagate(logits, f, form="linear").abs().mean().item())
    assert norms[1] / norms[0] == pytest.approx(4.0) and norms[2] / norms[1] == pytest.approx(4.0)


def test_float32_tiled_matches_dense():
    logits, f1, f2 = (t.float().detach() for t in make(m=200, d=21, c=21))
    torch.testing.assert_close(propagate(logits, f1, f2, chunk=32), propagate(logits, f1, f2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"form": "official"}, "form must be one of"),
        ({"chunk": 0}, "chunk must be a positive"),
        ({"op": "nope"}, "op must be one of"),
        ({"form": "linear", "paper_norm": "max"}, "paper_norm must be one of"),
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


def _grid_features(sigma, seed=0, m=1681, c=21):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, c, m, generator=g) * 3
    f1, f2 = (torch.randn(2, c, m, generator=g) * sigma for _ in range(2))
    return logits, f1.requires_grad_(), f2.requires_grad_()


@pytest.mark.parametrize("chunk", [None, 256])
@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_official_dlp_under_bf16_autocast_is_the_float32_result(chunk, sigma):
    """M = 1681 (a 321 crop), realistic feature scales: autocast must not lower the DLP's precision."""
    logits, f1, f2 = _grid_features(sigma)
    reference = propagate(logits, f1, f2, chunk=chunk)
    ref_grads = torch.autograd.grad(reference.square().sum(), (f1, f2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = propagate(logits, f1, f2, chunk=chunk)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out.square().sum(), (f1, f2))
    scale = reference.abs().max().item()
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3 * scale)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_a_bf16_dlp_would_fail_that_tolerance():
    """The tolerance above discriminates: the same scores computed in bf16 miss by far more than 1e-3."""
    logits, f1, f2 = (t.detach() for t in _grid_features(3.0))
    reference = propagate(logits, f1, f2)
    half = propagate(logits.bfloat16().double(), f1.bfloat16().double(), f2.bfloat16().double())
    g1, g2 = (torch.cat([f / math.sqrt(f.shape[1]), derivative(f, 1) / math.sqrt(f.shape[1] - 1)], 1) for f in (f1, f2))
    g2 = torch.cat([f2, derivative(f2, 1)], 1)
    bf16 = logits.bfloat16() @ (g1.bfloat16().transpose(1, 2) @ g2.bfloat16()).softmax(-1)
    assert (bf16.float() - reference).abs().max() > 1e-3 * reference.abs().max() * 10
    assert (half.float() - reference).abs().max() < (bf16.float() - reference).abs().max()


def dense_paper_normalised(logits, f1, f2, norm):
    w = torch.einsum("bdi,bdj->bij", *(f / f.abs().sum(1, keepdim=True) for f in (f1, f2)))
    w = w + torch.einsum("bdi,bdj->bij", *(derivative(f / f.abs().sum(1, keepdim=True), 1) for f in (f1, f2)))
    if norm == "mean":
        return logits @ w / w.shape[-1]
    return (logits / w.sum(-1).unsqueeze(1)) @ w


@pytest.mark.parametrize("norm", ["mean", "row_sum"])
def test_paper_normalisations_match_their_dense_form(norm):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 37, generator=g, dtype=torch.float64)
    f1, f2 = (torch.rand(2, 6, 37, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    torch.testing.assert_close(propagate(logits, f1, f2, form="linear", paper_norm=norm),
                               dense_paper_normalised(logits, f1, f2, norm))
    assert torch.autograd.gradcheck(lambda a, b: propagate(logits, a, b, form="linear", paper_norm=norm), (f1, f2))


def test_row_sum_averages_over_same_class_pixels_at_any_m():
    """Class features far apart in channels: L̃ at each pixel is the mean logit of its class, whatever M.

    (Adjacent one-hot channels would not do: their derivatives overlap, so Δ¹S makes neighbouring
    classes anti-similar.)
    """
    for m in (60, 600):
        cls = torch.arange(m) % 3
        f = torch.nn.functional.one_hot(3 * cls + 1, 9).T[None].double()
        logits = torch.randn(1, 2, m, dtype=torch.float64)
        out = propagate(logits, f, form="linear", paper_norm="row_sum")
        for k in range(3):
            expected = logits[..., cls == k].mean(-1, keepdim=True).expand(1, 2, int((cls == k).sum()))
            torch.testing.assert_close(out[..., cls == k], expected)


@pytest.mark.parametrize("form, norm", [("softmax", "none"), ("linear", "none"), ("linear", "mean"),
                                        ("linear", "row_sum")])
def test_propagation_weights_reproduce_propagate(form, norm):
    logits, f1, f2 = make(grad=False)
    f1, f2 = f1.abs(), f2.abs()  # row sums away from zero for row_sum
    w = propagation_weights(f1, f2, form=form, paper_norm=norm)
    assert torch.allclose(logits @ w, propagate(logits, f1, f2, form=form, paper_norm=norm), atol=1e-10)


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


def test_the_package_front_door_names_propagate():
    import derprop

    assert derprop.propagate is propagate and "propagate" in derprop.__all__
