"""What runs and benchmarks show (derprop.book.report): published matrix runs, the cost of a run, CPU findings."""

from __future__ import annotations

import json
import re

import pytest

from derprop.book.report import cpu_findings, gpu_hours, matrix_results, train_step_rows
from tests.fixtures import PAYLOAD, poisoned_results, render_myst, shows_as_text


def test_a_full_run_replaces_a_check_run(tmp_path):
    for size, miou in (("small", 0.1), ("full", 0.77)):
        (tmp_path / "matrix" / size).mkdir(parents=True)
        (tmp_path / "matrix" / size / "voc_92.json").write_text(json.dumps({"miou": miou}))
    assert matrix_results(tmp_path) == {"voc_92": {"size": "full", "miou": 0.77}}


def test_gpu_hours_from_the_fastest_gpu_step_of_the_configs_own_recipe(repo, tmp_path):
    def row(config, ips, amp="none", cl=False, impl="dense", compile=False):
        return {"profile": "official", "config": config, "crop": 321, "backbone": "resnet101", "images_per_s": ips,
                "amp": amp, "channels_last": cl, "impl": impl, "compile": compile}

    rows = [row("dense-fp32", 10.0), row("tiled-fp32", 11.0, impl="tiled"),
            row("tiled-amp-cl", 20.0, "bf16", True, "tiled"), row("tiled-amp-cl-compile", 30.0, "bf16", True, "tiled", True)]
    (tmp_path / "gpu_check_h100.json").write_text(json.dumps(
        {"train_step": {"machine": {"device": "cuda", "device_name": "H100"}, "rows": rows}}))
    (tmp_path / "bench_train_step_cpu.json").write_text(json.dumps(
        {"machine": {"device": "cpu"}, "rows": [{**rows[0], "images_per_s": 99.0}]}))
    steps = train_step_rows(tmp_path)
    assert len(steps) == 5
    hours, used = gpu_hours(repo / "configs" / "voc_92.yaml", steps)
    assert used["config"] == "dense-fp32" and used["device_name"] == "H100"  # its own recipe; CPU rows never count
    assert hours == pytest.approx(80 * (10582 - 92) * 2 / 10.0 / 3600)
    hours, used = gpu_hours(repo / "configs" / "voc_92_fast.yaml", steps)
    assert used["config"] == "tiled-amp-cl"  # the fast recipe, not compiled: training does not compile
    assert hours == pytest.approx(80 * (10582 - 92) * 2 / 20.0 / 3600)
    assert gpu_hours(repo / "configs" / "voc_92.yaml", [r for r in steps if r["device"] == "cpu"]) is None


def test_cpu_findings_read_the_claim_and_say_what_is_missing(tmp_path):
    assert [line.split(":")[0] for line in cpu_findings(tmp_path)] == ["No CPU evidence yet", "No DLP map yet"]
    claim = {"baseline": "supervised", "margin": 0.02, "seeds": [3, 4], "measured": True, "met": False,
             "diff_per_seed": {"backprop": {"3": 0.031, "4": 0.012}, "momentum": {"3": 0.025, "4": 0.021}}}
    (tmp_path / "cpu_evidence.json").write_text(json.dumps({"claim": claim}))
    oracle = {"full": {"0.5": {"fixed": 1200, "broken": 300, "net": 900}}}
    (tmp_path / "dlp_map.json").write_text(json.dumps({"oracle": oracle, "break_even_share": {"kappa": 0.61}}))
    first, second = cpu_findings(tmp_path)
    assert "+3.1 / +1.2 pp" in first and "+2.5 / +2.1 pp" in first and "**not met**" in first
    assert "fix 1,200 and break 300" in second and "0.61" in second


def test_paired_records_pair_each_network_seed_by_seed():
    from derprop.book.report import paired_columns, paired_records

    summary = {
        "base": {"seeds": [0, 1], "reference": "base",
                 "nets": {"backprop": {"mean": 0.40, "std": 0.01, "per_seed": {"0": 0.39, "1": 0.41}}}},
        "full": {"seeds": [0, 1], "reference": "base",
                 "nets": {"backprop": {"mean": 0.42, "std": 0.02, "diff_per_seed": {"1": -0.01, "0": 0.05},
                                       "diff": {"mean": 0.02}}}},
    }
    base, full = paired_records(summary, names={"full": "DerProp"})
    assert base["d_backprop"] == "reference" and base["momentum"] == "–"
    assert full["row"] == "DerProp" and full["backprop"] == "42.00 ± 2.00"
    assert full["d_backprop"] == "+5.0 / \u22121.0 (mean +2.00)"  # seeds in order, not in the file's order
    one = {"x": {"seeds": [0], "nets": {"backprop": {"mean": 0.352, "std": 0.0, "per_seed": {"0": 0.352}}}}}
    assert paired_records(one)[0]["backprop"] == "35.20 (n = 1)"  # not "± 0.00"
    assert paired_columns()[2].startswith("backprop=")


def regime_payload() -> dict:
    """A ``results/dlp_regime.json`` of three geometries whose maps are made from random inputs."""
    from derprop.book import dlp_map
    from tests.test_dlp_map import inputs

    points = []
    for k, (name, extent) in enumerate((("s64_os4", 5.0), ("s64_os8", 2.7), ("s128_os4_big", 16.5))):
        maps = {ck: dlp_map.regime_point(inputs(seed=k + 10 * j)) for j, ck in enumerate(("warm", "derprop"))}
        nets = {"miou_backprop": 0.45, "miou_momentum": 0.46}
        points.append({"name": name, "size": 64, "output_stride": 8, "extent": {"median": extent},
                       "headroom": {"full": 0.05 * (k + 1), "warm": 0.01}, "warm": {"miou": 0.4, "map": maps["warm"]},
                       "supervised": nets, "all_labels_supervised": nets, "derprop": {**nets, "map": maps["derprop"]}})
    paper = {"grid": 41, "extent": {"median": 4.9, "pixel_median": 18.8}}
    return {"points": points, "default": "s64_os8", "paper": paper}


def test_regime_records_sort_by_extent_and_normalise_per_thousand_pixels():
    from derprop.book.report import regime_records

    data = regime_payload()
    recs = regime_records(data)
    assert [r["extent"] for r in recs] == [2.7, 5.0, 16.5]
    p = data["points"][2]  # the largest extent
    m = p["derprop"]["map"]
    assert recs[2]["derprop_oracle_bilinear"] == pytest.approx(
        1000 * m["bilinear"]["oracle"]["full"]["0.5"]["net"] / m["pixels"]["full"])
    assert recs[2]["headroom"] == pytest.approx(15.0) and "one large object" in recs[2]["geometry"]


def test_regime_figures_draw_every_line_and_both_markers():
    import matplotlib

    matplotlib.use("Agg")
    from derprop.book.report import REGIME_LINES, headroom_figure, regime_figure

    fig = regime_figure(regime_payload())
    for ax in fig.axes:
        assert len(ax.lines) == len(REGIME_LINES) + 2  # the four lines, the zero line, the CPU default
        assert len(ax.patches) == 1  # the paper's span
        assert [round(x, 1) for x in ax.lines[0].get_xdata()] == [2.7, 5.0, 16.5]
    fig = headroom_figure(regime_payload())
    assert [round(y) for y in fig.axes[1].lines[0].get_ydata()] == [10, 5, 15]


def test_cpu_findings_show_what_the_files_hold_as_text(tmp_path):
    findings = cpu_findings(poisoned_results(tmp_path) / "results")
    for sentence in findings:
        rendered = render_myst(sentence).replace('<span class="math inline">\\eta_{ep}</span>', "η_ep")  # ours
        assert "<img" not in rendered and "<script" not in rendered and 'class="math' not in rendered, rendered
    claim = findings[0].split(" (committed:")[0]  # the source names its file as code
    assert shows_as_text(render_myst(claim).replace("<strong>not met</strong>", "not met"),
                         PAYLOAD.replace("|", "").strip())
    assert "this book's criterion" in findings[0] and findings[0].count("**not met**") == 1


def test_regime_findings_write_real_minus_signs_and_both_headroom_branches(repo):
    import copy

    from derprop.book.report import regime_findings

    regime = json.loads((repo / "results" / "dlp_regime.json").read_text())
    text = " ".join(regime_findings(regime))
    assert not re.search(r"(?<![\w.])-\d", text), text  # numbers carry a real minus, never a hyphen
    assert "8 pp or more at" in text
    low = copy.deepcopy(regime)
    for p in low["points"]:
        p["headroom"]["full"] = 0.05
    assert regime_findings(low)[1].endswith("never 8 pp.")
