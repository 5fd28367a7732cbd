"""The code that only a GPU box runs, checked on a CPU: collectives, devices, the refusal to train VOC on a CPU.

``tests/test_cuda.py`` (``make gpu-check``) runs the same paths on a real GPU; these tests are the part of that
which a CPU can see fail.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from derprop.errors import ConfigError
from derprop.provenance import source
from derprop.training import checkpoint, distributed
from derprop.training.distributed import CUDA_CHECK, all_reduce, check_gpu_run, setup_distributed

TOOLS = ("derprop", "benchmarks", "experiments", "pipelines", "data_prep", "scripts")


def _uses_torch_distributed(path) -> list[int]:
    """Lines of ``path`` that import ``torch.distributed`` or reach it as ``torch.distributed.x``."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            lines.append(node.lineno)
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and ast.unparse(node) == "torch.distributed":
            lines.append(node.lineno)
    return lines


def test_only_derprop_distributed_touches_torch_distributed():
    """One module places every collective's tensor (NCCL takes CUDA tensors only); nothing else may bypass it."""
    home = source() / "derprop" / "training" / "distributed.py"
    found = {str(p.relative_to(source())): lines for tool in TOOLS for p in sorted((source() / tool).rglob("*.py"))
             if p != home and (lines := _uses_torch_distributed(p))}
    assert found == {}, f"use derprop.training.distributed's helpers instead of torch.distributed: {found}"


def test_the_source_check_sees_a_direct_use(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nx = 1\ntorch.distributed.all_reduce(x)\n")
    assert _uses_torch_distributed(bad) == [3]
    bad.write_text("import torch.distributed as dist\n")
    assert _uses_torch_distributed(bad) == [1]


class FakeGroup:
    """A process group whose backend serves ``device`` only: each collective records the device it was given and
    refuses any other, as NCCL refuses CPU tensors."""

    def __init__(self, monkeypatch, device: torch.device):
        self.device, self.seen = device, []
        monkeypatch.setattr(distributed, "_grouped", lambda: True)
        monkeypatch.setattr(distributed, "collective_device", lambda: device)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        self.seen.append(tensor.device)
        if tensor.device != self.device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        raise StopIteration  # a meta tensor cannot travel back: placement is what is checked


@pytest.mark.parametrize("op", distributed.REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_every_reduction_runs_on_the_backend_device(monkeypatch, op, dtype):
    """The epoch's mean losses are a CPU float64 tensor: the helper must move it to the backend's device itself
    (a stand-in device, ``meta``, plays the GPU)."""
    group = FakeGroup(monkeypatch, torch.device("meta"))
    with pytest.raises(StopIteration):
        all_reduce(torch.ones(3, dtype=dtype), op)
    assert group.seen == [torch.device("meta")]


def test_the_fake_group_refuses_an_unplaced_tensor(monkeypatch):
    """The check above can fail: a collective handed the caller's CPU tensor is refused, as under NCCL."""
    group = FakeGroup(monkeypatch, torch.device("meta"))
    with pytest.raises(RuntimeError, match="device type cpu"):
        dist.all_reduce(torch.ones(3))
    assert group.seen == [torch.device("cpu")]


def test_without_a_process_group_nothing_is_reduced():
    t = torch.tensor([1.0, 2.0])
    assert all_reduce(t, "mean") is t
    assert distributed.all_gather_objects("x") == ["x"]
    distributed.barrier()
    with pytest.raises(ValueError, match="op must be one of"):
        all_reduce(t, "min")


def test_a_real_one_process_gloo_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert distributed.collective_device() == torch.device("cpu")
        out = all_reduce(torch.tensor([0.25, 4.0], dtype=torch.float64), "mean")
        assert out.tolist() == [0.25, 4.0]
        assert all_reduce(torch.tensor([3, 1]), "max").tolist() == [3, 1]
        assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
        distributed.barrier()
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- #
# devices
# --------------------------------------------------------------------------- #
def test_the_suite_hides_the_gpus_from_itself_and_its_processes():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    seen = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert seen == "''"


@pytest.mark.parametrize("layout", distributed.GPU_LAYOUTS)
def test_a_paper_dataset_is_not_trained_on_the_cpu_unless_asked(layout):
    with pytest.raises(ConfigError) as err:
        check_gpu_run(layout, None)
    assert CUDA_CHECK in str(err.value) and "--device cpu" in str(err.value) and "\n" not in str(err.value)
    check_gpu_run(layout, "cpu")  # asked for
    check_gpu_run("scenes", None)  # the CPU default


def test_train_and_make_reproduce_refuse_voc_without_cuda(repo, tmp_path):
    """One line naming the CUDA check, rc 2, before any data or papermill is touched."""
    for cmd in ([sys.executable, "-m", "derprop.train", "--config", "configs/voc_92.yaml", "--out", str(tmp_path / "r")],
                ["make", "-s", "--no-print-directory", "reproduce", "CONFIG=configs/voc_92.yaml",
                 f"PYTHON={sys.executable}"]):
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True,
                              env={**os.environ, "MAKEFLAGS": "", "MAKELEVEL": ""})
        lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("make: ***")]  # make's own
        assert (proc.returncode, len(lines)) == (2, 1), (cmd, proc.stderr)
        assert lines[0].startswith("error: no CUDA device for a VOC run") and CUDA_CHECK in lines[0]
    assert not (tmp_path / "r").exists()


class FakeCuda:
    """``torch.cuda`` of a box with ``count`` GPUs, for the device logic."""

    def __init__(self, monkeypatch, count: int):
        self.current = 0
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "set_device", lambda dev: setattr(self, "current", torch.device(dev).index))


def test_one_process_honours_the_gpu_it_is_given(monkeypatch):
    cuda = FakeCuda(monkeypatch, 2)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert setup_distributed("cuda:1").device == torch.device("cuda", 1) and cuda.current == 1
    cuda.current = 0
    assert setup_distributed("cuda").device == torch.device("cuda", 0)


def test_under_torchrun_each_process_takes_its_local_rank(monkeypatch):
    FakeCuda(monkeypatch, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as if torchrun's group were joined
    assert setup_distributed("cuda").device == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        setup_distributed("cuda:0")


def test_rng_states_of_more_gpus_than_this_box_has_restore(monkeypatch):
    """A last.pt written on a box with 2 GPUs, resumed on a box with 1."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append(device))
    state = {**checkpoint.rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8)] * 2}
    checkpoint.set_rng_state(state)
    assert restored == [0]


def test_bf16_is_native_on_a_cpu_and_on_ampere_not_on_a_v100(monkeypatch):
    assert distributed.native_bf16(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert not distributed.native_bf16(torch.device("cuda", 0))  # a V100: only through emulation


def test_peak_memory_is_a_gpu_figure():
    assert distributed.peak_memory_mib(torch.device("cpu")) is None


def test_the_readme_shows_the_same_cuda_check(repo):
    assert CUDA_CHECK in (repo / "README.md").read_text()
