"""Per-epoch pseudo-label diagnostics: unlabeled images with known labels, before and after DLP (eq. 5).

Explained in the book chapter *Pseudo-label rectification, interactively*; :mod:`derprop.book.viewer`
reads what is written here.

After every epoch (and once before the first step, ``epoch = -1``) the
trainer labels a fixed set of unlabeled images whose labels are known, as it
would for training, and records: pseudo-label accuracy and mIoU before and
after the blend, the pixels DLP fixed and broke, and how class-aware the
propagation weights are (own-class share of a pixel's weights against the
uniform share, and their effective support). The first 8 images are saved
as ``<run>/pseudo_labels/epoch_XXX.npz`` (arrays listed in :mod:`derprop.book.viewer`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from derprop.data.datasets import SegmentationDataset
from derprop.data.labels import IGNORE_INDEX
from derprop.method.propagation import attention_shares, propagation_weights
from derprop.training import atomic
from derprop.training.config import TrainConfig
from derprop.training.evaluation import center_crop
from derprop.training.metrics import ConfusionMatrix
from derprop.training.objective import label_on_grid
from derprop.training.pseudo_labels import blend, dlp_options, propagated_logits, similarity_features
from derprop.training.snapshots import SNAPSHOT_DLP_KEYS, SNAPSHOT_KEYS, change_masks

SAVED_IMAGES = 8
"""Images per snapshot file; the statistics use all diagnostic images."""


@torch.no_grad()
def pseudo_label_diagnostics(net: nn.Module, images: SegmentationDataset, cfg: TrainConfig, epoch: int,
                             out_dir: Path, device: torch.device,
                             autocast: Callable[[], AbstractContextManager]) -> dict[str, Any]:
    """Pseudo-labels of ``images`` by ``net`` at ``epoch`` (``-1`` = before the first step, snapshot ``epoch_000``).

    Without DLP (``method.dlp=false``) only the "before" figures exist: nothing propagates, so there is no "after".
    Returns the statistics (also stored in the snapshot as ``stat_*``).
    """
    m = cfg.method
    s = cfg.eval.crop_size
    c = cfg.model.num_classes
    eta = max(epoch, 0) / cfg.optim.epochs
    was = net.training
    net.eval()
    cms = {k: ConfusionMatrix(c) for k in (("before", "after", "prop") if m.dlp else ("before",))}
    fixed = broken = 0
    own, uniform, support = [], [], []
    keys = SNAPSHOT_KEYS + (SNAPSHOT_DLP_KEYS if m.dlp else ())
    arrays: dict[str, list] = {k: [] for k in keys}
    n = len(images)
    for start in range(0, n, 16):
        pairs = [fit_crop(*(t.as_subclass(Tensor) for t in images[i]), s) for i in range(start, min(start + 16, n))]
        x = torch.stack([p[0] for p in pairs]).to(device)
        gt = torch.stack([p[1] for p in pairs]).to(device)
        with autocast():
            out = net(x)
            prop = propagated_logits(out, x.shape[-2:], **dlp_options(m)) if m.dlp else None
        probs = blend(out.logits, prop, eta, m.blend_space)  # softmax(L) when there is no L̃
        pl_before = out.logits.float().argmax(1)
        cms["before"].update(pl_before, gt)
        conf, pl_after = probs.max(1)
        if m.dlp:
            cms["after"].update(pl_after, gt)
            cms["prop"].update(prop.argmax(1), gt)
            fixed_now, broken_now = change_masks(gt, pl_before, pl_after)
            fixed += int(fixed_now.sum())
            broken += int(broken_now.sum())
            h, w = out.f1.shape[-2:]
            f1, f2 = similarity_features(out, m.dlp_temperature)
            weights = propagation_weights(f1.float(), None if f2 is None else f2.float(), op=m.op,
                                          form=m.dlp_form,
                                          paper_norm=m.paper_dlp_norm)
            yg = label_on_grid(gt, (h, w), "nearest").flatten(1)
            o, u, sp = attention_shares(weights, yg, ignore_index=IGNORE_INDEX)
            own.append(o)
            uniform.append(u)
            support.append(sp)
        for k in range(min(len(pairs), SAVED_IMAGES - start)):
            arrays["image"].append(pairs[k][0].permute(1, 2, 0).cpu().numpy().astype(np.uint8))
            arrays["gt"].append(pairs[k][1].cpu().numpy().astype(np.uint8))
            arrays["pl_before"].append(pl_before[k].cpu().numpy().astype(np.uint8))
            arrays["confidence"].append(conf[k].cpu().numpy().astype(np.float16))
            arrays["names"].append(images.name(start + k))
            if m.dlp:
                arrays["pl_after"].append(pl_after[k].cpu().numpy().astype(np.uint8))
                j = chosen_pixel(yg[k].view(h, w))
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
    with atomic.open_atomic(out_dir / "pseudo_labels" / f"epoch_{epoch + 1:03d}.npz") as f:
        np.savez_compressed(f, **{k: np.stack(v) if k != "names" else np.array(v) for k, v in arrays.items()},
                            eta_ep=np.float32(eta), epoch=np.int32(epoch + 1),
                            **{f"stat_{k}": np.float64(v) for k, v in stats.items()})
    return stats


def chosen_pixel(grid_label: Tensor) -> int:
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


def fit_crop(image: Tensor, label: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Pad (image 0, label 255) to at least ``size``, then take the central ``size × size`` (so images stack)."""
    h, w = label.shape[-2:]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        pad = [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2]
        image = TF.pad(image, pad, fill=0)
        label = TF.pad(label.unsqueeze(0), pad, fill=IGNORE_INDEX)[0]
    return center_crop(image, label, size)
