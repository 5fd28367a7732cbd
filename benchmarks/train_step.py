"""Full training steps of DerProp: dense (release-style M × M) vs tiled, AMP, channels_last, torch.compile.

    python -m benchmarks.train_step                 # GPU: ResNet-101, crops 321 and 801, batch 4+4
    python -m benchmarks.train_step --size cpu      # CPU: ResNet-18, crop 161, batch 2+2 (~10 min on 2 cores)
    python -m benchmarks.train_step --size quick    # seconds; what the test runs

The default size is ``full`` on a CUDA device and ``cpu`` otherwise. Any preset
value can be overridden (``--backbone``, ``--crops``, ``--batch``, ``--chunk``,
``--configs``, ``--profiles``, ``--repeats``).

One *step* is what :meth:`derprop.trainer.Trainer.fit` does per iteration, by
the Trainer's own methods: ``train_step`` (momentum / CutMix-partner pass, Θb
on labeled + weak and on the mixed strong view, DLP, pseudo-labels, region
propagation, every loss term of the profile), then ``optimize`` (``zero_grad``,
backward through the GradScaler under fp16, the gradient-norm guard, the SGD
step and the poly-lr step). Batches are synthetic tensors of the right shapes and
dtypes (uint8 images, labels with an ignored border, a CutMix box), so no
dataset is read; the Trainer itself is built on a tiny generated scenes tree
(``data_prep.scenes``), only because its constructor needs one.

Implementations of the same maths (the ``method.chunk`` switch):

``dense``  ``method.chunk=null``: DLP's ``softmax(g1ᵀg2)`` and every ``S − S_GT``
           of the derivative loss are materialised as ``M × M`` matrices, as the
           released code does.
``tiled``  ``method.chunk=k``: :func:`derprop.propagation.propagate` and
           :func:`derprop.losses.similarity_l1` work ``k`` rows at a time,
           forward and backward (``O(k·M)`` memory).

Before anything is timed, one step per profile is run both ways on the same
weights, batch and random seed, and the loss, every logged loss term and every
parameter gradient must agree (fp32; ``--rtol`` on the loss and terms,
``--grad-rtol`` on ``‖g_dense − g_tiled‖ / ‖g_dense‖`` per parameter). If not,
the benchmark stops with the offending numbers.

Figures per case: images/s (labeled + unlabeled images per step, ``2·B``; the
CutMix partner batch is an extra no-grad forward and is not counted), peak
memory of the step above the state held between steps (weights, optimiser
state; CPU: rise of the resident-size high-water mark in an isolated process;
CUDA: ``max_memory_allocated``, plus the absolute allocated and reserved
peaks), and where the step's time goes (``split``, seconds; ``split_shares``):
``backbone`` (the network passes), ``region_propagation``, ``dlp_derivative_loss``
(DLP and the derivative loss), ``optimizer`` (guard, SGD and lr steps) and
``other``, each forward and backward, from one profiled step
(:func:`split_step`, by the ``record_function`` ranges the Trainer marks).

``tiled-fp32-nondet`` is ``tiled-fp32`` with ``torch.use_deterministic_algorithms``
off again after the Trainer switched it on (CPU): what determinism costs. The
Trainer runs deterministic on CPU; on CUDA it never switches it on, so there
the two configs are the same and the preset leaves this one out.

Output: a table on stdout and ``results/bench_train_step_<device>.json``
(``<device>``: ``cpu`` or a slug of the GPU name) with the machine, the
resolved configs, the equality check, every figure, the ratios and the goals
of the performance issue with met / not met.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from benchmarks.common import (RESULTS, device_slug, machine_info, measure, print_table, run_isolated, sync,
                               write_results)
from derprop.distributed import native_bf16

MODULE = "benchmarks.train_step"
PROFILES = ("official", "paper")

class Setup(NamedTuple):
    """How one config runs the step."""

    impl: str
    amp: bool
    channels_last: bool
    compile: bool
    deterministic: bool = True
    """False: ``torch.use_deterministic_algorithms(False)`` after the Trainer switched it on (CPU): its cost."""


CONFIGS: dict[str, Setup] = {
    "dense-fp32": Setup("dense", False, False, False),
    "tiled-fp32": Setup("tiled", False, False, False),
    "tiled-fp32-nondet": Setup("tiled", False, False, False, deterministic=False),
    "tiled-cl": Setup("tiled", False, True, False),
    "tiled-amp-cl": Setup("tiled", True, True, False),
    "tiled-amp-cl-compile": Setup("tiled", True, True, True),
}
BASELINE, TILED = "dense-fp32", "tiled-fp32"

PRESETS: dict[str, dict[str, Any]] = {
    # The issue's sizes: ResNet-101 DeepLabV3+ (deep stem, OS 8), M = 41² and 101².
    "full": {"backbone": "resnet101", "deep_stem": True, "crops": [321, 801], "batch": 4, "chunk": 512,
             "repeats": 5, "configs": [c for c, setup in CONFIGS.items() if setup.deterministic], "check_crop": 321},
    # These CPU machines (2 cores): M = 21²; chunk below M so that "tiled" really tiles.
    # torch.compile is left out here: compiling the step took ~10 minutes on these 2 cores.
    "cpu": {"backbone": "resnet18", "deep_stem": True, "crops": [161], "batch": 2, "chunk": 128,
            "repeats": 2, "configs": ["dense-fp32", "tiled-fp32", "tiled-fp32-nondet", "tiled-cl", "tiled-amp-cl"],
            "check_crop": 161},
    # The test: M = 5², one thread, in this process (its memory figures are only indicative).
    "quick": {"backbone": "resnet18", "deep_stem": False, "crops": [33], "batch": 2, "chunk": 8,
              "repeats": 1, "warmup": 0, "threads": 1, "isolate": False,
              "configs": ["dense-fp32", "tiled-fp32", "tiled-amp-cl"], "check_crop": 33},
}

#: Goals of the performance issue (ratios within one run on one device).
MEMORY_GOAL = 1 / 3          # tiled / dense peak memory of the whole step, at the largest crop
THROUGHPUT_GOAL = 1.0        # tiled / dense images/s, at the largest crop
BEST_GOAL = 1.5              # best config / dense fp32 images/s, at crop 321 (GPU)
GPU_BUDGET_GIB = 79.0        # an "80 GB" card has 80 GiB; about 1 GiB goes to the CUDA context


# --------------------------------------------------------------------------- #
# Building a trainer and a batch
# --------------------------------------------------------------------------- #


def amp_mode(device: str) -> str:
    """The AMP the issue asks for: bf16 where the device computes it natively, else fp16 (CUDA, with GradScaler)."""
    return "bf16" if native_bf16(torch.device(device)) else "fp16"


def overrides(case: dict) -> list[str]:
    """Dotted config overrides (the ``derprop.train`` syntax) for one case."""
    impl, amp, channels_last = CONFIGS[case["config"]][:3]
    return [
        f"profile={case['profile']}",
        f"model.backbone={case['backbone']}",
        "model.pretrained=none",
        f"model.deep_stem={str(case['deep_stem']).lower()}",
        "model.output_stride=8",
        "data.layout=scenes",
        f"data.root={case['scenes_root']}",
        "data.split=1_8",
        f"data.num_classes={case['classes']}",
        f"data.crop_size={case['crop']}",
        "data.num_workers=0",
        "data.diag_images=0",
        f"optim.batch_size={case['batch']}",
        f"optim.amp={amp_mode(case['device']) if amp else 'none'}",
        f"optim.channels_last={str(channels_last).lower()}",
        f"method.chunk={case['chunk'] if impl == 'tiled' else 'null'}",
    ]


def build_trainer(case: dict, out_dir: str):
    """A :class:`~derprop.trainer.Trainer` for ``case``, with ``trainer.model`` compiled if the config says so."""
    from derprop.configfile import load_config
    from derprop.trainer import Trainer

    cfg = load_config(None, overrides(case))
    trainer = Trainer(cfg, out_dir, device=case["device"], progress=False)
    if not CONFIGS[case["config"]].deterministic:
        torch.use_deterministic_algorithms(False)
    if CONFIGS[case["config"]].compile:
        # The Θb forward passes go through trainer.model; the no-grad passes (momentum net,
        # eval-mode CutMix partner) and DLP / the losses stay eager.
        trainer.model = torch.compile(trainer.net)
    return trainer


def synthetic_batch(batch: int, crop: int, classes: int, seed: int = 0):
    """One batch shaped like the training loaders' ``((x, y), (u_w, u_s, ignore, box), (u_w', u_s', ignore', box'))``."""
    g = torch.Generator().manual_seed(seed)
    border = max(1, crop // 16)

    def images() -> torch.Tensor:
        return torch.randint(0, 256, (batch, 3, crop, crop), generator=g, dtype=torch.uint8)

    def ignore() -> torch.Tensor:
        ign = torch.zeros(batch, crop, crop, dtype=torch.uint8)
        ign[:, -border:, :] = 255  # padding at the bottom, as after a crop of a smaller image
        return ign

    def boxes() -> torch.Tensor:
        box = torch.zeros(batch, crop, crop, dtype=torch.bool)
        for i in range(batch):
            h, w = (int(v) for v in torch.randint(crop // 4, crop // 2 + 1, (2,), generator=g))
            y0, x0 = (int(v) for v in torch.randint(0, crop - max(h, w) + 1, (2,), generator=g))
            box[i, y0:y0 + h, x0:x0 + w] = True
        return box

    x = images()
    y = torch.randint(0, classes, (batch, crop, crop), generator=g, dtype=torch.long)
    y[:, -border:, :] = 255
    return (x, y), (images(), images(), ignore(), boxes()), (images(), images(), ignore(), boxes())


def step_fn(trainer, batch, epoch: int) -> Callable[[], float]:
    """One iteration of ``Trainer.fit`` without its logging: ``train_step``, then ``Trainer.optimize``; returns the loss."""

    def step() -> float:
        loss, _ = trainer.train_step(batch, epoch)
        trainer.optimize(loss, epoch, 0)
        return float(loss.detach())

    return step


def _device_batch(batch, device: str):
    """Move the batch once, so host-to-device copies are not part of the timed step."""
    return tuple(tuple(t.to(device) for t in part) for part in batch)


def _epoch(trainer) -> int:
    return trainer.cfg.optim.epochs // 2  # η_ep = 1/2: both parts of the blend (eq. 5) are live


# --------------------------------------------------------------------------- #
# dense == tiled
# --------------------------------------------------------------------------- #


def run_check(case: dict, out_dir: str) -> dict:
    """Loss, logged terms and parameter gradients of one step, dense then tiled, from the same state.

    Each implementation gets a trainer of its own, built from its own config (:data:`BASELINE`, :data:`TILED`):
    a trainer reads ``method.chunk`` once, when it is built, so swapping the config of a live one would run
    the same implementation twice. The check fails unless the two trainers really use ``None`` and
    ``case["chunk"]``."""
    batch = _device_batch(synthetic_batch(case["batch"], case["crop"], case["classes"]), case["device"])
    results, chunks, state = {}, {}, None
    for impl, config in (("dense", BASELINE), ("tiled", TILED)):
        trainer = build_trainer({**case, "config": config}, str(Path(out_dir) / impl))
        if state is None:  # BN running stats feed the eval-mode partner pass: both start from the dense state
            state = copy.deepcopy({"net": trainer.net.state_dict(), "threshold": trainer.threshold.state_dict(),
                                   "momentum": trainer.momentum.state_dict() if trainer.momentum else None})
        trainer.net.load_state_dict(state["net"])
        trainer.threshold.load_state_dict(state["threshold"])
        if trainer.momentum:
            trainer.momentum.load_state_dict(state["momentum"])
        chunks[impl] = {"dlp": trainer.dlp["chunk"], "derivative_loss": trainer.der["chunk"]}
        torch.manual_seed(1234)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, logs = trainer.train_step(batch, _epoch(trainer))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainer.net.named_parameters() if p.grad is not None}
        results[impl] = (float(loss.detach()), logs, grads)
    (ld, logs_d, gd), (lt, logs_t, gt) = results["dense"], results["tiled"]

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(a), 1e-12)

    terms = {k: {"dense": logs_d[k], "tiled": logs_t[k], "rel_diff": rel(logs_d[k], logs_t[k])}
             for k in sorted(logs_d) if k in logs_t}
    # Per parameter, ‖g_dense − g_tiled‖ relative to max(‖g_dense‖, 1e-3·‖g‖ of the whole net): the
    # biases of convs followed by BatchNorm have a true gradient of 0, i.e. pure rounding noise.
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in gd.values()))
    diff = math.sqrt(sum(float((g - gt[n]).norm()) ** 2 for n, g in gd.items() if n in gt))
    grad_rel, worst = 0.0, None
    for name, g in gd.items():
        if name not in gt:
            continue
        r = float((g - gt[name]).norm()) / max(float(g.norm()), 1e-3 * total, 1e-30)
        if worst is None or r > grad_rel:
            grad_rel, worst = r, name
    missing = sorted(set(gt) ^ set(gd))
    term_rel = max((t["rel_diff"] for k, t in terms.items() if k not in ("threshold", "mask_ratio")), default=0.0)
    tiles = (set(chunks["dense"].values()) == {None} and set(chunks["tiled"].values()) == {case["chunk"]}
             and case["chunk"] is not None and case["chunk"] < case["M"])
    passed = (tiles and rel(ld, lt) <= case["rtol"] and term_rel <= case["rtol"] and grad_rel <= case["grad_rtol"]
              and not missing and math.isfinite(ld) and total > 0)
    return {
        "profile": case["profile"], "crop": case["crop"], "M": case["M"], "chunk": case["chunk"],
        "loss_dense": ld, "loss_tiled": lt, "loss_rel_diff": rel(ld, lt), "max_term_rel_diff": term_rel,
        "grad_max_rel_diff": grad_rel, "grad_worst_param": worst,
        "grad_global_rel_diff": diff / max(total, 1e-30), "grad_norm": total, "params_with_grad": len(gd),
        "params_grad_mismatch": missing, "terms": terms, "rtol": case["rtol"], "grad_rtol": case["grad_rtol"],
        "chunks_used": chunks, "tiles": tiles, "passed": passed,
    }


# --------------------------------------------------------------------------- #
# where the step's time goes
# --------------------------------------------------------------------------- #

#: ``record_function`` ranges of :mod:`derprop.trainer` -> the part of the step they time, forward and backward.
PARTS: dict[str, str] = {
    "derprop.forward": "backbone",
    "derprop.dlp": "dlp_derivative_loss",
    "derprop.derivative_loss": "dlp_derivative_loss",
    "derprop.region_propagation": "region_propagation",
    "derprop.optimizer": "optimizer",
}
SPLIT = ("backbone", "region_propagation", "dlp_derivative_loss", "optimizer", "other")
BACKWARD_NODE = "autograd::engine::evaluate_function: "


def split_step(step: Callable[[], float], device: str) -> dict[str, Any]:
    """One profiled step, its time split into :data:`SPLIT` by the package's ``record_function`` ranges
    (:func:`split_events`)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    return split_events(prof.events(), wall_us, device)


def split_events(events: Sequence[Any], wall_us: float, device: str) -> dict[str, Any]:
    """The time of a profiled step split into :data:`SPLIT` by the package's ``record_function`` ranges.

    Only the CPU-side events count: on CUDA the profiler also reports each range as a GPU user annotation of the
    same name, which would count it twice; a CPU-side event's device time covers the kernels launched under it.
    Forward: each range's own time (nested ranges counted where they are, e.g. DLP inside the CutMix partner's
    forward). Backward: each autograd node is charged to the range around the forward op that made it (the
    profiler's sequence numbers link the two). ``other`` is the rest: CE/KL terms, pseudo-labels, the autograd
    engine's bookkeeping. Shares are of the profiled step (eager code; a compiled model's backward is one node).
    """
    events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]

    def took(e) -> float:
        return e.device_time_total if device == "cuda" else e.cpu_time_total

    def label(e) -> str | None:
        while e is not None:
            if e.name in PARTS or e.name == "derprop.backward":
                return e.name
            e = e.cpu_parent
        return None

    made_by: dict[int, str | None] = {}  # forward sequence number -> the range around the op
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith(BACKWARD_NODE) and e.sequence_nr not in made_by:
            made_by[e.sequence_nr] = label(e)
    us = dict.fromkeys(SPLIT, 0.0)
    calls = dict.fromkeys(PARTS, 0)
    for e in events:
        if e.name in PARTS:  # a range's own time: less the ranges nested in it, which count for themselves
            nested = label(e.cpu_parent)
            us[PARTS[e.name]] += took(e)
            if nested in PARTS:
                us[PARTS[nested]] -= took(e)
            calls[e.name] += 1
        elif e.name.startswith(BACKWARD_NODE) and label(e.cpu_parent) == "derprop.backward":
            owner = made_by.get(e.sequence_nr)
            if owner in PARTS:
                us[PARTS[owner]] += took(e)
    total = wall_us if device != "cuda" else max(wall_us, sum(us.values()))
    us["other"] = max(total - sum(us[k] for k in SPLIT if k != "other"), 0.0)
    return {"shares": {k: us[k] / total for k in SPLIT}, "profiled_s": total / 1e6,
            "dlp_loss_calls": calls["derprop.dlp"] + calls["derprop.derivative_loss"],
            "region_propagation_calls": calls["derprop.region_propagation"]}


# --------------------------------------------------------------------------- #
# one case
# --------------------------------------------------------------------------- #


def run_step_case(case: dict, out_dir: str) -> dict:
    """Build, warm up (compile), then peak memory, median step time and the time split of one config."""
    torch.manual_seed(0)
    device = case["device"]
    t0 = time.perf_counter()
    trainer = build_trainer(case, out_dir)
    batch = _device_batch(synthetic_batch(case["batch"], case["crop"], case["classes"]), device)
    with torch.no_grad():
        m_seen = math.prod(trainer.net.eval()(batch[0][0][:1], heads=False).logits_grid.shape[-2:])
    trainer.net.train()
    if m_seen != case["M"]:
        raise RuntimeError(f"the model's feature grid has M = {m_seen} pixels, expected {case['M']} (output stride 8)")
    step = step_fn(trainer, batch, _epoch(trainer))
    # Warm-up: optimiser state, cuDNN autotuning, compilation (one graph per input shape and mode).
    losses = [step() for _ in range(case["warmup"])]
    warmup_s = time.perf_counter() - t0
    fig = measure(step, device, case["repeats"])
    extra: dict[str, Any] = {}
    if device == "cuda":
        extra["peak_allocated_total_mib"] = torch.cuda.max_memory_allocated() / 2**20
        extra["peak_reserved_total_mib"] = torch.cuda.max_memory_reserved() / 2**20
        extra["state_mib"] = torch.cuda.memory_allocated() / 2**20
    else:
        import psutil

        extra["state_mib"] = psutil.Process().memory_info().rss / 2**20
    split = split_step(lambda: losses.append(step()), device)
    images = 2 * case["batch"]
    return {
        **{k: case[k] for k in ("profile", "config", "crop", "M", "batch", "backbone", "chunk")},
        "impl": CONFIGS[case["config"]].impl,
        "amp": trainer.cfg.optim.amp,
        "channels_last": trainer.cfg.optim.channels_last,
        "compile": CONFIGS[case["config"]].compile,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "seconds": fig["seconds"],
        "images_per_s": images / fig["seconds"],
        "peak_mib": fig["peak_mib"],
        **extra,
        "split": {k: v * fig["seconds"] for k, v in split["shares"].items()},
        "split_shares": split["shares"],
        "dlp_loss_share": split["shares"]["dlp_derivative_loss"],
        "dlp_loss_calls": split["dlp_loss_calls"],
        "region_propagation_calls": split["region_propagation_calls"],
        "profiled_step_s": split["profiled_s"],
        "warmup_s": warmup_s,
        "repeats": fig["repeats"],
        "loss_finite": all(math.isfinite(v) for v in losses),
        "overrides": overrides(case),
    }


def run_case(case: dict) -> dict:
    """Entry point of one isolated case (``--case JSON``)."""
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(case.get("threads") or threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_train_step_") as out_dir:
            if case["kind"] == "check":
                return run_check(case, out_dir)
            return run_step_case(case, out_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _run(case: dict, isolate: bool) -> dict:
    """One case, in a fresh process (CPU peak memory is per process) or here; failures come back as rows."""
    try:
        if isolate:
            return run_isolated(MODULE, case)
        result = run_case(case)
        return result
    except (RuntimeError, torch.OutOfMemoryError) as err:
        text = str(err).strip().splitlines()
        last = text[-1] if text else type(err).__name__
        oom = "out of memory" in str(err).lower() or "OutOfMemoryError" in str(err)
        return {**{k: case.get(k) for k in ("profile", "config", "crop", "M", "batch", "backbone", "chunk")},
                "error": "out of memory" if oom else last[-300:]}
    finally:
        if not isolate:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------- #
# ratios and goals
# --------------------------------------------------------------------------- #


def grid_pixels(crop: int, output_stride: int = 8) -> int:
    """M at the feature grid: each stride-2 stage maps s to ⌈s/2⌉ (321 → 41, 801 → 101, 161 → 21)."""
    s = crop
    for _ in range(int(math.log2(output_stride))):
        s = (s + 1) // 2
    return s * s


def _ok(row: dict | None) -> bool:
    return row is not None and "error" not in row


def compute_ratios(rows: list[dict], profiles: list[str], crops: list[int]) -> list[dict]:
    ratios = []
    for profile in profiles:
        for crop in crops:
            by = {r["config"]: r for r in rows if r["profile"] == profile and r["crop"] == crop}
            dense, tiled = by.get(BASELINE), by.get(TILED)
            entry: dict[str, Any] = {"profile": profile, "crop": crop, "M": grid_pixels(crop)}
            if _ok(dense) and _ok(tiled):
                entry["tiled_vs_dense_memory"] = tiled["peak_mib"] / max(dense["peak_mib"], 1e-9)
                entry["tiled_vs_dense_throughput"] = tiled["images_per_s"] / dense["images_per_s"]
            nondet = by.get("tiled-fp32-nondet")
            if _ok(tiled) and _ok(nondet):  # what torch.use_deterministic_algorithms costs (CPU)
                entry["deterministic_time_ratio"] = tiled["seconds"] / nondet["seconds"]
            fast = [r for name, r in by.items() if _ok(r) and CONFIGS[name].impl == "tiled" and CONFIGS[name].deterministic]
            if fast and _ok(dense):
                best = max(fast, key=lambda r: r["images_per_s"])
                entry["best_config"] = best["config"]
                entry["best_vs_dense_throughput"] = best["images_per_s"] / dense["images_per_s"]
                entry["best_peak_mib"] = best["peak_mib"]
            for name in (BASELINE, TILED):
                if by.get(name) is not None and not _ok(by[name]):
                    entry[f"{name}_error"] = by[name]["error"]
            ratios.append(entry)
    return ratios


def evaluate_goals(rows: list[dict], ratios: list[dict], device: str, preset: str, crops: list[int]) -> list[dict]:
    """The issue's goals with met / not met (``None``: not measurable in this run)."""
    full = preset == "full"
    scope = "as stated" if full else f"reduced size ({preset} preset, crop {max(crops)}); the goal is stated for full size"
    goals = []
    big = max(crops)
    for r in (x for x in ratios if x["crop"] == big):
        mem, thr = r.get("tiled_vs_dense_memory"), r.get("tiled_vs_dense_throughput")
        met = None if mem is None else (mem <= MEMORY_GOAL and thr >= THROUGHPUT_GOAL)
        if mem is None and r.get(f"{BASELINE}_error") == "out of memory" and r.get(f"{TILED}_error") is None:
            met, note = True, "dense ran out of memory, tiled did not"
        else:
            note = None
        goals.append({"goal": "tiled vs dense at the largest crop: peak memory <= 1/3, throughput >= 1.0x",
                      "profile": r["profile"], "crop": big, "M": r["M"], "memory_ratio": mem, "throughput_ratio": thr,
                      "met": met, "scope": scope if big == 801 or not full else f"crop {big}, not 801", "note": note})
    at = 321 if 321 in crops else min(crops)
    for r in (x for x in ratios if x["crop"] == at):
        ratio = r.get("best_vs_dense_throughput")
        goals.append({"goal": "best config vs dense fp32: >= 1.5x images/s at crop 321 on a GPU",
                      "profile": r["profile"], "crop": at, "M": r["M"], "best_config": r.get("best_config"),
                      "throughput_ratio": ratio, "met": None if ratio is None else ratio >= BEST_GOAL,
                      "scope": "as stated" if (device == "cuda" and at == 321) else
                      f"{device}, crop {at}: for reference; the goal is stated for a GPU at crop 321"})
    for profile in sorted({r["profile"] for r in rows}):
        fits, used = None, None
        if device == "cuda" and 801 in crops:
            cands = [r for r in rows if r["profile"] == profile and r["crop"] == 801 and CONFIGS[r["config"]].impl == "tiled"]
            ok = [r for r in cands if _ok(r)]
            if ok:
                best = min(ok, key=lambda r: r["peak_reserved_total_mib"])
                used = {"config": best["config"], "peak_reserved_total_gib": best["peak_reserved_total_mib"] / 1024,
                        "peak_allocated_total_gib": best["peak_allocated_total_mib"] / 1024}
                fits = used["peak_reserved_total_gib"] <= GPU_BUDGET_GIB
            elif cands:
                fits = False
        goals.append({"goal": f"Cityscapes-size step (crop 801, batch 4+4 = 8) fits in one 80 GB GPU "
                              f"(peak reserved <= {GPU_BUDGET_GIB} GiB)",
                      "profile": profile, "met": fits, "measured": used,
                      "scope": "as stated" if device == "cuda" and 801 in crops else "needs a CUDA run at crop 801"})
    return goals


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #


def _make_scenes(root: Path) -> None:
    from data_prep import scenes

    from derprop.book_runs import BOOK_RUNS

    scenes.main(["--root", str(root), *BOOK_RUNS["smoke"]["data_args"], "--workers", "1", "--quiet"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", choices=tuple(PRESETS), help="preset (default: full on CUDA, cpu otherwise)")
    parser.add_argument("--backbone")
    parser.add_argument("--crops", type=int, nargs="+")
    parser.add_argument("--batch", type=int, help="labeled = unlabeled batch per step (B of B+B)")
    parser.add_argument("--chunk", type=int, help="rows per tile for impl=tiled")
    parser.add_argument("--configs", nargs="+", choices=tuple(CONFIGS))
    parser.add_argument("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES))
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 1, 3 with compile)")
    parser.add_argument("--classes", type=int, default=21, help="C (= D, the release's heads): 21 = VOC")
    parser.add_argument("--rtol", type=float, default=1e-4, help="dense vs tiled: loss and loss terms")
    parser.add_argument("--grad-rtol", type=float,
                        help="dense vs tiled: per-parameter gradient (default 1e-4; 1e-3 on CUDA, whose conv "
                             "backward kernels are not deterministic)")
    parser.add_argument("--no-check", action="store_true", help="skip the dense == tiled check (not recommended)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each case in its own process (default: on, except --size quick; CPU peak memory needs it)")
    parser.add_argument("--threads", type=int, help="torch threads per case (default: torch's)")
    parser.add_argument("--scenes-root", help="an existing scenes tree to build the Trainer on (default: a temp one)")
    parser.add_argument("--out", help="default results/bench_train_step_<device>.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        return args
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    args.size = args.size or ("full" if args.device == "cuda" else "cpu")
    for key, value in PRESETS[args.size].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.grad_rtol is None:
        args.grad_rtol = 1e-3 if args.device == "cuda" else 1e-4
    if args.isolate is None:
        args.isolate = PRESETS[args.size].get("isolate", True)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return {}
    device = args.device
    if any(CONFIGS[c].impl == "tiled" for c in args.configs) and args.chunk >= min(grid_pixels(c) for c in args.crops):
        print(f"note: --chunk {args.chunk} >= M at some crop: tiled falls back to the dense path there", flush=True)
    out = Path(args.out) if args.out else RESULTS / f"bench_train_step_{device_slug(device)}.json"
    tmp = None
    if args.scenes_root:
        scenes_root = Path(args.scenes_root)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench_scenes_"))
        scenes_root = tmp / "scenes"
        _make_scenes(scenes_root)
    base = {"device": device, "backbone": args.backbone, "deep_stem": args.deep_stem, "batch": args.batch,
            "chunk": args.chunk, "classes": args.classes, "scenes_root": str(scenes_root.resolve()),
            "threads": args.threads}
    started = time.time()
    load_before = os.getloadavg()
    try:
        checks = []
        if not args.no_check:
            crop = args.check_crop if args.check_crop in args.crops else min(args.crops)
            for profile in args.profiles:
                case = {**base, "kind": "check", "profile": profile, "config": BASELINE, "crop": crop,
                        "M": grid_pixels(crop), "rtol": args.rtol, "grad_rtol": args.grad_rtol}
                res = run_isolated(MODULE, case) if args.isolate else run_case(case)
                checks.append(res)
                print(f"  check {profile:8s} crop {crop}: loss {res['loss_dense']:.6f} vs {res['loss_tiled']:.6f}, "
                      f"gradients: max rel diff {res['grad_max_rel_diff']:.1e} per parameter, "
                      f"{res['grad_global_rel_diff']:.1e} overall -> {'ok' if res['passed'] else 'FAILED'}",
                      flush=True)
            failed = [c for c in checks if not c["passed"]]
            if failed:
                raise SystemExit(
                    "dense and tiled disagree, so their timings are not comparable; nothing was timed:\n"
                    + "\n".join(json.dumps({k: c[k] for k in ("profile", "crop", "loss_dense", "loss_tiled",
                                                              "loss_rel_diff", "max_term_rel_diff",
                                                              "grad_max_rel_diff", "grad_worst_param",
                                                              "params_grad_mismatch", "chunks_used")})
                              for c in failed))
        rows = []
        for crop in args.crops:
            for profile in args.profiles:
                for config in args.configs:
                    warmup = args.warmup if args.warmup is not None else (3 if CONFIGS[config].compile else 1)
                    case = {**base, "kind": "step", "profile": profile, "config": config, "crop": crop,
                            "M": grid_pixels(crop), "repeats": args.repeats, "warmup": warmup}
                    row = _run(case, args.isolate)
                    rows.append(row)
                    if "error" in row:
                        print(f"  {profile:8s} crop {crop:4d} {config:22s} failed: {row['error']}", flush=True)
                    else:
                        print(f"  {profile:8s} crop {crop:4d} {config:22s} {row['images_per_s']:8.2f} img/s "
                              f"{row['peak_mib']:9.1f} MiB  " + "  ".join(f"{k} {100 * v:4.1f} %" for k, v in
                                                                   row["split_shares"].items()), flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    ratios = compute_ratios(rows, args.profiles, args.crops)
    goals = evaluate_goals(rows, ratios, device, args.size, args.crops)
    print()
    print("steps; the last columns split a step's seconds into its parts, forward and backward (one profiled step)")
    print_table([r | {f"split_{k}": v for k, v in r["split"].items()} for r in rows if "error" not in r], [
        ("profile", "profile", "s"), ("crop", "crop", "d"), ("M", "M", "d"), ("config", "config", "s"),
        ("images_per_s", "images/s", ".2f"), ("seconds", "s/step", ".3f"), ("peak_mib", "peak MiB", ".1f"),
        *((f"split_{k}", k, ".3f") for k in SPLIT)])
    print()
    print_table(ratios, [
        ("profile", "profile", "s"), ("crop", "crop", "d"), ("M", "M", "d"),
        ("tiled_vs_dense_memory", "tiled/dense memory", ".3f"),
        ("tiled_vs_dense_throughput", "tiled/dense img/s", ".2f"),
        ("best_config", "best", "s"), ("best_vs_dense_throughput", "best/dense img/s", ".2f"),
        ("deterministic_time_ratio", "deterministic/not time", ".3f")])
    print()
    for g in goals:
        state = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        print(f"  [{state:12s}] {g['goal']} ({g['profile']}; {g['scope']})")

    machine = machine_info(device)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine.update({"gpu_memory_gib": round(props.total_memory / 2**30, 1),
                        "bf16_supported": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version()})
    machine["load_average_start"] = [round(v, 2) for v in load_before]
    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    resolved_configs = {}
    for profile in args.profiles:
        from derprop.config import resolved
        from derprop.configfile import load_config

        case = {**base, "profile": profile, "config": TILED, "crop": max(args.crops)}
        cfg = resolved(load_config(None, overrides(case)))
        cfg["data"]["root"] = "<generated scenes tree; unused: batches are synthetic>"
        resolved_configs[profile] = cfg
    payload = {
        "benchmark": "train_step",
        "machine": machine,
        "preset": args.size,
        "config": {k: v for k, v in vars(args).items() if k not in ("case", "out", "scenes_root")}
                  | {"amp": amp_mode(device), "images_per_step": 2 * args.batch, "wall_s": time.time() - started},
        "resolved_configs": resolved_configs,
        "check": checks,
        "rows": rows,
        "ratios": ratios,
        "goals": goals,
    }
    payload = write_results(out, payload)
    print(f"\nwrote {out}")
    return payload


if __name__ == "__main__":
    main()
