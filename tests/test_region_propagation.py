"""Region propagation, blockwise, against the whole-tensor version it replaced (kept here as the reference).

The reference holds every ``K × crop`` map at once (an int64 one among them); the package computes the same
regions per image and per block of sampled rows. Masks and confident pixels must be identical, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from derprop.data.labels import IGNORE_INDEX
from derprop.method.propagation import official_similarity_factors
from derprop.training.model import build_model
from derprop.training.pseudo_labels import _half_range_threshold, region_propagation
from tests.fixtures import real_voc_sample


@torch.no_grad()
def whole_tensor_region_propagation(f1, f2, grid, rows, mask_c, keep_c, box, ign_c, tau, op, num_classes):
    """The previous implementation: all ``K`` maps at the crop size, class counts by a one-hot matmul."""
    g1, g2 = official_similarity_factors(f1, f2, op)
    b, k = g1.shape[0], rows.numel()
    h, w = grid
    attn = (g1[:, :, rows].transpose(1, 2) @ g2).softmax(-1)
    maps = F.interpolate(attn.view(b * k, 1, h, w), size=mask_c.shape[-2:], mode="bilinear", align_corners=True)
    maps = maps.view(b, k, -1)
    lo, hi = maps.amin(-1, keepdim=True), maps.amax(-1, keepdim=True)
    regions = (maps - lo) / (hi - lo).clamp_min(1e-12) > 0.5
    regions &= (~box & (ign_c != IGNORE_INDEX)).flatten(1).unsqueeze(1)
    seg = regions & keep_c.flatten(1).unsqueeze(1)
    n_seg, n_ori = seg.sum(-1).float(), regions.sum(-1).float()
    counts = seg.float() @ F.one_hot(mask_c.flatten(1), num_classes).float()
    top_n, top_cls = counts.max(-1)
    accept = (n_seg > 0) & (n_seg / n_ori.clamp_min(1) >= tau) & (top_n / n_seg.clamp_min(1) > tau)
    hit = regions & accept.unsqueeze(-1)
    last = (hit * torch.arange(1, k + 1).view(1, k, 1)).amax(1)
    covered = last > 0
    new_cls = torch.gather(top_cls, 1, (last - 1).clamp_min(0))
    mask = torch.where(covered, new_cls, mask_c.flatten(1)).view_as(mask_c)
    return mask, (keep_c.flatten(1) | covered).view_as(keep_c)


def _pseudo_labels(label: torch.Tensor, g: torch.Generator, classes: int, wrong: float = 0.1):
    """A pseudo-label with wrong blobs, 90 % confident pixels, a CutMix box and an ignored band."""
    b, size = label.shape[0], label.shape[-1]
    blobs = F.interpolate(torch.rand(b, 1, 6, 6, generator=g), size=(size, size), mode="nearest")[:, 0] < wrong
    mask = torch.where(blobs, torch.randint(0, classes, label.shape, generator=g), label)
    keep = torch.rand(label.shape, generator=g) < 0.9
    box = torch.zeros(label.shape, dtype=torch.bool)
    box[:, size // 5:size // 2, size // 3:size // 3 + size // 4] = True
    ign = torch.zeros(label.shape, dtype=torch.long)
    ign[:, -max(1, size // 12):] = IGNORE_INDEX
    return mask, keep, box, ign


def _random_case(b, crop, classes, scale, seed):
    """Features that follow a blocky class map (scale sets how peaked the rows of A are)."""
    g = torch.Generator().manual_seed(seed)
    grid = (crop - 1) // 8 + 1
    cls = F.interpolate(torch.randint(0, classes, (b, 1, 5, 5), generator=g).float(), size=(grid, grid),
                        mode="nearest")[:, 0].long()
    emb = torch.randn(classes, classes, generator=g) * scale
    f1 = (emb[cls] + 0.5 * scale * torch.randn(b, grid, grid, classes, generator=g)).permute(0, 3, 1, 2).flatten(2)
    f2 = (emb[cls] + 0.5 * scale * torch.randn(b, grid, grid, classes, generator=g)).permute(0, 3, 1, 2).flatten(2)
    label = F.interpolate(cls.unsqueeze(1).float(), size=(crop, crop), mode="nearest")[:, 0].long()
    rows = torch.randint(0, grid * grid, (64,), generator=g)
    return f1, f2, (grid, grid), rows, *_pseudo_labels(label, g, classes)


def _agree(args, tau, classes):
    f1, f2, grid, rows, mask, keep, box, ign = args
    ref = whole_tensor_region_propagation(f1, f2, grid, rows, mask, keep, box, ign, tau, "forward", classes)
    ours = region_propagation(f1, f2, grid, rows, mask, keep, box, ign, tau, "forward", classes)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    return (ref[0] != mask).float().mean().item(), (ref[1] & ~keep).float().mean().item()


@pytest.mark.parametrize("crop", [33, 97])
@pytest.mark.parametrize("scale", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("rows_per_block", [None, 5])
def test_blockwise_equals_the_whole_tensor_version_on_random_features(crop, scale, rows_per_block, monkeypatch):
    if rows_per_block:  # 64 rows in blocks of 5: the last block is short
        monkeypatch.setattr("derprop.training.pseudo_labels.REGION_BLOCK_PIXELS", crop * crop * rows_per_block)
    relabelled = added = 0.0
    for seed, tau in enumerate((0.0, 0.5, 0.85, 0.95)):
        r, a = _agree(_random_case(2, crop, 7, scale, seed), tau, 7)
        relabelled, added = relabelled + r, added + a
    assert relabelled > 0 and added > 0  # regions were accepted and relabelled something


def test_blockwise_equals_the_whole_tensor_version_on_a_real_image(monkeypatch):
    """A VOC image at crop 321 (M = 41²), features of an untrained DeepLabV3+ head, pseudo-labels from its label."""
    rgb, label = real_voc_sample()
    img = torch.from_numpy(rgb[:321, 100:421].copy()).permute(2, 0, 1)[None].float()
    torch.manual_seed(0)
    net = build_model({"backbone": "resnet18", "deep_stem": False, "num_classes": 21}).eval()
    with torch.no_grad():
        out = net(img)
    f1, f2 = out.f1.flatten(2), out.f2.flatten(2)
    g = torch.Generator().manual_seed(1)
    pl = _pseudo_labels(torch.from_numpy(label[:321, 100:421].astype("int64"))[None], g, 21)
    rows = torch.randint(0, f1.shape[-1], (128,), generator=g)
    # several blocks per image, the last one short: the block boundaries must not matter
    monkeypatch.setattr("derprop.training.pseudo_labels.REGION_BLOCK_PIXELS", 321 * 321 * 48)
    for tau in (0.5, 0.9):
        relabelled, added = _agree((f1, f2, (41, 41), rows, *pl), tau, 21)
    assert relabelled > 0 and added > 0


def test_the_threshold_is_the_min_max_normalisation_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    maps = torch.cat([torch.rand(50, 300, generator=g) ** 4, torch.full((1, 300), 0.25),
                      torch.tensor([[0.0] * 299 + [1e-30]]), torch.rand(3, 300, generator=g) * 1e-6 + 0.5])
    lo, hi = maps.amin(-1, keepdim=True), maps.amax(-1, keepdim=True)
    reference = (maps - lo) / (hi - lo).clamp_min(1e-12) > 0.5
    assert torch.equal(maps >= _half_range_threshold(maps), reference)
    assert not reference[50].any()  # a constant map is no region

