"""The papermill pipelines (pipelines/*.ipynb) and the matrix runner, at smoke size.

``make reproduce`` / ``make reproduce-all`` go through ``pipelines/run_matrix.py``,
which executes ``pipelines/train.ipynb`` with papermill; ``pipelines/evaluate.ipynb``
evaluates a checkpoint. Here both run on the tiny scenes tree, and the notebooks
also run unmodified under ``pytest --nbval-lax``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from derprop.book_runs import BOOK_RUNS

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"
TINY = "configs/cpu_scenes_tiny.yaml"


def _run_matrix():
    spec = importlib.util.spec_from_file_location("run_matrix", PIPELINES / "run_matrix.py")
    mod = sys.modules["run_matrix"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rm = _run_matrix()


# --------------------------------------------------------------------------- #
# the matrix (no training)
# --------------------------------------------------------------------------- #
def test_dedicated_config_files_are_preferred():
    assert rm.resolve_config("configs/voc_92.yaml", "wo_dlp") == ("configs/voc_92_wo_dlp.yaml", "")
    assert rm.resolve_config("configs/voc_366.yaml", "wo_dlp") == ("configs/voc_366.yaml", "wo_dlp")


def test_the_pipeline_notebook_does_not_import_the_script_that_runs_it():
    nb = json.loads((PIPELINES / "train.ipynb").read_text())
    code = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "derprop.tables import overrides_for" in code
    assert "run_matrix" not in code and "sys.path" not in code


def test_overrides_may_follow_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(rm, "run_one", lambda config, **kw: seen.update(config=config, **kw))
    assert rm.main(["one", TINY, "--size", "smoke", "optim.epochs=1", "--device", "cpu", "method.dlp=false"]) == 0
    assert (seen["config"], seen["size"], seen["device"]) == (TINY, "smoke", "cpu")
    assert list(seen["extra"]) == ["optim.epochs=1", "method.dlp=false"]


@pytest.mark.parametrize("notebook", ["train.ipynb", "evaluate.ipynb"])
def test_papermill_reads_every_parameter_without_a_warning(notebook, tmp_path, monkeypatch, caplog):
    import papermill

    with caplog.at_level(logging.WARNING):
        known = papermill.inspect_notebook(str(PIPELINES / notebook))
    assert not caplog.records, caplog.text  # e.g. "Unable to parse line 3"
    if notebook == "train.ipynb":
        passed = {}
        monkeypatch.setattr(rm, "execute", lambda path, params: passed.update(params))
        rm.run_one(TINY, size="smoke", runs_root=tmp_path, results_dir=None)
        assert passed and set(passed) <= set(known)  # else papermill warns "Passed unknown parameter"


def test_publish_writes_the_summary_atomically(tmp_path):
    run_dir, results = tmp_path / "run", tmp_path / "results"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"miou": 0.5, "device": "cpu", "config": {"profile": "paper"},
                                                      "final": {"momentum": {"original": {"miou": 0.5}}}}))
    path = rm.publish(run_dir, "voc_92", config="configs/voc_92.yaml", ablation="", size="smoke", results_dir=results)
    summary = json.loads(path.read_text())
    assert path == results / "voc_92.json" and summary["miou"] == 0.5 and summary["profile"] == "paper"
    assert summary["final"] == {"momentum": {"original": {"miou": 0.5, "pixel_acc": None}}}
    assert [p.name for p in results.iterdir()] == ["voc_92.json"]  # no temporary file left behind


# --------------------------------------------------------------------------- #
# papermill, end to end
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_one_trains_through_papermill_then_skips(scenes_tiny, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    extra = [f"data.root={scenes_tiny}"]
    run_dir = rm.run_one(TINY, ablation="wo_dlp", size="smoke", runs_root=runs, device="cpu", extra=extra,
                         results_dir=results)
    assert run_dir == runs / "cpu_scenes_tiny_wo_dlp"
    executed = json.loads((run_dir / "train.ipynb").read_text())
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
    res = json.loads((run_dir / "results.json").read_text())
    assert res["config"]["method"]["dlp"] is False and res["epochs"] == 1
    summary = json.loads((results / "cpu_scenes_tiny_wo_dlp.json").read_text())
    assert summary["miou"] == res["miou"] and summary["size"] == "smoke" and summary["ablation"] == "wo_dlp"
    stamp = (run_dir / "results.json").stat().st_mtime_ns
    rm.run_one(TINY, ablation="wo_dlp", size="smoke", runs_root=runs, device="cpu", extra=extra, results_dir=results)
    assert (run_dir / "results.json").stat().st_mtime_ns == stamp, "a finished run is skipped"
    assert rm.state(run_dir) == "done"

    import papermill

    out = tmp_path / "eval.ipynb"
    papermill.execute_notebook(str(PIPELINES / "evaluate.ipynb"), str(out), kernel_name="python3", cwd=str(ROOT),
                               parameters={"RUN_DIR": str(run_dir), "MODE": "center_crop", "CROP_SIZE": 32,
                                           "LIMIT": 4, "DEVICE": "cpu"}, progress_bar=False)
    ev = json.loads((run_dir / "eval_center_crop.json").read_text())
    assert ev["num_images"] == 4 or ev["results"]
    assert 0.0 <= ev["results"]["model"]["miou"] <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipelines_run_under_nbval_lax():
    """The notebooks as committed (default parameters: the tiny scenes config) under ``pytest --nbval-lax``."""
    subprocess.run([sys.executable, "-m", "data_prep.scenes", "--root", str(ROOT / "data" / "scenes_tiny"),
                    *BOOK_RUNS["smoke"]["data_args"], "--workers", "1", "--quiet"],
                   cwd=ROOT, check=True)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider",
                           "--rootdir", str(PIPELINES), str(PIPELINES / "train.ipynb"), str(PIPELINES / "evaluate.ipynb")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
