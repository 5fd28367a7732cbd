"""Semi-supervised training: one step for both profiles, the epoch loop, checkpoints.

Explained in the book chapters *Training* and *Paper vs released code*.

One training step (:meth:`Trainer.train_step`), with ``B`` labeled images
``x, y`` and two unlabeled batches (``u`` and the CutMix partner ``u'``):

1. Pseudo-labels of ``u'`` (no gradient): from the momentum net Θm (release,
   ``pseudo_label_source: momentum``, plain logits) or from Θb with the same
   DLP blend as ``u`` (``backprop``).
2. The strong view of ``u`` gets the strong view of ``u'`` pasted into its
   CutMix box.
3. Θb runs on ``[x; u_w]`` (with the feature-perturbation branch when
   ``fp_branch``) and on the mixed strong view. Each output is propagated at
   the feature grid (eq. 4, :func:`derprop.propagation.propagate`):
   ``L̃`` from ``logits_grid`` (B,C,h,w) and ``f1, f2`` (B,D,h,w), upsampled
   bilinearly to the input size.
4. Pseudo-label of ``u_w`` (eq. 5): ``P = (1−η_ep)·softmax(L) + η_ep·softmax(L̃)``
   (``blend_space: prob``, the paper) or ``softmax((1−η_ep)·L + η_ep·L̃)``
   (``logit``, the release), ``η_ep = epoch / epochs``; without DLP
   ``P = softmax(L)``. Inside the box the partner's label is used.
5. Confident pixels: ``max P ≥ τ`` with ``τ`` fixed (0.95) or the release's
   EMA of the mean per-class maximum confidence (start 0.85, momentum 0.999);
   region propagation (CorrMatch, release) may add whole regions.
6. Losses (eq. 7/8; SPEC §2 "Total" for the release)::

       L = scale · [ λCE·(CE_x + CE_x̃) + λCE/2·(CE_u + CE_ũ) + λKL·KL + λFP·CE_fp
                     + λDer·(L_Der,x + L_Der,u) ]

   ``CE_ũ`` is the strong view's propagated CE, averaged with the weak
   view's (release, ``weak_propagated_ce``). Paper: λ = 0.5/0.25/0.5,
   η = 0.5, scale 1. Release: λDer = 0.25 with η = 1 (its
   ``0.5·(S+ΔS)/2 + 0.25·sparsity``) and scale 1/2.

Randomness: the data of an epoch is a function of (seed, epoch) alone
(:mod:`derprop.augment`), and torch's global RNG (dropout, region sampling)
is re-seeded from (seed, epoch, rank) at the start of every epoch. So a run
resumed from the checkpoint of epoch ``e`` replays epochs ``e+1…`` exactly as
the uninterrupted run does (on CPU, where kernels are deterministic).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.transforms.v2 import functional as TF

from derprop import atomic
from derprop import checkpoint as ckpt_io
from derprop import data as data_io
from derprop import rundir
from derprop.augment import LabeledTrainSet, UnlabeledTrainSet
from derprop.config import TrainConfig, eval_mode, resolved
from derprop.configfile import dump_yaml
from derprop.data import IGNORE_INDEX, DatasetError, SegmentationDataset
from derprop.evaluate import evaluate
from derprop.losses import derivative_loss
from derprop.metrics import ConfusionMatrix
from derprop.model import DerPropNet, SegOutput, build_model
from derprop.momentum import MomentumNetwork
from derprop.progress import DEFAULT_EVERY, ProgressLog
from derprop.propagation import attention_shares, official_similarity_factors, propagate, propagation_weights

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient norm or a weight became NaN or infinite; the last finite checkpoint was kept."""


class TrainingInterrupted(RuntimeError):
    """Raised by a hook to stop training (tests use it to simulate a kill)."""


# --------------------------------------------------------------------------- #
# Process set-up
# --------------------------------------------------------------------------- #


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


def setup_distributed(device: str | None = None) -> Dist:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE > 1``); gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 7919 + epoch * 104729 + rank * 15485863) % (2**31 - 1)


def _all_reduce_mean(t: Tensor, d: Dist) -> Tensor:
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


# --------------------------------------------------------------------------- #
# Confidence threshold
# --------------------------------------------------------------------------- #


class Threshold:
    """Confidence threshold τ: fixed, or the release's global EMA (CorrMatch).

    EMA update: for every class predicted somewhere in the batch (all ranks),
    take the highest confidence among its valid pixels; average over those
    classes; ``τ ← m·τ + (1−m)·that``.
    """

    def __init__(self, kind: str, value: float, init: float, momentum: float):
        self.kind, self.momentum = kind, momentum
        self.value = float(value if kind == "fixed" else init)

    @torch.no_grad()
    def update(self, probs: Tensor, ignore: Tensor, d: Dist) -> None:
        if self.kind != "ema":
            return
        conf, pred = probs.float().max(dim=1)
        c = probs.shape[1]
        valid = ignore != IGNORE_INDEX
        best = torch.full((c,), -1.0, device=probs.device)
        if bool(valid.any()):
            best.scatter_reduce_(0, pred[valid], conf[valid], reduce="amax", include_self=True)
        if d.distributed:
            dist.all_reduce(best, op=dist.ReduceOp.MAX)
        present = best >= 0
        if bool(present.any()):
            self.value = self.momentum * self.value + (1 - self.momentum) * float(best[present].mean())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------- #
# Losses used by the step
# --------------------------------------------------------------------------- #


def ohem_ce(logits: Tensor, target: Tensor, thresh: float, min_kept: int) -> Tensor:
    """Online hard example mining CE: keep pixels whose true-class probability ≤ max(thresh, k-th smallest)."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none").flatten()
    valid = target.flatten() != IGNORE_INDEX
    if not bool(valid.any()):
        return ce.sum() * 0.0
    with torch.no_grad():
        prob = torch.exp(-ce.detach())
        p = prob[valid]
        k = min(min_kept, p.numel())
        cut = max(thresh, float(p.kthvalue(k).values)) if k > 0 else thresh
        keep = valid & (prob <= cut)
    return ce[keep].mean()


def masked_mean(per_pixel: Tensor, keep: Tensor, denom: Tensor) -> Tensor:
    """``Σ per_pixel·keep / Σ denom`` (the release divides by all non-ignored pixels, not the kept ones)."""
    return (per_pixel * keep).sum() / denom.sum().clamp_min(1)


# --------------------------------------------------------------------------- #
# The trainer
# --------------------------------------------------------------------------- #

Hook = Callable[..., None]


class Trainer:
    """Trains one config; writes ``config.yaml``, ``metrics.jsonl``, ``steps.jsonl``, ``last.pt``,
    ``best.pt``, ``pseudo_labels/`` and ``results.json`` into ``out_dir``.

    ``resume``: a checkpoint path (or ``True`` for ``out_dir/last.pt``); a
    fresh run refuses a folder that holds a run unless ``overwrite``. The
    folder's rules (lock, commit point, clean-up) are :mod:`derprop.rundir`'s.
    ``log_every``: iterations per progress line in ``out_dir/train.log`` (and on
    stdout when no tqdm bar is drawn; :mod:`derprop.progress`).
    ``hook(event, **info)`` is called at ``"step_end"`` (epoch, step, loss)
    and ``"epoch_end"`` (epoch, metrics); raising from it stops training.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | os.PathLike,
        *,
        resume: str | os.PathLike | bool | None = None,
        device: str | None = None,
        hook: Hook | None = None,
        progress: bool | None = None,
        log_every: int = DEFAULT_EVERY,
        overwrite: bool = False,
    ):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.hook = hook
        self.log_every = log_every
        self.d = setup_distributed(device)
        self.fresh = resume is None or resume is False
        if self.d.is_main:  # folder problems come before the (slow) data and model
            rundir.check_writable(self.out)
            rundir.check_unlocked(self.out)
            if self.fresh:
                rundir.check_fresh(self.out, overwrite)
        if self.d.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        if cfg.optim.amp == "fp16" and self.d.device.type != "cuda":
            raise ValueError("optim.amp=fp16 needs a CUDA device; use bf16 or none on CPU")
        self.progress = (self.d.is_main and sys.stderr.isatty()) if progress is None else (progress and self.d.is_main)
        self.resume_path = self._resume_path(resume)
        # Reading a checkpoint comes first: a broken one must fail before anything is written.
        self._resume_state = ckpt_io.load(self.resume_path) if self.resume_path else None
        self._changes = (rundir.resume_changes(self.resume_path, self._resume_state, resolved(cfg))
                         if self._resume_state is not None else {})

        seed_all(cfg.seed)
        self._build_data()
        self._build_model()
        self.threshold = Threshold(cfg.method.threshold, cfg.method.threshold_value, cfg.method.threshold_init,
                                   cfg.method.threshold_momentum)
        self.start_epoch = 0
        self.global_step = 0
        self.best: dict[str, Any] = {"miou": -1.0, "epoch": None, "net": None}
        self.history: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []  # settings changed at each resume (rundir.RESUME_MAY_CHANGE)
        self._eval_cache: dict[tuple[str, str], dict[str, Any]] = {}
        if self._resume_state is not None:
            self._restore(self._resume_state)
            self._resume_state = None

    # ------------------------------------------------------------------ #
    # set-up
    # ------------------------------------------------------------------ #
    def _resume_path(self, resume: str | os.PathLike | bool | None) -> Path | None:
        if resume is None or resume is False:
            return None
        path = self.out / "last.pt" if resume is True else Path(resume)
        if not path.is_file():
            hint = (f"{self.out} holds no finished epoch: start the run again without --resume"
                    if resume is True else "pass the last.pt of a run with --resume-from")
            raise ckpt_io.CheckpointError(f"cannot resume: checkpoint {path} does not exist; {hint}")
        return path

    def _items(self, kind: str) -> list[tuple[str, str]]:
        c = self.cfg.data
        explicit = {"labeled": c.labeled_list, "unlabeled": c.unlabeled_list, "val": c.val_list}[kind]
        if explicit:
            return data_io.read_split(explicit)
        if kind == "unlabeled" and c.labeled_list:
            train = data_io.read_split(c.train_list) if c.train_list else data_io.split_items(
                c.layout, None, "train", c.root)
            return data_io.derive_unlabeled(train, data_io.read_split(c.labeled_list))
        return data_io.split_items(c.layout, c.split, kind, c.root)

    def _dataset(self, kind: str, labeled: bool, limit: int | None) -> SegmentationDataset:
        c = self.cfg.data
        root = Path(c.root)
        spec = data_io.dataset_spec(c.layout)
        if not root.is_dir():
            raise DatasetError(
                f"dataset root {root} does not exist. Fix: run `{spec.prepare.format(root=root)}` "
                "or set data.root to where the data is"
            )
        items = self._items(kind)
        if limit is not None:
            items = items[:limit]
        if not items:
            raise DatasetError(f"the {kind} list of {c.layout} split {c.split!r} under {root} is empty")
        fix = f"Fix: run `{spec.prepare.format(root=root)}` to (re)create it, or correct the split list."
        try:  # the dataset's own class names (scenes keeps them in its manifest)
            names = SegmentationDataset.from_split(c.layout, root, kind="val").class_names
        except DatasetError:
            names = spec.class_names
        ds = SegmentationDataset(root, items, num_classes=self.cfg.model.num_classes, labeled=labeled,
                                 class_names=names if len(names) == self.cfg.model.num_classes else None, fix=fix)
        missing = ds.missing_files()
        if missing:
            raise DatasetError(
                f"{len(missing)} file(s) named in the {kind} list are missing, first: {missing[0]}. {fix}")
        return ds

    def _build_data(self) -> None:
        c, seed = self.cfg.data, self.cfg.seed
        self.labeled_base = self._dataset("labeled", True, c.labeled_limit)
        self.unlabeled_base = self._dataset("unlabeled", False, c.unlabeled_limit)
        self.val_set = self._dataset("val", True, c.val_limit)
        n_u = len(self.unlabeled_base)
        self.train_l = LabeledTrainSet(self.labeled_base, c, seed=seed, length=max(n_u, len(self.labeled_base)))
        self.train_u = UnlabeledTrainSet(self.unlabeled_base, c, seed=seed, stream=2)
        self.train_mix = UnlabeledTrainSet(self.unlabeled_base, c, seed=seed, stream=3)
        # Diagnostics: the first unlabeled images, read with their labels (scenes and VOC have them).
        n_diag = min(c.diag_images, n_u)
        self.diag_set = None
        if n_diag and self.d.is_main:
            diag = SegmentationDataset(c.root, self.unlabeled_base.items[:n_diag], num_classes=self.cfg.model.num_classes,
                                       labeled=True)
            if not diag.missing_files():
                self.diag_set = diag
        b = self.cfg.optim.batch_size
        per_rank = len(self.train_u) // self.d.world_size
        if per_rank < b:
            raise DatasetError(
                f"{len(self.train_u)} unlabeled images are fewer than one batch per process "
                f"(optim.batch_size={b} × {self.d.world_size} processes); lower optim.batch_size"
            )
        self.iters_per_epoch = per_rank // b
        if self.cfg.optim.iters_per_epoch:
            self.iters_per_epoch = min(self.iters_per_epoch, self.cfg.optim.iters_per_epoch)

    def _loader(self, ds, sampler_seed: int) -> DataLoader:
        sampler = DistributedSampler(ds, num_replicas=self.d.world_size, rank=self.d.rank, shuffle=True,
                                     seed=sampler_seed, drop_last=True)
        nw = self.cfg.data.num_workers
        return DataLoader(ds, batch_size=self.cfg.optim.batch_size, sampler=sampler, num_workers=nw,
                          drop_last=True, pin_memory=self.d.device.type == "cuda", persistent_workers=False,
                          multiprocessing_context="fork" if nw and sys.platform == "linux" else None)

    def _loaders(self) -> tuple[DataLoader, DataLoader, DataLoader]:
        """Labeled, unlabeled and CutMix-partner loaders (``method.cutmix_partner``).

        ``same_image``: the partner's sampler replays the unlabeled order, so each image is mixed
        with another augmentation of itself (the release zips one loader twice).
        """
        seed = self.cfg.seed
        mix_seed = seed if self.cfg.method.cutmix_partner == "same_image" else seed + 1
        return (self._loader(self.train_l, seed), self._loader(self.train_u, seed),
                self._loader(self.train_mix, mix_seed))

    def _build_model(self) -> None:
        cfg, d = self.cfg, self.d
        net = build_model(cfg.model)
        if cfg.optim.warm_start:
            _load_warm_start(net, Path(cfg.optim.warm_start))
        if d.distributed:  # BN statistics over the global batch, as with one process
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if d.device.type == "cuda" else CpuSyncBatchNorm.convert(net)
        net = net.to(d.device)
        if cfg.optim.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net: DerPropNet = net
        m = cfg.method
        uses_heads = ((m.dlp and (m.propagated_ce or m.weak_propagated_ce)) or m.derivative_loss) and m.semi_supervised
        self.model: nn.Module = (
            nn.parallel.DistributedDataParallel(
                net, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                find_unused_parameters=not uses_heads,
            )
            if d.distributed
            else net
        )
        self.momentum = (
            MomentumNetwork(net, include_buffers=m.momentum_buffers, when=m.momentum_timing) if m.momentum else None
        )
        global_batch = cfg.optim.batch_size * d.world_size
        lr = cfg.optim.lr * (global_batch / cfg.optim.ref_batch if cfg.optim.ref_batch else 1.0)
        self.base_lr = lr
        self.optimizer = torch.optim.SGD(
            net.param_groups(lr, cfg.optim.head_lr_mult), lr=lr, momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
        )
        total = cfg.optim.epochs * self.iters_per_epoch
        power = cfg.optim.poly_power
        self.total_iters = total
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: max(0.0, 1.0 - it / total) ** power
        )
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.optim.amp]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.optim.amp == "fp16" else None

    # ------------------------------------------------------------------ #
    # forward helpers
    # ------------------------------------------------------------------ #
    def _autocast(self):
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _prop(self, out: SegOutput, size) -> Tensor:
        """``L̃`` (eq. 4) at the feature grid, upsampled to ``size``."""
        m = self.cfg.method
        b, c, h, w = out.logits_grid.shape
        f1, f2 = similarity_features(out, m.dlp_temperature)
        lt = propagate(out.logits_grid.flatten(2), f1, f2, mode="official" if m.dlp_form == "softmax" else "paper",
                       op=m.op, chunk=m.chunk, paper_norm=m.paper_dlp_norm)
        return F.interpolate(lt.view(b, c, h, w).float(), size=size, mode="bilinear", align_corners=True)

    def _blend(self, logits: Tensor, prop: Tensor | None, eta: float) -> Tensor:
        """Pseudo-label probabilities (eq. 5)."""
        logits = logits.float()
        if prop is None:
            return logits.softmax(1)
        if self.cfg.method.blend_space == "logit":
            return ((1 - eta) * logits + eta * prop.float()).softmax(1)
        return (1 - eta) * logits.softmax(1) + eta * prop.float().softmax(1)

    # ------------------------------------------------------------------ #
    def train_step(self, batch, epoch: int) -> tuple[Tensor, dict[str, float]]:
        """Loss of one batch (see the module doc); returns ``(loss, logged terms)``."""
        cfg, m, lc = self.cfg, self.cfg.method, self.cfg.loss
        dev = self.d.device
        if not m.semi_supervised:
            x, y = batch[0]
            return self._labeled_step(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True))
        (x, y), (uw, us, ign, box), (uw2, us2, ign2, _) = batch
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        uw, us, ign, box = (t.to(dev, non_blocking=True) for t in (uw, us, ign, box))
        uw2, us2, ign2 = (t.to(dev, non_blocking=True) for t in (uw2, us2, ign2))
        ign, ign2 = ign.long(), ign2.long()
        eta = epoch / cfg.optim.epochs
        nb, size = x.shape[0], x.shape[-2:]
        dlp = m.dlp

        # 1. pseudo-labels of the CutMix partner batch (no gradient)
        with torch.no_grad(), self._autocast():
            if m.pseudo_label_source == "momentum" and self.momentum is not None:
                out_mix = self.momentum(uw2)
                p_mix = out_mix.logits.float().softmax(1)
            else:
                self.net.eval()
                out_mix = self.net(uw2)
                self.net.train()
                p_mix = self._blend(out_mix.logits, self._prop(out_mix, size) if dlp else None, eta)
        conf_mix, mask_mix = p_mix.max(1)

        # 2. CutMix the strong view
        box3 = box.unsqueeze(1)
        us_mixed = torch.where(box3, us2, us)
        inp_w = torch.cat([x, uw])
        if cfg.optim.channels_last:
            inp_w = inp_w.contiguous(memory_format=torch.channels_last)
            us_mixed = us_mixed.contiguous(memory_format=torch.channels_last)

        # 3. forward passes of Θb
        with self._autocast():
            out_w = self.model(inp_w, perturb=m.fp_branch)
            out_s = self.model(us_mixed)
            need_prop = dlp and (m.propagated_ce or m.weak_propagated_ce)
            prop_w = self._prop(out_w, size) if dlp else None
            prop_s = self._prop(out_s, size) if (dlp and m.propagated_ce) else None
        logits_w = out_w.logits.float()
        pred_x, pred_uw = logits_w[:nb], logits_w[nb:]
        pred_us = out_s.logits.float()

        # 4. pseudo-labels of the weak view (eq. 5)
        with torch.no_grad():
            p_w = self._blend(pred_uw.detach(), prop_w[nb:].detach() if prop_w is not None else None, eta)
            conf_w, mask_w = p_w.max(1)
            mask_c = torch.where(box, mask_mix, mask_w)
            conf_c = torch.where(box, conf_mix, conf_w)
            ign_c = torch.where(box, ign2, ign)
            p_target = torch.where(box3, p_mix, p_w) if m.cutmix_consistent_targets else p_w

            # 5. confidence threshold, region propagation
            self.threshold.update(p_w, ign if m.cutmix_consistent_targets else ign_c, self.d)
            tau = self.threshold.value
            keep_c = (conf_c >= tau) & (ign_c != IGNORE_INDEX)
            keep_w = (conf_w >= tau) & (ign != IGNORE_INDEX)
            keep_cu = keep_c
            if m.region_propagation:
                mask_c, keep_cu = self._region_propagation(out_w, nb, mask_c, keep_c, box, ign_c, tau, size)
            valid_c = ign_c != IGNORE_INDEX
            valid_w = ign != IGNORE_INDEX

        # 6. losses
        terms: dict[str, Tensor] = {}
        ce_l = (lambda lg, t: ohem_ce(lg, t, lc.ohem_thresh, lc.ohem_min_kept)) if lc.ohem else (
            lambda lg, t: F.cross_entropy(lg, t, ignore_index=IGNORE_INDEX))
        terms["ce_x"] = ce_l(pred_x, y)
        if need_prop and m.propagated_ce:
            terms["ce_x_prop"] = ce_l(prop_w[:nb], y)
        log_s = F.log_softmax(pred_us, dim=1)
        if m.unlabeled_ce == "soft":
            ce_u = -(p_target * log_s).sum(1)
        else:
            ce_u = F.nll_loss(log_s, mask_c, reduction="none")
        terms["ce_u"] = masked_mean(ce_u, keep_cu, valid_c)
        if prop_s is not None:
            ce_us_prop = masked_mean(F.cross_entropy(prop_s, mask_c, reduction="none"), keep_cu, valid_c)
            if m.weak_propagated_ce:
                ce_uw_prop = masked_mean(F.cross_entropy(prop_w[nb:], mask_w, reduction="none"), keep_w, valid_w)
                terms["ce_u_prop"] = 0.5 * (ce_us_prop + ce_uw_prop)
            else:
                terms["ce_u_prop"] = ce_us_prop
        kl = (p_target * (torch.log(p_target.clamp_min(1e-8)) - log_s)).sum(1)
        terms["kl"] = masked_mean(kl, keep_c, valid_c)
        if m.fp_branch:
            terms["ce_fp"] = masked_mean(
                F.cross_entropy(out_w.logits_fp[nb:].float(), mask_w, reduction="none"), keep_w, valid_w)
        if m.derivative_loss:
            terms["der_x"], terms["der_u"] = self._derivative_terms(out_w, out_s, out_mix, nb, y, box)

        total = lc.lambda_ce * (terms["ce_x"] + terms.get("ce_x_prop", 0.0))
        total = total + lc.lambda_ce / 2 * (terms["ce_u"] + terms.get("ce_u_prop", 0.0))
        total = total + lc.lambda_kl * terms["kl"]
        if "ce_fp" in terms:
            total = total + lc.lambda_fp * terms["ce_fp"]
        if "der_x" in terms:
            total = total + lc.lambda_der * (terms["der_x"] + terms["der_u"])
        total = lc.scale * total
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["threshold"] = tau
        logs["mask_ratio"] = float(keep_w.sum() / valid_w.sum().clamp_min(1))
        return total, logs

    def _labeled_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Loss of a supervised-only step (``method.semi_supervised=false``): the labeled terms of eq. 7/8."""
        m, lc = self.cfg.method, self.cfg.loss
        with self._autocast():
            out = self.model(x)
            prop = self._prop(out, x.shape[-2:]) if m.dlp and m.propagated_ce else None
        ce_l = (lambda lg, t: ohem_ce(lg, t, lc.ohem_thresh, lc.ohem_min_kept)) if lc.ohem else (
            lambda lg, t: F.cross_entropy(lg, t, ignore_index=IGNORE_INDEX))
        terms: dict[str, Tensor] = {"ce_x": ce_l(out.logits.float(), y)}
        if prop is not None:
            terms["ce_x_prop"] = ce_l(prop, y)
        total = lc.lambda_ce * (terms["ce_x"] + terms.get("ce_x_prop", 0.0))
        if m.derivative_loss:
            terms["der_x"] = self._labeled_derivative_term(out, x.shape[0], y)
            total = total + lc.lambda_der * terms["der_x"]
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["threshold"] = self.threshold.value
        logs["mask_ratio"] = 0.0
        return lc.scale * total, logs

    def _der_options(self) -> dict[str, Any]:
        m, lc = self.cfg.method, self.cfg.loss
        return dict(Q=m.Q, eta=lc.eta, op=m.op, sparsity=m.sparsity, normalize=m.feature_norm, chunk=m.chunk,
                    spatial_softmax_sparsity=m.spatial_softmax_sparsity)

    def _labeled_derivative_term(self, out: SegOutput, nb: int, y: Tensor) -> Tensor:
        """Labeled derivative loss (eq. 8/9, S_GT = YᵀY) of the first ``nb`` images of ``out``."""
        m = self.cfg.method
        c = self.cfg.model.num_classes
        h, w = out.f1.shape[-2:]
        # labeled target: the label on the feature grid, one-hot; ignore pixels drop out (mask)
        yg = label_on_grid(y, (h, w), m.label_resize).flatten(1)
        keep = yg < c
        onehot = F.one_hot(yg.clamp(0, c), c + 1)[..., :c].transpose(1, 2).float()
        f1x = out.f1[:nb].flatten(2).float()
        f2x = f1x if out.f2 is out.f1 else out.f2[:nb].flatten(2).float()
        return derivative_loss(f1x, f2x, onehot, onehot, labeled=True, mask=keep,
                               detach_labeled=m.labeled_der_detached, **self._der_options())

    def _derivative_terms(self, out_w: SegOutput, out_s: SegOutput, out_mix: SegOutput, nb: int, y: Tensor,
                          box: Tensor) -> tuple[Tensor, Tensor]:
        """Labeled (S_GT = YᵀY) and unlabeled (weak view as target) derivative losses, eq. 8/9."""
        m = self.cfg.method
        h, w = out_w.f1.shape[-2:]
        one_head = out_w.f2 is out_w.f1
        der_x = self._labeled_derivative_term(out_w, nb, y)
        # unlabeled: the weak view's features are the target of the (CutMixed) strong view's
        t1 = out_w.f1[nb:].detach().float()
        t2 = t1 if one_head else out_w.f2[nb:].detach().float()
        if m.cutmix_consistent_targets:
            boxg = F.interpolate(box.unsqueeze(1).float(), size=(h, w), mode="nearest").bool()
            t1 = torch.where(boxg, out_mix.f1.float(), t1)
            t2 = t1 if one_head else torch.where(boxg, out_mix.f2.float(), t2)
        f1s = out_s.f1.flatten(2).float()
        f2s = f1s if one_head else out_s.f2.flatten(2).float()
        t1f = t1.flatten(2)
        t2f = t1f if one_head else t2.flatten(2)
        der_u = derivative_loss(f1s, f2s, t1f, t2f, labeled=False, **self._der_options())
        return der_x, der_u

    @torch.no_grad()
    def _region_propagation(self, out_w: SegOutput, nb: int, mask_c: Tensor, keep_c: Tensor, box: Tensor,
                            ign_c: Tensor, tau: float, size) -> tuple[Tensor, Tensor]:
        """CorrMatch's region-level label propagation (the release keeps it), compact version.

        ``K = region_samples`` pixels are drawn at random on the feature grid; the
        row of the similarity softmax ``A`` (release form, with the derivative
        term) of each is upsampled to the crop, min-max normalised and
        thresholded at 0.5: a region. Regions are restricted to valid pixels
        outside the CutMix box. A region whose confident fraction is ≥ τ and
        whose confident pixels agree on one class for more than τ of them gets
        that class everywhere, and all its pixels count as confident.

        Difference from the release: the class counts of every region are
        taken from the pseudo-label before any region is applied (the release
        updates the label map region by region, so later regions see earlier
        ones); where accepted regions overlap the last one wins, as there.
        """
        k = self.cfg.method.region_samples
        f1, f2 = similarity_features(out_w, self.cfg.method.dlp_temperature)
        f1 = f1[nb:].detach().float()
        f2 = f1 if f2 is None else f2[nb:].detach().float()
        g1, g2 = official_similarity_factors(f1, f2, self.cfg.method.op)
        b, _, mpix = g1.shape
        h, w = out_w.f1.shape[-2:]
        idx = torch.randint(0, mpix, (k,), device=g1.device)
        rows = (g1[:, :, idx].transpose(1, 2) @ g2).softmax(-1)  # (B, K, M)
        maps = F.interpolate(rows.view(b * k, 1, h, w), size=size, mode="bilinear", align_corners=True)
        maps = maps.view(b, k, -1)
        lo, hi = maps.amin(-1, keepdim=True), maps.amax(-1, keepdim=True)
        regions = (maps - lo) / (hi - lo).clamp_min(1e-12) > 0.5  # (B, K, HW)
        allowed = (~box & (ign_c != IGNORE_INDEX)).flatten(1).unsqueeze(1)
        regions &= allowed
        conf = keep_c.flatten(1).unsqueeze(1)
        seg = regions & conf
        n_seg, n_ori = seg.sum(-1).float(), regions.sum(-1).float()
        c = self.cfg.model.num_classes
        onehot = F.one_hot(mask_c.flatten(1), c).float()  # (B, HW, C)
        counts = seg.float() @ onehot  # (B, K, C)
        top_n, top_cls = counts.max(-1)
        accept = (n_seg > 0) & (n_seg / n_ori.clamp_min(1) >= tau) & (top_n / n_seg.clamp_min(1) > tau)
        hit = regions & accept.unsqueeze(-1)  # (B, K, HW)
        order = torch.arange(1, k + 1, device=hit.device).view(1, k, 1)
        last = (hit * order).amax(1)  # (B, HW): 1-based index of the last accepted region covering a pixel
        covered = last > 0
        new_cls = torch.gather(top_cls, 1, (last - 1).clamp_min(0))
        flat = mask_c.flatten(1)
        mask_new = torch.where(covered, new_cls, flat).view_as(mask_c)
        keep_new = (keep_c.flatten(1) | covered).view_as(keep_c)
        return mask_new, keep_new

    # ------------------------------------------------------------------ #
    # epoch loop
    # ------------------------------------------------------------------ #
    def fit(self) -> dict[str, Any]:
        """Train from ``start_epoch`` to ``optim.epochs``; returns the ``results.json`` content (rank 0)."""
        cfg, d = self.cfg, self.d
        t0 = time.time()
        lock = rundir.RunLock(self.out) if d.is_main else None
        try:
            if lock is not None:
                lock.acquire()
                self._prepare_folder()
            loaders = self._loaders()
            if self.start_epoch == 0 and d.is_main and self.diag_set is not None:
                self._pseudo_label_diagnostics(-1)  # the state training starts from: snapshot epoch_000
            for epoch in range(self.start_epoch, cfg.optim.epochs):
                self._train_epoch(epoch, loaders)
            results = self._final_results(time.time() - t0)
            if d.distributed:
                dist.barrier()
        finally:
            if lock is not None:
                lock.release()
        return results if d.is_main else {}

    def _prepare_folder(self) -> None:
        """With the lock held: remove stale temporaries, start clean or reconcile with the last commit."""
        rundir.remove_stale_temporaries(self.out)
        if self.fresh:
            rundir.clear_run_files(self.out)
        else:
            rundir.adopt(self.resume_path.parent, self.out)
            self.history = rundir.truncate_logs(self.out, self.start_epoch)
            if self.start_epoch < self.cfg.optim.epochs:
                (self.out / "results.json").unlink(missing_ok=True)  # the run is unfinished again
            self._reconcile_best()
        atomic.write_text(self.out / "config.yaml", dump_yaml(self.cfg))

    def _reconcile_best(self) -> None:
        """``best.pt`` after a kill between the commit (``last.pt``) and its write: rebuilt from the nets."""
        if rundir.best_needs_rewrite(self.out, self.best.get("epoch"), self.start_epoch):
            self._save_best(self.start_epoch - 1, self.best["net"], self.best["miou"])

    def _train_epoch(self, epoch: int, loaders) -> None:
        cfg, d = self.cfg, self.d
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, d.rank))
        for ds in (self.train_l, self.train_u, self.train_mix):
            ds.set_epoch(epoch)
        for ld in loaders:
            ld.sampler.set_epoch(epoch)
        if self.momentum is not None:
            self.momentum.on_epoch_start(self.net, epoch)
        self.model.train()
        t_epoch = time.time()
        sums: dict[str, float] = {}
        n_steps = 0
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", leave=False)
        steps_log = []
        # a supervised-only run reads no unlabeled images
        for step, batch in enumerate(zip(*(loaders if cfg.method.semi_supervised else loaders[:1]))):
            if step >= self.iters_per_epoch:
                break
            loss, logs = self.train_step(batch, epoch)
            loss_all = _all_reduce_mean(loss.detach().float(), d)
            value = float(loss_all)
            if not math.isfinite(value):
                self._non_finite(value, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self._check_grad_norm(epoch, step)
                self.optimizer.step()
            self.scheduler.step()
            self.global_step += 1
            n_steps += 1
            logs["loss"] = value
            ProgressLog.of(self).step(self.global_step, logs, self.optimizer.param_groups[0]["lr"])
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            steps_log.append({"epoch": epoch, "step": step, "global_step": self.global_step, "loss": value,
                              "lr": self.optimizer.param_groups[0]["lr"]})
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3f}", tau=f"{logs['threshold']:.3f}")
                bar.update(1)
            if self.hook:
                self.hook("step_end", epoch=epoch, step=step, loss=value)
        if bar is not None:
            bar.close()
        if self.momentum is not None:
            self.momentum.on_epoch_end(self.net, epoch)
        self._check_weights(epoch)

        means = {k: v / max(n_steps, 1) for k, v in sums.items()}
        if d.distributed:
            keys = sorted(means)
            t = _all_reduce_mean(torch.tensor([means[k] for k in keys], dtype=torch.float64), d)
            means = dict(zip(keys, t.tolist()))
        metrics: dict[str, Any] = {"epoch": epoch + 1, "global_step": self.global_step, "train_time_s": time.time() - t_epoch,
                                   "lr": self.optimizer.param_groups[0]["lr"], "eta_ep": epoch / cfg.optim.epochs,
                                   **{f"train_{k}": v for k, v in means.items()}}
        last_epoch = epoch + 1 == cfg.optim.epochs
        self._eval_cache = {}
        if (epoch + 1) % cfg.eval.every == 0 or last_epoch:
            metrics.update(self._evaluate_epoch(epoch))  # every rank evaluates its shard
        if d.is_main:
            if self.diag_set is not None:
                metrics.update(self._pseudo_label_diagnostics(epoch))
            self._save_epoch(epoch, metrics, steps_log)
        if d.distributed:
            dist.barrier()
        if self.hook:
            self.hook("epoch_end", epoch=epoch, metrics=metrics)

    def _non_finite(self, value: float, epoch: int, step: int, what: str = "loss") -> None:
        where = f"at epoch {epoch + 1}, step {step + 1} (global step {self.global_step + 1})" if step >= 0 else \
            f"during epoch {epoch + 1}"
        if epoch and (self.out / "last.pt").is_file():  # every finished epoch was committed
            kept = (f"the last finite checkpoint {self.out / 'last.pt'} (epoch {epoch}) is kept; continue it with a "
                    "lower lr (--resume optim.lr=...) or start again (--overwrite optim.lr=...)")
        else:
            kept = "no checkpoint was written yet; start again with a lower optim.lr"
        raise NonFiniteLossError(f"{what} became {value} {where}; training stopped and {kept} (or try optim.amp=none)")

    def _check_grad_norm(self, epoch: int, step: int) -> None:
        """A NaN/inf gradient stops training before the optimiser step can write it into the weights."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if not math.isfinite(norm):
            self._non_finite(norm, epoch, step, "gradient norm")

    def _check_weights(self, epoch: int) -> None:
        """Every parameter and buffer (both nets) must be finite before an epoch can be evaluated and saved."""
        for net_name, net in self._nets().items():
            bad = ckpt_io.first_non_finite(net.state_dict())
            if bad is not None:
                self._non_finite(bad[1], epoch, -1, f"{net_name} network tensor {bad[0]}")

    # ------------------------------------------------------------------ #
    # evaluation (every rank, on its shard) and diagnostics (rank 0)
    # ------------------------------------------------------------------ #
    def _nets(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"backprop": self.net}
        if self.momentum is not None:
            nets["momentum"] = self.momentum.module
        return nets

    def _eval(self, name: str, mode: str) -> dict[str, Any]:
        """mIoU of net ``name`` (``backprop``/``momentum``) on the val set; reuses this epoch's result."""
        mode = eval_mode(self.cfg, mode)
        if (name, mode) in self._eval_cache:
            return self._eval_cache[(name, mode)]
        d = self.d
        data = self.val_set if not d.distributed else Subset(self.val_set, range(d.rank, len(self.val_set), d.world_size))
        with self._autocast():
            res = evaluate(self._nets()[name], data, num_classes=self.cfg.model.num_classes, mode=mode,
                           crop_size=self.cfg.eval.crop_size, device=d.device, all_reduce=d.distributed)
        self._eval_cache[(name, mode)] = res
        return res

    def _evaluate_epoch(self, epoch: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._nets():
            out[f"miou_{name}"] = self._eval(name, self.cfg.eval.mode)["miou"]
        nets = list(self._nets())
        candidates = nets if self.cfg.eval.select == "best_of_both" else nets[-1:]  # momentum if kept
        best_net = max(candidates, key=lambda n: out[f"miou_{n}"])
        out["eval_mode"] = eval_mode(self.cfg, self.cfg.eval.mode)
        out["_best_candidate"] = (best_net, out[f"miou_{best_net}"])
        return out

    @torch.no_grad()
    def _pseudo_label_diagnostics(self, epoch: int) -> dict[str, Any]:
        """Pseudo-labels of fixed unlabeled images with known labels, before and after DLP (eq. 5), and how
        class-aware the propagation weights are (chapter *Pseudo-label rectification*).

        ``epoch = -1`` is the state before the first step (snapshot ``epoch_000``). Without DLP
        (``method.dlp=false``) only the "before" figures exist: nothing propagates, so there is no "after".
        """
        cfg, m = self.cfg, self.cfg.method
        s = cfg.eval.crop_size
        c = cfg.model.num_classes
        eta = max(epoch, 0) / cfg.optim.epochs
        net = self.net
        was = net.training
        net.eval()
        cms = {k: ConfusionMatrix(c) for k in (("before", "after", "prop") if m.dlp else ("before",))}
        fixed = broken = 0
        own, uniform, support = [], [], []
        keys = ["image", "gt", "pl_before", "confidence", "names"] + (["pl_after", "attn", "attn_pixel"] if m.dlp else [])
        arrays: dict[str, list] = {k: [] for k in keys}
        n = len(self.diag_set)
        for start in range(0, n, 16):
            pairs = [_center_fit(*(t.as_subclass(Tensor) for t in self.diag_set[i]), s) for i in range(start, min(start + 16, n))]
            x = torch.stack([p[0] for p in pairs]).to(self.d.device)
            gt = torch.stack([p[1] for p in pairs]).to(self.d.device)
            with self._autocast():
                out = net(x)
                prop = self._prop(out, x.shape[-2:]) if m.dlp else None
            probs = self._blend(out.logits, prop, eta)  # softmax(L) when there is no L̃
            pl_before = out.logits.float().argmax(1)
            cms["before"].update(pl_before, gt)
            conf, pl_after = probs.max(1)
            if m.dlp:
                cms["after"].update(pl_after, gt)
                cms["prop"].update(prop.argmax(1), gt)
                valid = gt != IGNORE_INDEX
                fixed += int((valid & (pl_before != gt) & (pl_after == gt)).sum())
                broken += int((valid & (pl_before == gt) & (pl_after != gt)).sum())
                h, w = out.f1.shape[-2:]
                f1, f2 = similarity_features(out, m.dlp_temperature)
                weights = propagation_weights(f1.float(), None if f2 is None else f2.float(), op=m.op,
                                              mode="official" if m.dlp_form == "softmax" else "paper",
                                              paper_norm=m.paper_dlp_norm)
                yg = label_on_grid(gt, (h, w), "nearest").flatten(1)
                o, u, sp = attention_shares(weights, yg, ignore_index=IGNORE_INDEX)
                own.append(o)
                uniform.append(u)
                support.append(sp)
            for k in range(len(pairs)):
                i = start + k
                if i >= 8:
                    break
                arrays["image"].append(pairs[k][0].permute(1, 2, 0).cpu().numpy().astype(np.uint8))
                arrays["gt"].append(pairs[k][1].cpu().numpy().astype(np.uint8))
                arrays["pl_before"].append(pl_before[k].cpu().numpy().astype(np.uint8))
                arrays["confidence"].append(conf[k].cpu().numpy().astype(np.float16))
                arrays["names"].append(self.diag_set.name(i))
                if m.dlp:
                    arrays["pl_after"].append(pl_after[k].cpu().numpy().astype(np.uint8))
                    j = _chosen_pixel(yg[k].view(h, w))
                    col = weights[k, :, j].abs()
                    arrays["attn"].append((col / col.sum().clamp_min(1e-30)).view(h, w).cpu().numpy().astype(np.float32))
                    arrays["attn_pixel"].append(np.array(divmod(j, w), np.int32))
        net.train(was)
        stats: dict[str, Any] = {"pl_images": n, "pl_acc_before": cms["before"].pixel_accuracy(),
                                 "pl_miou_before": cms["before"].miou()}
        if m.dlp:
            o, u, sp = torch.cat(own), torch.cat(uniform), torch.cat(support)
            stats |= {
                "pl_acc_after": cms["after"].pixel_accuracy(), "pl_miou_after": cms["after"].miou(),
                "pl_acc_prop": cms["prop"].pixel_accuracy(), "pl_miou_prop": cms["prop"].miou(),
                "pl_fixed": fixed, "pl_broken": broken,
                "attn_own_share": float(o.mean()) if o.numel() else float("nan"),
                "attn_uniform_share": float(u.mean()) if u.numel() else float("nan"),
                "attn_support": float(sp.mean()) if sp.numel() else float("nan"),
                "attn_grid_pixels": h * w,
            }
            stats["attn_share_ratio"] = stats["attn_own_share"] / max(stats["attn_uniform_share"], 1e-12)
        _savez(self.out / "pseudo_labels" / f"epoch_{epoch + 1:03d}.npz",
               **{k: np.stack(v) if k != "names" else np.array(v) for k, v in arrays.items()},
               eta_ep=np.float32(eta), epoch=np.int32(epoch + 1),
               **{f"stat_{k}": np.float64(v) for k, v in stats.items()})
        return stats

    # ------------------------------------------------------------------ #
    # checkpoints
    # ------------------------------------------------------------------ #
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch + 1,
            "global_step": self.global_step,
            "model": self.net.state_dict(),
            "momentum": self.momentum.state_dict() if self.momentum is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "threshold": self.threshold.state_dict(),
            "rng": ckpt_io.rng_state(),
            "best": dict(self.best),
            "resumes": list(self.resumes),
            "config": resolved(self.cfg),
            "data_root": str(Path(self.cfg.data.root).resolve()),
            "world_size": self.d.world_size,
            "torch_version": str(torch.__version__),
        }

    def _save_epoch(self, epoch: int, metrics: dict[str, Any], steps_log: list[dict[str, Any]]) -> None:
        """Log rows first, then ``last.pt`` (the epoch's commit point), then ``best.pt`` (rebuilt on resume)."""
        cand = metrics.pop("_best_candidate", None)
        improved = cand is not None and cand[1] > self.best["miou"]
        if improved:
            self.best = {"miou": cand[1], "epoch": epoch + 1, "net": cand[0]}
        metrics["best_miou"] = self.best["miou"] if self.best["epoch"] is not None else None
        self.history.append(metrics)
        rundir.append_jsonl(self.out / "steps.jsonl", steps_log)
        rundir.append_jsonl(self.out / "metrics.jsonl", [metrics])
        ckpt_io.save(self.out / "last.pt", self._state(epoch))
        if improved:
            self._save_best(epoch, cand[0], cand[1])

    def _save_best(self, epoch: int, net_name: str, miou: float) -> None:
        ckpt_io.save(self.out / "best.pt", {
            "epoch": epoch + 1, "net": net_name, "miou": miou, "model": self._nets()[net_name].state_dict(),
            "config": resolved(self.cfg), "data_root": str(Path(self.cfg.data.root).resolve()),
        })

    def _restore(self, state: dict[str, Any]) -> None:
        changed = self._changes
        fresh_groups = [dict(g) for g in self.optimizer.param_groups]
        try:
            self.net.load_state_dict(state["model"])
            if self.momentum is not None:
                if state.get("momentum") is None:
                    raise KeyError("momentum")
                self.momentum.load_state_dict(state["momentum"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            self.threshold.load_state_dict(state["threshold"])
            ckpt_io.set_rng_state(state["rng"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise ckpt_io.CheckpointError(
                f"checkpoint {self.resume_path} does not fit this config ({type(err).__name__}: {err}); "
                "resume with the config it was written with"
            ) from err
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best = dict(state["best"])
        self.resumes = list(state.get("resumes") or [])
        if changed:
            self.resumes.append({"epoch": self.start_epoch, "changed": changed})
        if any(k in rundir.OPTIMIZER_KEYS for k in changed):
            rundir.apply_optimizer_settings(self.optimizer, self.scheduler, fresh_groups)

    # ------------------------------------------------------------------ #
    def _final_results(self, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        modes = list(dict.fromkeys(eval_mode(cfg, m) for m in (cfg.eval.mode, *cfg.eval.final_modes)))
        names = list(self.val_set.class_names)
        nets: dict[str, Any] = {}
        for name in self._nets():
            nets[name] = {}
            for mode in modes:
                res = self._eval(name, mode)
                nets[name][mode] = {
                    "miou": res["miou"],
                    "pixel_acc": res["pixel_acc"],
                    "iou_per_class": dict(zip(names, res["iou_per_class"])),
                    "num_images": res["num_images"],
                    "crop_size": res["crop_size"],
                }
        head_net = "momentum" if "momentum" in nets else "backprop"
        if cfg.eval.select == "best_of_both":
            head_net = max(nets, key=lambda n: nets[n][modes[0]]["miou"])
        results = {
            "config": resolved(cfg),
            "miou": nets[head_net][modes[0]]["miou"],
            "miou_net": head_net,
            "miou_mode": modes[0],
            "final": nets,
            "best": self.best,
            "resumes": self.resumes,
            "epochs": cfg.optim.epochs,
            "iters_per_epoch": self.iters_per_epoch,
            "global_batch": cfg.optim.batch_size * self.d.world_size,
            "world_size": self.d.world_size,
            "wall_time_s": wall,
            "device": _device_name(self.d.device),
            "torch_version": str(torch.__version__),
            "python": platform.python_version(),
        }
        if self.d.is_main:
            atomic.write_json(self.out / "results.json", results)
        return results


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #


def similarity_features(out: SegOutput, temperature: float) -> tuple[Tensor, Tensor | None]:
    """``f1, f2`` flattened to ``(B, D, M)`` (``f2`` None when symmetric), ``f1`` divided by the temperature
    (``method.dlp_temperature``): in the softmax form the similarity becomes ``s/T`` (Δ is linear)."""
    f1 = out.f1.flatten(2)
    if temperature == 1.0:
        return f1, None if out.f2 is out.f1 else out.f2.flatten(2)
    return f1 / temperature, f1 if out.f2 is out.f1 else out.f2.flatten(2)


def _load_warm_start(net: nn.Module, path: Path) -> None:
    """Initialise ``net`` with the model weights of checkpoint ``path`` (``optim.warm_start``)."""
    if not path.is_file():
        raise ckpt_io.CheckpointError(f"optim.warm_start: checkpoint {path} does not exist; train the warm-start run "
                                      "first or correct the path")
    state = ckpt_io.load(path)
    try:
        net.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise ckpt_io.CheckpointError(
            f"optim.warm_start: {path} does not fit this model ({type(err).__name__}: {err}); "
            "warm-start from a run with the same model section") from err


def _chosen_pixel(grid_label: Tensor) -> int:
    """Flat index of the pixel whose attention the snapshots keep: the foreground grid pixel with the most
    same-class pixels among its 8 neighbours (an object's interior), else the grid centre."""
    h, w = grid_label.shape
    fg = (grid_label > 0) & (grid_label != IGNORE_INDEX)
    if not bool(fg.any()):
        return (h // 2) * w + w // 2
    padded = F.pad(grid_label[None, None].float(), (1, 1, 1, 1), value=-1.0)
    same = sum((padded[0, 0, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == grid_label).int()
               for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    score = torch.where(fg, same, torch.full_like(same, -1)).flatten()
    return int(score.argmax())


def label_on_grid(label: Tensor, size: tuple[int, int], how: str) -> Tensor:
    """Class indices ``(B, H, W)`` sampled on the ``h × w`` feature grid (eq. 8's ``Y``).

    The logits are upsampled from that grid with ``align_corners=True``, so
    grid point ``k`` sits at pixel ``k·(H−1)/(h−1)``. ``nearest`` takes the
    label of the pixel nearest to each grid point; ``bilinear`` (release)
    interpolates class indices there and truncates, which mixes neighbours
    into a wrong class (or a value ≥ C, then ignored) wherever grid points
    fall between pixels. At crops 321, 513 and 801 (stride 8) every grid point
    is a pixel and the two agree exactly.
    """
    if how == "bilinear":
        return F.interpolate(label.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=True)[:, 0].long()
    (h, w), (big_h, big_w) = size, label.shape[-2:]
    rows = torch.linspace(0, big_h - 1, h, device=label.device).round().long()
    cols = torch.linspace(0, big_w - 1, w, device=label.device).round().long()
    return label[:, rows][:, :, cols].long()


def _center_fit(image: Tensor, label: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Pad (image 0, label 255) to at least ``size`` and take the central ``size × size``."""
    h, w = label.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        pad = [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]
        image = TF.pad(image, pad, fill=0)
        label = TF.pad(label.unsqueeze(0), pad, fill=IGNORE_INDEX)[0]
    return TF.center_crop(image, [size, size]), TF.center_crop(label.unsqueeze(0), [size, size])[0]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _savez(path: Path, **arrays: Any) -> None:
    with atomic.open_atomic(path) as f:
        np.savez_compressed(f, **arrays)
