"""The benchmark against the released code: what runs without a checkout of the release.

With one (``--release DIR``) the benchmark itself checks values and gradients against the release before timing.
"""

import math

import pytest
import torch.nn.functional as F

from benchmarks import vs_release


def test_without_a_release_it_skips_in_one_line(capsys):
    assert vs_release.main([]) == {}
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "skipped" in out


def test_a_folder_that_is_not_the_release_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not a checkout of the release"):
        vs_release.main(["--release", str(tmp_path)])


def test_the_divergence_note_restates_the_releases_labeled_term():
    """Recomputed with derprop's loss as ``tables.DIVERGENCES`` describes it, the labeled term equals the release's
    formula (main.py: 255 → 22, one-hot over 0..max, YᵀY/√(K−2), L1 mean over all pairs, orders 0 and 1)."""
    inp = vs_release.make_inputs(2, 33, 21)
    side = vs_release.grid_side(33)
    f1, f2 = (h(inp["proj_w"][:2]).flatten(2).detach() for h in vs_release._heads(inp, 21))
    target = vs_release.release_labeled_target(inp["label"], side)

    def similarity(a, b, q):
        for _ in range(q):
            a, b = a[:, 1:] - a[:, :-1], b[:, 1:] - b[:, :-1]
        return a.softmax(1).transpose(1, 2) @ b.softmax(1) / math.sqrt(a.shape[1])

    def second(f):
        return (f[:, 2:] - 2 * f[:, 1:-1] + f[:, :-2]).softmax(-1).abs().mean()

    release = sum(F.l1_loss(similarity(f1, f2, q), target) for q in (0, 1)) + (second(f1) + second(f2)) / 2
    assert (inp["label"] == 255).any()
    assert vs_release.derprop_labeled_as_the_release(inp) == pytest.approx(float(release), rel=1e-5)


def test_goals_are_judged_from_the_medians():
    def row(impl, crop, seconds, peak):
        return {"impl": impl, "crop": crop, "seconds": seconds, "peak_mib": peak}

    rows = [row("release", 321, 3.0, 300), row("derprop-dense", 321, 2.5, 200), row("derprop-tiled", 321, 1.5, 90),
            row("release", 801, 60, 9000), row("derprop-dense", 801, 50, 8000), row("derprop-tiled", 801, 30, 900),
            row("release-region", 321, 0.6, 50), row("derprop-region", 321, 0.2, 30),
            row("derprop-region", 801, 1.0, 70)]
    judged = vs_release.goals(rows)
    # dense and tiled (speed at 321, memory at 801), then region propagation (speed at 321, memory at 801)
    assert [g["met"] for g in judged] == [False, False, True, True, True, True]
    assert judged[2]["value"] == pytest.approx(2.0) and judged[3]["value"] == pytest.approx(0.1)
    assert [g["met"] for g in vs_release.goals(rows[:3])] == [False, None, True, None, None, None]
