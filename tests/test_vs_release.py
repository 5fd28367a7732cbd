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


def test_every_renamed_module_is_a_release_name():
    """derprop's parameter names map onto the release's ``SegmentationNet`` names (the value check loads derprop's
    weights into the release's network through them): nothing of derprop's own naming is left, no two collide."""
    from benchmarks import release_step
    from derprop.training.configfile import load_config
    from derprop.training.model import build_model
    from derprop.provenance import source

    names = list(build_model(load_config(source() / "configs" / "voc_92.yaml", ["model.pretrained=none"]).model)
                 .state_dict())
    mapped = [release_step.release_name(n) for n in names]
    assert len(set(mapped)) == len(names) == 703
    assert not [n for n in mapped if n.startswith(("aspp.", "head1.", "head2.", "fuse.0.0", "fuse.1.1"))]
    assert {"head.b4.gap.1.weight", "corr.conv2.bias", "fuse.4.running_var", "head.b3.0.weight"} <= set(mapped)


def test_step_memory_scales_the_network_by_pixels_and_takes_the_block_at_the_target_crop():
    from benchmarks import release_step

    blocks = [{"impl": "release", "crop": 321, "peak_mib": 400.0}, {"impl": "release", "crop": 801, "peak_mib": 6800.0}]
    rows = [{"impl": "release-step", "crop": 321, "batch": 2, "state_mib": 2000.0, "peak_mib": 2 * 400 + 1000.0,
             "peak_total_mib": 0.0},
            {"impl": "release-step", "crop": 801, "batch": 2, "error": "does not fit in 14 GiB"},
            {"impl": "derprop-step-fast", "crop": 321, "batch": 2, "state_mib": 2000.0, "peak_mib": 900.0}]
    est = {r["batch"]: r for r in release_step.scaling(rows, blocks)}  # no block row of derprop's: not estimated
    for b in (2, 4, 8):  # network: 1000 MiB for 2 images at 321, grows with the pixels; the block: per image, at 801
        want = (2000 + b / 2 * (1000 * (801 / 321) ** 2 + 2 * 6800)) / 1024
        assert est[b]["estimated_peak_gib"] == pytest.approx(want)
    assert est[2]["measured"] == "does not fit in 14 GiB" and est[4]["measured"] == "not tried"
    assert est[8]["fits_80gb_card"] is (want <= 80e9 / 2**30 - 1)


def test_step_ratios_are_each_recipe_over_the_release():
    from benchmarks import release_step

    rows = [{"impl": "release-step", "crop": 321, "batch": 2, "images_per_s": 0.2, "peak_mib": 4000,
             "peak_total_mib": 6000},
            {"impl": "derprop-step-fast", "crop": 321, "batch": 2, "images_per_s": 0.44, "peak_mib": 1800,
             "peak_total_mib": 3000},
            {"impl": "derprop-step-fp32", "crop": 321, "batch": 2, "error": "does not fit in 14 GiB"}]
    (r,) = release_step.ratios(rows)
    assert (r["recipe"], r["speed_vs_release"], r["step_memory_vs_release"]) == ("fast", pytest.approx(2.2), 0.45)


def test_a_case_over_the_memory_limit_does_not_fit(tmp_path, monkeypatch):
    from benchmarks.common import run_isolated

    (tmp_path / "grab.py").write_text("import json, sys\nx = bytearray(int(json.loads(sys.argv[2])['gib'] * 2**30))\n"
                                      "print(json.dumps({'held': len(x)}))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert run_isolated("grab", {"gib": 0.05}, limit_gib=1) == {"held": int(0.05 * 2**30)}
    assert run_isolated("grab", {"gib": 2}, limit_gib=1) == {"error": "does not fit in 1 GiB", "limit_gib": 1}
