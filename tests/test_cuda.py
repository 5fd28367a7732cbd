"""What only a GPU can show. ``make gpu-check`` runs this file with ``DERPROP_TEST_CUDA=1``; ``make test`` hides
the GPUs (conftest), so here every test skips.

It imports nothing beyond pytest, torch and derprop, so that it runs beside a preinstalled torch without the
development packages (the README's own-torch route).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from derprop.method.propagation import propagate
from derprop.training import distributed
from derprop.training.checkpoint import rng_state, set_rng_state
from derprop.training.evaluation import evaluate
from derprop.training.metrics import ConfusionMatrix
from derprop.training.model import build_model
from derprop.training.pseudo_labels import region_propagation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check runs it)")


def _features(m: int = 1681, c: int = 21, seed: int = 0, sigma: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, c, m, generator=g) * 3
    f1, f2 = (torch.randn(2, c, m, generator=g) * sigma for _ in range(2))
    return logits, f1, f2


def test_tiled_dlp_matches_dense():
    logits, f1, f2 = (t.cuda() for t in _features())
    torch.testing.assert_close(propagate(logits, f1, f2, chunk=256), propagate(logits, f1, f2), rtol=1e-4, atol=1e-4)


def test_dlp_matches_the_cpu_and_keeps_fp32_under_autocast():
    logits, f1, f2 = _features(sigma=3.0)
    reference = propagate(logits, f1, f2)
    dtype = torch.bfloat16 if distributed.native_bf16(torch.device("cuda")) else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        out = propagate(logits.cuda(), f1.cuda(), f2.cuda(), chunk=256)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), reference, rtol=1e-3, atol=1e-3 * reference.abs().max().item())


def test_region_propagation_matches_the_cpu():
    """The masks of a 321 crop (41×41 grid); a last-bit difference in the softmax may move a region's edge pixel."""
    g = torch.Generator().manual_seed(1)
    b, c, grid, size = 2, 21, (41, 41), (321, 321)
    f1 = torch.randn(b, c, grid[0] * grid[1], generator=g) * 2
    mask = torch.randint(0, c, (b, *size), generator=g)
    keep = torch.rand(b, *size, generator=g) > 0.4
    box = torch.zeros(b, *size, dtype=torch.bool)
    box[:, 100:200, 100:200] = True
    ign = torch.zeros(b, *size, dtype=torch.long)
    rows = torch.randint(0, f1.shape[-1], (128,), generator=g)
    cpu = region_propagation(f1, f1, grid, rows, mask, keep, box, ign, 0.6, "forward", c)
    gpu = region_propagation(f1.cuda(), f1.cuda(), grid, rows.cuda(), mask.cuda(), keep.cuda(), box.cuda(),
                             ign.cuda(), 0.6, "forward", c)
    for a, b_ in zip(cpu, gpu):
        assert (a == b_.cpu()).float().mean() > 0.999


def test_evaluation_matches_the_cpu():
    net = build_model({"backbone": "resnet18", "pretrained": "none", "num_classes": 5, "output_stride": 8}).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(3, 96, 80, generator=g) * 255, torch.randint(0, 5, (96, 80), generator=g)) for _ in range(3)]
    on_cpu = evaluate(net, data, num_classes=5)
    on_gpu = evaluate(net.cuda(), data, num_classes=5)
    assert on_gpu["miou"] == pytest.approx(on_cpu["miou"], abs=1e-3)


def test_collectives_take_tensors_on_any_device_under_nccl(tmp_path):
    """The epoch means, the image count, the threshold's maximum and the confusion matrix: CPU tensors given to
    :mod:`derprop.training.distributed` reach NCCL on this GPU and come back where they were."""
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert distributed.collective_device() == torch.device("cuda", torch.cuda.current_device())
        means = torch.tensor([0.5, 2.0], dtype=torch.float64)
        out = distributed.all_reduce(means, "mean")
        assert out.device.type == "cpu" and torch.equal(out, means)
        assert int(distributed.all_reduce(torch.tensor([7]), "sum")) == 7
        assert distributed.all_reduce(torch.tensor([0.3, -1.0]).cuda(), "max").device.type == "cuda"
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
        before = cm.mat.clone()
        assert torch.equal(cm.reduce_().mat, before)
        distributed.barrier()
        assert distributed.all_gather_objects(("host", "cuda:0")) == [("host", "cuda:0")]
    finally:
        dist.destroy_process_group()


def test_one_process_trains_on_the_gpu_it_is_given(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    last = torch.cuda.device_count() - 1
    assert distributed.setup_distributed(f"cuda:{last}").device == torch.device("cuda", last)
    assert torch.cuda.current_device() == last
    torch.cuda.set_device(0)


def test_rng_states_of_more_gpus_than_this_box_has_restore():
    torch.cuda.init()
    state = rng_state()
    state["cuda"] = [*state["cuda"], state["cuda"][0].clone()]  # saved on a box with one GPU more
    set_rng_state(state)
    assert not math.isnan(float(torch.rand(1, device="cuda")))
