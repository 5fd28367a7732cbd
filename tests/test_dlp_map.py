"""The DLP map: oracle weights, the three families and the fixed/broken counts, against dense definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from derprop.book import dlp_map
from derprop.data.labels import IGNORE_INDEX
from derprop.training.objective import label_on_grid


def inputs(seed: int = 0, n: int = 3, c: int = 4, grid: int = 4, size: int = 13) -> dlp_map.MapInputs:
    g = torch.Generator().manual_seed(seed)
    m = grid * grid
    labels = torch.randint(0, c, (n, size, size), generator=g)
    labels[0, :2, :2] = IGNORE_INDEX
    grid_labels = label_on_grid(labels, (grid, grid), "nearest").flatten(1)
    scores = torch.randn(n, m, m, generator=g)
    logits_grid = torch.randn(n, c, m, generator=g) * 3
    logits = F.interpolate(logits_grid.view(n, c, grid, grid), size=(size, size), mode="bilinear",
                           align_corners=True) + 0.5 * torch.randn(n, c, size, size, generator=g)
    return dlp_map.MapInputs(logits, logits_grid, scores, scores.softmax(-1), labels, grid_labels, (grid, grid),
                             "logit")


def test_oracle_is_the_class_mean():
    inp = inputs()
    lt = inp.logits_grid @ dlp_map.oracle_weights(inp.grid_labels)
    for k in range(inp.grid_labels.shape[0]):
        for j in range(inp.grid_labels.shape[1]):
            y = int(inp.grid_labels[k, j])
            if y == IGNORE_INDEX:  # an ignored pixel only keeps itself
                assert torch.allclose(lt[k, :, j], inp.logits_grid[k, :, j])
                continue
            same = inp.grid_labels[k] == y
            assert torch.allclose(lt[k, :, j], inp.logits_grid[k][:, same].mean(-1), atol=1e-6)


def test_families_start_at_the_learned_weights_and_end_at_the_oracle():
    inp = inputs()
    for family, values in dlp_map.FAMILIES.items():
        assert torch.allclose(dlp_map.family_weights(inp, family, values[0]), inp.weights, atol=1e-6), family
    oracle = dlp_map.oracle_weights(inp.grid_labels)
    assert torch.allclose(dlp_map.family_weights(inp, "alpha", 1.0), oracle)
    # a large similarity bonus keeps only the own class (row sums stay one)
    w = dlp_map.family_weights(inp, "kappa", 60.0)
    y = inp.grid_labels
    other = (y.unsqueeze(-1) != y.unsqueeze(1)) & (y != IGNORE_INDEX).unsqueeze(-1)
    assert float(w[other].max()) < 1e-20 and torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_fixed_and_broken_count_every_changed_pixel():
    inp = inputs(seed=1)
    s = dlp_map.score(inp, dlp_map.oracle_weights(inp.grid_labels), etas=(0.5,))
    lt = inp.logits_grid @ dlp_map.oracle_weights(inp.grid_labels)
    up = F.interpolate(lt.view(3, 4, 4, 4), size=(13, 13), mode="bilinear", align_corners=True)
    before, after = inp.logits.argmax(1), (0.5 * inp.logits + 0.5 * up).argmax(1)
    valid = inp.labels != IGNORE_INDEX
    fixed = int(((before != inp.labels) & (after == inp.labels) & valid).sum())
    broken = int(((before == inp.labels) & (after != inp.labels) & valid).sum())
    assert s["full"]["0.5"] == pytest.approx({"fixed": fixed, "broken": broken, "net": fixed - broken,
                                              "acc": s["full"]["0.5"]["acc"], "miou": s["full"]["0.5"]["miou"]})
    assert s["own_share"] == pytest.approx(1.0)


def test_break_even_interpolates_the_first_sign_change():
    pts = [{"own_share": a, "full": {"0.5": {"net": n}}} for a, n in ((0.2, -10), (0.4, 10), (0.6, 30))]
    assert dlp_map.break_even(pts) == pytest.approx(0.3)
    assert dlp_map.break_even(pts[:1]) is None


def test_ceiling_splits_every_wrong_pixel():
    inp = inputs(seed=2)
    c = dlp_map.ceiling(inp)
    assert c["whole_region"] + c["boundary"] + c["interior"] == c["wrong"]
    assert c["whole_region_fixed"] <= c["whole_region"] and c["interior_fixed"] <= c["interior"]


def test_kappa_snapshots_agree_with_the_scores():
    inp = inputs(seed=3)
    base = {"image": np.zeros((2, 13, 13, 3), np.uint8), "gt": inp.labels[:2].numpy(), "names": np.array(["a", "b"])}
    snaps = dlp_map.kappa_snapshots(inp, (0.0, 20.0), base, eta=0.5)
    for kappa, snap in snaps.items():
        s = dlp_map.score(inp, dlp_map.family_weights(inp, "kappa", kappa), etas=(0.5,))
        assert (snap["stat_pl_fixed"], snap["stat_pl_broken"]) == (s["full"]["0.5"]["fixed"], s["full"]["0.5"]["broken"])
        assert snap["pl_after"].shape == (2, 13, 13) and snap["stat_attn_share_ratio"] == pytest.approx(s["share_ratio"])
        assert ((snap["confidence"] > 0) & (snap["confidence"] <= 1)).all()
    with pytest.raises(ValueError, match="not the first diagnostic images"):
        dlp_map.kappa_snapshots(inp, (0.0,), {**base, "gt": inp.labels[1:3].numpy()})


def test_detail_preserving_upsampling_keeps_the_logits_where_nothing_propagates():
    inp = inputs(seed=4)
    identity = torch.eye(inp.weights.shape[-1]).expand_as(inp.weights)
    _, full = dlp_map.propagate_with(inp, identity, upsample="detail")
    assert torch.allclose(full, inp.logits)
    s = dlp_map.score(inp, identity, etas=(1.0,), upsample="detail")
    assert s["full"]["1"]["fixed"] == s["full"]["1"]["broken"] == 0


def test_object_extent_counts_objects_in_grid_cells():
    labels = torch.zeros(2, 16, 16, dtype=torch.long)  # a 4 × 4 grid: a cell is 16 pixels
    labels[0, :8, :8] = 1  # 64 px: 2 cells across
    labels[0, 12:, 12:] = 1  # same class, elsewhere: another object of 16 px, 1 cell across
    labels[0, 9, 0:3] = 2  # a sliver of 3 px: less than a cell, not counted
    labels[1, 4:8, 5:9] = 3
    labels[1, 0, 0] = IGNORE_INDEX
    e = dlp_map.object_extent(labels, (4, 4))
    assert e["objects"] == 3 and e["cell_pixels"] == 16
    assert e["median"] == pytest.approx(1.0) and e["q75"] == pytest.approx(1.5)
    assert e["pixel_median"] == pytest.approx(2.0)  # 64 of the 96 object pixels lie in the 2-cell object


def test_regime_point_scores_both_upsamplings_and_counts_pixels():
    from derprop.book.report import net_per_thousand  # it reads map results, so it lives in report

    inp = inputs(seed=5)
    p = dlp_map.regime_point(inp)
    assert p["pixels"]["full"] == int((inp.labels != IGNORE_INDEX).sum())
    for up in dlp_map.UPSAMPLES:
        assert p[up]["learned"] == dlp_map.score(inp, inp.weights, upsample=up) | {"value": 0.0}
        assert p[up]["oracle"] == dlp_map.score(inp, dlp_map.oracle_weights(inp.grid_labels), upsample=up)
    assert p["bilinear"]["oracle"]["grid"] == p["detail"]["oracle"]["grid"]  # the grid points need no upsampling
    assert p["bilinear"]["oracle"]["full"] != p["detail"]["oracle"]["full"]
    net = p["detail"]["oracle"]["full"]["0.5"]["net"]
    assert net_per_thousand(p, "detail", "oracle") == pytest.approx(1000 * net / p["pixels"]["full"])
