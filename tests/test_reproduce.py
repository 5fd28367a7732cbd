"""``make reproduce``'s path without training: the matrix runner's folders, skips and ``--force``, the
launch of the training processes, the Makefile's interpreter, and what the README names.

The papermill runs themselves are in ``test_notebooks.py``; here papermill is replaced by a stand-in
that records its parameters and writes a ``results.json``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import papermill
import pytest
import tomllib

from derprop.provenance import KEYS, source
from derprop.training import launch
from derprop.training.config import resolved
from derprop.training.configfile import load_config
from derprop.training.tables import overrides_for, run_path
from pipelines import run_matrix as rm

TINY = "configs/cpu_scenes_tiny.yaml"


@pytest.fixture
def fake_papermill(monkeypatch):
    """papermill.execute_notebook replaced: records the parameters, writes a finished run's results.json."""
    calls: list[dict] = []

    def execute(notebook, output, parameters, **_):
        calls.append(parameters)
        out = Path(parameters["OUT_DIR"])
        config = trained_config(parameters["CONFIG"], overrides_for(
            profile=parameters["PROFILE"], ablation=parameters["ABLATION"], size=parameters["SIZE"],
            extra=parameters["OVERRIDES"]))
        (out / "results.json").write_text(json.dumps({"miou": 0.5, "final": {}, "config": config,
                                                      **{k: 1 for k in KEYS}}))
        Path(output).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    return calls


def test_a_check_run_does_not_block_the_full_run_and_force_trains_again(fake_papermill, tmp_path, capsys):
    kw = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "results", gpus=2)
    small = rm.run_one(TINY, size="small", **kw)
    full = rm.run_one(TINY, size="full", **kw)
    assert (small, full) == (tmp_path / "runs" / "small" / "cpu_scenes_tiny", tmp_path / "runs" / "full" / "cpu_scenes_tiny")
    assert [c["SIZE"] for c in fake_papermill] == ["small", "full"] and all(c["GPUS"] == 2 for c in fake_papermill)
    assert [c["RESUME"] for c in fake_papermill] == ["auto", "auto"]
    for size in ("small", "full"):
        summary = json.loads((tmp_path / "results" / size / "cpu_scenes_tiny.json").read_text())
        assert summary["size"] == size and set(KEYS) <= set(summary)
    rm.run_one(TINY, size="full", **kw)
    assert len(fake_papermill) == 2 and "[skip] full/cpu_scenes_tiny" in capsys.readouterr().out
    rm.run_one(TINY, size="full", force=True, **kw)
    assert len(fake_papermill) == 3 and fake_papermill[-1]["RESUME"] == "overwrite"


def trained_config(config: str, overrides: list[str]) -> dict:
    """The config a run of ``config`` with ``overrides`` records in its results.json."""
    return resolved(load_config(source() / config, overrides))


def test_list_shows_every_entry_at_every_size(tmp_path, capsys):
    done = run_path("configs/voc_92.yaml", "", "small", tmp_path)
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"config": trained_config("configs/voc_92.yaml",
                                                                            overrides_for(size="small"))}))
    other = run_path("configs/voc_92.yaml", "", "smoke", tmp_path)  # a run of voc_183, copied in by hand
    other.mkdir(parents=True)
    (other / "results.json").write_text(json.dumps({"config": trained_config("configs/voc_183.yaml",
                                                                             overrides_for(size="smoke"))}))
    partial = run_path("configs/voc_92.yaml", "wo_dlp", "full", tmp_path)
    partial.mkdir(parents=True)
    (partial / "last.pt").write_bytes(b"")
    assert rm.main(["list", "--runs-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["entry", "smoke", "small", "full"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["voc_92"] == ["other", "done", "todo"] and rows["voc_92_wo_dlp"] == ["todo", "todo", "partial"]


def test_a_folder_holding_a_run_of_another_config_is_not_skipped(fake_papermill, tmp_path, capsys):
    kw = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "results", device="cpu")  # no GPU here
    out = run_path("configs/voc_92.yaml", "", "smoke", tmp_path / "runs")
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"config": trained_config("configs/voc_183.yaml",
                                                                           overrides_for(size="smoke"))}))
    assert rm.main(["one", "configs/voc_92.yaml", "--size", "smoke", "--runs-root", str(tmp_path / "runs"),
                    "--results-root", str(tmp_path / "results"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} holds a finished run of another config (recorded → this entry: "
                          "data.split '183' → '92'") and "--force trains smoke/voc_92 there anew" in err, err
    assert not fake_papermill
    rm.run_one("configs/voc_92.yaml", size="smoke", force=True, **kw)
    assert len(fake_papermill) == 1 and rm.state(out, "configs/voc_92.yaml", overrides_for(size="smoke")) == "done"


def test_a_failed_run_is_one_error_line_naming_its_notebook(monkeypatch, tmp_path, capsys):
    def fail(notebook, output, parameters, **_):
        raise papermill.PapermillExecutionError(3, 3, "run(command)", "RunFailed", "error: no such file x.png", [])

    monkeypatch.setattr(papermill, "execute_notebook", fail)
    code = rm.main(["one", TINY, "--size", "smoke", "--runs-root", str(tmp_path), "--results-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: smoke/cpu_scenes_tiny failed: error: no such file x.png")
    assert str(tmp_path / "smoke" / "cpu_scenes_tiny" / "train.ipynb") in err


def test_without_papermill_it_is_one_error_line_naming_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "papermill", None)  # import papermill now raises ImportError
    code = rm.main(["one", TINY, "--runs-root", str(tmp_path), "--results-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: papermill is not installed") and "make setup" in err and "pip install papermill" in err


# --------------------------------------------------------------------------- #
# the training processes
# --------------------------------------------------------------------------- #
def test_one_process_or_torchrun_with_n(tmp_path):
    one = launch.train_command(TINY, tmp_path, ["optim.epochs=1"], processes=1, device="cpu")
    assert one == [sys.executable, "-m", "derprop.train", "--config", TINY, "--out", str(tmp_path), "--device", "cpu",
                   "optim.epochs=1"]
    two = launch.train_command(TINY, tmp_path, processes=2)
    assert two[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert two[5:7] == ["-m", "derprop.train"]


def test_resume_modes(tmp_path):
    def flags(mode):
        return [f for f in launch.train_command(TINY, tmp_path, resume=mode) if f in ("--resume", "--overwrite")]

    assert (flags("auto"), flags("yes"), flags("no"), flags("overwrite")) == ([], ["--resume"], [], ["--overwrite"])
    (tmp_path / "last.pt").write_bytes(b"")
    assert flags("auto") == ["--resume"]  # a re-executed notebook continues the run
    with pytest.raises(ValueError, match="resume must be one of"):
        launch.train_command(TINY, tmp_path, resume="maybe")


def test_process_count_on_a_cpu():
    assert launch.process_count(2, "cpu") == 2 and launch.process_count(0, "cpu") == 1
    assert launch.process_count(-1, "cpu") == 1


def test_run_streams_lines_and_fails_with_the_last_error_line():
    script = ("import sys\n"
              "print('epoch 1/2 it 1/4', flush=True)\n"
              "print('error: optim.batch_size=8 is the global batch', file=sys.stderr, flush=True)\n"
              "print('torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ', flush=True)\n"
              "print('==========', flush=True)\n"
              "sys.exit(2)\n")
    lines: list[str] = []
    with pytest.raises(launch.RunFailed) as err:
        launch.run([sys.executable, "-c", script], echo=lines.append)
    assert str(err.value) == "error: optim.batch_size=8 is the global batch"
    assert lines[0] == "epoch 1/2 it 1/4" and lines[-1] == "=========="
    with pytest.raises(launch.RunFailed, match=r"^ValueError: bad$"):
        launch.run([sys.executable, "-c", "raise ValueError('bad')"], echo=lambda line: None)
    launch.run([sys.executable, "-c", "print('ok')"], echo=lines.append)
    assert lines[-1] == "ok"


# --------------------------------------------------------------------------- #
# the Makefile and the README
# --------------------------------------------------------------------------- #
def _make_n(*args: str) -> list[str]:
    proc = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=source(), capture_output=True, text=True, check=True)
    return [line for line in proc.stdout.splitlines() if line.strip()]


def test_make_reproduce_never_installs_and_uses_the_interpreter_it_finds(tmp_path):
    for target in (["reproduce", "CONFIG=configs/voc_92.yaml"], ["reproduce-all"]):
        without_venv = _make_n(*target, f"VENV={tmp_path / 'none'}", "PYTHON=/opt/box/bin/python3")
        assert len(without_venv) == 1 and without_venv[0].startswith("/opt/box/bin/python3 -m pipelines.run_matrix ")
        with_venv = tmp_path / "venv"
        (with_venv / "bin").mkdir(parents=True, exist_ok=True)
        (with_venv / "bin" / "python").write_text("")
        lines = _make_n(*target, f"VENV={with_venv}")
        assert len(lines) == 1 and lines[0].startswith(f"{with_venv}/bin/python -m pipelines.run_matrix ")
        assert not any(word in " ".join(without_venv + lines) for word in ("pip install", "-m venv", "setup"))


def test_make_reproduce_passes_gpus_size_device_and_force():
    (line,) = _make_n("reproduce", f"CONFIG={TINY}", "GPUS=2", "SIZE=smoke", "DEVICE=cpu", "FORCE=1",
                      "ABLATION=wo_dlp", f"CHECK_PY={sys.executable}")
    assert shlex.split(line) == [sys.executable, "-m", "pipelines.run_matrix", "one", "--config", TINY, "--size", "smoke",
                                 "--gpus", "2", "--device", "cpu", "--force", "--ablation", "wo_dlp"]


def test_the_readme_names_the_console_scripts(repo):
    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    readme = (repo / "README.md").read_text()
    assert set(scripts) == {"derprop-train", "derprop-evaluate", "derprop-predict"}
    for name in scripts:
        assert f"`{name}`" in readme, name
