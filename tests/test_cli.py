"""One command-line front for every entry point (derprop.training.cli): its error line, its Ctrl-C line, --version, --help.

Every error kind of the package, raised inside every command, must reach the user as one ``error:`` line with
exit status 2; Ctrl-C as one ``interrupted:`` line with exit status 130, SIGTERM and SIGHUP alike (143, 129); a
closed pipe on stdout ends a command quietly. The matrix runs in this process (each command's body replaced by
one that raises, or signals itself), then real bad inputs run as subprocesses, whose whole stderr is seen.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from derprop.data.datasets import DatasetError
from derprop.errors import ConfigError, DerPropError
from derprop.provenance import source
from derprop.training import cli

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source()), os.environ.get("PYTHONPATH", "")])}  # this checkout

# every entry point: its module, the function its body calls (replaced below), and arguments it parses
ENTRY_POINTS = {
    "derprop.train": ("_train", ["--config", "x.yaml"]),
    "derprop.evaluate": ("_evaluate_checkpoint", ["--checkpoint", "x.pt"]),
    "derprop.predict": ("_predict", ["--checkpoint", "x.pt", "--image", "a.jpg", "--out", "a.png"]),
    "derprop.book.runs": ("_train_runs", ["smoke"]),
    "data_prep.scenes": ("_run", ["--root", "x"]),
    "data_prep.voc": ("prepare", ["--root", "x"]),
    "data_prep.cityscapes": ("prepare", ["--root", "x"]),
    "data_prep.weights": ("_place", []),
    "pipelines.run_matrix": ("_run", ["list"]),
}


def project_errors() -> list[type[BaseException]]:
    """Every exception class that a module of derprop, data_prep or pipelines defines: a new kind is in the
    matrix below without being listed."""
    kinds = []
    for package in ("derprop", "data_prep", "pipelines"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            module = importlib.import_module(info.name)
            kinds += [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, BaseException)
                      and not issubclass(c, KeyboardInterrupt) and c.__module__ == module.__name__]
    return sorted(set(kinds) - {DerPropError}, key=lambda k: k.__name__)


KINDS = project_errors()
WORKER = ("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
          '  File "x.py", line 1, in f\nderprop.data.DatasetError: missing image data/x.jpg')


def test_every_error_kind_is_a_derprop_error():
    assert {k.__name__ for k in KINDS} >= {"DatasetError", "CheckpointError", "ConfigError", "RunDirError", "WriteError",
                                          "NonFiniteLossError", "PretrainedWeightsError", "WeightsError", "RunFailed"}
    for kind in KINDS:
        assert issubclass(kind, DerPropError), f"{kind.__module__}.{kind.__name__} must derive from DerPropError"
    assert issubclass(ConfigError, ValueError) and issubclass(DatasetError, ValueError)


def _raising(exc: BaseException):
    def body(*args, **kwargs):
        raise exc

    return body


@pytest.mark.parametrize("module", ENTRY_POINTS)
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_each_command_reports_each_error_kind_in_one_line(module, kind, monkeypatch, capsys):
    target, argv = ENTRY_POINTS[module]
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, target, _raising(kind(f"{kind.__name__} at fault; do this")))
    assert mod.main(argv) == 2
    assert capsys.readouterr().err == f"error: {kind.__name__} at fault; do this\n"


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_an_error_from_a_loader_worker_keeps_its_message_not_the_traceback(module, monkeypatch, capsys):
    target, argv = ENTRY_POINTS[module]
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, target, _raising(DatasetError(WORKER)))
    assert mod.main(argv) == 2
    assert capsys.readouterr().err == "error: missing image data/x.jpg\n"


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_ctrl_c_is_one_line_with_status_130(module, monkeypatch, capsys):
    target, argv = ENTRY_POINTS[module]
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, target, _raising(KeyboardInterrupt()))
    assert mod.main(argv) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("module", ENTRY_POINTS)
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_is_one_line_like_ctrl_c(module, name, monkeypatch, capsys):
    target, argv = ENTRY_POINTS[module]
    mod = importlib.import_module(module)
    signum = getattr(signal, name)
    monkeypatch.setattr(mod, target, lambda *a, **k: os.kill(os.getpid(), signum) or time.sleep(5))
    before = signal.getsignal(signum)
    assert mod.main(argv) == 128 + signum
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted by {name}: ") and err.count("\n") == 1, err
    assert signal.getsignal(signum) == before  # the command's handler does not outlive it


def test_a_forked_child_dies_of_the_signal_without_a_traceback():
    def body():
        pid = os.fork()
        if pid == 0:  # the child inherits the handler, not the role: SIGTERM ends it as it would without one
            time.sleep(10)
            os._exit(0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        assert os.waitpid(pid, 0)[1] == signal.SIGTERM

    assert cli.run(body) == 0


def test_an_error_line_is_cut_to_a_readable_length(capsys):
    def body():
        raise ConfigError("config key 'name' must be a string, got " + repr(["lol"] * 100_000))

    assert cli.run(body) == 2
    err = capsys.readouterr().err
    assert len(err) <= cli.MAX_LINE + len("error: \n") and err.endswith("…\n") and err.count("\n") == 1


def test_a_closed_pipe_ends_a_command_quietly(repo):
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.run_matrix", "list"], cwd=repo, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait() == cli.EXIT_CLOSED_PIPE and err == "", err


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_a_bad_argument_is_one_line_with_status_2(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main([*ENTRY_POINTS[module][1], "--no-such-flag"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--no-such-flag" in err and err.count("\n") == 1, err
    assert f"(see python -m {module} --help)" in err


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_version_is_the_installed_package_version(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"derprop {importlib.metadata.version('derprop')}\n"


def _usage(*command: str) -> str:
    proc = subprocess.run([sys.executable, *command, "--help"], cwd=source(), capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n")[0]


def test_help_names_the_program_as_it_was_called(repo, tmp_path):
    assert _usage("pipelines/run_matrix.py").startswith("usage: python pipelines/run_matrix.py ")
    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, function = target.split(":")
        shim = tmp_path / name  # what pip writes for a console script
        shim.write_text(f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n")
        assert _usage(str(shim)).startswith(f"usage: {name} "), name


@pytest.mark.parametrize("command", [
    ["-m", "derprop.train", "--config", "configs"],
    ["-m", "derprop.evaluate", "--checkpoint", "absent.pt", "--stride", "-5"],
    ["-m", "derprop.predict", "--checkpoint", "absent.pt", "--image", "a.jpg", "--out", "a.png"],
    ["-m", "data_prep.scenes", "--root", "absent", "--check"],
    ["pipelines/run_matrix.py", "one", "configs/absent.yaml"],
], ids=lambda c: " ".join(c[:2]))
def test_real_bad_inputs_end_in_one_line_without_a_traceback(repo, command):
    proc = subprocess.run([sys.executable, *command], cwd=repo, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr


def test_device_names_are_checked(monkeypatch):
    from derprop.training.distributed import pick_device

    assert str(pick_device("cpu")) == "cpu"
    with pytest.raises(ConfigError, match="'bogus' is not a device; use cpu or cuda"):
        pick_device("bogus")
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        pick_device("meta")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available here"):
        pick_device("cuda")


def test_at_least_is_an_argparse_type():
    assert cli.at_least(1)("3") == 3
    for text in ("0", "-5", "x"):
        with pytest.raises(Exception, match=">= 1"):
            cli.at_least(1)(text)


TINY = str(source() / "configs" / "cpu_scenes_tiny.yaml")


@pytest.mark.parametrize("args, words", [
    (["model.pretrained=absent.pth"], "model.pretrained='absent.pth': no such file; give a state dict saved"),
    (["model.pretrained=FOREIGN"], "not a checkpoint that loads safely (UnpicklingError)"),
    (["--device", "bogus"], "--device 'bogus' is not a device; use cpu or cuda"),
    (["--device", "cuda"], "--device cuda: no CUDA device is available here"),
    (["optim.poly_power=-3"], "config key 'optim.poly_power' must be > 0, got -3.0"),
    (["data.scale_range=[1, .inf]"], "config key 'data.scale_range' must be finite"),
    (["data.crop_size=100000000"], "config key 'data.crop_size' must be in [17, 4096]"),
    (["base=123"], "unknown config key 'base'"),
    (["optim=1"], "'optim' is a section"),
], ids=lambda a: a[0] if isinstance(a, list) else None)
def test_train_on_real_bad_settings_is_one_line(args, words, scenes_tiny, tmp_path, monkeypatch, capsys):
    from derprop.train import main

    (tmp_path / "foreign.pth").write_text("not a checkpoint")
    args = [a.replace("FOREIGN", str(tmp_path / "foreign.pth")) for a in args]
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["--config", TINY, "--out", str(tmp_path / "run"), f"data.root={scenes_tiny}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.timeout(120)
def test_make_reproduce_on_two_processes_with_an_odd_batch_is_one_line(repo, tmp_path):
    """``make reproduce GPUS=2`` with a global batch of 3: the run's ConfigError reaches the user as one error line
    naming the fix, through run_matrix, papermill and torchrun (each process would say it in one line too)."""
    name = f"odd_batch_{os.getpid()}"
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"base: {TINY}\noptim:\n  batch_size: 3\n")
    made = repo / "runs" / "matrix" / "smoke" / name
    try:
        proc = subprocess.run(["make", "--no-print-directory", "reproduce", f"CONFIG={config}", "GPUS=2", "DEVICE=cpu",
                               "SIZE=smoke", f"CHECK_PY={sys.executable}"], cwd=repo, env=ENV, capture_output=True,
                              text=True, timeout=110)
    finally:
        subprocess.run(["rm", "-rf", str(made)], check=True)
        for empty in (made.parent, made.parent.parent, made.parent.parent.parent):  # what this test alone made
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "optim.batch_size=3 is the global batch and does not divide over 2 processes" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", ["derprop.evaluate", "derprop.predict"])
def test_evaluate_and_predict_check_the_device_before_the_checkpoint(module, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    argv = [a.replace("a.png", str(tmp_path / "a.png")) for a in ENTRY_POINTS[module][1]]  # x.pt does not exist
    assert importlib.import_module(module).main([*argv, "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("error: --device cuda: no CUDA device is available here")


def test_book_runs_children_end_with_it(monkeypatch, capsys):
    from derprop.book import runs as book_runs

    children: list[subprocess.Popen] = []
    real = subprocess.Popen

    def sleeper(cmd, **kwargs):  # a training child, as the signal sees it: it runs until stopped
        children.append(real([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return children[-1]

    monkeypatch.setattr(book_runs, "warm_start", lambda *a, **k: None)
    monkeypatch.setattr(book_runs.subprocess, "Popen", sleeper)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert book_runs.main(["smoke", "--jobs", "2"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.startswith("interrupted by SIGTERM: every finished epoch is kept under ")
    assert len(children) == 2 and all(c.poll() is not None for c in children)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_child_started_to_end_with_its_parent_ends_when_the_parent_is_killed(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; from derprop.training import cli; "
         "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
         "preexec_fn=cli.ends_with_parent()); print(c.pid, flush=True); time.sleep(60)"],
        env=ENV, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # kill -9: no handler of the parent runs
    parent.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2] \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"


@pytest.mark.parametrize("root", ["absent", "a_file", "empty"])
def test_book_runs_checks_its_project_folder_before_writing(root, tmp_path, capsys):
    from derprop.book import runs as book_runs

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty").mkdir()
    assert book_runs.main(["smoke", "--root", str(tmp_path / root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: project folder {tmp_path / root} ") and err.count("\n") == 1, err
    assert "--root with a checkout of derprop" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a_file", "empty"]
