"""Evaluation: mIoU in three modes (book chapters *Full reproduction on a GPU* and *Paper vs released code*).

Modes (the results table always says which one was used):

``"original"``
    the whole image at its own size (the paper's protocol for VOC);
``"sliding"``
    windows of ``crop_size`` with ``stride`` (default ⌊2/3·crop⌋), the image
    first padded on the right/bottom to at least ``crop_size`` with the
    ImageNet mean colour (0 after normalisation); logits of overlapping
    windows are averaged, the padding cropped off (the paper's protocol for
    Cityscapes);
``"center_crop"``
    image and label cropped to the central ``crop_size``×``crop_size``
    (less where the image is smaller) — what the released code does for
    every dataset.

Images go to the model with pixel values in [0, 255]; the model normalises
them itself (:func:`derprop.model.normalize`).

CLI::

    python -m derprop.evaluate --checkpoint runs/x/last.pt [--mode sliding]
        [--data-root DIR] [--split val | --val-list FILE] [--which both]
        [--out results.json]

The checkpoint is the trainer's, read with :func:`derprop.checkpoint.load`
(safe ``weights_only`` loading; a truncated or corrupt file gives an error
naming it): a dict with ``"model"`` (a state dict),
optionally ``"momentum"`` (:meth:`derprop.momentum.MomentumNetwork.state_dict`
or a bare state dict) and ``"config"`` whose ``"model"`` section holds
:class:`~derprop.config.ModelConfig` fields and whose ``"data"`` section holds
``root``, ``layout``, ``val_list`` and ``num_classes`` (see :func:`eval_dataset`).
Both weight sets are evaluated when present. A relative ``data.root`` is
resolved as training resolved it (the checkpoint's ``data_root``), else
against the current folder; the CLI says which root it used. A checkpoint
whose ``num_classes`` differs from the dataset's is refused. ``--out`` is checked
before the checkpoint is read (:func:`derprop.paths.check_output`, the guard
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
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from derprop import atomic
from derprop import checkpoint as ckpt_io
from derprop import cli, paths
from derprop import data as data_io
from derprop.config import EVAL_MODES, RELEASE_CROP, eval_crop_size
from derprop import distributed
from derprop.distributed import pick_device
from derprop.labels import IGNORE_INDEX, default_class_names
from derprop.metrics import ConfusionMatrix
from derprop.model import IMAGENET_MEAN_255, SegOutput, build_model, model_config_of

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- #
# inference
# --------------------------------------------------------------------------- #
def logits_of(model: Any, x: Tensor) -> Tensor:
    """The logits ``L`` of any segmentation model: ours (:class:`SegOutput`), a tensor, or torchvision's dict."""
    out = model(x)
    if isinstance(out, SegOutput):
        return out.logits
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        return out["logits"] if "logits" in out else out["out"]
    return out.logits


def _starts(length: int, crop: int, stride: int) -> list[int]:
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


def sliding_window_logits(
    model: Any, img: Tensor, *, crop_size: int, stride: int | None = None, window_batch: int = 8
) -> Tensor:
    """Average logits over ``crop_size`` windows (see module doc). ``img``: (B,3,H,W) in [0,255]."""
    stride = stride or max(1, crop_size * 2 // 3)
    b, _, h, w = img.shape
    hp, wp = max(h, crop_size), max(w, crop_size)
    if (hp, wp) != (h, w):
        padded = torch.empty(b, 3, hp, wp, dtype=torch.float32, device=img.device)
        padded[:] = torch.tensor(IMAGENET_MEAN_255, device=img.device).view(1, 3, 1, 1)
        padded[:, :, :h, :w] = img
        img = padded
    boxes = [(y, x) for y in _starts(hp, crop_size, stride) for x in _starts(wp, crop_size, stride)]
    acc: Tensor | None = None
    count = torch.zeros(1, 1, hp, wp, device=img.device)
    for i in range(0, len(boxes), window_batch):
        chunk = boxes[i:i + window_batch]
        crops = torch.cat([img[:, :, y:y + crop_size, x:x + crop_size] for y, x in chunk])
        out = logits_of(model, crops).float()
        if acc is None:
            acc = torch.zeros(b, out.shape[1], hp, wp, device=img.device)
        for j, (y, x) in enumerate(chunk):
            acc[:, :, y:y + crop_size, x:x + crop_size] += out[j * b:(j + 1) * b]
            count[:, :, y:y + crop_size, x:x + crop_size] += 1
    assert acc is not None
    return (acc / count)[:, :, :h, :w]


def center_crop(img: Tensor, label: Tensor, crop_size: int) -> tuple[Tensor, Tensor]:
    """Central ``crop_size`` square of image (..., H, W) and label (..., H, W)."""
    h, w = label.shape[-2:]
    top, left = max(0, (h - crop_size) // 2), max(0, (w - crop_size) // 2)
    sl = (slice(top, top + crop_size), slice(left, left + crop_size))
    return img[..., sl[0], sl[1]], label[..., sl[0], sl[1]]


# --------------------------------------------------------------------------- #
# data plumbing
# --------------------------------------------------------------------------- #
def _as_batch(img: Any, lab: Any) -> tuple[Tensor, Tensor]:
    """Image (B,3,H,W) and label (B,H,W) int64 as plain tensors, from arrays, tensors or tv_tensors,
    channels first or last, batched or not."""
    x, y = (t if isinstance(t, Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(t))) for t in (img, lab))
    x, y = x.as_subclass(Tensor), y.as_subclass(Tensor)  # tv_tensors.Image/Mask -> plain tensors
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"image must be (3,H,W), (H,W,3) or batched, got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if y.dim() == 2:
        y = y.unsqueeze(0)
    if y.dim() == 4 and y.shape[1] == 1:
        y = y[:, 0]
    return x, y.long()


def _iter_batches(data: Any, num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (image (B,3,H,W), label (B,H,W)) from a Dataset (one item at a time) or a DataLoader."""
    if isinstance(data, torch.utils.data.DataLoader) or not hasattr(data, "__getitem__"):
        items: Iterable[Any] = data
    elif num_workers > 0:
        items = torch.utils.data.DataLoader(data, batch_size=1, shuffle=False, num_workers=num_workers)
    else:
        items = (data[i] for i in range(len(data)))
    for img, lab, *_ in items:
        yield _as_batch(img, lab)


# --------------------------------------------------------------------------- #
# evaluate
# --------------------------------------------------------------------------- #
def _model_device(model: Any) -> torch.device:
    module = getattr(model, "module", model)
    try:
        return next(module.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: Any,
    data: Any,
    *,
    num_classes: int,
    mode: str = "original",
    crop_size: int = RELEASE_CROP,
    stride: int | None = None,
    device: torch.device | str | None = None,
    ignore_index: int = IGNORE_INDEX,
    window_batch: int = 8,
    limit: int | None = None,
    all_reduce: bool = False,
    progress: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """mIoU of ``model`` on ``data`` (a Dataset of (image, label) items or a DataLoader).

    Items may be tuples ``(image, label, ...)`` or dicts with ``image``/``label``;
    images uint8/float in [0, 255] as (3,H,W) / (H,W,3) tensors or arrays,
    labels (H,W) with ``ignore_index`` for void. ``model`` is a
    :class:`~derprop.model.DerPropNet`, a
    :class:`~derprop.momentum.MomentumNetwork` or any callable returning
    logits. It runs in eval mode; its previous mode is restored afterwards.
    ``all_reduce=True`` sums the confusion matrix and the image count over DDP
    ranks (every rank must then call evaluate on its shard). ``num_workers > 0`` loads a
    Dataset's items in that many worker processes (batch size 1).

    Returns ``{"miou", "iou_per_class" (None for absent classes), "pixel_acc",
    "mode", "crop_size", "stride", "num_images", "num_classes"}``; values are
    fractions in [0, 1].
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {list(EVAL_MODES)}, got {mode!r}")
    if mode != "original" and (not isinstance(crop_size, int) or crop_size < 1):
        raise ValueError(f"crop_size must be a positive integer, got {crop_size!r}")
    if mode == "sliding":
        stride = stride or max(1, crop_size * 2 // 3)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = getattr(model, "training", None)
    if isinstance(model, nn.Module):
        model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    n = 0
    batches = _iter_batches(data, num_workers)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"eval ({mode})", total=_safe_len(data, limit))
    try:
        for img, lab in batches:
            if limit is not None and n >= limit:
                break
            img, lab = img.to(device), lab.to(device)
            if mode == "center_crop":
                img, lab = center_crop(img, lab, crop_size)
            if mode == "sliding":
                logits = sliding_window_logits(model, img, crop_size=crop_size, stride=stride,
                                               window_batch=window_batch)
            else:
                logits = logits_of(model, img)
            cm.update(logits.argmax(1), lab)
            n += img.shape[0]
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()
    if all_reduce:
        cm.reduce_()
        n = int(distributed.all_reduce(torch.tensor([n]), "sum"))
    iou = cm.iou_per_class().tolist()
    return {
        "miou": cm.miou(),
        "iou_per_class": [None if math.isnan(v) else v for v in iou],
        "pixel_acc": cm.pixel_accuracy(),
        "mode": mode,
        "crop_size": None if mode == "original" else crop_size,
        "stride": stride if mode == "sliding" else None,
        "num_images": n,
        "num_classes": num_classes,
    }


def _safe_len(data: Any, limit: int | None) -> int | None:
    try:
        n = len(data)
    except TypeError:
        return limit
    return min(n, limit) if limit is not None else n


def format_iou_table(result: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Text table of per-class IoU (%), then mIoU, pixel accuracy and the mode used."""
    ious = result["iou_per_class"]
    names = list(class_names if class_names is not None else default_class_names(len(ious)))
    if len(names) != len(ious):
        raise ValueError(f"{len(names)} class names for {len(ious)} classes")
    width = max(12, *(len(s) for s in names))
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    for name, v in zip(names, ious):
        lines.append(f"{name:<{width}}  {'-' if v is None else f'{100 * v:7.2f}':>7}")
    lines.append("-" * (width + 9))
    miou = result["miou"]
    lines.append(f"{'mIoU':<{width}}  {'-' if miou is None or math.isnan(miou) else f'{100 * miou:7.2f}':>7}")
    acc = result.get("pixel_acc")
    if acc is not None and not math.isnan(acc):
        lines.append(f"{'pixel acc':<{width}}  {100 * acc:7.2f}")
    mode = result.get("mode", "?")
    extra = ""
    if mode == "sliding":
        extra = f" (crop {result.get('crop_size')}, stride {result.get('stride')})"
    elif mode == "center_crop":
        extra = f" (crop {result.get('crop_size')})"
    lines.append(f"mode: {mode}{extra}; images: {result.get('num_images', '?')}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #
# CLI helpers
# --------------------------------------------------------------------------- #
def eval_dataset(data_cfg: Mapping[str, Any], *, split: str = "val", root: str | os.PathLike | None = None,
                 list_file: str | os.PathLike | None = None,
                 num_classes: int | None = None) -> data_io.SegmentationDataset:
    """The labeled dataset to evaluate on, from a ``data`` config section.

    ``list_file`` (or, for ``split="val"``, ``data_cfg["val_list"]``) wins; a
    relative path is tried as given, then under ``root``. Otherwise the split
    comes from the dataset named by ``data_cfg["layout"]`` via
    :meth:`derprop.data.SegmentationDataset.from_split` (``split="val"``: its
    val list; another split name: that labeled subset). The classes are the
    tree's (:func:`derprop.data.class_names`: a scenes tree's manifest; more when
    ``data_cfg["num_classes"]`` says so, :func:`derprop.data.fits_tree`, with the labels
    still kept to the tree's), else ``data_cfg["num_classes"]``, else the argument (the
    model's), else the layout's.
    """
    root = Path(root if root is not None else data_cfg.get("root") or ".")
    layout = data_cfg.get("layout")
    spec = data_io.DATASETS.get(layout) if layout else None
    if list_file is None and split == "val":
        list_file = data_cfg.get("val_list")
    if list_file is None:
        if spec is None:
            raise data_io.DatasetError(
                f"no list file for split {split!r}: the data config has no val_list and layout {layout!r} is not "
                f"one of {sorted(data_io.DATASETS)}; pass --val-list FILE"
            )
        items = data_io.split_items(layout, None if split == "val" else split, "val" if split == "val" else "labeled",
                                    root)
    else:
        p = Path(list_file)
        if not p.is_file() and (root / p).is_file():
            p = root / p
        items = data_io.read_split(p)
    names = data_io.class_names(layout, root, items) if spec is not None else None
    configured = int(data_cfg.get("num_classes") or 0)
    if layout in data_io.TREE_LAYOUTS:  # the tree's count, or a larger one its config set (data.fits_tree)
        n = configured if configured and data_io.fits_tree(len(names), configured, True) else len(names)
    elif list_file is None:
        n = len(names)
    else:
        n = configured or int(num_classes or len(names or ()))
    if n < 2:
        raise data_io.DatasetError("the number of classes is unknown: set data.num_classes")
    return data_io.SegmentationDataset(root, items, num_classes=n, labeled=True,
                                       class_names=names if names and len(names) == n else None,
                                       fix=data_io.fix_hint(layout, root) if spec is not None else "",
                                       label_classes=len(names) if layout in data_io.TREE_LAYOUTS else None)


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
