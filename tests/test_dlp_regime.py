"""The regime sweep (experiments.dlp_regime), its choice rule, and the thread-noise benchmark's aggregation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import dlp_regime, thread_noise
from derprop.provenance import source


@pytest.fixture(scope="module")
def scenes_32(tmp_path_factory) -> Path:
    """64 training scenes of 32 px: enough for the 1/32 split (two labeled scenes) the sweep trains on."""
    root = tmp_path_factory.mktemp("data") / "scenes_32"
    subprocess.run([sys.executable, "-m", "data_prep.scenes", "--root", str(root), "--num-train", "64", "--num-val",
                    "4", "--size", "32", "--workers", "1", "--quiet"], cwd=source(), check=True)
    return root


def test_a_tiny_sweep_writes_every_field_and_resumes(scenes_32, tmp_path, monkeypatch):
    class Tiny(dlp_regime.Geometry):
        data = property(lambda self: scenes_32)

    monkeypatch.setattr(dlp_regime, "GEOMETRIES", {"t8": Tiny(32, 8, crop=32), "t4": Tiny(32, 4, crop=32)})
    monkeypatch.setattr(dlp_regime, "DEFAULT", "t8")
    monkeypatch.setattr(dlp_regime, "make_scenes", lambda root, args: root)
    argv = ["--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "regime.json"), "--images", "2",
            "optim.iters_per_epoch=1", "data.val_limit=2"]
    payload = dlp_regime.main(argv)
    assert [p["name"] for p in payload["points"]] == ["t8", "t4"]  # sorted by extent: stride 4 doubles it
    p4 = payload["points"][1]
    assert p4["derprop"]["map"]["grid"] == [8, 8] and p4["warm"]["map"]["grid"] == [8, 8]
    assert p4["headroom"]["warm"] == pytest.approx(p4["all_labels"]["miou"] - p4["warm"]["miou"])
    assert p4["headroom"]["full"] == pytest.approx(p4["all_labels_supervised"]["miou_backprop"]
                                                   - p4["supervised"]["miou_backprop"])
    for ck in ("warm", "derprop"):
        m = p4[ck]["map"]
        assert {"bilinear", "detail", "ceiling", "extent", "pixels"} <= set(m)
        assert {"learned", "oracle", "kappa", "break_even_share"} <= set(m["detail"])
    assert p4["command"].startswith("python -m experiments.dlp_regime --points t4")
    assert p4["threads"] == 1 and p4["wall_time_s"]["runs"] > 0 and "machine" in p4
    assert payload["paper"]["grid"] == 41 and payload["paper"]["extent"]["objects"] == 19
    config = json.loads((tmp_path / "runs" / "t4" / "all_labels_sup_s0" / "results.json").read_text())["config"]
    assert config["data"]["labeled_list"].endswith("splits/train.txt") and config["model"]["output_stride"] == 4
    assert not config["method"]["semi_supervised"] and config["method"]["momentum"]
    assert config["optim"]["warm_start"].endswith("all_labels_s0/last.pt")
    # a second call trains nothing: the points are reused
    stamp = (tmp_path / "runs" / "t4" / "point.json").stat().st_mtime
    assert dlp_regime.main(argv)["points"][1] == p4
    assert (tmp_path / "runs" / "t4" / "point.json").stat().st_mtime == stamp


def point(name: str, warm: int, derprop: int, headroom: float) -> dict:
    net = lambda n: {"map": {"bilinear": {"oracle": {"full": {"0.5": {"net": n}}}}}}  # noqa: E731
    return {"name": name, "extent": {"median": 1.0}, "warm": net(warm), "derprop": net(derprop),
            "headroom": {"full": headroom, "warm": 0.0}}


def test_choose_takes_the_cheapest_point_that_meets_both_conditions():
    points = [point("s64_os8", 10, -5, 0.20), point("s64_os4", 30, 20, 0.09), point("s128_os8_big", 5, 5, 0.09),
              point("s128_os4_big", 40, 40, 0.30)]
    choice = dlp_regime.choose(points)
    assert [r["name"] for r in choice["points"]] == ["s64_os8", "s128_os8_big", "s64_os4", "s128_os4_big"]  # by price
    assert choice["chosen"] == "s128_os8_big"
    assert [r["oracle_positive"] for r in choice["points"]] == [False, True, True, True]
    # as cheap a step, smaller scenes
    assert not choice["final"] and choice["unfinished"] == {"s64_os8_big": 1.0, "s96_os8_big": 1.0}
    assert dlp_regime.choose(points[:1])["chosen"] is None
    points.append(point("s64_os8_big", 1, 1, 0.01))  # finished, and failing the headroom
    assert not dlp_regime.choose(points)["final"]
    points.append(point("s96_os8_big", 1, -1, 0.20))  # finished, and failing the oracle
    assert dlp_regime.choose(points)["final"]


def test_thread_noise_pairs_runs_by_thread_count(tmp_path, monkeypatch):
    for threads, repeat, miou in ((1, 0, 0.40), (2, 0, 0.38), (1, 1, 0.41), (2, 1, 0.35)):
        run = tmp_path / "runs" / f"t{threads}_r{repeat}"
        run.mkdir(parents=True)
        final = {"backprop": {"original": {"miou": miou, "iou_per_class": {}, "num_images": 3}}}
        (run / "results.json").write_text(json.dumps({"miou": miou, "miou_net": "backprop", "miou_mode": "original",
                                                      "final": final, "wall_time_s": 60.0}))
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    monkeypatch.setattr(thread_noise, "train", lambda *a: pytest.fail("finished runs are not trained again"))
    payload = thread_noise.main(["--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "noise.json")])
    assert payload["by_threads"]["1"]["range"] == pytest.approx(0.01)
    assert payload["by_threads"]["2"]["range"] == pytest.approx(0.03)
    assert payload["machine_range"] == pytest.approx(0.06)
    assert payload["seed_spread"]["source"] == "results/cpu_evidence.json"
