"""Evaluation: mIoU in three modes (book chapters *Full reproduction on a GPU* and *Paper vs released code*).

The loop that training, the diagnostics and ``python -m derprop.evaluate`` (:mod:`derprop.evaluate`) share.

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
them itself (:func:`derprop.training.model.normalize`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from derprop.data import datasets as data_io
from derprop.data.labels import IGNORE_INDEX, default_class_names
from derprop.training import distributed
from derprop.training.config import EVAL_MODES, RELEASE_CROP
from derprop.training.metrics import ConfusionMatrix
from derprop.training.model import IMAGENET_MEAN_255, SegOutput

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
    :class:`~derprop.training.model.DerPropNet`, a
    :class:`~derprop.method.momentum.MomentumNetwork` or any callable returning
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
    :meth:`derprop.data.datasets.SegmentationDataset.from_split` (``split="val"``: its
    val list; another split name: that labeled subset). The classes are the
    tree's (:func:`derprop.data.datasets.class_names`: a scenes tree's manifest; more when
    ``data_cfg["num_classes"]`` says so, :func:`derprop.data.datasets.fits_tree`, with the labels
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
