"""The DLP map: propagation weights between the learned ones and an oracle's, and what each fixes or breaks.

Explained in the book chapter *Pseudo-label rectification, interactively*; ``python -m experiments.dlp_map``
writes it for a trained run.

DLP (eq. 4, release form) replaces a pixel's logits by ``L̃_j = Σ_i L_i W_ij`` with ``W = softmax_j(s)``
on the feature grid, upsamples ``L̃`` and blends it with ``L`` (eq. 5). Whether that helps depends on how
much of ``W`` stays inside the receiving pixel's true class. The **oracle** knows the labels ``y`` on the
grid and gives each pixel the mean logits of its own class: ``W*_ij = 1[y_i = y_j] / n(y_i)``. Three
families of weights move from the learned ``W`` (value 0) to the oracle:

* ``kappa``: ``softmax_j(s_ij + κ·1[y_i = y_j])``, a bonus on the similarity logits;
* ``alpha``: ``(1 − α)·W + α·W*``, a mix of the normalised matrices;
* ``temperature``: ``softmax_j(s_ij / T)``, sharper learned weights (no labels; T = 1 is the learned ``W``).

Each point is scored by the **own-class share** of its weights (:func:`derprop.method.propagation.attention_shares`,
against the share uniform weights give) and by the pseudo-label pixels DLP **fixes** (wrong before, right
after) and **breaks** (right before, wrong after) at each blend weight ``η``, on the grid points alone and
at full resolution. The **break-even share** is where the ``kappa`` family's net (fixed − broken) at full
resolution and ``η = 0.5`` crosses zero. :func:`ceiling` splits the errors the oracle cannot fix: whole
class regions whose mean logits already name a wrong class, against boundary and interior pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from derprop.data.datasets import SegmentationDataset
from derprop.data.labels import IGNORE_INDEX
from derprop.method.propagation import attention_shares, official_similarity_factors, propagation_weights
from derprop.training.config import TrainConfig
from derprop.training.snapshots import change_masks
from derprop.training.diagnostics import fit_crop
from derprop.training.metrics import ConfusionMatrix
from derprop.training.objective import label_on_grid
from derprop.training.pseudo_labels import blend, similarity_features, upsample_propagated

FAMILIES: dict[str, tuple[float, ...]] = {
    "kappa": (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0, 20.0),
    "alpha": (0.0, 0.1, 0.25, 0.5, 0.75, 1.0),
    "temperature": (1.0, 0.5, 0.2, 0.1, 0.05),
}
"""Family → the values scored (the first is the learned weights in each)."""

ETAS = (0.5, 0.75, 1.0)
"""Blend weights ``η`` of eq. 5 at which fixed and broken pixels are counted."""


@dataclass
class MapInputs:
    """One pass of a network over labeled images: what every point of the map is computed from.

    ``scores`` are the release's similarity logits ``s`` (``None`` for the paper's linear form, which has no
    softmax to add a bonus to); ``weights`` the learned ``W``; labels are ``(N, H, W)`` and ``(N, M)``.
    """

    logits: Tensor
    logits_grid: Tensor
    scores: Tensor | None
    weights: Tensor
    labels: Tensor
    grid_labels: Tensor
    grid: tuple[int, int]
    blend_space: str


@torch.no_grad()
def collect(net: nn.Module, images: SegmentationDataset, cfg: TrainConfig, device: torch.device | str = "cpu",
            batch: int = 16) -> MapInputs:
    """Run ``net`` (eval mode) over ``images`` at ``cfg.eval.crop_size`` and keep what the map needs."""
    m = cfg.method
    was = net.training
    net.eval()
    parts: dict[str, list[Tensor]] = {k: [] for k in ("logits", "logits_grid", "scores", "weights", "labels")}
    grid = (0, 0)
    for start in range(0, len(images), batch):
        pairs = [fit_crop(*(t.as_subclass(Tensor) for t in images[i]), cfg.eval.crop_size)
                 for i in range(start, min(start + batch, len(images)))]
        x = torch.stack([p[0] for p in pairs]).to(device)
        out = net(x)
        grid = tuple(out.f1.shape[-2:])
        f1, f2 = similarity_features(out, m.dlp_temperature)
        f1, f2 = f1.float(), None if f2 is None else f2.float()
        parts["weights"].append(propagation_weights(f1, f2, form=m.dlp_form, op=m.op,
                                                    paper_norm=m.paper_dlp_norm).cpu())
        if m.dlp_form == "softmax":  # the κ family re-weights the release's scores (family_weights)
            g1, g2 = official_similarity_factors(f1, f1 if f2 is None else f2, m.op)
            parts["scores"].append((g1.transpose(1, 2) @ g2).cpu())
        parts["logits"].append(out.logits.float().cpu())
        parts["logits_grid"].append(out.logits_grid.float().flatten(2).cpu())
        parts["labels"].append(torch.stack([p[1] for p in pairs]).long())
    net.train(was)
    cat = {k: torch.cat(v) if v else None for k, v in parts.items()}
    return MapInputs(cat["logits"], cat["logits_grid"], cat["scores"], cat["weights"], cat["labels"],
                     label_on_grid(cat["labels"], grid, "nearest").flatten(1), grid, m.blend_space)


def oracle_weights(grid_labels: Tensor) -> Tensor:
    """``W*_ij = 1[y_i = y_j] / n(y_i)``: every pixel takes the mean logits of its own class (``(N, M, M)``).

    Rows of ignored pixels give nothing; a pixel's own row always holds itself, so no row is empty.
    """
    valid = grid_labels != IGNORE_INDEX
    same = (grid_labels.unsqueeze(-1) == grid_labels.unsqueeze(1)) & valid.unsqueeze(-1) & valid.unsqueeze(1)
    same |= torch.eye(grid_labels.shape[1], dtype=torch.bool).unsqueeze(0)
    same = same.float()
    return same / same.sum(-1, keepdim=True)


def family_weights(inputs: MapInputs, family: str, value: float) -> Tensor:
    """The weights of ``family`` at ``value`` (module doc), ``(N, M, M)``, rows summing to one."""
    if family == "alpha":
        return (1 - value) * inputs.weights + value * oracle_weights(inputs.grid_labels)
    if inputs.scores is None:
        raise ValueError(f"family {family!r} needs the release's softmax form (method.dlp_form=softmax)")
    if family == "kappa":
        y = inputs.grid_labels
        same = (y.unsqueeze(-1) == y.unsqueeze(1)) & (y != IGNORE_INDEX).unsqueeze(-1)
        return (inputs.scores + value * same.float()).softmax(-1)
    if family == "temperature":
        return (inputs.scores / value).softmax(-1)
    raise ValueError(f"family must be one of {list(FAMILIES)}, got {family!r}")


def propagate_with(inputs: MapInputs, weights: Tensor, upsample: str = "bilinear") -> tuple[Tensor, Tensor]:
    """``L̃ = L·W`` on the grid ``(N, C, M)`` and at full resolution ``(N, C, H, W)``, brought there as training
    would with ``method.dlp_upsample=upsample`` (:func:`derprop.training.pseudo_labels.upsample_propagated`: the release's
    ``bilinear``, or ``detail``, ``L + up(L̃ − L_grid)``)."""
    lt = inputs.logits_grid @ weights
    n, c, _ = lt.shape
    full = upsample_propagated(lt.view(n, c, *inputs.grid), inputs.logits_grid.view(n, c, *inputs.grid),
                               inputs.logits, upsample)
    return lt, full


def _changes(before: Tensor, after: Tensor, truth: Tensor) -> tuple[int, int]:
    fixed, broken = change_masks(truth, before, after)
    return int(fixed.sum()), int(broken.sum())


def _accuracy(pred: Tensor, truth: Tensor, num_classes: int) -> tuple[float, float]:
    cm = ConfusionMatrix(num_classes)
    cm.update(pred, truth)
    return cm.pixel_accuracy(), cm.miou()


def score(inputs: MapInputs, weights: Tensor, etas: Sequence[float] = ETAS,
          upsample: str = "bilinear") -> dict[str, Any]:
    """Own-class share of ``weights`` and, per ``η``, fixed / broken / net pixels and pseudo-label accuracy
    and mIoU, on the grid points (``grid``) and at full resolution (``full``, brought there by ``upsample``:
    :func:`propagate_with`)."""
    own, uniform, support = attention_shares(weights, inputs.grid_labels, ignore_index=IGNORE_INDEX)
    out: dict[str, Any] = {"own_share": float(own.mean()), "uniform_share": float(uniform.mean()),
                           "support": float(support.mean())}
    out["share_ratio"] = out["own_share"] / out["uniform_share"]
    c = inputs.logits.shape[1]
    lt_grid, lt_full = propagate_with(inputs, weights, upsample)
    where = {"grid": (inputs.logits_grid, lt_grid, inputs.grid_labels),
             "full": (inputs.logits, lt_full, inputs.labels)}
    for name, (logits, lt, truth) in where.items():
        before = logits.argmax(1)
        acc, miou = _accuracy(before, truth, c)
        rows = {"before": {"acc": acc, "miou": miou}}
        for eta in etas:
            after = blend(logits, lt, eta, inputs.blend_space).argmax(1)
            fixed, broken = _changes(before, after, truth)
            acc, miou = _accuracy(after, truth, c)
            rows[f"{eta:g}"] = {"fixed": fixed, "broken": broken, "net": fixed - broken, "acc": acc, "miou": miou}
        out[name] = rows
    return out


def dlp_map(inputs: MapInputs, families: dict[str, Sequence[float]] | None = None,
            etas: Sequence[float] = ETAS, upsample: str = "bilinear") -> dict[str, list[dict[str, Any]]]:
    """Every point of every family (those that apply to ``inputs``' form), scored by :func:`score`."""
    families = FAMILIES if families is None else families
    out = {}
    for family, values in families.items():
        if family != "alpha" and inputs.scores is None:
            continue
        out[family] = [{"value": v, **score(inputs, family_weights(inputs, family, v), etas, upsample)} for v in values]
    return out


def break_even(points: Sequence[dict[str, Any]], where: str = "full", eta: float = 0.5) -> float | None:
    """Own-class share at which the net fixed − broken of a family first turns positive (linear interpolation
    between its points, in the order of increasing share); ``None`` when it never does."""
    pts = sorted(((p["own_share"], p[where][f"{eta:g}"]["net"]) for p in points), key=lambda t: t[0])
    for (s0, n0), (s1, n1) in zip(pts, pts[1:]):
        if n0 <= 0 < n1:
            return s0 + (s1 - s0) * (-n0) / (n1 - n0) if n1 != n0 else s1
    return pts[0][0] if pts and pts[0][1] > 0 else None


def ceiling(inputs: MapInputs, eta: float = 0.5, band: int | None = None) -> dict[str, int]:
    """What the oracle can fix at full resolution: the wrong pixels before DLP, split into

    ``whole_region`` (the mean logits of the pixel's true class in its image already name a wrong class:
    averaging within the class cannot fix them), ``boundary`` (within ``band`` pixels of another class;
    default half a grid cell) and ``interior`` (the rest), each with how many the oracle (η = ``eta``) fixes.
    """
    size = tuple(inputs.labels.shape[-2:])
    band = band if band is not None else max(1, round(size[0] / (2 * (inputs.grid[0] - 1))))
    truth = inputs.labels
    before = inputs.logits.argmax(1)
    _, lt_full = propagate_with(inputs, oracle_weights(inputs.grid_labels))
    after = blend(inputs.logits, lt_full, eta, inputs.blend_space).argmax(1)
    wrong = (before != truth) & (truth != IGNORE_INDEX)
    # the class mean's verdict: L̃ at a grid point of the class is exactly that class's mean logits
    lt_grid = inputs.logits_grid @ oracle_weights(inputs.grid_labels)
    mean_says = torch.full_like(truth, -1)
    for k in range(truth.shape[0]):
        verdict = {int(c): int(lt_grid[k, :, (inputs.grid_labels[k] == c)].mean(-1).argmax())
                   for c in inputs.grid_labels[k].unique().tolist() if c != IGNORE_INDEX}
        for c, v in verdict.items():
            mean_says[k][truth[k] == c] = v
    whole = wrong & (mean_says != truth) & (mean_says >= 0)
    kernel = 2 * band + 1
    t = truth.unsqueeze(1).float()
    near_other = (F.max_pool2d(t, kernel, 1, band) != F.max_pool2d(-t, kernel, 1, band).neg()).squeeze(1)
    boundary = wrong & ~whole & near_other
    interior = wrong & ~whole & ~near_other
    fixed = after == truth
    return {"wrong": int(wrong.sum()), "band_pixels": band,
            **{k: int(v.sum()) for k, v in (("whole_region", whole), ("boundary", boundary), ("interior", interior))},
            **{f"{k}_fixed": int((v & fixed).sum()) for k, v in (("whole_region", whole), ("boundary", boundary),
                                                                 ("interior", interior))}}


def kappa_snapshots(inputs: MapInputs, kappas: Sequence[float], base: dict[str, Any],
                    eta: float = 0.5) -> dict[float, dict[str, Any]]:
    """The κ viewer's frames (chapter *Pseudo-label rectification, interactively*): per ``kappa``, a snapshot
    in :mod:`derprop.book.viewer`'s layout for the first images of ``inputs``.

    ``base`` is one of the run's saved snapshots of the same diagnostic images (``image``, ``gt``, ``names``,
    ``class_names``); ``pl_before`` and ``pl_after`` are the network's labels before and after DLP at blend
    weight ``eta`` with the κ weights, ``confidence`` the blend's top probability, and the ``stat_*`` entries
    count fixed / broken pixels over *all* the images of ``inputs``, as :func:`score` does.
    """
    n = len(base["image"])
    before = inputs.logits.argmax(1)
    if not torch.equal(inputs.labels[:n], torch.as_tensor(base["gt"]).long()):
        raise ValueError("the snapshot's images are not the first diagnostic images of these inputs")
    out: dict[float, dict[str, Any]] = {}
    for kappa in kappas:
        weights = family_weights(inputs, "kappa", kappa)
        _, lt_full = propagate_with(inputs, weights)
        mixed = blend(inputs.logits, lt_full, eta, inputs.blend_space)
        after = mixed.argmax(1)
        fixed, broken = _changes(before, after, inputs.labels)
        own, uniform, _ = attention_shares(weights, inputs.grid_labels, ignore_index=IGNORE_INDEX)
        ratio = float(own.mean() / uniform.mean())
        out[kappa] = {**{k: base[k] for k in ("image", "gt", "names", "class_names") if k in base},
                      "pl_before": before[:n].numpy(), "pl_after": after[:n].numpy(),
                      "confidence": mixed[:n].max(1).values.numpy(),
                      "heading": f"κ = {kappa:g} (own class {ratio:.2f}× uniform)",
                      "stat_pl_fixed": fixed, "stat_pl_broken": broken, "stat_attn_share_ratio": ratio}
    return out


UPSAMPLES = ("bilinear", "detail")
"""The two ways :func:`propagate_with` brings ``L̃`` to full resolution (``method.dlp_upsample``)."""


def extent_stats(areas: np.ndarray, cell: float) -> dict[str, Any]:
    """Median and quartiles of ``√(area / cell)`` over objects of ``areas`` pixels, and ``pixel_median``: the
    extent of the object that the median object *pixel* belongs to (the per-pixel view the map counts in)."""
    ext = np.sqrt(np.asarray(areas, dtype=float) / cell)
    if not len(ext):
        return {"median": float("nan"), "q25": float("nan"), "q75": float("nan"), "pixel_median": float("nan"),
                "objects": 0, "cell_pixels": cell}
    q25, med, q75 = np.percentile(ext, [25, 50, 75])
    order = np.argsort(ext)
    weight = np.cumsum(np.asarray(areas, dtype=float)[order])
    pixel_median = ext[order][np.searchsorted(weight, weight[-1] / 2)]
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "pixel_median": float(pixel_median),
            "objects": int(len(ext)), "cell_pixels": cell}


def object_extent(labels: Tensor, grid: tuple[int, int], background: int = 0) -> dict[str, Any]:
    """How many feature-grid cells an object spans: ``√(area in cells)`` of every object in ``labels``
    ``(N, H, W)`` (:func:`extent_stats`).

    An object is an 8-connected region of one class other than ``background``; a cell is ``H·W / (h·w)``
    pixels for a ``grid`` of ``h × w``. Regions smaller than one cell (slivers cut off by an occluder) are not
    on the grid and are left out.
    """
    cell = labels.shape[-2] * labels.shape[-1] / (grid[0] * grid[1])
    areas = []
    for lab in labels.numpy():
        for c in set(lab.flat) - {background, IGNORE_INDEX}:
            regions, n = ndimage.label(lab == c, structure=np.ones((3, 3)))
            areas += [a for a in np.bincount(regions.ravel(), minlength=n + 1)[1:] if a >= cell]
    return extent_stats(np.array(areas), cell)


def regime_point(inputs: MapInputs, eta: float = 0.5) -> dict[str, Any]:
    """What the regime map (chapter *Where DLP can help*) keeps of one network's map inputs.

    The objects' extent in grid cells (:func:`object_extent`), the pseudo-label pixels counted (``pixels``:
    not ignored, at full resolution and on the grid) and, per upsampling (:data:`UPSAMPLES`), the learned
    weights' and the oracle's :func:`score`, the ``kappa`` family's points and its :func:`break_even` share at
    ``eta``; the release upsampling's :func:`ceiling`.
    """
    out: dict[str, Any] = {
        "grid": list(inputs.grid), "images": int(inputs.labels.shape[0]), "image_size": list(inputs.labels.shape[-2:]),
        "extent": object_extent(inputs.labels, inputs.grid),
        "pixels": {"full": int((inputs.labels != IGNORE_INDEX).sum()),
                   "grid": int((inputs.grid_labels != IGNORE_INDEX).sum())},
    }
    oracle = oracle_weights(inputs.grid_labels)
    for upsample in UPSAMPLES:
        kappa = dlp_map(inputs, {"kappa": FAMILIES["kappa"]}, upsample=upsample)["kappa"]
        out[upsample] = {"learned": kappa[0], "oracle": score(inputs, oracle, upsample=upsample),
                         "kappa": kappa, "break_even_share": break_even(kappa, eta=eta)}
    out["ceiling"] = ceiling(inputs, eta)
    return out


def full_map(inputs: MapInputs) -> dict[str, Any]:
    """The whole map of one network's :class:`MapInputs`: what ``python -m experiments.dlp_map`` writes for a run,
    and what chapter *Pseudo-label rectification, interactively* computes for this build's run.

    Every family (:func:`dlp_map`) and the oracle, scored by :func:`score`; each family's :func:`break_even`
    share; the oracle's :func:`ceiling`; and the same for the ``kappa`` family and the oracle with the
    detail-preserving upsampling (``detail``).
    """
    families = dlp_map(inputs)
    detail = dlp_map(inputs, {"kappa": FAMILIES["kappa"]}, upsample="detail")
    oracle = oracle_weights(inputs.grid_labels)
    return {
        "images": int(inputs.labels.shape[0]), "grid": list(inputs.grid),
        "image_size": list(inputs.labels.shape[-2:]),
        "families": families,
        "oracle": score(inputs, oracle),
        "break_even_share": {f: break_even(p) for f, p in families.items()},
        "ceiling": ceiling(inputs),
        "detail": {"what": "the same, with a detail-preserving upsampling: L + up(L̃ − L_grid) in place of up(L̃)",
                   "oracle": score(inputs, oracle, upsample="detail"), "families": detail,
                   "break_even_share": {f: break_even(p) for f, p in detail.items()}},
    }
