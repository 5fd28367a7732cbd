"""The paper's tables as data: what each row runs, the numbers the paper reports, and every paper/release divergence.

Explained in the book chapters *Full reproduction on a GPU* (Tables 1–4, the paper's
numbers beside ours), *Ablations at CPU scale* (the same rows on the CPU scenes data)
and *Paper vs released code* (:data:`DIVERGENCES`). Each row is defined here once:
``pipelines/run_matrix.py`` and ``pipelines/train.ipynb`` run :data:`MATRIX`,
``scripts/ablation_configs.py`` writes the ``configs/voc_*_<ablation>.yaml`` files from
:data:`ABLATIONS`, ``derprop.book.runs`` trains the book's "w/o DLP" with them, and the
chapters read the paper's numbers from :data:`MATRIX`. The paper's numbers
(its Tables 1–4) lay out the tables only: nothing here is ever written into ``results/``.
A matrix run lives in ``runs/matrix/<size>/<name>`` (:func:`run_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from derprop.errors import ConfigError


@dataclass(frozen=True)
class Ablation:
    """One row of the paper's ablations: the config switches it turns on top of a base config."""

    table: str
    row: str
    overrides: tuple[str, ...]
    about: str
    """What the row changes, one line (the comment of its config file)."""


ABLATIONS: dict[str, Ablation] = {
    # Tables 1 and 2 (the paper's "Ablation Study": w/o DLP and w/o L_Der also drop the momentum network)
    "wo_dlp": Ablation("1", "w/o DLP", ("method.dlp=false", "method.derivative_loss=false", "method.momentum=false",
                                        "method.region_propagation=false"),
                       "no propagation (the pseudo-label is softmax(L)), no derivative loss, no momentum network, "
                       "and no similarity head anywhere (the release's region propagation reads f1/f2 too)"),
    "wo_der": Ablation("1", "w/o L_Der", ("method.derivative_loss=false", "method.momentum=false"),
                       "DLP kept, derivative loss dropped, no momentum network"),
    "wo_momentum": Ablation("1", "w/o momentum", ("method.momentum=false",),
                            "no momentum network (eq. 6): the back-propagation network is evaluated"),
    # Table 3: eq. 9 with Q = 0..3, with and without the sparsity term
    **{f"Q{q}": Ablation("3", f"L_{q}", (f"method.Q={q}", "method.sparsity=true"),
                         f"derivative orders 0..{q} supervised, sparsity on the order {q + 1} (eq. 9)")
       for q in range(4)},
    **{f"Q{q}_nosparsity": Ablation("3", f"L_{q} w/o sparsity", (f"method.Q={q}", "method.sparsity=false"),
                                    "eq. 9 without the eta term")
       for q in range(4)},
    # Table 4: the derivative operator (eq. 10, 11, 12 instead of eq. 2)
    **{f"op_{op}": Ablation("4", f"eq. {eq} ({op})", (f"method.op={op}",),
                            f"derivative operator of eq. {eq} instead of eq. 2")
       for op, eq in (("central", 10), ("sum", 11), ("second", 12))},
}
"""Ablation name → its row; the name is the suffix of its run and config file (``voc_92_wo_dlp``)."""

VOC_SPLITS = ("92", "183", "366", "732", "1464")
CITYSCAPES_SPLITS = ("186", "372", "744")

PAPER_TABLE1: dict[str, tuple[float | None, ...]] = {  # Pascal VOC 2012, per labeled split (VOC_SPLITS)
    "": (77.6, 78.7, 80.5, 81.3, 82.2),
    "wo_dlp": (66.6, 77.8, 78.3, 79.8, None),  # 1464: fully supervised, no pseudo-labels (paper, Ablation)
    "wo_der": (72.9, 77.0, 77.5, 78.8, 81.0),
    "wo_momentum": (75.1, 78.0, 79.6, 78.8, 81.9),
}
PAPER_TABLE2: dict[str, tuple[float, ...]] = {  # Cityscapes, per labeled split (CITYSCAPES_SPLITS)
    "": (60.1, 61.8, 62.1),
    "wo_dlp": (59.1, 60.4, 60.9),
    "wo_der": (57.1, 60.5, 61.0),
    "wo_momentum": (57.6, 60.4, 61.6),
}
PAPER_TABLE3: dict[int, tuple[float, float]] = {  # VOC 92: L_Q without and with sparsity
    0: (74.1, 75.1), 1: (77.0, 77.6), 2: (76.0, 76.9), 3: (76.4, 76.7),
}
PAPER_TABLE4: dict[str, tuple[float, float]] = {  # VOC 92 and 183 (VOC_SPLITS[:2]), per derivative operator
    "op_central": (76.1, 78.6), "op_sum": (76.4, 77.1), "op_second": (76.8, 78.5), "": (77.6, 78.7),
}
"""The paper's mIoU (%, ResNet-101; its Tables 1–4), keyed by ablation ("" = DerProp itself)."""


@dataclass(frozen=True)
class Entry:
    """One cell of the paper's tables: a config (plus ablation) and the paper's number for it."""

    table: str
    row: str
    column: str
    config: str
    ablation: str = ""
    paper: float | None = None

    @property
    def name(self) -> str:
        return run_name(self.config, self.ablation)


def _entries() -> list[Entry]:
    out: list[Entry] = []
    for table, splits, numbers, config in (("1", VOC_SPLITS, PAPER_TABLE1, "configs/voc_{}.yaml"),
                                           ("2", CITYSCAPES_SPLITS, PAPER_TABLE2, "configs/cityscapes_{}.yaml")):
        for abl, nums in numbers.items():
            row = ABLATIONS[abl].row if abl else "DerProp"
            out += [Entry(table, row, split, config.format(split), abl, num)
                    for split, num in zip(splits, nums) if not (abl == "wo_dlp" and split == "1464")]
    for q, (without, with_) in PAPER_TABLE3.items():
        out.append(Entry("3", f"L_{q}", "w/o sparsity", "configs/voc_92.yaml", f"Q{q}_nosparsity", without))
        out.append(Entry("3", f"L_{q}", "w/ sparsity", "configs/voc_92.yaml", f"Q{q}", with_))
    for abl, nums in PAPER_TABLE4.items():
        row = ABLATIONS[abl].row if abl else "eq. 2 (forward)"
        out += [Entry("4", row, split, f"configs/voc_{split}.yaml", abl, num)
                for split, num in zip(VOC_SPLITS[:2], nums)]
    return out


MATRIX: list[Entry] = _entries()
"""Every cell of Tables 1–4 with the paper's value (``None`` = not reported)."""


def run_name(config: str, ablation: str = "") -> str:
    """``voc_92`` + ``wo_dlp`` → ``voc_92_wo_dlp``; ``Q1`` with sparsity is the main run (same name)."""
    stem = Path(config).stem
    if ablation in ("", "Q1"):  # Q = 1 with sparsity is DerProp itself
        return stem
    return f"{stem}_{ablation}"


def run_path(config: str, ablation: str = "", size: str = "full", root: str | Path = "runs/matrix") -> Path:
    """The folder of a matrix run, ``<root>/<size>/<run name>``: a check run never shares the full run's folder."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    return Path(root) / size / run_name(config, ablation)


SIZES: dict[str, tuple[str, ...]] = {
    "smoke": ("optim.epochs=1", "optim.iters_per_epoch=2", "data.val_limit=4", "data.diag_images=2"),
    "small": ("optim.epochs=4", "data.val_limit=100"),
    "full": (),
}
"""Run size of a matrix cell → overrides. ``full`` is the config as written (the paper's schedule)."""


def overrides_for(*, split: str = "", profile: str = "", ablation: str = "", size: str = "full", seed: int = -1,
                  data_root: str = "", extra: Sequence[str] = ()) -> list[str]:
    """Dotted config overrides for the parameters of ``pipelines/train.ipynb``."""
    if ablation and ablation not in ABLATIONS:
        raise ConfigError(f"unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}")
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    out: list[str] = []
    if profile:
        out.append(f"profile={profile}")
    if split:
        out.append(f'data.split="{split}"')
    out += ABLATIONS[ablation].overrides if ablation else ()
    out += SIZES[size]
    if seed is not None and int(seed) >= 0:
        out.append(f"seed={int(seed)}")
    if data_root:
        out.append(f"data.root={data_root}")
    return out + list(extra)


@dataclass(frozen=True)
class Divergence:
    """One switch between the profiles: its value in each (``official``, ``paper``), what the release does,
    what the paper writes, which equation. :data:`derprop.training.config.PROFILES` is made from these values."""

    values: tuple[Any, Any]
    release: str
    paper: str
    eq: str


DIVERGENCES: dict[str, Divergence] = {
    "model.two_heads": Divergence(
        (True, False), "two 1×1 heads f1, f2 with D = C: S = f1ᵀf2 is asymmetric", "one V: S = VᵀV", "eq. 1, 3"),
    "method.dlp_form": Divergence(
        ("softmax", "linear"), "row softmax of the scaled similarity, L̃ = sg(L)·A", "L̃ = L(S + Δ¹S), unnormalised",
        "eq. 4"),
    "method.blend_space": Divergence(("logit", "prob"), "blend logits: (1−η_ep)L + η_ep·L̃", "blend probabilities", "eq. 5"),
    "method.feature_norm": Divergence(
        ("softmax", "l1"), "softmax over channels (called “L1 normalisation”)", "‖v‖₁ = 1", "eq. 3, Thm. 1"),
    "method.label_resize": Divergence(("bilinear", "nearest"),
        "class indices interpolated bilinearly on the feature grid (exact at crops 321/513/801)",
        "label at the nearest pixel of each grid point", "eq. 8 (S_GT)"),
    "method.labeled_der_detached": Divergence((True, False),
        "labeled prediction similarities detached: no gradient. The term's logged value differs as well (no switch: "
        "it changes nothing else): the release keeps ignored pixels, label 255 → class 22, in the mean over all B·M² "
        "pairs, against YᵀY/√(K−2), K = 1 + the largest label in the batch (√21 whenever it holds an ignored pixel, "
        "on VOC and Cityscapes alike); derprop averages over the valid pairs, against YᵀY/√C", "trained", "eq. 8"),
    "method.spatial_softmax_sparsity": Divergence(
        (True, False), "sparsity term takes a softmax over pixels: constant 1/M, no gradient", "η‖Δ²V‖₁", "eq. 3, 8"),
    "method.momentum_timing": Divergence(
        ("epoch_start", "epoch_end"), "average at the start of each epoch (lags one epoch)", "after each epoch",
        "eq. 6"),
    "method.momentum_buffers": Divergence((True, False), "BN buffers averaged too", "parameters Θ only", "eq. 6"),
    "method.threshold": Divergence(
        ("ema", "fixed"), "EMA confidence threshold (start 0.85, momentum 0.999)", "fixed binary map (0.95)", "eq. 7"),
    "method.pseudo_label_source": Divergence(
        ("momentum", "backprop"), "CutMix partner labelled by the momentum net", "by the trained net Θb", "eq. 5, 6"),
    "method.unlabeled_ce": Divergence(("soft", "hard"), "soft targets", "hard pseudo-labels", "eq. 7"),
    "method.cutmix_consistent_targets": Divergence(
        (False, True), "uncut weak-view targets, threshold counted over the CutMixed ignore mask (quirk)",
        "targets cut like the images, threshold over the weak view's ignore mask", "eq. 7"),
    "method.cutmix_partner": Divergence(
        ("same_image", "other_image"), "CutMix partner: another augmentation of the same image", "a different image",
        "eq. 7"),
    "method.weak_propagated_ce": Divergence(
        (True, False), "propagated CE on the weak view too", "strong view only", "eq. 7"),
    "method.fp_branch": Divergence(
        (True, False), "UniMatch feature-perturbation branch (Dropout2d 0.5), weight loss.lambda_fp = 0.25", "absent",
        "—"),
    "method.region_propagation": Divergence((True, False), "CorrMatch region-level label propagation", "absent", "—"),
    "loss.lambda_der": Divergence((0.25, 0.5), "0.25 (its 0.5·(S+ΔS)/2)", "λDer = 0.5", "eq. 7"),
    "loss.eta": Divergence((1.0, 0.5), "1.0 (its 0.25·sparsity against λDer = 0.25)", "η = 0.5", "eq. 3, 8"),
    "loss.scale": Divergence((0.5, 1.0), "whole loss / 2", "1", "eq. 7"),
    "eval.mode": Divergence(
        ("center_crop", "auto"), "centre crop 321 for every data set",
        "original size (VOC), sliding window (Cityscapes)", "Experiments"),
    "eval.select": Divergence(("best_of_both", "momentum"), "best of both nets", "momentum net only", "eq. 6"),
}
"""Every switch that differs between the profiles, with both values: ``derprop.training.config.PROFILES`` reads them here."""
