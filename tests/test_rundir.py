"""The run folder (derprop.training.rundir): a kill at any write, locks, fresh starts, stale files, resume options."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from derprop.provenance import source
from derprop.train import main
from derprop.training import atomic, loaders, paths, rundir
from derprop.training import checkpoint as ck
from derprop.training.configfile import load_config
from derprop.training.trainer import Trainer
from tests.fixtures import TrainingInterrupted


TINY = source() / "configs" / "cpu_scenes_tiny.yaml"
FAST = ["model.backbone=mobilenet_v2", "model.aspp_dilations=[1]", "data.crop_size=24", "optim.iters_per_epoch=1",
        "data.val_limit=2", "data.diag_images=1", "eval.final_modes=[original]"]


class Kill(BaseException):
    """A simulated ``kill -9``: no ``except Exception`` handler sees it."""


def fast(root, *overrides):
    return load_config(TINY, [f"data.root={root}", *FAST, *overrides])


def cli(root, out, *args):
    return main(["--config", str(TINY), "--out", str(out), f"data.root={root}", *FAST, *args])


def clone(src: Path, dst: Path) -> None:
    """Copy a run folder; checkpoints and snapshots (only ever replaced, never changed in place) as hard links."""
    shutil.copytree(src, dst, copy_function=lambda a, b: os.link(a, b) if a.endswith((".pt", ".npz"))
                    else shutil.copy2(a, b))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leave_lock(out: Path, pid: int) -> None:
    """What a killed run leaves: its lock, naming a process that is gone."""
    (out / rundir.LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))


@contextmanager
def faults(monkeypatch, kill_at: int | None, names: list[str]):
    """Count every file write of the trainer (atomic files and log appends); die at write ``kill_at``.

    The dying write leaves what a kill mid-write leaves: a partial temporary file, or a torn log line.
    """
    real_open, real_append = atomic.open_atomic, atomic.append_text

    def tick(path) -> bool:
        names.append(Path(path).name)
        return len(names) - 1 == kill_at

    @contextmanager
    def open_atomic(path, size_hint=None):
        if tick(path):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            (Path(path).parent / f".{Path(path).name}.killed.tmp").write_bytes(b"partial")
            raise Kill(path)
        with real_open(path, size_hint) as f:
            yield f

    def append_text(path, text):
        if tick(path):
            with open(path, "a") as f:
                f.write(text[: len(text) // 2])
            raise Kill(path)
        real_append(path, text)

    with monkeypatch.context() as m:
        m.setattr(atomic, "open_atomic", open_atomic)
        m.setattr(atomic, "append_text", append_text)
        yield


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        r.pop("train_time_s", None)
    return rows


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_run(out: Path, ref: Path) -> None:
    assert _rows(out / "metrics.jsonl") == _rows(ref / "metrics.jsonl")
    assert _rows(out / "steps.jsonl") == _rows(ref / "steps.jsonl")
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (out, ref))
    assert ra["best"] == rb["best"] and ra["final"] == rb["final"]
    la, lb = ck.load(out / "last.pt"), ck.load(ref / "last.pt")
    _same_weights(la["model"], lb["model"])
    _same_weights(la["momentum"]["model"], lb["momentum"]["model"])
    ba, bb = ck.load(out / "best.pt"), ck.load(ref / "best.pt")
    assert ba["epoch"] == bb["epoch"] == rb["best"]["epoch"]
    _same_weights(ba["model"], bb["model"])
    assert not list(out.rglob(f".*{atomic.TMP_SUFFIX}")) and not (out / rundir.LOCK).exists()


@pytest.fixture(scope="module", autouse=True)
def improving():
    """Every epoch scores best so far (a tiny run's mIoU often ties), so every epoch writes ``best.pt``."""
    real = Trainer._evaluate_epoch

    def evaluate_epoch(self):
        scores, (net, miou) = real(self)
        return scores, (net, miou + self.global_step)  # grows every epoch

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Trainer, "_evaluate_epoch", evaluate_epoch)
        yield


@pytest.fixture(scope="module")
def runs(scenes_tiny, tmp_path_factory):
    """The uninterrupted 2-epoch run, and a copy stopped right after epoch 1 was committed."""
    base = tmp_path_factory.mktemp("rundir")
    ref, after1 = base / "ref", base / "after1"

    def stop(event, epoch=None, **_):
        if event == "epoch_end" and epoch == 0:
            raise TrainingInterrupted("stop after epoch 1")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "fsync", lambda fd: None)  # durability is not under test; speed is
        Trainer(fast(scenes_tiny), ref).fit()
        with pytest.raises(TrainingInterrupted):
            Trainer(fast(scenes_tiny), after1, hook=stop).fit()
    return ref, after1


def test_a_kill_at_every_write_of_an_epoch_then_resume_reproduces_the_run(runs, scenes_tiny, tmp_path,
                                                                          monkeypatch):
    ref, after1 = runs
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    names: list[str] = []
    probe = tmp_path / "probe"
    clone(after1, probe)
    with faults(monkeypatch, None, names):
        Trainer(fast(scenes_tiny), probe, resume=True).fit()
    # the resumed run writes: the logs cut to epoch 1, config.yaml, epoch 2's snapshot, its log rows,
    # last.pt (the commit), best.pt, results.json
    assert names == ["metrics.jsonl", "steps.jsonl", "config.yaml", "epoch_002.npz", "steps.jsonl", "metrics.jsonl",
                     "last.pt", "best.pt", "results.json"]
    for kill_at in range(len(names)):
        out = tmp_path / f"kill{kill_at}"
        clone(after1, out)
        with faults(monkeypatch, kill_at, []), pytest.raises(Kill):
            Trainer(fast(scenes_tiny), out, resume=True).fit()
        leave_lock(out, dead_pid())
        Trainer(fast(scenes_tiny), out, resume=True).fit()
        assert_same_run(out, ref)
        shutil.rmtree(out)


def test_best_is_rebuilt_when_a_kill_came_between_last_and_best(runs, scenes_tiny, tmp_path, caplog):
    ref, after1 = runs
    out = tmp_path / "run"
    clone(after1, out)
    best = ck.load(out / "last.pt")["best"]
    assert best["epoch"] == 1
    (out / "best.pt").unlink()  # killed after last.pt of epoch 1 was committed, before best.pt was written
    tr = Trainer(fast(scenes_tiny), out, resume=True)
    with caplog.at_level(logging.WARNING):
        tr.fit()
    assert "rewriting" in caplog.text
    assert_same_run(out, ref)
    for name in ("last.pt", "best.pt"):  # evaluate finds the data from anywhere (a relative data.root, resolved)
        assert ck.load(out / name)["data_root"] == str(Path(scenes_tiny).resolve())


def test_a_second_run_into_a_locked_folder_refuses_in_one_line(runs, scenes_tiny, tmp_path, capsys):
    _, after1 = runs
    out = tmp_path / "run"
    clone(after1, out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leave_lock(out, sleeper.pid)
        assert cli(scenes_tiny, out, "--resume") == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: output folder")
        assert f"in use by pid {sleeper.pid} on host {socket.gethostname()}" in err and rundir.LOCK in err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert json.loads((out / rundir.LOCK).read_text())["pid"] == sleeper.pid  # untouched


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    leave_lock(tmp_path, pid := dead_pid())
    with caplog.at_level(logging.WARNING), rundir.RunLock(tmp_path):
        assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(rundir.RunDirError, match=f"in use by pid {os.getpid()}"):
            rundir.RunLock(tmp_path).acquire()
    assert f"stale lock {tmp_path / rundir.LOCK} of pid {pid}" in caplog.text
    assert not (tmp_path / rundir.LOCK).exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_fresh_run_into_a_finished_folder_refuses_or_overwrites(runs, scenes_tiny, tmp_path, capsys):
    ref, _ = runs
    out = tmp_path / "run"
    clone(ref, out)
    (out / "pseudo_labels" / "epoch_009.npz").write_bytes(b"from an older, longer run")
    (out / ".last.pt.abc123.tmp").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    (out / "train.log").write_text("a line of the older run\n")
    (out / "tensorboard").mkdir(exist_ok=True)
    (out / "tensorboard" / "events.out.tfevents.older").write_bytes(b"older scalars")
    before = sorted(p.name for p in out.rglob("*"))
    assert cli(scenes_tiny, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output folder {out} already holds a finished run (results.json)")
    assert "--resume" in err and "--overwrite" in err
    assert sorted(p.name for p in out.rglob("*")) == before
    assert cli(scenes_tiny, out, "--overwrite") == 0
    assert not (out / "pseudo_labels" / "epoch_009.npz").exists()
    assert not (out / ".last.pt.abc123.tmp").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert "older run" not in (out / "train.log").read_text()
    assert not (out / "tensorboard" / "events.out.tfevents.older").exists()
    assert_same_run(out, ref)


def test_resume_from_into_a_folder_that_holds_another_run_is_refused(runs, scenes_tiny, tmp_path, capsys):
    ref, after1 = runs
    out = tmp_path / "runC"
    clone(ref, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli(scenes_tiny, out, "--resume-from", str(after1 / "last.pt")) == 2
    assert capsys.readouterr().err == (
        f"error: output folder {out} already holds a finished run (results.json); --resume-from starts a run from "
        f"{after1 / 'last.pt'} in a folder of its own: choose an empty --out, or continue the run there with "
        "--resume\n")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_folder_that_no_run_wrote_is_refused_and_overwrite_removes_only_run_files(scenes_tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "tensorboard" / "other_run").mkdir(parents=True)
    mine = {"config.yaml": "lr: 3\n", "train.log": "my notes\n", "best.pt": "my model",
            "tensorboard/other_run/events.out.tfevents.1": "their scalars"}
    for name, text in mine.items():
        (out / name).write_text(text)
    assert cli(scenes_tiny, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output folder {out} is not a derprop run folder and holds 3 entries (best.pt, "
                          "config.yaml, tensorboard); choose an empty --out, or start there with --overwrite "
                          "(deletes only the files a run writes: ") and err.count("\n") == 1, err
    assert {name: (out / name).read_text() for name in mine} == mine
    assert cli(scenes_tiny, out, "--overwrite") == 0
    assert (out / "tensorboard" / "other_run" / "events.out.tfevents.1").read_text() == "their scalars"
    assert (out / "results.json").is_file() and "my notes" not in (out / "train.log").read_text()
    # the leftovers of a run that never finished an epoch are a run's: cleared without --overwrite; and a folder
    # holding only what a launcher puts there first (papermill's notebook, a redirected log) is a new run's
    leftovers, launched = tmp_path / "leftovers", tmp_path / "launched"
    leftovers.mkdir()
    shutil.copy(out / "config.yaml", leftovers / "config.yaml")
    (leftovers / "train.log").write_text("epoch 1/2 it 1/2 ...\n")
    assert cli(scenes_tiny, leftovers) == 0
    launched.mkdir()
    (launched / "train.ipynb").write_text("{}")
    (launched / "train.log").write_text("")
    assert rundir.foreign_files(launched) == [] and rundir.foreign_files(tmp_path / "mine") == []
    (launched / "notes.txt").write_text("mine")
    assert rundir.foreign_files(launched) == ["notes.txt"]


def test_resume_refuses_a_regenerated_dataset_naming_both_hashes(runs, scenes_tiny, tmp_path, capsys):
    from data_prep import scenes
    from tests.conftest import TINY_SCENES

    _, after1 = runs
    out, root = tmp_path / "run", tmp_path / "scenes"
    clone(after1, out)
    shutil.copytree(scenes_tiny, root)
    old = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    assert ck.load(out / "last.pt")["data_sha256"] == old
    assert scenes.main(["--root", str(root), *TINY_SCENES, "--seed", "1", "--force", "--quiet", "--workers", "1"]) == 0
    new = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    assert cli(root, out, "--resume") == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint {out / 'last.pt'} was trained on another dataset: its manifest had sha256 {old[:16]}…, "
        f"the one of data.root has {new[:16]}… (the tree was regenerated or changed); resume with the tree it was "
        "trained on, or pass --new-data to go on with this one\n")
    assert cli(root, out, "--resume", "--new-data") == 0
    assert json.loads((out / "results.json").read_text())["data_sha256"] == new


def _broken(state: dict, fault: str) -> dict:
    """A last.pt that loads but cannot be resumed."""
    if fault == "nan weights":
        name = next(k for k, v in state["model"].items() if v.is_floating_point())
        state["model"][name] = state["model"][name] * float("nan")
    elif fault == "optimizer buffer":
        first = next(iter(state["optimizer"]["state"]))
        state["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(3)
    else:
        state["model"][next(iter(state["model"]))] = torch.zeros(5)
    return {k: v for k, v in state.items() if k not in ("format", "version")}


@pytest.mark.parametrize("fault, words", [
    ("nan weights", "holds non-finite weights (model tensor "),
    ("optimizer buffer", "does not fit this config (ValueError: the optimizer's momentum_buffer of parameter 0 of "
                         "group 0 has shape (3,), the parameter ("),
    ("model shape", "does not fit this config (RuntimeError: Error(s) in loading state_dict for DerPropNet: size "
                    "mismatch for "),
])
def test_a_checkpoint_that_cannot_be_resumed_is_one_line_before_any_step(fault, words, runs, scenes_tiny, tmp_path,
                                                                          monkeypatch, capsys):
    _, after1 = runs
    path = ck.save(tmp_path / "last.pt", _broken(ck.load(after1 / "last.pt"), fault))
    monkeypatch.setattr(Trainer, "compute_loss", lambda *a: pytest.fail("a step ran"))
    assert cli(scenes_tiny, tmp_path / "run", "--resume-from", str(path)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {path} {words}") and err.count("\n") == 1, err
    assert "last finite checkpoint" not in err and ("is nan): no run can go on from it" in err) == (fault == "nan weights")


def test_an_unwritable_output_folder_fails_before_anything_is_built(scenes_tiny, tmp_path, monkeypatch, capsys):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    def never(*a, **k):
        raise AssertionError("data built before the output folder was checked")

    monkeypatch.setattr(paths.tempfile, "mkstemp", denied)
    monkeypatch.setattr(loaders, "build_training_data", never)
    assert cli(scenes_tiny, tmp_path / "ro" / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write to output folder {tmp_path / 'ro' / 'run'}: Permission denied")
    assert "\n" not in err and not (tmp_path / "ro").exists()


def test_an_output_folder_that_is_a_link_loop_or_a_dangling_link_fails_before_anything_is_built(
        scenes_tiny, tmp_path, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("data built before the output folder was checked")

    monkeypatch.setattr(loaders, "build_training_data", never)
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere" / "run")
    assert cli(scenes_tiny, tmp_path / "loop") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {tmp_path / 'loop'} is a symbolic link that leads back to itself") \
        and err.count("\n") == 1, err
    assert cli(scenes_tiny, tmp_path / "gone") == 2
    assert capsys.readouterr().err == (f"error: cannot use output folder {tmp_path / 'gone'}: it is a symbolic link to "
                                       f"{tmp_path / 'nowhere' / 'run'}, which does not exist; choose another --out "
                                       "or remove the link\n")


def test_a_full_disk_is_one_line_naming_the_file_and_the_space(runs, scenes_tiny, tmp_path, monkeypatch, capsys):
    _, after1 = runs
    out = tmp_path / "run"
    clone(after1, out)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f, name):
            self.f, self.name, self.n = f, name, 0

        def write(self, b):
            self.n += len(b)
            if ".last.pt." in self.name and self.n > 1_000_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *a, **k):
        return Full(real_fdopen(fd, *a, **k), os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)
    assert cli(scenes_tiny, out, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"error: cannot write {out / 'last.pt'}: No space left on device (needs about ")
    assert " MB free in " in err
    assert ck.load(out / "last.pt")["epoch"] == 1  # the committed epoch is intact
    assert not list(out.glob(".*.tmp")) and not (out / rundir.LOCK).exists()


def test_resume_is_a_flag_and_may_change_the_lr(runs, scenes_tiny, tmp_path, capsys, caplog):
    ref, after1 = runs
    out = tmp_path / "run"
    clone(after1, out)
    with caplog.at_level(logging.WARNING):
        assert cli(scenes_tiny, out, "--resume", "optim.lr=5e-3", "optim.epochs=3") == 0
    assert "changed settings: optim.epochs 2 → 3, optim.lr 0.01 → 0.005" in caplog.text
    steps = _rows(out / "steps.jsonl")
    assert [s["epoch"] for s in steps] == [0, 1, 2]
    # the backbone lr follows the new schedule from global step 2 on: 0.005 · (1 − 2/3)^0.9
    assert steps[1]["lr"] == pytest.approx(0.005 * (1 - 2 / 3) ** 0.9)
    assert steps[0]["lr"] == _rows(ref / "steps.jsonl")[0]["lr"]
    res = json.loads((out / "results.json").read_text())
    assert res["resumes"] == [{"epoch": 1, "changed": {"optim.epochs": [2, 3], "optim.lr": [0.01, 0.005]}}]
    capsys.readouterr()
    assert cli(scenes_tiny, tmp_path / "other", "--resume-from", str(after1 / "last.pt")) == 0
    assert_same_run(tmp_path / "other", ref)
    capsys.readouterr()
    assert cli(scenes_tiny, out, "--resume", str(out / "last.pt")) == 2
    assert "goes after --resume-from" in capsys.readouterr().err
    assert cli(scenes_tiny, out, "--resume", "method.Q=2") == 2
    assert "different config: method.Q: 1 there, 2 here" in capsys.readouterr().err


def test_resuming_from_a_best_pt_says_it_holds_weights_only(runs, scenes_tiny, tmp_path, capsys):
    ref, _ = runs
    assert cli(scenes_tiny, tmp_path / "run", "--resume-from", str(ref / "best.pt")) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint {ref / 'best.pt'} holds a network's weights only (a best.pt), not the training state a "
        f"resume needs; resume from the run's last.pt (--resume-from {ref / 'last.pt'}), or start a new run from "
        f"these weights with optim.warm_start={ref / 'best.pt'}\n")


def test_ctrl_c_keeps_the_last_finished_epoch_and_prints_the_resume_command(runs, scenes_tiny, tmp_path,
                                                                            monkeypatch, capsys):
    ref, _ = runs
    out = tmp_path / "run"
    real = Trainer._train_steps

    def ctrl_c_in_epoch_2(self, epoch, loaders):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch, loaders)

    options = ["--threads", str(torch.get_num_threads()), "--device", "cpu", "--log-every", "3"]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "_train_steps", ctrl_c_in_epoch_2)
        assert cli(scenes_tiny, out, *options) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted: epoch 1, the last finished one, is kept in {out / 'last.pt'}; "
                          "continue it with `python -m derprop.train --config ") and err.count("\n") == 1
    assert not (out / rundir.LOCK).exists()
    command = shlex.split(err.split("`")[1])
    assert command[:3] == ["python", "-m", "derprop.train"] and "--resume" in command
    for flag, value in zip(options[::2], options[1::2]):  # run as it was started: a thread count changes the sums
        assert command[command.index(flag) + 1] == value, flag
    assert main(command[3:]) == 0
    assert_same_run(out, ref)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_in_training_is_handled_like_ctrl_c(name, runs, scenes_tiny, tmp_path, monkeypatch, capsys):
    ref, _ = runs
    out = tmp_path / "run"
    signum = getattr(signal, name)
    real = Trainer.__init__

    def signalled_in_epoch_2(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.hook = lambda event, epoch=None, **_: epoch == 1 and os.kill(os.getpid(), signum)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "__init__", signalled_in_epoch_2)
        assert cli(scenes_tiny, out) == 128 + signum
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted by {name}: epoch 1, the last finished one, is kept in {out / 'last.pt'}; "
                          "continue it with `python -m derprop.train --config ") and err.count("\n") == 1
    assert not (out / rundir.LOCK).exists() and not list(out.rglob(f".*{atomic.TMP_SUFFIX}"))
    if name == "SIGTERM":  # the command it printed goes on as after Ctrl-C
        assert main(shlex.split(err.split("`")[1])[3:]) == 0
        assert_same_run(out, ref)


def test_a_book_run_trained_with_other_settings_is_refused_not_shown(tmp_path):
    from derprop.book.runs import load_or_train
    from derprop.training.config import resolved
    from derprop.errors import DerPropError

    config = source() / "configs" / "cpu_scenes_tiny.yaml"
    out = tmp_path / "cpu_dlp"
    out.mkdir()
    saved = resolved(load_config(config, ["data.root=/elsewhere/scenes", "data.split=1_4"]))
    atomic.write_json(out / "results.json", {"miou": 0.5, "config": saved})
    with pytest.raises(DerPropError, match=r"other settings.*data\.split '1_4' → '1_8'.*remove the folder"):
        load_or_train(config, out)
    assert load_or_train(config, out, ["data.split=1_4"])["miou"] == 0.5  # a moved data folder is the same run
    # a setting added after the run was trained (absent from its config) is the same run at its default only
    del saved["method"]["dlp_upsample"]
    atomic.write_json(out / "results.json", {"miou": 0.5, "config": saved})
    assert load_or_train(config, out, ["data.split=1_4"])["miou"] == 0.5
    with pytest.raises(DerPropError, match=r"method\.dlp_upsample None → 'detail'"):
        load_or_train(config, out, ["data.split=1_4", "method.dlp_upsample=detail"])
