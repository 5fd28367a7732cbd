"""The core benchmarks run end to end at a tiny size and write their JSON sections."""

import json

from benchmarks import derloss, dlp


def test_core_benchmarks_write_results(tmp_path):
    out = tmp_path / "bench_core.json"
    dlp.main(["--sizes", "64", "--chunk", "16", "--repeats", "1", "--out", str(out)])
    derloss.main(["--sizes", "64", "--chunk", "16", "--repeats", "1", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert set(payload) == {"dlp", "derloss"}
    assert {r["impl"] for r in payload["dlp"]["rows"]} == set(dlp.IMPLS)
    assert payload["dlp"]["machine"]["torch"]
    assert payload["derloss"]["ratios"][0]["M"] == 64
    assert all(r["seconds"] > 0 for r in payload["derloss"]["rows"])
