"""Checkpoints: atomic writes, safe loading, clear errors for broken files, RNG round trip."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from derprop.training import checkpoint as ck


def test_round_trip_with_rng_state(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "config": {"a": [1, "x", None]}, "rng": ck.rng_state()}
    ck.save(tmp_path / "last.pt", state)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    back = ck.load(tmp_path / "last.pt")
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], torch.arange(4.0))
    ck.set_rng_state(back["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp files left


def test_training_state_round_trip_and_a_missing_part(tmp_path):
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 2)).sum().backward()
    opt.step()
    ck.save(tmp_path / "last.pt", ck.training_state({"model": net, "optimizer": opt, "scaler": None}))
    draw = float(torch.rand(()))
    back = ck.load(tmp_path / "last.pt")
    assert back["scaler"] is None  # a part this run does not have
    net2 = torch.nn.Linear(2, 2)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    ck.restore_training_state(back, {"model": net2, "optimizer": opt2, "scaler": None}, tmp_path / "last.pt")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert float(torch.rand(())) == draw
    with pytest.raises(ck.CheckpointError, match=r"last\.pt does not fit this config \(KeyError: 'momentum'\)"):
        ck.restore_training_state(back, {"model": net2, "momentum": net2}, tmp_path / "last.pt")


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.save(path, {"epoch": 1})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ck.save(path, {"epoch": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign", "empty"])
def test_broken_files_give_one_clear_error(tmp_path, damage):
    path = tmp_path / "last.pt"
    ck.save(path, {"epoch": 1, "w": torch.ones(1000)})
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "garbage":
        path.write_bytes(os.urandom(2000))
    elif damage == "foreign":
        torch.save({"state_dict": {}}, path)
    else:
        path.write_bytes(b"")
    before = path.read_bytes()
    with pytest.raises(ck.CheckpointError) as exc:
        ck.load(path)
    assert str(path) in str(exc.value)
    assert "DerProp checkpoint" in str(exc.value)
    assert path.read_bytes() == before


def test_missing_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load(tmp_path / "nope.pt")


def test_atomic_files_get_the_umask_mode(tmp_path):
    from derprop.training import atomic

    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        ck.save(tmp_path / "b.pt", {"epoch": 1})
        os.umask(0o077)
        atomic.write_json(tmp_path / "c.json", {})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.txt": 0o644, "b.pt": 0o644, "c.json": 0o600}


def test_a_failed_write_is_one_line_naming_the_file_and_the_space(tmp_path, monkeypatch):
    import errno

    from derprop.training import atomic

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "last.pt"
    monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"x" * 100), full()))
    with pytest.raises(atomic.WriteError) as exc:
        ck.save(path, {"w": torch.ones(250_000)})
    msg = str(exc.value)
    assert msg.startswith(f"cannot write {path}: No space left on device (needs about 1.0 MB; ")
    assert " MB free in " in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


class Payload:
    """What a crafted pickle holds: loading it would call ``os.mkdir(marker)``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("path", ["evaluate", "predict", "resume-from", "warm_start", "pretrained", "weights"])
def test_a_pickle_with_code_is_refused_in_our_words_on_every_load_path(path, scenes_tiny, tmp_path, capsys):
    from data_prep import weights
    from derprop import evaluate, predict, train
    from derprop.provenance import source

    marker = tmp_path / "the_code_ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": Payload(marker)}, evil)
    tiny = ["--config", str(source() / "configs" / "cpu_scenes_tiny.yaml"), "--out", str(tmp_path / "run"),
            f"data.root={scenes_tiny}"]
    main, argv = {
        "evaluate": (evaluate.main, ["--checkpoint", str(evil)]),
        "predict": (predict.main, ["--checkpoint", str(evil), "--image", str(scenes_tiny / "JPEGImages" /
                                   "val_00000.jpg"), "--out", str(tmp_path / "a.png")]),
        "resume-from": (train.main, [*tiny, "--resume-from", str(evil)]),
        "warm_start": (train.main, [*tiny, f"optim.warm_start={evil}"]),
        "pretrained": (train.main, [*tiny, f"model.pretrained={evil}"]),
        "weights": (weights.main, ["--from", str(evil), "--root", str(tmp_path)]),
    }[path]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"{evil}" in err and "holds pickled Python objects" in err and "it was not loaded" in err
    assert "Weights only load failed" not in err and "\x1b[" not in err  # torch's hint, with its terminal escapes
    assert not marker.exists()
