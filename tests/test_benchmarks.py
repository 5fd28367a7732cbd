"""The core benchmarks run end to end at a tiny size and write their JSON sections."""

import json

import pytest

from benchmarks import derloss, dlp, region

from derprop.provenance import source


def test_core_benchmarks_write_results(tmp_path, monkeypatch):
    monkeypatch.setattr(dlp, "TARGETS", (("factorised ≥ 20× literal", 64, "paper_speedup", 20.0, "min"),
                                         ("tiled ≤ 1.5× dense time", 64, "official_time_ratio", 1.5, "max")))
    out = tmp_path / "bench_core.json"
    dlp.main(["--sizes", "64", "--chunk", "16", "--repeats", "1", "--threads", "1", "--out", str(out)])
    derloss.main(["--sizes", "64", "--chunk", "16", "--repeats", "1", "--threads", "1", "--out", str(out)])
    region.main(["--sizes", "81", "--repeats", "1", "--threads", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert set(payload) == {"dlp", "derloss", "region_propagation"}
    assert payload["region_propagation"]["ratios"][0]["crop"] == 65
    assert payload["region_propagation"]["targets"] == []  # its target is stated at crop 801 only
    assert {r["impl"] for r in payload["dlp"]["rows"]} == set(dlp.IMPLS)
    assert payload["dlp"]["machine"]["torch"]
    assert payload["derloss"]["ratios"][0]["M"] == 64
    assert all(r["seconds"] > 0 for r in payload["derloss"]["rows"])
    targets = payload["dlp"]["targets"]
    assert [t["target"] for t in targets] == ["factorised ≥ 20× literal", "tiled ≤ 1.5× dense time"]
    assert all(isinstance(t["met"], bool) and t["threads"] == 1 for t in targets)


def test_one_failed_run_does_not_stop_the_others(scenes_tiny, tmp_path):
    from experiments.cpu_evidence import train_all

    config = str(source() / "configs" / "cpu_scenes_tiny.yaml")
    common = [f"data.root={scenes_tiny}", "optim.epochs=1", "optim.iters_per_epoch=1", "data.diag_images=0"]
    bad, good = tmp_path / "bad", tmp_path / "good"
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed: .*bad/train\.log"):
        train_all(config, [(bad, [*common, f"optim.warm_start={tmp_path / 'none.pt'}"]), (good, common)], 2, 1)
    assert (good / "results.json").is_file() and not (bad / "results.json").exists()
