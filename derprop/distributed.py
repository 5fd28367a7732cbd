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
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE > 1``); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deterministic_kernels(device: torch.device) -> None:
    """On CPU, deterministic kernels where an op has a choice, so that a resumed run replays the uninterrupted
    one bit for bit; they cost nothing measurable there (``benchmarks.train_step``, config tiled-fp32-nondet).

    The NaN fill of every ``torch.empty`` that the same switch turns on is a debugging aid for code that reads
    memory it never wrote; it cost a few % of a step, so it stays off. On CUDA the switch stays off, unmeasured:
    cuDNN and atomic-add backward kernels may then differ in the last bits from run to run, and a resumed GPU
    run follows the uninterrupted one only statistically.
    """
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of torch's global RNG in epoch ``epoch`` on rank ``rank``: a resumed run replays it exactly."""
    return (seed * 7919 + epoch * 104729 + rank * 15485863) % (2**31 - 1)


def all_reduce_mean(t: Tensor, d: Dist) -> Tensor:
    """Mean of ``t`` over all processes (``t`` itself with one process)."""
    if d.distributed:
        t = t.clone()
        dist.all_reduce(t)
        t /= d.world_size
    return t


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
    here = (socket.gethostname(), str(d.device), device_name(d.device))
    everyone: list = [here]
    if d.distributed:
        everyone = [None] * d.world_size
        dist.all_gather_object(everyone, here)
    return [e[2] for e in everyone], len({tuple(e[:2]) for e in everyone})
