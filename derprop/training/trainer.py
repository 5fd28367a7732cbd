"""Semi-supervised training: build a run, fit it epoch by epoch, evaluate, save and restore.

Explained in the book chapters *Training on a CPU* and *Paper vs released code*.

The loss of one step (:meth:`Trainer.compute_loss`; :meth:`Trainer.optimize` steps on it) on ``B``
labeled images ``x, y`` and two unlabeled batches, ``u`` and its CutMix partner ``u'``, reads top to bottom as: (1) pseudo-labels of ``u'`` without
gradient, from Θm (release) or from Θb with the DLP blend (paper); (2) ``u'``'s strong view pasted
into ``u``'s CutMix box; (3) Θb on ``[x; u_w]`` and on the mixed view, each output propagated at
the feature grid (eq. 4); (4) the pseudo-label of ``u_w`` (eq. 5, ``η_ep = epoch / epochs``), the
partner's inside the box; (5) confident pixels and region propagation
(:mod:`derprop.training.pseudo_labels`); (6) the losses of eq. 7/8 (:mod:`derprop.training.objective`).

Each part of a step is a ``torch.profiler.record_function`` range, so that a profile splits its time
(``benchmarks.train_step`` does): ``derprop.forward`` (the network passes), ``derprop.dlp``,
``derprop.region_propagation``, ``derprop.derivative_loss``, ``derprop.backward`` and ``derprop.optimizer``
(:meth:`Trainer.optimize`).

The run folder's rules are :mod:`derprop.training.rundir`'s, the data :mod:`derprop.training.loaders`', the schedule
:mod:`derprop.training.schedule`'s, processes and seeds :mod:`derprop.training.distributed`'s, the NaN checks
:mod:`derprop.training.guards`' and the per-epoch pseudo-label snapshots :mod:`derprop.training.diagnostics`'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.data import Subset

from derprop import provenance
from derprop.data.datasets import manifest_sha256
from derprop.errors import ConfigError
from derprop.method.momentum import MomentumNetwork
from derprop.training import atomic
from derprop.training import checkpoint as ckpt_io
from derprop.training import guards, paths, rundir, schedule
from derprop.training import loaders as data_loaders
from derprop.training.config import TrainConfig, eval_mode, resolved
from derprop.training.configfile import dump_yaml
from derprop.training.diagnostics import pseudo_label_diagnostics
from derprop.training.distributed import (CpuSyncBatchNorm, all_reduce, barrier, check_gpu_run, configure_kernels,
                                          device_name, epoch_seed, gather_devices, native_bf16, peak_memory_mib,
                                          seed_all, setup_distributed)
from derprop.training.evaluation import evaluate
from derprop.training.model import DerPropNet, SegOutput, build_model
from derprop.training.objective import (derivative_options, labeled_ce, labeled_derivative_term,
                                        unlabeled_derivative_term, unlabeled_terms, weighted_sum)
from derprop.training.progress import DEFAULT_EVERY, ProgressLog
from derprop.training.pseudo_labels import (Threshold, blend, cutmix_pseudo_labels, dlp_options, propagated_logits,
                                            weak_features)


Hook = Callable[..., None]
log = logging.getLogger(__name__)


def host_values(values: dict[str, Tensor]) -> dict[str, float]:
    """The step's logged tensors as floats, copied to the host in one go: one device sync per step, not one each."""
    return dict(zip(values, torch.stack([v.detach().float() for v in values.values()]).tolist()))


class Trainer:
    """Trains one config; writes ``config.yaml``, ``metrics.jsonl``, ``steps.jsonl``, ``last.pt``,
    ``best.pt``, ``pseudo_labels/`` and ``results.json`` into ``out_dir``.

    ``resume``: a checkpoint path (or ``True`` for ``out_dir/last.pt``); a
    fresh run refuses a folder that holds a run unless ``overwrite``, and a
    resume a dataset that changed since the checkpoint unless ``new_data``. The
    folder's rules (lock, commit point, clean-up) are :mod:`derprop.training.rundir`'s.
    ``log_every``: iterations per progress line in ``out_dir/train.log`` (and on
    stdout when no tqdm bar is drawn; :mod:`derprop.training.progress`).
    ``hook(event, **info)`` is called at ``"step_end"`` (epoch, step, loss)
    and ``"epoch_end"`` (epoch, metrics); raising from it stops training.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike, *, resume: str | os.PathLike | bool | None = None,
                 device: str | None = None, hook: Hook | None = None, progress: bool | None = None,
                 log_every: int = DEFAULT_EVERY, overwrite: bool = False, new_data: bool = False):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.hook = hook
        self.log_every = log_every
        check_gpu_run(cfg.data.layout, device)
        self.d = setup_distributed(device)
        batch = cfg.optim.per_process_batch(self.d.world_size)  # a batch that does not divide fails first
        devices, count = gather_devices(self.d)
        self.record = provenance.record(devices=devices, device_count=count, world_size=self.d.world_size,
                                        global_batch=cfg.optim.batch_size, per_process_batch=batch)
        self.record["data_sha256"] = manifest_sha256(cfg.data.layout, cfg.data.root)  # a resume checks it
        self.fresh = resume is None or resume is False
        if self.d.is_main:  # folder problems come before the (slow) data and model
            paths.check_writable(self.out)
            rundir.check_unlocked(self.out)
            rundir.check_start(self.out, resume, overwrite)
        configure_kernels(self.d.device)
        if cfg.optim.amp == "fp16" and self.d.device.type != "cuda":
            raise ConfigError("optim.amp=fp16 needs a CUDA device; use bf16 or none on CPU")
        if cfg.optim.amp == "bf16" and not native_bf16(self.d.device):
            log.warning("optim.amp=bf16 on %s, which has no native bf16: torch emulates it, slower than fp32; "
                        "use optim.amp=fp16 or none", device_name(self.d.device))
        self.progress = (self.d.is_main and sys.stderr.isatty()) if progress is None else (progress and self.d.is_main)
        self.resume_path = rundir.resume_path(self.out, resume)
        # Reading a checkpoint comes first: a broken one must fail before anything is written.
        self._resume_state = (ckpt_io.load(self.resume_path, fix="delete it or pass another file with --resume-from")
                              if self.resume_path else None)
        self._changes = (rundir.resume_changes(self.resume_path, self._resume_state, resolved(cfg))
                         if self._resume_state is not None else {})
        if self._resume_state is not None:
            rundir.check_same_data(self.resume_path, self._resume_state, self.record["data_sha256"], new_data)

        seed_all(cfg.seed)
        self.data = data_loaders.build_training_data(cfg, self.d)
        self._build_model()
        self.threshold = Threshold(cfg.method.threshold, cfg.method.threshold_value, cfg.method.threshold_init,
                                   cfg.method.threshold_momentum)
        self.dlp = dlp_options(cfg.method)  # the config read once; the step's helpers take values
        self.der = derivative_options(cfg.method, cfg.loss)
        self.start_epoch = 0
        self.global_step = 0
        self.best: dict[str, Any] = {"miou": -1.0, "epoch": None, "net": None}
        self.history: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []  # settings changed at each resume (rundir.RESUME_MAY_CHANGE)
        self._eval_cache: dict[tuple[str, str], dict[str, Any]] = {}
        if self._resume_state is not None:
            self._restore(self._resume_state)
            self._resume_state = None

    @property
    def iters_per_epoch(self) -> int:
        return self.data.iters_per_epoch

    def _build_model(self) -> None:
        cfg, d = self.cfg, self.d
        net = build_model(cfg.model)
        if cfg.optim.warm_start:
            ckpt_io.load_weights(net, Path(cfg.optim.warm_start), "optim.warm_start")
        if d.distributed:  # BN statistics over the global batch, as with one process
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if d.device.type == "cuda" else CpuSyncBatchNorm.convert(net)
        net = net.to(d.device)
        if cfg.optim.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net: DerPropNet = net
        m = cfg.method
        uses_heads = ((m.dlp and (m.propagated_ce or m.weak_propagated_ce)) or m.derivative_loss) and m.semi_supervised
        self.model: nn.Module = nn.parallel.DistributedDataParallel(
            net, device_ids=[d.local_rank] if d.device.type == "cuda" else None, find_unused_parameters=not uses_heads,
        ) if d.distributed else net
        self.momentum = MomentumNetwork(net, include_buffers=m.momentum_buffers, when=m.momentum_timing) if m.momentum else None
        self.optimizer = schedule.build_optimizer(net, cfg.optim)
        self.scheduler = schedule.build_scheduler(self.optimizer, cfg.optim, cfg.optim.epochs * self.iters_per_epoch)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.optim.amp]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.optim.amp == "fp16" else None

    def _autocast(self):
        return torch.autocast(self.d.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def compute_loss(self, batch, epoch: int) -> tuple[Tensor, dict[str, float]]:
        """Loss of one batch (steps 1–6 of the module doc; the labeled terms alone when
        ``method.semi_supervised=false``); returns ``(loss, logged terms)``."""
        cfg, m, lc = self.cfg, self.cfg.method, self.cfg.loss
        dev = self.d.device
        if not m.semi_supervised:
            x, y = (t.to(dev, non_blocking=True) for t in batch[0])
            with self._autocast():
                with record_function("derprop.forward"):
                    out = self.model(x)
                prop = propagated_logits(out, x.shape[-2:], **self.dlp) if m.dlp and m.propagated_ce else None
            logs = host_values(terms := self._labeled_terms(out, prop, x.shape[0], y))
            return weighted_sum(terms, lc), logs | {"threshold": self.threshold.value, "mask_ratio": 0.0}
        labeled, unlabeled, partner = batch
        (x, y), (uw, us, ign, box), (uw2, us2, ign2) = ([t.to(dev, non_blocking=True) for t in part]
                                                        for part in (labeled, unlabeled, partner[:3]))
        ign, ign2 = ign.long(), ign2.long()
        eta = epoch / cfg.optim.epochs
        nb, size = x.shape[0], x.shape[-2:]

        # 1. pseudo-labels of the CutMix partner batch (no gradient). Its f1/f2 are read only as the derivative
        # loss's target inside the box (cutmix_consistent_targets, paper) and for its L̃ (Θb's blend, paper);
        # the release's momentum pass reads L alone and skips J and the heads.
        box_targets = m.derivative_loss and m.cutmix_consistent_targets
        with torch.no_grad(), self._autocast(), record_function("derprop.forward"):
            if m.pseudo_label_source == "momentum" and self.momentum is not None:
                out_mix = self.momentum(uw2, heads=box_targets)
                p_mix = out_mix.logits.float().softmax(1)
            else:
                self.net.eval()
                out_mix = self.net(uw2, heads=box_targets or m.dlp)
                self.net.train()
                p_mix = blend(out_mix.logits, propagated_logits(out_mix, size, **self.dlp) if m.dlp else None, eta,
                              m.blend_space)

        # 2. CutMix the strong view
        us_mixed = torch.where(box.unsqueeze(1), us2, us)
        inp_w = torch.cat([x, uw])
        if cfg.optim.channels_last:
            inp_w = inp_w.contiguous(memory_format=torch.channels_last)
            us_mixed = us_mixed.contiguous(memory_format=torch.channels_last)

        # 3. forward passes of Θb, and L̃ (eq. 4)
        with self._autocast():
            with record_function("derprop.forward"):
                out_w = self.model(inp_w, perturb=m.fp_branch)
                out_s = self.model(us_mixed)
            prop_w = propagated_logits(out_w, size, **self.dlp) if m.dlp else None
            prop_s = propagated_logits(out_s, size, **self.dlp) if (m.dlp and m.propagated_ce) else None
        logits_w = out_w.logits.float()
        pred_uw = logits_w[nb:]
        prop_uw = prop_w[nb:] if prop_w is not None else None

        # 4.–5. pseudo-labels of the weak view (eq. 5), confident pixels, region propagation
        with torch.no_grad():
            p_w = blend(pred_uw.detach(), prop_uw.detach() if prop_uw is not None else None, eta, m.blend_space)
            feats = weak_features(out_w, nb, m.dlp_temperature) if m.region_propagation else None
            pl = cutmix_pseudo_labels(p_w, p_mix, box, ign, ign2, self.threshold, features=feats,
                                      consistent_targets=m.cutmix_consistent_targets, samples=m.region_samples, op=m.op)

        # 6. losses (eq. 7/8)
        terms = self._labeled_terms(out_w, prop_w if prop_s is not None else None, nb, y)
        logits_fp = out_w.logits_fp[nb:].float() if m.fp_branch else None
        terms |= unlabeled_terms(out_s.logits.float(), prop_s, prop_uw, logits_fp, pl, soft=m.unlabeled_ce == "soft",
                                 weak_propagated=m.weak_propagated_ce)
        if m.derivative_loss:
            with record_function("derprop.derivative_loss"):
                terms["der_u"] = unlabeled_derivative_term(out_w, out_s, out_mix, nb, box,
                                                           consistent_targets=m.cutmix_consistent_targets,
                                                           options=self.der)
        logs = host_values({**terms, "mask_ratio": pl.keep_w.sum() / pl.valid_w.sum().clamp_min(1)})
        logs["threshold"] = pl.tau
        return weighted_sum(terms, lc), logs

    def optimize(self, loss: Tensor, epoch: int, step: int) -> None:
        """One optimisation step on ``loss`` (eq. 7/8), after :meth:`compute_loss`: ``zero_grad`` and backward
        (through the GradScaler under fp16), the NaN/inf gradient-norm guard (the GradScaler skips such a step
        itself), the SGD step and the poly-lr step; then ``global_step`` + 1. ``epoch``/``step`` (0-based) place
        a guard's error. :meth:`fit` and ``benchmarks.train_step`` both step through here."""
        with record_function("derprop.backward"):
            self.optimizer.zero_grad(set_to_none=True)
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        with record_function("derprop.optimizer"):
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                guards.check_grad_norm(self.net, self.out, epoch, step, self.global_step)
                self.optimizer.step()
            self.scheduler.step()
        self.global_step += 1

    def _labeled_terms(self, out: SegOutput, prop: Tensor | None, nb: int, y: Tensor) -> dict[str, Tensor]:
        """The labeled terms of eq. 7/8 on the first ``nb`` images of ``out``: CE, CE of the propagated logits
        ``prop`` (release) and the labeled derivative loss."""
        m = self.cfg.method
        ce = labeled_ce(self.cfg.loss)
        terms = {"ce_x": ce(out.logits[:nb].float(), y)}
        if prop is not None:
            terms["ce_x_prop"] = ce(prop[:nb], y)
        if m.derivative_loss:
            with record_function("derprop.derivative_loss"):
                terms["der_x"] = labeled_derivative_term(out, nb, y, label_resize=m.label_resize,
                                                         detached=m.labeled_der_detached, options=self.der)
        return terms

    def fit(self) -> dict[str, Any]:
        """Train from ``start_epoch`` to ``optim.epochs``; returns the ``results.json`` content (rank 0)."""
        cfg, d = self.cfg, self.d
        t0 = time.time()
        with rundir.RunLock(self.out) if d.is_main else contextlib.nullcontext():
            if d.is_main:
                self._prepare_folder()
            # one log per fit, so that its rates and ETA span the epochs; made in the locked, prepared folder
            self.log = ProgressLog(self.out, total_steps=cfg.optim.epochs * self.iters_per_epoch,
                                   steps_per_epoch=self.iters_per_epoch, epochs=cfg.optim.epochs,
                                   images_per_step=2 * cfg.optim.batch_size, every=self.log_every,
                                   echo=not self.progress, enabled=d.is_main, bar=self.progress)
            try:
                loaders = data_loaders.loaders(self.data, cfg, d)
                if self.start_epoch == 0 and d.is_main and self.data.diag_set is not None:
                    self._diagnostics(-1)  # the state training starts from: snapshot epoch_000
                peak_memory_mib(d.device)  # each epoch's peak starts here
                for epoch in range(self.start_epoch, cfg.optim.epochs):
                    started = time.time()
                    means, rows = self._train_steps(epoch, loaders)
                    self._end_epoch(epoch, means, rows, time.time() - started)
                results = self._final_results(time.time() - t0)
                barrier()
            finally:
                self.log.close()
        return results if d.is_main else {}

    def _prepare_folder(self) -> None:
        """With the lock held: a clean folder, or one reconciled with the last commit (:func:`derprop.training.rundir.prepare`)
        and ``best.pt`` rebuilt from the nets after a kill between the commit (``last.pt``) and its write."""
        self.history = rundir.prepare(self.out, None if self.fresh else self.resume_path, self.start_epoch,
                                      self.cfg.optim.epochs, dump_yaml(self.cfg))
        if not self.fresh and rundir.best_needs_rewrite(self.out, self.best.get("epoch"), self.start_epoch):
            self._save_best(self.start_epoch - 1, self.best["net"], self.best["miou"])

    def _train_steps(self, epoch: int, loaders) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The steps of epoch ``epoch``: :meth:`compute_loss`, the loss guard, :meth:`optimize`, a progress line.

        Returns the epoch's mean logged terms (averaged over the processes) and its rows of ``steps.jsonl``.
        """
        cfg, d = self.cfg, self.d
        torch.manual_seed(epoch_seed(cfg.seed, epoch, d.rank))
        self.data.set_epoch(epoch)
        for ld in loaders:
            ld.sampler.set_epoch(epoch)
        if self.momentum is not None:
            self.momentum.on_epoch_start(self.net, epoch)
        self.model.train()
        sums: dict[str, float] = {}
        rows: list[dict[str, Any]] = []
        self.log.start_epoch(epoch)
        # a supervised-only run reads no unlabeled images
        for step, batch in enumerate(zip(*(loaders if cfg.method.semi_supervised else loaders[:1]))):
            if step >= self.iters_per_epoch:
                break
            loss, logs = self.compute_loss(batch, epoch)
            value = float(all_reduce(loss.detach().float(), "mean"))
            guards.check_loss(value, self.out, epoch, step, self.global_step)
            self.optimize(loss, epoch, step)
            logs["loss"] = value
            lr = self.optimizer.param_groups[0]["lr"]
            self.log.step(self.global_step, logs, lr)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            rows.append({"epoch": epoch, "step": step, "global_step": self.global_step, "loss": value, "lr": lr})
            if self.hook:
                self.hook("step_end", epoch=epoch, step=step, loss=value)
        self.log.end_epoch()
        means = {k: v / max(len(rows), 1) for k, v in sums.items()}
        if d.distributed:
            keys = sorted(means)
            t = all_reduce(torch.tensor([means[k] for k in keys], dtype=torch.float64), "mean")
            means = dict(zip(keys, t.tolist()))
        return means, rows

    def _end_epoch(self, epoch: int, means: dict[str, float], rows: list[dict[str, Any]], seconds: float) -> None:
        """After the steps of ``epoch``: Θm's end-of-epoch update, the weight guard, evaluation when due, the
        pseudo-label snapshot, and the epoch's commit (``metrics.jsonl``, ``steps.jsonl``, ``last.pt``, ``best.pt``)."""
        cfg, d = self.cfg, self.d
        if self.momentum is not None:
            self.momentum.on_epoch_end(self.net, epoch)
        guards.check_weights(self._nets(), self.out, epoch, self.global_step)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "global_step": self.global_step, "train_time_s": seconds,
                                   "lr": self.optimizer.param_groups[0]["lr"], "eta_ep": epoch / cfg.optim.epochs,
                                   **{f"train_{k}": v for k, v in means.items()}}
        self._eval_cache = {}
        candidate = None
        if (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.optim.epochs:
            scores, candidate = self._evaluate_epoch()  # every rank evaluates its shard
            metrics.update(scores)
            nets, mode = list(self._nets()), cfg.eval.mode
            self.log.validation(self.global_step, {n: metrics[f"miou_{n}"] for n in nets}, candidate[1],
                                {n: self._eval(n, mode)["iou_per_class"] for n in nets}, self.data.val_set.class_names)
        peak = peak_memory_mib(d.device)
        if peak is not None:
            metrics["peak_cuda_mib"] = peak
            self.log.note(f"epoch {epoch + 1}/{cfg.optim.epochs}: peak CUDA memory {peak:.0f} MiB (the most of any process)")
        if d.is_main:
            if self.data.diag_set is not None:
                metrics.update(self._diagnostics(epoch))
            self._save_epoch(epoch, metrics, rows, candidate)
        barrier()
        if self.hook:
            self.hook("epoch_end", epoch=epoch, metrics=metrics)

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
        val = self.data.val_set
        data = val if not d.distributed else Subset(val, range(d.rank, len(val), d.world_size))
        # fp32 whatever optim.amp says, so that a bf16 run's mIoU is comparable with an fp32 run's
        res = evaluate(self._nets()[name], data, num_classes=self.cfg.model.num_classes, mode=mode,
                       crop_size=self.cfg.eval.crop_size, device=d.device, all_reduce=d.distributed,
                       num_workers=self.cfg.data.num_workers)
        self._eval_cache[(name, mode)] = res
        return res

    def _evaluate_epoch(self) -> tuple[dict[str, Any], tuple[str, float]]:
        """Each net's mIoU in ``eval.mode`` and the candidate for ``best.pt``: ``(net, mIoU)`` of ``eval.select``."""
        out: dict[str, Any] = {}
        for name in self._nets():
            out[f"miou_{name}"] = self._eval(name, self.cfg.eval.mode)["miou"]
        nets = list(self._nets())
        candidates = nets if self.cfg.eval.select == "best_of_both" else nets[-1:]  # momentum if kept
        best_net = max(candidates, key=lambda n: out[f"miou_{n}"])
        out["eval_mode"] = eval_mode(self.cfg, self.cfg.eval.mode)
        return out, (best_net, out[f"miou_{best_net}"])

    def _diagnostics(self, epoch: int) -> dict[str, Any]:
        return pseudo_label_diagnostics(self.net, self.data.diag_set, self.cfg, epoch, self.out, self.d.device,
                                        self._autocast)

    def _provenance(self) -> dict[str, Any]:
        """What a checkpoint records beside the weights: the resolved config, where its data was, and
        :func:`derprop.provenance.record`."""
        return {"config": resolved(self.cfg), "data_root": str(Path(self.cfg.data.root).resolve()), **self.record}

    def _parts(self) -> dict[str, Any]:
        """What a ``last.pt`` holds a state dict of (:func:`derprop.training.checkpoint.training_state`); None: not in this run."""
        return {"model": self.net, "momentum": self.momentum, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "scaler": self.scaler, "threshold": self.threshold}

    def _state(self, epoch: int) -> dict[str, Any]:
        return {"epoch": epoch + 1, "global_step": self.global_step, **ckpt_io.training_state(self._parts()),
                "best": dict(self.best), "resumes": list(self.resumes), **self._provenance()}

    def _save_epoch(self, epoch: int, metrics: dict[str, Any], steps_log: list[dict[str, Any]],
                    cand: tuple[str, float] | None) -> None:
        """Log rows and ``last.pt`` (the epoch's commit, :func:`derprop.training.rundir.commit_epoch`), then ``best.pt``
        when ``cand`` (the evaluated ``(net, mIoU)``, None without evaluation) beats the best so far."""
        improved = cand is not None and cand[1] > self.best["miou"]
        if improved:
            self.best = {"miou": cand[1], "epoch": epoch + 1, "net": cand[0]}
        metrics["best_miou"] = self.best["miou"] if self.best["epoch"] is not None else None
        self.history.append(metrics)
        rundir.commit_epoch(self.out, steps_log, metrics, self._state(epoch))
        if improved:
            self._save_best(epoch, cand[0], cand[1])

    def _save_best(self, epoch: int, net_name: str, miou: float) -> None:
        rundir.save_best(self.out, epoch + 1, net_name, miou, self._nets()[net_name].state_dict(), self._provenance())

    def _restore(self, state: dict[str, Any]) -> None:
        changed = self._changes
        fresh_groups = [dict(g) for g in self.optimizer.param_groups]  # the new config's, before loading
        fresh_schedule = (self.scheduler.total_iters, self.scheduler.power)
        ckpt_io.restore_training_state(state, self._parts(), self.resume_path)
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best = dict(state["best"])
        self.resumes = list(state.get("resumes") or [])
        if changed:
            self.resumes.append({"epoch": self.start_epoch, "changed": changed})
        if any(k in rundir.OPTIMIZER_KEYS for k in changed):
            schedule.apply_settings(self.optimizer, self.scheduler, fresh_groups, *fresh_schedule)

    def _final_results(self, wall: float) -> dict[str, Any]:
        """Every net in every final mode; the headline is the first mode's, of the net ``eval.select`` names."""
        cfg = self.cfg
        modes = list(dict.fromkeys(eval_mode(cfg, m) for m in (cfg.eval.mode, *cfg.eval.final_modes)))
        names = list(self.data.val_set.class_names)
        def final(res: dict[str, Any]) -> dict[str, Any]:
            return {"miou": res["miou"], "pixel_acc": res["pixel_acc"], "iou_per_class": dict(zip(names, res["iou_per_class"])),
                    "num_images": res["num_images"], "crop_size": res["crop_size"]}

        nets = {name: {mode: final(self._eval(name, mode)) for mode in modes} for name in self._nets()}
        head = "momentum" if "momentum" in nets else "backprop"
        if cfg.eval.select == "best_of_both":
            head = max(nets, key=lambda n: nets[n][modes[0]]["miou"])
        results = {
            "config": resolved(cfg), "miou": nets[head][modes[0]]["miou"], "miou_net": head, "miou_mode": modes[0],
            "final": nets, "best": self.best, "resumes": self.resumes, "epochs": cfg.optim.epochs,
            "iters_per_epoch": self.iters_per_epoch, "wall_time_s": wall, **self.record,
        }
        peaks = [m["peak_cuda_mib"] for m in self.history if m.get("peak_cuda_mib") is not None]
        if peaks:
            results["peak_cuda_mib"] = max(peaks)
        if self.d.is_main:
            atomic.write_json(self.out / "results.json", results)
        return results
