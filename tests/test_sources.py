"""Where a book number comes from (derprop.book.sources): committed results files, this build's runs, fingerprints."""

from __future__ import annotations

import json
import os

from derprop.book.sources import committed, fingerprint, machine_words, matches, this_build
from tests.fixtures import PAYLOAD, render_myst, shows_as_text

MACHINE = {"device": "cpu", "device_name": "x86_64", "cpu_count": 2, "torch_threads": 2,
           "date": "2026-12-03T02:29:53+00:00"}


def test_a_committed_file_names_its_date_machine_and_threads(tmp_path):
    path = tmp_path / "results" / "cpu_evidence.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"machine": MACHINE, "threads": 1}))
    src = committed(path, root=tmp_path)
    assert (src.kind, src.path, src.date, src.machine, src.threads) == \
        ("committed", "results/cpu_evidence.json", "2026-12-03", "2-core x86_64", 1)
    assert src.markdown() == "committed: `results/cpu_evidence.json` (2026-12-03, 2-core x86\\_64, 1 thread per run)"
    # the process's own threads are not the runs' threads: without "threads" the file does not say
    assert committed(path, {"machine": MACHINE}, root=tmp_path).details() == \
        "2026-12-03, 2-core x86_64, threads not recorded"
    # a file that compares thread counts names every count its runs used
    noise = {"machine": MACHINE, "runs": [{"threads": 2}, {"threads": 1}, {"threads": 2}]}
    assert committed(path, noise, root=tmp_path).details() == "2026-12-03, 2-core x86_64, 1 and 2 threads per run"


def test_a_gpu_machine_is_named_by_its_device():
    assert machine_words({"device": "cuda", "device_name": "NVIDIA H100"}) == "NVIDIA H100"
    assert machine_words({}) is None


def test_a_run_of_this_build_names_its_folder_and_threads(tmp_path):
    run = tmp_path / "runs" / "book" / "small" / "cpu_dlp"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"device": "cpu (x86_64, 1 threads)", "threads": 1}))
    os.utime(run / "results.json", (1796000000, 1796000000))
    src = this_build(run, root=tmp_path)
    assert str(src) == "this build: runs/book/small/cpu_dlp (2026-11-30, CPU, 1 thread)"


def test_a_derived_file_matches_only_the_run_it_scored(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert fingerprint(run) is None and not matches({"run_fingerprint": None}, run)
    (run / "last.pt").write_bytes(b"weights of day one")
    scored = {"run_fingerprint": fingerprint(run)}
    assert matches(scored, run)
    assert not matches({}, run), "a file that records no fingerprint is never taken for this run"
    (run / "last.pt").write_bytes(b"weights of day two")  # the reader trained the run again
    assert not matches(scored, run)


def test_a_machine_name_from_a_file_shows_as_text(tmp_path):
    src = committed(tmp_path / "x.json", {"machine": {"device": "cpu", "device_name": PAYLOAD}}, root=tmp_path)
    details = src.markdown().split(" (", 1)[1]  # what follows the path, which is code
    assert shows_as_text(render_myst(details), PAYLOAD.replace("|", "").strip())
