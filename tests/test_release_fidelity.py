"""The `official` profile against the released code's formulas, stated here from the release's files and issue 12.

Each reference below is written out with plain tensor ops (forward differences as slices, softmax,
matmul), independently of :mod:`derprop.method.losses` and :mod:`derprop.method.propagation`, so a misreading in
the package cannot hide in its own test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from derprop.method.losses import derivative_loss
from derprop.training.configfile import load_config
from derprop.training.loaders import loaders
from derprop.training.model import SegOutput
from derprop.training.trainer import Trainer

from tests.test_trainer import TINY


def feats(*shape, scale=1.0, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(grad)


def diff(v):
    """One forward difference along channels: v(i+1) − v(i)."""
    return v[:, 1:] - v[:, :-1]


def release_similarity(a, b, q):
    """Order-q similarity of the release's loss: softmax_c(Δ^q a)ᵀ softmax_c(Δ^q b) / √(D−q)."""
    for _ in range(q):
        a, b = diff(a), diff(b)
    return a.softmax(1).transpose(1, 2) @ b.softmax(1) / math.sqrt(a.shape[1])


def release_unlabeled(f1, f2, w1, w2):
    """The release's unlabeled consistency: mean over q = 0, 1 of mean |S_q(strong) − S_q(weak)|."""
    return sum((release_similarity(f1, f2, q) - release_similarity(w1, w2, q)).abs().mean() for q in (0, 1)) / 2


def release_labeled(f1, f2, labels, classes):
    """The labeled consistency against YᵀY/√C, over the pairs of non-ignored pixels only."""
    total, pairs = 0.0, 0
    for b in range(labels.shape[0]):
        valid = labels[b] != 255
        y = F.one_hot(labels[b][valid], classes).to(f1.dtype).T
        target = y.T @ y / math.sqrt(classes)
        for q in (0, 1):
            total = total + (release_similarity(f1[b:b + 1, :, valid], f2[b:b + 1, :, valid], q)[0] - target).abs().sum() / 2
        pairs += int(valid.sum()) ** 2
    return total / pairs


def release_sparsity(f1, f2):
    """mean |softmax over pixels of Δ²f|, averaged over the two heads (the release's 'norm' term)."""
    return (diff(diff(f1)).softmax(-1).abs().mean() + diff(diff(f2)).softmax(-1).abs().mean()) / 2


def official_loss(f1, f2, t1, t2, **kw):
    return derivative_loss(f1, f2, t1, t2, Q=1, op="forward", normalize="softmax", **kw)


@pytest.mark.parametrize("scale", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("chunk", [None, 37])
def test_unlabeled_derivative_loss_equals_the_release(scale, chunk):
    f1, f2 = feats(2, 21, 300, scale=scale, seed=1), feats(2, 21, 300, scale=scale, seed=2)
    w1, w2 = feats(2, 21, 300, scale=scale, seed=3, grad=False), feats(2, 21, 300, scale=scale, seed=4, grad=False)
    ours = official_loss(f1, f2, w1, w2, sparsity=False, chunk=chunk) / 2  # eq. 9 sums over q, the release averages
    ref = release_unlabeled(f1, f2, w1, w2)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(ours, (f1, f2)), torch.autograd.grad(ref, (f1, f2))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_differentiating_after_the_softmax_is_a_different_loss():
    """The order the release uses matters: softmax-then-Δ gives another value at q = 1."""
    f1, f2 = feats(1, 21, 300, seed=1, grad=False), feats(1, 21, 300, seed=2, grad=False)
    w1, w2 = feats(1, 21, 300, seed=3, grad=False), feats(1, 21, 300, seed=4, grad=False)
    wrong = (diff(f1.softmax(1)).transpose(1, 2) @ diff(f2.softmax(1)) / math.sqrt(20)
             - diff(w1.softmax(1)).transpose(1, 2) @ diff(w2.softmax(1)) / math.sqrt(20)).abs().mean()
    q1 = (release_similarity(f1, f2, 1) - release_similarity(w1, w2, 1)).abs().mean()
    assert abs(wrong.item() - q1.item()) > 0.1 * q1.item()


@pytest.mark.parametrize("chunk", [None, 11])
@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_labeled_derivative_loss_equals_the_release_on_valid_pairs(chunk, scale):
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 21, (2, 60), generator=g)
    labels[0, :7] = 255
    labels[1, 50:] = 255
    valid = labels != 255
    y = F.one_hot(labels.clamp(max=21), 22)[..., :21].permute(0, 2, 1).double()
    f1, f2 = feats(2, 21, 60, scale=scale, seed=6), feats(2, 21, 60, scale=scale, seed=7)
    ours = official_loss(f1, f2, y, y, labeled=True, mask=valid, sparsity=False, chunk=chunk) / 2
    ref = release_labeled(f1, f2, labels, 21)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    for a, b in zip(torch.autograd.grad(ours, (f1, f2)), torch.autograd.grad(ref, (f1, f2))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    detached = official_loss(f1, f2, y, y, labeled=True, mask=valid, sparsity=False, detach_labeled=True)
    torch.testing.assert_close(detached / 2, ref.detach(), rtol=1e-6, atol=0)
    assert not detached.requires_grad


def test_ignored_pixels_do_not_shrink_the_labeled_loss():
    """Dividing by the valid pairs: padding an image with ignored pixels leaves the loss unchanged."""
    labels = torch.randint(0, 5, (1, 30), generator=torch.Generator().manual_seed(0))
    y = F.one_hot(labels, 5).permute(0, 2, 1).double()
    f1, f2 = feats(1, 5, 30, seed=1), feats(1, 5, 30, seed=2)
    base = derivative_loss(f1, f2, y, y, labeled=True, sparsity=False)
    pad = torch.zeros(1, 5, 70, dtype=torch.float64)
    mask = torch.cat([torch.ones(1, 30), torch.zeros(1, 70)], 1).bool()
    padded = derivative_loss(torch.cat([f1, pad], 2), torch.cat([f2, pad], 2), torch.cat([y, pad], 2),
                             torch.cat([y, pad], 2), labeled=True, sparsity=False, mask=mask)
    torch.testing.assert_close(padded, base)


def test_sparsity_term_is_the_releases_constant():
    f1, f2 = feats(2, 21, 64, seed=1), feats(2, 21, 64, seed=2)
    w = feats(2, 21, 64, seed=3, grad=False)
    term = official_loss(f1, f2, w, w, eta=1.0, spatial_softmax_sparsity=True) - official_loss(
        f1, f2, w, w, sparsity=False)
    torch.testing.assert_close(term, release_sparsity(f1, f2))
    assert term.item() == pytest.approx(1 / 64)
    grads = torch.autograd.grad(term, (f1, f2))
    assert max(g.abs().max().item() for g in grads) < 1e-12
    raw = official_loss(f1, f2, w, w, eta=1.0) - official_loss(f1, f2, w, w, sparsity=False)
    torch.testing.assert_close(raw, (diff(diff(f1)).abs().mean() + diff(diff(f2)).abs().mean()) / 2)


def test_labeled_detach_and_spatial_softmax_are_independent_switches():
    f1, f2 = feats(1, 6, 20, seed=1), feats(1, 6, 20, seed=2)
    y = F.one_hot(torch.arange(20).remainder(6)[None], 6).permute(0, 2, 1).double()
    only_detach = official_loss(f1, f2, y, y, labeled=True, eta=1.0, detach_labeled=True)
    (g,) = torch.autograd.grad(only_detach, (f1,))
    assert g.abs().max() > 0  # the raw sparsity term still trains
    only_softmax = official_loss(f1, f2, y, y, labeled=True, eta=1.0, spatial_softmax_sparsity=True)
    (g,) = torch.autograd.grad(only_softmax, (f1,))
    assert g.abs().max() > 0  # the labeled similarities still train


# --------------------------------------------------------------------------- #
# One official training step on fixed network outputs
# --------------------------------------------------------------------------- #

B, C, D, S, G = 2, 11, 11, 33, 5  # batch, classes, feature channels, crop, feature grid (stride 8: exact)


class FixedNet(torch.nn.Module):
    """Returns prepared outputs: ``[x; u_w]`` (with the perturbation branch) or the strong view."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, x, perturb=False):
        return self.outputs["w" if perturb else "s"]


def _outputs():
    g = torch.Generator().manual_seed(3)

    def out(n, fp):
        grid = (torch.randn(n, C, G, G, generator=g) * 2).requires_grad_()
        return SegOutput(
            logits=F.interpolate(grid, size=(S, S), mode="bilinear", align_corners=True)
            + 0.3 * torch.randn(n, C, S, S, generator=g),
            f1=(torch.randn(n, D, G, G, generator=g) * 2).requires_grad_(),
            f2=(torch.randn(n, D, G, G, generator=g) * 2).requires_grad_(),
            logits_fp=torch.randn(n, C, S, S, generator=g).requires_grad_() if fp else None,
            logits_grid=grid,
        )

    return {"w": out(2 * B, True), "s": out(B, False), "mix": out(B, False)}


def _batch():
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, C, (B, S, S), generator=g)
    y[:, :3] = 255
    ign = torch.zeros(B, S, S, dtype=torch.long)
    ign[0, -4:] = 255
    ign2 = torch.zeros(B, S, S, dtype=torch.long)
    ign2[1, :, -5:] = 255
    box = torch.zeros(B, S, S, dtype=torch.bool)
    box[:, 8:20, 10:25] = True
    img = torch.zeros(B, 3, S, S)
    return (img, y), (img, img, ign, box), (img, img, ign2, box)


def release_step_loss(o, batch, epoch, epochs, tau0):
    """The release's total loss (its ``main.py``), term by term, from the prepared outputs (region propagation off)."""
    (_, y), (_, _, ign, box), (_, _, ign2, _) = batch
    w, s, mix = o["w"], o["s"], o["mix"]
    alpha = epoch / epochs

    def corr(out):  # L̃ = L·softmax_j(f1ᵀf2/√D + Δf1ᵀΔf2/√(D−1)), at the grid, then upsampled
        f1, f2 = out.f1.flatten(2), out.f2.flatten(2)
        score = f1.transpose(1, 2) @ f2 / math.sqrt(D) + diff(f1).transpose(1, 2) @ diff(f2) / math.sqrt(D - 1)
        lt = out.logits_grid.detach().flatten(2) @ score.softmax(-1)
        return F.interpolate(lt.view(-1, C, G, G), size=(S, S), mode="bilinear", align_corners=True)

    corr_w, corr_s = corr(w), corr(s)
    pred_x, pred_uw = w.logits[:B], w.logits[B:]
    blend = (1 - alpha) * pred_uw.detach() + alpha * corr_w[B:].detach()
    conf_w, mask_w = blend.softmax(1).max(1)
    conf_mix, mask_mix = mix.logits.detach().softmax(1).max(1)
    mask_c = torch.where(box, mask_mix, mask_w)
    conf_c = torch.where(box, conf_mix, conf_w)
    ign_c = torch.where(box, ign2, ign)
    # global threshold (CorrMatch): mean over predicted classes of their top confidence, EMA 0.999
    pred_cls, valid = blend.argmax(1), ign_c != 255
    tops = [blend.softmax(1).max(1)[0][(pred_cls == k) & valid].max() for k in pred_cls.unique()
            if ((pred_cls == k) & valid).any()]
    tau = 0.999 * tau0 + 0.001 * float(torch.stack(tops).mean())
    keep_c = (conf_c >= tau) & (ign_c != 255)
    keep_w = (conf_w >= tau) & (ign != 255)
    n_c, n_w = (ign_c != 255).sum(), (ign != 255).sum()
    soft_w = blend.softmax(1)
    logsm_s = F.log_softmax(s.logits, 1)
    loss_x = F.cross_entropy(pred_x, y, ignore_index=255)
    loss_x_corr = F.cross_entropy(corr_w[:B], y, ignore_index=255)
    loss_u_s1 = (-(logsm_s * soft_w) * keep_c.unsqueeze(1)).sum() / n_c
    corr_u = 0.5 * ((F.cross_entropy(corr_s, mask_c, reduction="none") * keep_c).sum() / n_c
                    + (F.cross_entropy(corr_w[B:], mask_w, reduction="none") * keep_w).sum() / n_w)
    kl = ((soft_w * (soft_w.log() - logsm_s)).sum(1) * keep_c).sum() / n_c
    fp = (F.cross_entropy(w.logits_fp[B:], mask_w, reduction="none") * keep_w).sum() / n_w
    # derivative terms: labels sampled on the grid (stride 8 at this crop), ignored pixels out
    y_grid = y[:, ::8, ::8].flatten(1)
    cons_x = release_labeled(w.f1[:B].flatten(2).detach(), w.f2[:B].flatten(2).detach(), y_grid, C)
    cons_u = release_unlabeled(s.f1.flatten(2), s.f2.flatten(2), w.f1[B:].flatten(2).detach(),
                               w.f2[B:].flatten(2).detach())
    norm_x = release_sparsity(w.f1[:B].flatten(2), w.f2[:B].flatten(2))
    norm_u = release_sparsity(s.f1.flatten(2), s.f2.flatten(2))
    total = (0.5 * loss_x + 0.5 * loss_x_corr + 0.25 * kl + 0.25 * loss_u_s1 + 0.25 * fp + 0.25 * corr_u
             + 0.5 * (cons_x + cons_u) + 0.25 * (norm_x + norm_u)) / 2
    return total, tau


def test_one_official_step_equals_the_releases_total_loss(scenes_tiny, tmp_path):
    cfg = load_config(TINY, [f"data.root={scenes_tiny}", "profile=official", "method.region_propagation=false",
                             "data.diag_images=0", "optim.epochs=4", f"data.crop_size={S}"])
    tr = Trainer(cfg, tmp_path)
    outputs = _outputs()
    tr.model = FixedNet(outputs)
    tr.momentum = lambda x, **_: outputs["mix"]  # the partner's pseudo-labels come from Θm
    batch, epoch = _batch(), 1
    tau0 = tr.threshold.value
    loss, logs = tr.compute_loss(batch, epoch)
    ref, tau = release_step_loss(outputs, batch, epoch, cfg.optim.epochs, tau0)
    assert logs["threshold"] == pytest.approx(tau, rel=1e-6)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)
    leaves = [t for o in outputs.values() for t in (o.f1, o.f2, o.logits_grid, o.logits_fp) if t is not None]
    ours = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)
    theirs = torch.autograd.grad(ref, leaves, allow_unused=True)
    for a, b in zip(ours, theirs):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("profile", "same"), [("official", True), ("paper", False)])
def test_cutmix_partner_is_the_same_image_under_official(scenes_tiny, tmp_path, profile, same):
    cfg = load_config(TINY, [f"data.root={scenes_tiny}", f"profile={profile}", "data.diag_images=0"])
    tr = Trainer(cfg, tmp_path)
    _, unlabeled, partner = loaders(tr.data, tr.cfg, tr.d)
    for epoch in (0, 1):
        unlabeled.sampler.set_epoch(epoch)
        partner.sampler.set_epoch(epoch)
        assert (list(unlabeled.sampler) == list(partner.sampler)) == same
    (uw, _, _, _), (uw2, _, _, _) = tr.data.train_u[0], tr.data.train_mix[0]
    assert not torch.equal(uw, uw2)  # same image, another augmentation
