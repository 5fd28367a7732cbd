"""``python -m derprop.evaluate``: mIoU of a checkpoint's networks on a dataset (book chapters *Full
reproduction on a GPU* and *Paper vs released code*), by :func:`derprop.training.evaluation.evaluate` in one of
its three modes (``original``, ``sliding``, ``center_crop``: :mod:`derprop.training.evaluation`).

CLI::

    python -m derprop.evaluate --checkpoint runs/x/last.pt [--mode sliding]
        [--data-root DIR] [--split val | --val-list FILE] [--which both]
        [--out results.json]

The checkpoint is the trainer's, read with :func:`derprop.training.checkpoint.load`
(safe ``weights_only`` loading; a truncated or corrupt file gives an error
naming it): a dict with ``"model"`` (a state dict),
optionally ``"momentum"`` (:meth:`derprop.method.momentum.MomentumNetwork.state_dict`
or a bare state dict) and ``"config"`` whose ``"model"`` section holds
:class:`~derprop.training.config.ModelConfig` fields and whose ``"data"`` section holds
``root``, ``layout``, ``val_list`` and ``num_classes`` (see :func:`eval_dataset`).
Both weight sets are evaluated when present. A relative ``data.root`` is
resolved as training resolved it (the checkpoint's ``data_root``), else
against the current folder; the CLI says which root it used. A checkpoint
whose ``num_classes`` differs from the dataset's is refused. ``--out`` is checked
before the checkpoint is read (:func:`derprop.training.paths.check_output`, the guard
``derprop.predict`` shares): a ``.json`` file that is no input, lies in no dataset
tree, replaces only an earlier ``--out`` of evaluate (never a checkpoint or a run's
``results.json``) and can be written. The CLI exits
with status 2 and a one-line ``error:`` message on a bad checkpoint, dataset
or config, or an output file it cannot write.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from derprop.data import datasets as data_io
from derprop.training import atomic, cli, paths
from derprop.training import checkpoint as ckpt_io
from derprop.training.config import EVAL_MODES, eval_crop_size
from derprop.training.distributed import pick_device
from derprop.training.evaluation import eval_dataset, evaluate, format_iou_table
from derprop.training.model import build_model, model_config_of

log = logging.getLogger(__name__)


def data_root(ckpt: Mapping[str, Any], given: str | os.PathLike | None) -> tuple[Path, str]:
    """The dataset root to evaluate on and how it was found: ``--data-root``, else the checkpoint's
    ``data.root`` (absolute as is; relative: as the training run resolved it, else from the current folder)."""
    if given is not None:
        return Path(given), "--data-root"
    root = Path(((ckpt.get("config") or {}).get("data") or {}).get("root") or ".")
    if root.is_absolute():
        return root, "the checkpoint's data.root"
    trained = ckpt.get("data_root")
    if trained and Path(trained).is_dir():
        return Path(trained), f"the checkpoint's data.root {os.fspath(root)!r} as the training run resolved it"
    if root.is_dir():
        return root.resolve(), f"the checkpoint's data.root {os.fspath(root)!r} from the current folder"
    tried = ", ".join(dict.fromkeys(str(p) for p in (trained, root.resolve()) if p))
    raise data_io.DatasetError(f"dataset root {os.fspath(root)!r} of the checkpoint is not found (tried {tried}); "
                               "pass --data-root DIR")


def build_parser() -> cli.Parser:
    ap = cli.parser("derprop.evaluate", __doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="trainer checkpoint (.pt)")
    ap.add_argument("--mode", choices=EVAL_MODES, default="original")
    ap.add_argument("--crop-size", type=cli.at_least(1), default=None,
                    help="window or crop size of sliding and center_crop (default: the checkpoint's eval.crop_size)")
    ap.add_argument("--stride", type=cli.at_least(1), default=None, help="sliding-window stride (default 2/3 of crop)")
    ap.add_argument("--data-root", default=None, help="dataset root (default: the checkpoint's data.root)")
    ap.add_argument("--split", default="val", help="'val' or a labeled split name of the dataset layout")
    ap.add_argument("--val-list", default=None, help="list file overriding the checkpoint's")
    ap.add_argument("--which", choices=("both", "model", "momentum"), default="both")
    ap.add_argument("--device", default=None, help="default: cuda if available else cpu")
    ap.add_argument("--limit", type=cli.at_least(1), default=None, help="evaluate only the first N images")
    ap.add_argument("--window-batch", type=cli.at_least(1), default=8, help="sliding windows per forward pass")
    ap.add_argument("--workers", type=cli.at_least(0), default=2,
                    help="image-loading worker processes (0: load in this process)")
    ap.add_argument("--out", default=None, help="write the results as JSON here (atomically)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return cli.run(lambda: _evaluate_checkpoint(args))


RESULTS_KEYS = ("checkpoint", "data_root", "epoch", "num_images", "results")
"""The keys of the JSON that ``--out`` writes (:func:`is_results`)."""
MAX_RESULTS_BYTES = 10_000_000
"""An evaluation's JSON is a few kB; a larger file is something else."""


def is_results(path: Path) -> bool:
    """Whether ``path`` holds what ``--out`` writes: an earlier evaluation, which a new one may replace."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(MAX_RESULTS_BYTES))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) == set(RESULTS_KEYS)


def _evaluate_checkpoint(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    if args.out:  # before the (slow) evaluation: never a checkpoint, a run's results.json or a dataset's file
        inputs = {flag: Path(p) for flag, p in (("--checkpoint", args.checkpoint), ("--val-list", args.val_list)) if p}
        paths.check_output(Path(args.out), "--out", command="evaluate", kind="evaluation results", suffix=".json",
                           inputs=inputs, replaces=is_results)
    fix = "pass another file with --checkpoint"
    ckpt = ckpt_io.load(args.checkpoint, fix=fix)
    if "model" not in ckpt:
        raise ckpt_io.CheckpointError(f"checkpoint {args.checkpoint} has no 'model' weights; {fix}")
    cfg = model_config_of(ckpt)
    data_cfg = dict((ckpt.get("config") or {}).get("data") or {})
    root, how = data_root(ckpt, args.data_root)
    log.info("dataset root %s (%s)", root, how)
    dataset = eval_dataset(data_cfg, split=args.split, root=root, list_file=args.val_list,
                           num_classes=cfg.num_classes)
    if dataset.num_classes != cfg.num_classes:
        raise ckpt_io.CheckpointError(
            f"checkpoint {args.checkpoint} predicts {cfg.num_classes} classes but the dataset under {root} has "
            f"{dataset.num_classes}; pass --data-root with the dataset it was trained on (its data.root was "
            f"{data_cfg.get('root')!r}), or another --checkpoint")
    which = ["model", "momentum"] if args.which == "both" else [args.which]
    which = [w for w in which if ckpt.get(w) is not None]
    if not which:
        raise ckpt_io.CheckpointError(f"checkpoint {args.checkpoint} has no '{args.which}' weights; pass --which model")
    model = build_model(cfg).to(device)
    crop = args.crop_size or eval_crop_size(ckpt.get("config") or {})
    results: dict[str, Any] = {}
    for w in which:
        ckpt_io.load_net(model, ckpt, w, args.checkpoint, fix)
        res = evaluate(model, dataset, num_classes=dataset.num_classes, mode=args.mode, crop_size=crop,
                       stride=args.stride, device=device,
                       window_batch=args.window_batch, limit=args.limit, progress=sys.stderr.isatty(),
                       num_workers=args.workers)
        results[w] = res
        print(f"== {w} weights of {args.checkpoint} on {root} ==")
        print(format_iou_table(res, dataset.class_names))
    if args.out:
        atomic.write_json(args.out, dict(zip(RESULTS_KEYS, (os.fspath(args.checkpoint), str(root), ckpt.get("epoch"),
                                                            next(iter(results.values()))["num_images"], results))))


if __name__ == "__main__":
    raise SystemExit(main())
