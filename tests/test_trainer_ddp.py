"""DDP on CPU (gloo): 2 processes follow the loss curve of 1 process with the same config (the same global batch),
and every collective they run goes through derprop.training.distributed with a tensor on the model's device."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from derprop.provenance import source
from derprop.training.configfile import load_config
from derprop.training.trainer import Trainer

TINY = source() / "configs" / "cpu_scenes_tiny.yaml"
# Dropout draws differ between processes, so it is switched off. BatchNorm statistics are global
# (CpuSyncBatchNorm); the curves still differ a little: losses are averaged per process (the CE over
# each process's valid pixels, the labeled derivative loss over its valid pixel pairs).
COMMON = ["optim.batch_size=4", "model.proj_dropout=0.0", "optim.lr=0.002", "optim.epochs=1", "optim.iters_per_epoch=4", "data.diag_images=0",
          "data.val_limit=2", "eval.final_modes=[original]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce_scatter")
TORCH_OWN = ("torch.nn.parallel", "torch.distributed.nn.functional")


def _record_collectives(seen: list[dict]) -> None:
    """Wrap torch.distributed's collectives: each call records its op, the module that asked for it (the first
    caller outside torch), the module that called it (``via``: torch's DDP for its own parameter syncs) and its
    tensor's device and dtype."""
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            frame = sys._getframe(1)
            via = frame.f_globals.get("__name__")
            while frame is not None and frame.f_globals.get("__name__", "").startswith("torch"):
                frame = frame.f_back
            t = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
            seen.append({"op": _name, "caller": frame.f_globals.get("__name__") if frame else None, "via": via,
                         "device": None if t is None else t.device.type, "dtype": None if t is None else str(t.dtype)})
            return _real(*args, **kwargs)

        setattr(dist, name, wrapper)


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen: list[dict] = []
    _record_collectives(seen)
    cfg = load_config(TINY, [f"data.root={root}", *COMMON])
    trainer = Trainer(cfg, out, device="cpu")
    trainer.fit()
    (Path(out) / f"collectives_rank{rank}.json").write_text(json.dumps(
        {"model_device": next(trainer.net.parameters()).device.type, "calls": seen}))
    flat = torch.cat([p.detach().flatten() for p in trainer.net.parameters()])
    torch.save(flat, Path(out) / f"params_rank{rank}.pt")
    dist.destroy_process_group()


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(scenes_tiny, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(scenes_tiny), str(tmp_path / "ddp")), nprocs=2, join=True)
    torch.set_num_threads(1)
    single = Trainer(load_config(TINY, [f"data.root={scenes_tiny}", *COMMON]),
                     tmp_path / "single", device="cpu")
    single.fit()
    ddp, one = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert len(ddp) == len(one) == 4
    assert ddp[:3] == pytest.approx(one[:3], rel=5e-4)
    assert ddp == pytest.approx(one, rel=0.05)  # later, thresholded pseudo-labels may flip a pixel or two
    # gradients were averaged: both ranks hold the same weights
    p0, p1 = (torch.load(tmp_path / "ddp" / f"params_rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(p0, p1)
    ran = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert (ran["world_size"], ran["global_batch"], ran["per_process_batch"], ran["device_count"]) == (2, 4, 2, 1)
    assert len(ran["devices"]) == 2
    for rank in (0, 1):
        record = json.loads((tmp_path / "ddp" / f"collectives_rank{rank}.json").read_text())
        calls = record["calls"]
        # torch's own: DDP's parameter syncs, and the backward of CpuSyncBatchNorm's differentiable all-reduce
        bypass = [c for c in calls if c["caller"] != "derprop.training.distributed" and not c["via"].startswith(TORCH_OWN)]
        assert bypass == [], f"{len(bypass)} collectives bypassed derprop.training.distributed, e.g. {bypass[:3]}"
        wrong = [c for c in calls if c["device"] not in (None, record["model_device"])]
        assert wrong == [], f"collectives on another device than the model's ({record['model_device']}): {wrong}"
        assert any(c["dtype"] == "torch.float64" for c in calls)  # the epoch's mean terms went through it
    assert json.loads((tmp_path / "single" / "results.json").read_text())["per_process_batch"] == 4
