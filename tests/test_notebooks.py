"""The papermill pipelines (pipelines/*.ipynb) and the matrix runner, at smoke size.

``make reproduce`` / ``make reproduce-all`` go through ``pipelines/run_matrix.py``,
which executes ``pipelines/train.ipynb`` with papermill; the notebook starts the
training processes (``torchrun`` for ``GPUS`` > 1, gloo on a CPU);
``pipelines/evaluate.ipynb`` evaluates a checkpoint. Here both run on the tiny
scenes tree, and the notebooks also run unmodified under ``pytest --nbval-lax``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from derprop.book.runs import BOOK_RUNS
from derprop.provenance import KEYS, source

PIPELINES = source() / "pipelines"
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
    assert "derprop.training.tables import overrides_for" in code
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
        monkeypatch.setattr(rm, "execute", lambda path, params, label: passed.update(params))
        rm.run_one(TINY, size="smoke", runs_root=tmp_path, results_root=None)
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
    assert set(KEYS) <= set(summary)  # the provenance fields, None where the run had none


# --------------------------------------------------------------------------- #
# papermill, end to end
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def repo_scenes_tiny() -> Path:
    """``data/scenes_tiny`` in the repository: the tree ``configs/cpu_scenes_tiny.yaml`` reads as it is."""
    root = source() / BOOK_RUNS["smoke"]["data"]
    subprocess.run([sys.executable, "-m", "data_prep.scenes", "--root", str(root), *BOOK_RUNS["smoke"]["data_args"],
                    "--workers", "1", "--quiet"], cwd=source(), check=True)
    return root


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_make_reproduce_trains_on_two_gloo_processes(repo, repo_scenes_tiny, tmp_path):
    """``make reproduce CONFIG=configs/cpu_scenes_tiny.yaml GPUS=2 SIZE=smoke`` on a CPU: the notebook starts torchrun
    with 2 gloo processes, streams their log, ends with the learning curves, and results.json says what ran."""
    make = subprocess.run(["make", "--no-print-directory", "-n", "reproduce", f"CONFIG={TINY}", "GPUS=2", "SIZE=smoke", "DEVICE=cpu",
                           f"CHECK_PY={sys.executable}"], cwd=repo, capture_output=True, text=True, check=True)
    runs, results = tmp_path / "runs", tmp_path / "results"
    cmd = [*shlex.split(make.stdout), "--runs-root", str(runs), "--results-root", str(results)]
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline backend draws the figure
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = runs / "smoke" / "cpu_scenes_tiny"
    executed = json.loads((run_dir / "train.ipynb").read_text())
    outputs = [o for c in executed["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    log = "".join("".join(o.get("text", "")) for o in outputs)
    assert f"from {repo}" in log, "the kernel imports this checkout's derprop"
    assert "--nproc_per_node=2" in log and "it 2/2" in log and "ran on 2 process(es)" in log  # the run's own log
    assert any("image/png" in o.get("data", {}) for o in outputs) and (run_dir / "learning_curves.png").is_file()
    assert "mIoU" in log.rsplit("momentum network", 1)[-1]  # the per-class IoU table ends the notebook
    res = json.loads((run_dir / "results.json").read_text())
    assert (res["world_size"], res["global_batch"], res["per_process_batch"], len(res["devices"])) == (2, 2, 1, 2)
    assert res["final"]["momentum"]["original"]["num_images"] == 4  # both processes' shards of val_limit=4
    summary = json.loads((results / "smoke" / "cpu_scenes_tiny.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["size"]) == (2, 2, "smoke")
    assert summary["git_commit"] == res["git_commit"] and summary["derprop_version"] == res["derprop_version"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_check_run_then_the_full_run_both_train_then_skip(repo, scenes_tiny, tmp_path):
    runs, results = tmp_path / "runs", tmp_path / "results"
    kw = dict(ablation="wo_dlp", gpus=1, runs_root=runs, device="cpu", extra=[f"data.root={scenes_tiny}"],
              results_root=results)
    small = rm.run_one(TINY, size="small", **kw)
    full = rm.run_one(TINY, size="full", **kw)
    assert (small, full) == (runs / "small" / "cpu_scenes_tiny_wo_dlp", runs / "full" / "cpu_scenes_tiny_wo_dlp")
    res_small, res_full = (json.loads((d / "results.json").read_text()) for d in (small, full))
    assert (res_small["epochs"], res_full["epochs"]) == (4, 2)  # SIZE=small's 4 epochs, then the config's own 2
    assert res_full["config"]["method"]["dlp"] is False and res_full["world_size"] == 1
    for size, res in (("small", res_small), ("full", res_full)):
        summary = json.loads((results / size / "cpu_scenes_tiny_wo_dlp.json").read_text())
        assert summary["miou"] == res["miou"] and summary["size"] == size and summary["ablation"] == "wo_dlp"
    stamp = (full / "results.json").stat().st_mtime_ns
    rm.run_one(TINY, size="full", **kw)
    assert (full / "results.json").stat().st_mtime_ns == stamp, "a finished run is skipped"

    import papermill

    out = tmp_path / "eval.ipynb"
    papermill.execute_notebook(str(PIPELINES / "evaluate.ipynb"), str(out), kernel_name="python3", cwd=str(repo),
                               parameters={"RUN_DIR": str(full), "MODE": "center_crop", "CROP_SIZE": 32,
                                           "LIMIT": 4, "DEVICE": "cpu"}, progress_bar=False)
    ev = json.loads((full / "eval_center_crop.json").read_text())
    assert ev["num_images"] == 4 or ev["results"]
    assert 0.0 <= ev["results"]["model"]["miou"] <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_that_fails_fails_its_notebook_with_the_run_error_line(tmp_path):
    with pytest.raises(rm.RunError) as err:
        rm.run_one(TINY, size="smoke", gpus=1, device="cpu", runs_root=tmp_path / "runs", results_root=None,
                   extra=[f"data.root={tmp_path / 'missing'}"])
    message = str(err.value)
    assert message.startswith("smoke/cpu_scenes_tiny failed: error: dataset root ") and "does not exist" in message
    assert str(tmp_path / "runs" / "smoke" / "cpu_scenes_tiny" / "train.ipynb") in message and "\n" not in message


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipelines_run_under_nbval_lax(repo, repo_scenes_tiny):
    """The notebooks as committed (default parameters: the tiny scenes config) under ``pytest --nbval-lax``."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider",
                           "--rootdir", str(PIPELINES), str(PIPELINES / "train.ipynb"), str(PIPELINES / "evaluate.ipynb")],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
