"""Full training steps of DerProp: dense (release-style M × M) vs tiled, AMP, channels_last, torch.compile.

    python -m benchmarks.train_step                 # GPU: ResNet-101, crops 321 and 801, batch 4+4
    python -m benchmarks.train_step --size cpu      # CPU: ResNet-18, crop 161, batch 2+2 (~10 min on 2 cores)
    python -m benchmarks.train_step --size quick    # seconds; what the test runs

One *step* is an iteration of :meth:`derprop.training.trainer.Trainer.fit` by the Trainer's own methods
(:func:`benchmarks.common.step_fn`) on a synthetic batch (:func:`benchmarks.common.synthetic_batch`); the
Trainer is built on a tiny scenes tree only because its constructor needs one. ``dense`` (``method.chunk=null``)
builds DLP's ``softmax(g1ᵀg2)`` and the derivative loss's ``S − S_GT`` as ``M × M`` matrices, as the release
does; ``tiled`` (``method.chunk=k``) works ``k`` rows at a time, forward and backward, in ``O(k·M)`` memory.
Before anything is timed, :func:`run_check` runs one step per profile on a dense and a tiled trainer from the
same weights, batch and seed: loss, terms and gradients must agree and the tiled trainer must tile.

Per case: images/s (``2·B`` per step; the CutMix partner's no-grad pass is not counted), peak memory above
the state held between steps (CPU: in an isolated process), and where the time goes
(:func:`benchmarks.common.split_step`); ``tiled-fp32-nondet`` gives what CPU determinism costs. Output: a table
and ``results/bench_train_step_<device>.json`` (machine, resolved configs, the check, rows, ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks.common import (RESULTS, SPLIT, device_slug, gradient_gap, machine_info, make_scenes, measure,
                               print_table, run_guarded, run_isolated, split_step, step_fn, synthetic_batch,
                               write_results)
from derprop.training.distributed import native_bf16

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
ROW_KEYS = ("profile", "config", "crop", "M", "batch", "backbone", "chunk")  # what names a row, failed or not

PRESETS: dict[str, dict[str, Any]] = {
    # The issue's sizes: ResNet-101 DeepLabV3+ (deep stem, OS 8), M = 41² and 101².
    "full": {"backbone": "resnet101", "deep_stem": True, "crops": [321, 801], "batch": 4, "chunk": 512,
             "repeats": 5, "configs": [c for c, setup in CONFIGS.items() if setup.deterministic], "check_crop": 321},
    # 2 CPU cores: M = 21², chunk below M so that "tiled" tiles; no torch.compile (~10 minutes to compile here).
    "cpu": {"backbone": "resnet18", "deep_stem": True, "crops": [161], "batch": 2, "chunk": 128,
            "repeats": 2, "configs": ["dense-fp32", "tiled-fp32", "tiled-fp32-nondet", "tiled-cl", "tiled-amp-cl"],
            "check_crop": 161},
    # The test: M = 5², one thread, in this process (memory figures only indicative).
    "quick": {"backbone": "resnet18", "deep_stem": False, "crops": [33], "batch": 2, "chunk": 8,
              "repeats": 1, "warmup": 0, "threads": 1, "isolate": False,
              "configs": ["dense-fp32", "tiled-fp32", "tiled-amp-cl"], "check_crop": 33},
}


def amp_mode(device: str) -> str:
    """The AMP the issue asks for: bf16 where the device computes it natively, else fp16 (CUDA, with GradScaler)."""
    return "bf16" if native_bf16(torch.device(device)) else "fp16"


def overrides(case: dict) -> list[str]:
    """Dotted config overrides (the ``derprop.train`` syntax) for one case."""
    impl, amp, channels_last = CONFIGS[case["config"]][:3]
    return [f"profile={case['profile']}", f"model.backbone={case['backbone']}", "model.pretrained=none",
            f"model.deep_stem={str(case['deep_stem']).lower()}", "model.output_stride=8", "data.layout=scenes",
            f"data.root={case['scenes_root']}", "data.split=1_8", f"data.num_classes={case['classes']}",
            f"data.crop_size={case['crop']}", "data.num_workers=0", "data.diag_images=0",
            f"optim.batch_size={case['batch']}", f"optim.amp={amp_mode(case['device']) if amp else 'none'}",
            f"optim.channels_last={str(channels_last).lower()}",
            f"method.chunk={case['chunk'] if impl == 'tiled' else 'null'}"]


def build_trainer(case: dict, out_dir: str):
    """A :class:`~derprop.training.trainer.Trainer` for ``case``, with ``trainer.model`` compiled if the config says so."""
    from derprop.training.configfile import load_config
    from derprop.training.trainer import Trainer

    cfg = load_config(None, overrides(case))
    trainer = Trainer(cfg, out_dir, device=case["device"], progress=False)
    if not CONFIGS[case["config"]].deterministic:
        torch.use_deterministic_algorithms(False)
    if CONFIGS[case["config"]].compile:
        # The Θb forward passes go through trainer.model; the no-grad passes (momentum net,
        # eval-mode CutMix partner) and DLP / the losses stay eager.
        trainer.model = torch.compile(trainer.net)
    return trainer


def _epoch(trainer) -> int:  # η_ep = 1/2: both parts of the blend (eq. 5) are live
    return trainer.cfg.optim.epochs // 2


def run_check(case: dict, out_dir: str) -> dict:
    """Loss, logged terms and parameter gradients of one step, dense then tiled, from the same state.

    Each implementation gets a trainer of its own, built from its own config (:data:`BASELINE`, :data:`TILED`):
    a trainer reads ``method.chunk`` once, when it is built, so swapping the config of a live one would run
    the same implementation twice. The check fails unless the two trainers really use ``None`` and
    ``case["chunk"]``."""
    batch = synthetic_batch(case["batch"], case["crop"], case["classes"], device=case["device"])
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
        loss, logs = trainer.compute_loss(batch, _epoch(trainer))
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainer.net.named_parameters() if p.grad is not None}
        results[impl] = (float(loss.detach()), logs, grads)
    (ld, logs_d, gd), (lt, logs_t, gt) = results["dense"], results["tiled"]

    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(a), 1e-12)

    terms = {k: {"dense": logs_d[k], "tiled": logs_t[k], "rel_diff": rel(logs_d[k], logs_t[k])}
             for k in sorted(logs_d) if k in logs_t}
    term_rel = max((t["rel_diff"] for k, t in terms.items() if k not in ("threshold", "mask_ratio")), default=0.0)
    gap = gradient_gap(gd, gt)
    tiles = (set(chunks["dense"].values()) == {None} and set(chunks["tiled"].values()) == {case["chunk"]}
             and case["chunk"] is not None and case["chunk"] < case["M"])
    passed = (tiles and rel(ld, lt) <= case["rtol"] and term_rel <= case["rtol"] and gap["max"] <= case["grad_rtol"]
              and not gap["missing"] and math.isfinite(ld) and gap["norm"] > 0)
    return {"profile": case["profile"], "crop": case["crop"], "M": case["M"], "chunk": case["chunk"],
            "loss_dense": ld, "loss_tiled": lt, "loss_rel_diff": rel(ld, lt), "max_term_rel_diff": term_rel,
            "grad_max_rel_diff": gap["max"], "grad_worst_param": gap["worst"], "grad_global_rel_diff": gap["global"],
            "grad_norm": gap["norm"], "params_with_grad": len(gd), "params_grad_mismatch": gap["missing"],
            "terms": terms, "rtol": case["rtol"], "grad_rtol": case["grad_rtol"], "chunks_used": chunks,
            "tiles": tiles, "passed": passed}


def run_step_case(case: dict, out_dir: str) -> dict:
    """Build, warm up (compile), then peak memory, median step time and the time split of one config."""
    torch.manual_seed(0)
    device = case["device"]
    t0 = time.perf_counter()
    trainer = build_trainer(case, out_dir)
    batch = synthetic_batch(case["batch"], case["crop"], case["classes"], device=device)
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
    if device == "cuda":
        extra = {"peak_allocated_total_mib": torch.cuda.max_memory_allocated() / 2**20,
                 "peak_reserved_total_mib": torch.cuda.max_memory_reserved() / 2**20,
                 "state_mib": torch.cuda.memory_allocated() / 2**20}
    else:
        import psutil

        extra = {"state_mib": psutil.Process().memory_info().rss / 2**20}
    split = split_step(lambda: losses.append(step()), device)
    shares = split["shares"]
    return {**{k: case[k] for k in ROW_KEYS}, "impl": CONFIGS[case["config"]].impl, "amp": trainer.cfg.optim.amp,
            "channels_last": trainer.cfg.optim.channels_last, "compile": CONFIGS[case["config"]].compile,
            "deterministic": torch.are_deterministic_algorithms_enabled(), "seconds": fig["seconds"],
            "images_per_s": 2 * case["batch"] / fig["seconds"], "peak_mib": fig["peak_mib"], **extra,
            "split": {k: v * fig["seconds"] for k, v in shares.items()}, "split_shares": shares,
            "dlp_loss_share": shares["dlp_derivative_loss"], "dlp_loss_calls": split["dlp_loss_calls"],
            "region_propagation_calls": split["region_propagation_calls"], "profiled_step_s": split["profiled_s"],
            "warmup_s": warmup_s, "repeats": fig["repeats"], "loss_finite": all(math.isfinite(v) for v in losses),
            "overrides": overrides(case)}


def run_case(case: dict) -> dict:
    """Entry point of one isolated case (``--case JSON``)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(case.get("threads") or threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_train_step_") as out_dir:
            if case["kind"] == "check":
                return run_check(case, out_dir)
            return run_step_case(case, out_dir)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def grid_pixels(crop: int, output_stride: int = 8) -> int:
    """M at the feature grid: each stride-2 stage maps s to ⌈s/2⌉ (321 → 41, 801 → 101, 161 → 21)."""
    s = crop
    for _ in range(int(math.log2(output_stride))):
        s = (s + 1) // 2
    return s * s


def _ok(row: dict | None) -> bool:
    return row is not None and "error" not in row


def compute_ratios(rows: list[dict], profiles: list[str], crops: list[int]) -> list[dict]:
    """Per profile and crop: tiled vs dense memory and speed, the fastest config, what determinism costs."""
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
            fast = [r for name, r in by.items()
                    if _ok(r) and CONFIGS[name].impl == "tiled" and CONFIGS[name].deterministic]
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    add("--size", choices=tuple(PRESETS), help="preset (default: full on CUDA, cpu otherwise)")
    add("--backbone")
    add("--crops", type=int, nargs="+")
    add("--batch", type=int, help="labeled = unlabeled batch per step (B of B+B)")
    add("--chunk", type=int, help="rows per tile for impl=tiled")
    add("--configs", nargs="+", choices=tuple(CONFIGS))
    add("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES))
    add("--repeats", type=int)
    add("--warmup", type=int, help="untimed steps first (default 1, 3 with compile)")
    add("--classes", type=int, default=21, help="C (= D, the release's heads): 21 = VOC")
    add("--rtol", type=float, default=1e-4, help="dense vs tiled: loss and loss terms")
    add("--grad-rtol", type=float, help="dense vs tiled: per-parameter gradient (default 1e-4; 1e-3 on CUDA, "
                                          "whose conv backward kernels are not deterministic)")
    add("--no-check", action="store_true", help="skip the dense == tiled check (not recommended)")
    add("--isolate", action=argparse.BooleanOptionalAction, default=None,
        help="each case in its own process (default: on, except --size quick; CPU peak memory needs it)")
    add("--threads", type=int, help="torch threads per case (default: torch's)")
    add("--scenes-root", help="an existing scenes tree to build the Trainer on (default: a temp one)")
    add("--out", help="default results/bench_train_step_<device>.json")
    add("--case", help=argparse.SUPPRESS)
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


def check_all(args: argparse.Namespace, base: dict) -> list[dict]:
    """:func:`run_check` per profile, one line each; stops the benchmark when any fails (nothing is timed)."""
    crop = args.check_crop if args.check_crop in args.crops else min(args.crops)
    checks = []
    for profile in args.profiles:
        case = {**base, "kind": "check", "profile": profile, "config": BASELINE, "crop": crop,
                "M": grid_pixels(crop), "rtol": args.rtol, "grad_rtol": args.grad_rtol}
        res = run_isolated(MODULE, case) if args.isolate else run_case(case)
        checks.append(res)
        print(f"  check {profile:8s} crop {crop}: loss {res['loss_dense']:.6f} vs {res['loss_tiled']:.6f}, gradients: "
              f"max rel diff {res['grad_max_rel_diff']:.1e} per parameter, {res['grad_global_rel_diff']:.1e} overall, "
              f"chunks {res['chunks_used']} -> {'ok' if res['passed'] else 'FAILED'}", flush=True)
    failed = [{k: c[k] for k in ("profile", "crop", "loss_rel_diff", "max_term_rel_diff", "grad_max_rel_diff",
                                 "grad_worst_param", "params_grad_mismatch", "chunks_used", "tiles")}
              for c in checks if not c["passed"]]
    if failed:
        raise SystemExit("dense and tiled disagree (or the tiled pass did not tile), so their timings are not "
                         "comparable; nothing was timed:\n" + "\n".join(json.dumps(f) for f in failed))
    return checks


def time_all(args: argparse.Namespace, base: dict) -> list[dict]:
    """One row per crop, profile and config (:func:`run_step_case`), one line each."""
    rows = []
    for crop in args.crops:
        for profile in args.profiles:
            for config in args.configs:
                warmup = args.warmup if args.warmup is not None else (3 if CONFIGS[config].compile else 1)
                case = {**base, "kind": "step", "profile": profile, "config": config, "crop": crop,
                        "M": grid_pixels(crop), "repeats": args.repeats, "warmup": warmup}
                row = run_guarded(MODULE, run_case, case, args.isolate, ROW_KEYS)
                rows.append(row)
                what = (f"failed: {row['error']}" if "error" in row else
                        f"{row['images_per_s']:8.2f} img/s {row['peak_mib']:9.1f} MiB  "
                        + "  ".join(f"{k} {100 * v:4.1f} %" for k, v in row["split_shares"].items()))
                print(f"  {profile:8s} crop {crop:4d} {config:22s} {what}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return {}
    device = args.device
    if any(CONFIGS[c].impl == "tiled" for c in args.configs) and args.chunk >= min(grid_pixels(c) for c in args.crops):
        print(f"note: --chunk {args.chunk} >= M at some crop: tiled falls back to the dense path there", flush=True)
    out = Path(args.out) if args.out else RESULTS / f"bench_train_step_{device_slug(device)}.json"
    tmp = None if args.scenes_root else Path(tempfile.mkdtemp(prefix="bench_scenes_"))
    scenes_root = Path(args.scenes_root) if args.scenes_root else tmp / "scenes"
    base = {"device": device, "backbone": args.backbone, "deep_stem": args.deep_stem, "batch": args.batch,
            "chunk": args.chunk, "classes": args.classes, "scenes_root": str(scenes_root.resolve()),
            "threads": args.threads}
    started, load_before = time.time(), os.getloadavg()
    try:
        if tmp is not None:
            make_scenes(scenes_root)
        checks = [] if args.no_check else check_all(args, base)
        rows = time_all(args, base)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ratios = compute_ratios(rows, args.profiles, args.crops)
    print("\nsteps; the last columns split a step's seconds into its parts, forward and backward (one profiled step)")
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
    machine = machine_info(device) | {"load_average_start": [round(v, 2) for v in load_before],
                                      "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine.update({"gpu_memory_gib": round(props.total_memory / 2**30, 1),
                        "bf16_supported": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version()})
    payload = write_results(out, {
        "benchmark": "train_step", "machine": machine, "preset": args.size,
        "config": {k: v for k, v in vars(args).items() if k not in ("case", "out", "scenes_root")}
                  | {"amp": amp_mode(device), "images_per_step": 2 * args.batch, "wall_s": time.time() - started},
        "resolved_configs": {profile: resolved_config(base, profile, max(args.crops)) for profile in args.profiles},
        "check": checks, "rows": rows, "ratios": ratios,
    })
    print(f"\nwrote {out}")
    return payload


def resolved_config(base: dict, profile: str, crop: int) -> dict:
    """The resolved config of ``profile``'s tiled case (the others differ only in :data:`CONFIGS`' switches)."""
    from derprop.training.config import resolved
    from derprop.training.configfile import load_config

    cfg = resolved(load_config(None, overrides({**base, "profile": profile, "config": TILED, "crop": crop})))
    cfg["data"]["root"] = "<generated scenes tree; unused: batches are synthetic>"
    return cfg


if __name__ == "__main__":
    main()
