"""derprop.book.glance: every headline row names its source; a file or run that is not there gives no number."""

import json

from derprop.book.glance import build_rows, committed_rows, headlines, maths_rows

MACHINE = {"device": "cpu", "device_name": "x86_64", "cpu_count": 2, "date": "2026-12-03T02:29:53+00:00"}


def test_maths_rows_are_computed_and_name_their_chapter():
    rows = maths_rows()
    assert [str(r["chapter"]) for r in rows] == ["{doc}`theorems`", "{doc}`theorems`", "{doc}`paper_vs_code`"]
    assert str(rows[0]["value"]).startswith("8 ")  # Theorem 1: eight maps at every D, not the identity only
    assert str(rows[1]["value"]).startswith("2, 6, 20, 70 ")  # the sharp constants C(2k, k)


def test_missing_runs_and_files_give_no_number(tmp_path):
    rows = build_rows(tmp_path, "small")
    assert [str(r["value"]) for r in rows] == ["not trained yet"]
    committed = committed_rows(tmp_path)
    assert str(committed[0]["value"]) == "not measured"
    assert str(committed[-1]["value"]).startswith("0 of ")  # no GPU cell measured


def test_a_committed_file_is_cited_with_date_machine_and_threads(tmp_path):
    (tmp_path / "results").mkdir()
    noise = {"machine": MACHINE, "machine_range": 0.04,
             "runs": [{"threads": 1}, {"threads": 2}]}
    (tmp_path / "results" / "thread_noise.json").write_text(json.dumps(noise))
    row = next(r for r in committed_rows(tmp_path) if "threads" in r["what"])
    assert str(row["value"]) == "4.00 points"
    assert str(row["source"]) == ("committed: `results/thread_noise.json` "
                                  "(2026-12-03, 2-core x86\\_64, 1 and 2 threads per run)")


def test_headlines_put_the_maths_first(tmp_path):
    rows = headlines(tmp_path, "smoke")
    assert rows[0]["what"].startswith("Theorem 1") and len(rows) == len(maths_rows()) + 1 + len(committed_rows(tmp_path))


def test_the_regime_row_names_the_first_extent_where_the_oracle_nets_positive_on_both_checkpoints(tmp_path):
    (tmp_path / "results").mkdir()

    def point(extent, warm, derprop):
        net = {ck: {"map": {"bilinear": {"oracle": {"full": {"0.5": {"net": n}}}}}}
               for ck, n in (("warm", warm), ("derprop", derprop))}
        return {"extent": {"median": extent}, **net}

    def row(points):
        (tmp_path / "results" / "dlp_regime.json").write_text(json.dumps({"machine": MACHINE, "points": points}))
        return next(str(r["value"]) for r in committed_rows(tmp_path) if r["what"].startswith("Objects' extent"))

    # positive on the warm start alone does not count; the points are read in order of extent
    assert row([point(8.2, 5, 5), point(2.8, 20, -9), point(4.1, 16, 14)]) == "from 4.1 grid cells"
    assert row([point(2.8, 20, -9)]) == "at none of 1 geometries"
