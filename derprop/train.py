"""Command line: ``python -m derprop.train --config configs/X.yaml [overrides]``.

Explained in the book chapters *Training on a CPU* and *Full reproduction on a GPU*.

::

    python -m derprop.train --config configs/cpu_scenes.yaml [--out runs/NAME]
        [--resume | --resume-from PATH | --overwrite] [--new-data] [--amp bf16|fp16]
        [--channels-last] [--seed N] [--device cpu|cuda] [--threads N]
        [--log-every N] [key.sub=value ...]

    torchrun --nproc_per_node 2 -m derprop.train --config configs/voc_92.yaml

Writes ``runs/NAME/{config.yaml, train.log, metrics.jsonl, steps.jsonl, last.pt,
best.pt, results.json, pseudo_labels/}`` (``NAME`` defaults to the config
file's stem). ``--resume`` continues from ``runs/NAME/last.pt``,
``--resume-from PATH`` from another checkpoint (into ``--out``); a resumed
run may change the learning rate and schedule (``--resume optim.lr=1e-4``;
the changes are printed). A fresh run refuses a folder that already holds a
run, or files that no derprop run wrote; ``--overwrite`` deletes the files a
run writes first, and nothing else. ``--resume-from`` starts in a folder of
its own. A resume refuses a dataset whose manifest changed since the
checkpoint (both hashes named) unless ``--new-data``. One process at a time
writes a run folder (its ``run.lock`` names the pid and host).
``--amp``, ``--channels-last`` and ``--seed`` are shorthands for the
overrides ``optim.amp=…``, ``optim.channels_last=true`` and ``seed=…``.

Batch size and learning rate: ``optim.batch_size`` is the global batch, so
``torchrun --nproc_per_node N`` gives each process ``batch_size / N`` images
(one ``error:`` line when N does not divide it) and trains the same recipe as
one process; ``optim.lr`` is used as given unless ``optim.ref_batch`` is set
(then it is scaled by ``batch_size / ref_batch``). The last line printed says
what ran: processes, global and per-process batch, derprop version and commit.

Exit status 2 with one ``error:`` line for a bad config (file:line:col for
YAML syntax), dataset or checkpoint, an output folder that is in use, not
writable or full, or a loss, gradient or weight that became NaN/inf
(:mod:`derprop.training.cli`). Ctrl-C (exit status 130), SIGTERM (143) and SIGHUP (129)
keep the last finished epoch, release the folder's lock and print the command
that resumes it, with every option the run was started with.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Sequence

from derprop.book.report import iou_table
from derprop.training import checkpoint as ckpt_io
from derprop.training import cli
from derprop.training.configfile import load_config
from derprop.training.progress import DEFAULT_EVERY
from derprop.training.trainer import Trainer


def build_parser() -> cli.Parser:
    ap = cli.parser("derprop.train", __doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    start.add_argument("--resume-from", default=None, metavar="PATH", help="continue from the checkpoint PATH")
    start.add_argument("--overwrite", action="store_true",
                       help="start again in a folder that holds a run (deletes only the files a run writes)")
    ap.add_argument("--new-data", action="store_true",
                    help="resume although the dataset's manifest changed since the checkpoint (a regenerated tree)")
    ap.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None, help="autocast dtype (CUDA)")
    ap.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=cli.at_least(1), default=None,
                    help="torch CPU threads (on a busy machine 1 is often fastest: idle-spinning threads compete)")
    ap.add_argument("--log-every", type=cli.at_least(1), default=DEFAULT_EVERY, metavar="N",
                    help=f"a progress line every N iterations to <out>/train.log (and stdout without a terminal; "
                         f"default {DEFAULT_EVERY})")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. method.dlp=false")
    return ap


def describe(results: dict) -> str:
    """One line of what a run ran on: processes, devices, batch, derprop version and commit."""
    dirty = {True: ", with uncommitted changes", False: "", None: ""}[results["git_dirty"]]
    return (f"ran on {results['world_size']} process(es), {results['device_count']} device(s) ({results['device']}), "
            f"global batch {results['global_batch']} ({results['per_process_batch']} per process); "
            f"derprop {results['derprop_version']}, commit {results['git_commit']}{dirty}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may follow options: --resume optim.lr=1e-4
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    overrides = list(args.overrides)
    if args.amp is not None:
        overrides.append(f"optim.amp={args.amp}")
    if args.channels_last:
        overrides.append("optim.channels_last=true")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    out: list[Path] = []  # the run folder, once the config has named it
    return cli.run(lambda: _train(args, overrides, out), interrupted=lambda: _interrupted(args, overrides, out))


def _train(args: argparse.Namespace, overrides: list[str], out: list[Path]) -> None:
    cfg = load_config(args.config, overrides)
    out.append(Path(args.out) if args.out else Path("runs") / (cfg.name or Path(args.config).stem))
    resume = args.resume_from or args.resume or None
    trainer = Trainer(cfg, out[0], resume=resume, device=args.device, log_every=args.log_every,
                      overwrite=args.overwrite, new_data=args.new_data)
    results = trainer.fit()
    if trainer.d.is_main:
        for net, by_mode in results["final"].items():
            for mode in by_mode:
                print(f"== {net} network, {mode} ==")
                print(iou_table(results, net, mode))
        print(f"mIoU {100 * results['miou']:.2f} ({results['miou_net']} net, {results['miou_mode']}); "
              f"results in {out[0] / 'results.json'}")
        print(describe(results))


def _interrupted(args: argparse.Namespace, overrides: list[str], out: list[Path]) -> str:
    """What Ctrl-C left: the last finished epoch (``last.pt`` commits it) and the command that continues it."""
    if not out:
        return "stopped before training began; nothing was written"
    try:
        epoch = ckpt_io.load(out[0] / "last.pt").get("epoch")
    except ckpt_io.CheckpointError:
        return f"no epoch has finished in {out[0]}, so it holds nothing to resume; run the same command again"
    again = shlex.join(resume_arguments(args, overrides, out[0]))
    return (f"epoch {epoch}, the last finished one, is kept in {out[0] / 'last.pt'}; continue it with "
            f"`{cli.prog_name('derprop.train')} {again}`")


def resume_arguments(args: argparse.Namespace, overrides: list[str], out: Path) -> list[str]:
    """The arguments that continue the run in ``out`` as it was started: every option given (the device, the
    threads, which change the sums a CPU run makes, how often it logs, a dataset accepted as new) and every
    override."""
    options = ["--config", args.config, "--out", str(out), "--resume", *(["--new-data"] if args.new_data else [])]
    for flag, value, default in (("--device", args.device, None), ("--threads", args.threads, None),
                                 ("--log-every", args.log_every, DEFAULT_EVERY)):
        if value != default:
            options += [flag, str(value)]
    return options + overrides


if __name__ == "__main__":
    raise SystemExit(main())
