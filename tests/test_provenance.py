"""What a run says about itself: the global batch it trained with, and where it came from.

The configs state the release's global batch and each process takes its share; ``results.json``,
``last.pt`` and ``best.pt`` carry :func:`derprop.provenance.record`; TensorBoard gets the validation
mIoU of both networks and the per-class IoU.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import derprop
from derprop import provenance
from derprop.errors import ConfigError
from derprop.provenance import source
from derprop.training import checkpoint as ck
from derprop.training import progress
from derprop.training.configfile import load_config
from derprop.training.distributed import Dist
from derprop.training.loaders import build_training_data
from derprop.training.trainer import Trainer

CONFIGS = source() / "configs"
TINY = CONFIGS / "cpu_scenes_tiny.yaml"


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- #
# the recipe: a global batch, whatever the number of processes
# --------------------------------------------------------------------------- #
def test_the_configs_state_the_release_global_batch_and_lr():
    voc, city = load_config(CONFIGS / "voc_92.yaml"), load_config(CONFIGS / "cityscapes_186.yaml")
    assert (voc.optim.batch_size, voc.optim.lr, voc.optim.head_lr_mult, voc.optim.ref_batch) == (8, 1e-3, 10.0, None)
    assert (city.optim.batch_size, city.optim.lr, city.optim.head_lr_mult) == (4, 5e-3, 1.0)


@pytest.mark.parametrize("world,share", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_each_process_takes_its_share_of_the_global_batch(world, share):
    assert load_config(CONFIGS / "voc_92.yaml").optim.per_process_batch(world) == share


def test_a_global_batch_that_does_not_divide_is_one_line_naming_the_fix(scenes_tiny, tmp_path, monkeypatch, capsys):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "voc_92.yaml").optim.per_process_batch(3)
    msg = str(err.value)
    assert "\n" not in msg and "optim.batch_size=8" in msg and "3 processes" in msg and "GPUS=" in msg
    # each process of `torchrun --nproc_per_node=2 -m derprop.train ... optim.batch_size=3` says it in one line
    from derprop.training import trainer
    from derprop.train import main

    monkeypatch.setattr(trainer, "setup_distributed", lambda device: Dist(rank=1, world_size=2))
    assert main(["--config", str(TINY), "--out", str(tmp_path / "run"), f"data.root={scenes_tiny}",
                 "optim.batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: optim.batch_size=3 is the global batch and does not divide over 2 processes")
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_an_epoch_has_the_same_iterations_on_one_process_or_two(scenes_tiny):
    cfg = load_config(TINY, [f"data.root={scenes_tiny}", "optim.batch_size=4", "optim.iters_per_epoch=null"])
    one = build_training_data(cfg, Dist(rank=0, world_size=1))
    two = build_training_data(cfg, Dist(rank=0, world_size=2))
    assert one.iters_per_epoch == two.iters_per_epoch == len(one.train_u) // 4


# --------------------------------------------------------------------------- #
# provenance
# --------------------------------------------------------------------------- #
def test_the_version_is_the_package_metadata_and_says_when_it_is_not_installed(monkeypatch):
    assert provenance.version() == importlib.metadata.version("derprop") == derprop.__version__

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert provenance.version() == derprop.__version__ == provenance.NOT_INSTALLED


def test_git_state_names_the_commit_and_whether_tracked_files_changed(tmp_path):
    assert provenance.git_state(tmp_path) == (provenance.NOT_A_CHECKOUT, None)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", cwd=repo)
    (repo / "a.txt").write_text("1")
    _git("add", "a.txt", cwd=repo)
    _git("commit", "-q", "-m", "one", cwd=repo)
    (repo / "untracked.txt").write_text("not part of the code")
    head = _git("rev-parse", "HEAD", cwd=repo)
    assert provenance.git_state(repo) == (head, False)
    (repo / "a.txt").write_text("2")
    assert provenance.git_state(repo) == (head, True)
    (repo / "sub").mkdir()  # a package installed inside someone's checkout is not that checkout's code
    assert provenance.git_state(repo / "sub") == (provenance.NOT_A_CHECKOUT, None)


class FakeWriter:
    """Stands in for TensorBoard's SummaryWriter: records what the trainer writes."""

    def __init__(self):
        self.scalars: dict[str, list[tuple[int, float]]] = {}
        self.texts: dict[str, list[tuple[int, str]]] = {}
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))

    def add_text(self, tag, text, step):
        self.texts.setdefault(tag, []).append((step, text))

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def recorded_run(scenes_tiny, tmp_path_factory):
    """A 1-epoch tiny run with a stand-in TensorBoard writer."""
    writer = FakeWriter()
    mp = pytest.MonkeyPatch()
    mp.setattr(progress, "summary_writer", lambda log_dir: writer)
    out = tmp_path_factory.mktemp("runs") / "recorded"
    try:
        Trainer(load_config(TINY, [f"data.root={scenes_tiny}", "optim.epochs=1", "eval.final_modes=[original]"]), out,
                device="cpu").fit()
    finally:
        mp.undo()
    return out, writer


def test_results_and_checkpoints_carry_the_provenance(recorded_run):
    out, _ = recorded_run
    results = json.loads((out / "results.json").read_text())
    commit, dirty = provenance.git_state()
    expected = {"derprop_version": provenance.version(), "git_commit": commit, "git_dirty": dirty,
                "world_size": 1, "global_batch": 2, "per_process_batch": 2, "device_count": 1,
                "threads": torch.get_num_threads()}  # a CPU run's numbers depend on it
    assert {k: results[k] for k in expected} == expected
    assert results["devices"] == [results["device"]] and results["device"].startswith("cpu")
    assert results["torch_version"] and results["python"] and "cudnn_version" in results and "cuda_version" in results
    for name in ("last.pt", "best.pt"):
        state = ck.load(out / name)
        assert {k: state[k] for k in provenance.KEYS} == {k: results[k] for k in provenance.KEYS}, name
    if commit != provenance.NOT_A_CHECKOUT:
        assert re.fullmatch(r"[0-9a-f]{40}", commit)


def test_tensorboard_gets_the_validation_miou_of_both_nets_and_the_per_class_iou(recorded_run):
    out, writer = recorded_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["global_step"] for r in rows]
    assert writer.scalars["val/miou_backprop"] == [(s, pytest.approx(r["miou_backprop"])) for s, r in zip(steps, rows)]
    assert writer.scalars["val/miou_momentum"] == [(s, pytest.approx(r["miou_momentum"])) for s, r in zip(steps, rows)]
    # eval.select = momentum (paper profile): val/miou is the momentum net's, the one that picks best.pt
    assert writer.scalars["val/miou"] == writer.scalars["val/miou_momentum"]
    assert [s for s, _ in writer.texts["val/iou_per_class"]] == steps
    table = writer.texts["val/iou_per_class"][-1][1]
    assert "| class | backprop | momentum |" in table and "| background |" in table
    assert "train/loss" in writer.scalars and writer.closed


@pytest.mark.slow
def test_a_run_writes_tensorboard_event_files_holding_val_miou(scenes_tiny, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional dependency (derprop[tensorboard])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    Trainer(load_config(TINY, [f"data.root={scenes_tiny}", "optim.epochs=1", "eval.final_modes=[original]"]), out,
            device="cpu").fit()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"val/miou", "val/miou_backprop", "val/miou_momentum"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("val/miou")] == [2]


def test_project_root_is_the_variable_else_the_checkout_else_the_current_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(provenance.ROOT_VARIABLE, raising=False)
    assert provenance.project_root() == provenance.source()  # a checkout: it holds configs/
    monkeypatch.setenv(provenance.ROOT_VARIABLE, str(tmp_path))
    assert provenance.project_root() == tmp_path.resolve()
    monkeypatch.delenv(provenance.ROOT_VARIABLE)
    monkeypatch.setattr(provenance, "source", lambda: tmp_path / "site-packages")  # an installed package
    monkeypatch.chdir(tmp_path)
    assert provenance.project_root() == tmp_path


def test_at_root_sets_the_project_folder_for_the_block_only(monkeypatch, tmp_path):
    monkeypatch.delenv(provenance.ROOT_VARIABLE, raising=False)
    with provenance.at_root(tmp_path):
        assert provenance.project_root() == tmp_path.resolve()
        with provenance.at_root(None):
            assert provenance.project_root() == tmp_path.resolve()
    assert provenance.ROOT_VARIABLE not in os.environ and provenance.project_root() == provenance.source()
