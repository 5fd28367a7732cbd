"""Checkpoints: atomic writes, safe loading, clear errors for broken files, RNG round trip."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from derprop import checkpoint as ck


def test_round_trip_with_rng_state(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "config": {"a": [1, "x", None]}, "rng": ck.rng_state()}
    ck.save(tmp_path / "last.pt", state)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    back = ck.load(tmp_path / "last.pt")
    assert back["epoch"] == 3 and torch.equal(back["model"]["w"], torch.arange(4.0))
    ck.set_rng_state(back["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp files left


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
