"""Where a run's processes live: rank and device, the process group, BatchNorm over all of them, and seeds.

Explained in the book chapter *Full reproduction on a GPU*; ``torchrun --nproc_per_node N -m derprop.train``
starts N processes.

Randomness: torch's global RNG (dropout, region sampling) is re-seeded from (seed, epoch, rank) at
the start of every epoch (:func:`epoch_seed`), so a run resumed after epoch ``e`` replays epochs
``e+1…`` exactly as the uninterrupted run does (on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import os
import platform
import random
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from derprop.errors import ConfigError


@dataclass
class Dist:
    """Where this process runs: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(name: str | None) -> torch.device:
    """The device ``name`` (``cpu``, ``cuda``, ``cuda:N``; None: cuda when available, else cpu).

    Raises :class:`~derprop.errors.ConfigError` for a name that is no device, or a device this machine lacks.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {name!r} is not a device; use cpu or cuda (cuda:N for GPU N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: only cpu and cuda are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here (torch.cuda.is_available() is False); "
                          "use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def setup_distributed(device: str | None = None) -> Dist:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE > 1``); gloo on CPU, nccl on CUDA.

    One process trains on ``device`` as named (``cuda:1`` is GPU 1; ``cuda``, the current GPU). Under ``torchrun``
    each process takes the GPU of its ``LOCAL_RANK``, so ``device`` may say ``cuda`` but not name one GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        if world > 1 and dev.index is not None:
            raise ConfigError(f"--device {device}: under torchrun each process trains on the GPU of its LOCAL_RANK; "
                              "pass --device cuda, and CUDA_VISIBLE_DEVICES to choose the GPUs")
        dev = torch.device("cuda", local if world > 1 else (dev.index if dev.index is not None
                                                             else torch.cuda.current_device()))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


GPU_LAYOUTS = ("pascal", "cityscapes")
"""The paper's datasets (``data.layout``): their ResNet-101 runs are meant for a GPU."""

CUDA_CHECK = 'python -c "import torch; print(torch.cuda.is_available(), torch.version.cuda)"'
"""The command that tells whether this torch sees a GPU, and which CUDA it was built for."""


def check_gpu_run(layout: str, device: str | None) -> None:
    """Refuse to train a :data:`GPU_LAYOUTS` config on the CPU unless the CPU is named (``device="cpu"``).

    Without it a machine whose driver is too old for this torch's CUDA build would silently train ResNet-101 on
    the CPU (weeks for one run of the paper) instead of failing.
    """
    if layout in GPU_LAYOUTS and device is None and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        dataset = {"pascal": "VOC", "cityscapes": "Cityscapes"}[layout]
        raise ConfigError(f"no CUDA device for a {dataset} run: torch.cuda.is_available() is False (torch "
                          f"{torch.__version__}, {built}; check with `{CUDA_CHECK}`, and the driver floor in the "
                          "README's GPU section); to train on the CPU anyway pass --device cpu (make reproduce DEVICE=cpu)")


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_kernels(device: torch.device) -> None:
    """Kernel choices for a run on ``device``.

    On CPU, deterministic kernels where an op has a choice, so that a resumed run replays the uninterrupted
    one bit for bit; they cost nothing measurable there (``benchmarks.train_step``, config tiled-fp32-nondet).
    The NaN fill of every ``torch.empty`` that the same switch turns on is a debugging aid for code that reads
    memory it never wrote; it cost a few % of a step, so it stays off.

    On CUDA, ``cudnn.benchmark`` as in the release (the crops are fixed, so cuDNN's choice of convolution kernel
    is made once), unless the user asked for determinism (``torch.use_deterministic_algorithms(True)`` before the
    run): benchmarking may pick a different kernel per run. CUDA runs are not made deterministic here, unmeasured:
    cuDNN and atomic-add backward kernels may differ in the last bits from run to run, and a resumed GPU run
    follows the uninterrupted one only statistically.
    """
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    else:
        torch.backends.cudnn.benchmark = not torch.are_deterministic_algorithms_enabled()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of torch's global RNG in epoch ``epoch`` on rank ``rank``: a resumed run replays it exactly."""
    return (seed * 7919 + epoch * 104729 + rank * 15485863) % (2**31 - 1)


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def collective_device() -> torch.device:
    """The device whose tensors the process group's backend takes: this process's GPU under NCCL (which serves
    CUDA tensors only), else the CPU (gloo)."""
    if _grouped() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


REDUCTIONS = ("sum", "mean", "max")


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """``t`` summed, averaged or maximised (``op``) over all processes, as a new tensor on ``t``'s device;
    ``t`` itself without a process group.

    Every collective of derprop goes through this module, and the tensor collectives through here: the
    reduction runs on :func:`collective_device` whatever device the caller's tensor is on, so a CPU tensor
    (an epoch's mean losses, an image count) cannot reach NCCL.
    """
    if op not in REDUCTIONS:
        raise ValueError(f"op must be one of {list(REDUCTIONS)}, got {op!r}")
    if not _grouped():
        return t
    work = t.to(collective_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        work /= dist.get_world_size()
    return work.to(t.device)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: a CPU does (through its bf16 kernels), a GPU only from Ampere
    on; on a V100 ``torch.cuda.is_bf16_supported()`` is True through emulation, which is slower than fp32."""
    return device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)


def peak_memory_mib(device: torch.device) -> float | None:
    """The most CUDA memory tensors held since the previous call, in MiB, the maximum over all processes (every
    process calls it); None on the CPU. Each call starts a new span: the trainer reports one per epoch."""
    if device.type != "cuda":
        return None
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**20)
    torch.cuda.reset_peak_memory_stats(device)
    return float(all_reduce(peak, "max"))


def barrier() -> None:
    """Wait for every process (nothing without a process group); under NCCL on this process's GPU."""
    if _grouped():
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process in rank order (``[obj]`` without a process group); picklable objects only."""
    if not _grouped():
        return [obj]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)  # under NCCL on torch.cuda.current_device(), set by setup_distributed
    return everyone


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken over all processes, for gloo (CPU) DDP.

    ``nn.SyncBatchNorm`` needs CUDA. This one all-reduces per-channel sums
    with the differentiable :func:`torch.distributed.nn.functional.all_reduce`,
    so forward and backward see the global batch, as with one process.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not (dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = x.new_tensor([x.numel() / c])
        stats = all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp_min(1))
        y = (x - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every ``BatchNorm2d`` of ``module`` (in place) by this class, keeping its state."""
        for name, child in module.named_children():
            if type(child) is nn.BatchNorm2d:
                new = cls(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                new.load_state_dict(child.state_dict())
                setattr(module, name, new)
            else:
                cls.convert(child)
        return module


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of threads torch uses (recorded in every results file)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def gather_devices(d: Dist) -> tuple[list[str], int]:
    """The device name of every process (rank order) and how many distinct devices they use (all ranks call it)."""
    everyone = all_gather_objects((socket.gethostname(), str(d.device), device_name(d.device)))
    return [e[2] for e in everyone], len({tuple(e[:2]) for e in everyone})
