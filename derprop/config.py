"""Training configuration: frozen dataclasses loaded from YAML.

Explained in the book chapters *Training* and *Paper vs released code*.

A config file is YAML with the sections ``model``, ``data``, ``optim``,
``loss``, ``method`` and ``eval`` (plus ``profile``, ``seed``, ``name``). A
file may start with ``base: other.yaml`` (relative to itself) to inherit
everything and override some keys. :func:`load_config` also takes dotted
command-line overrides, ``method.dlp=false`` or ``optim.lr=0.01``, whose
values are parsed as YAML too. Every float notation reads as a number
(``1e-3``, ``5E-3``, ``.5``; plain YAML 1.1 would read ``1e-3`` as a string).
An unknown key raises ``ValueError`` naming the full dotted key and the keys
allowed there; a bad value names the allowed values; a YAML syntax error is
``<file>:<line>:<col>: <problem>`` (``override 'k=v'`` for an override).

Profiles
--------
``profile: official|paper`` sets every switch of :data:`PROFILES` at once:
``official`` is what the released code does (SPEC §2), ``paper`` what the
paper writes (SPEC §1). A key written in a config file or on the command
line always wins over the profile. :func:`resolved` gives the fully expanded
dictionary that goes into checkpoints and ``results.json``.

======================================  ==================  ==================  =====================================
key                                     official (release)  paper               SPEC / equation
======================================  ==================  ==================  =====================================
``model.two_heads``                     true (S = f1ᵀf2)    false (S = VᵀV)     §2 "J … two 1×1 convs"; eq. 1, 3
``method.dlp_form``                     softmax             linear              §2 "Propagation"; eq. 4
``method.blend_space``                  logit               prob                §2 "Blend in logit space"; eq. 5
``method.feature_norm``                 softmax             l1                  §2 "channel-softmax"; §1 ‖v‖₁ = 1
``method.label_resize``                 bilinear            nearest             §2 "resized bilinearly"; eq. 8 S_GT
``method.cutmix_partner``               same_image          other_image         §2 "zip(loader_u, loader_u)"
``method.labeled_der_detached``         true                false               §2 quirk; eq. 8 labeled terms
``method.spatial_softmax_sparsity``     true                false               §2 quirk; eq. 8 η‖Δ²V‖₁
``method.momentum_timing``              epoch_start         epoch_end           §2 "Momentum"; eq. 6
``method.momentum_buffers``             true                false               §2 "full state dict"; eq. 6 (Θ only)
``method.threshold``                    ema (0.85, 0.999)   fixed (0.95)        §2 CorrMatch threshold; eq. 7 "binary map"
``method.pseudo_label_source``          momentum            backprop            §2 CutMix batch; §1 "pseudo-labels by Θb"
``method.unlabeled_ce``                 soft                hard                §2 CE_u(soft); eq. 7 l^CE(P^s, P̃)
``method.cutmix_consistent_targets``    false               true                §2 quirk: uncut weak-view targets
``method.weak_propagated_ce``           true                false               §2 "CE_u(L̃)" has a weak-view half
``method.fp_branch``                    true                false               §2 feature perturbation (UniMatch)
``method.region_propagation``           true                false               §2 CorrMatch region propagation
``loss.lambda_der``                     0.25                0.5                 §2 "0.5·(Der_x+Der_u)" of (S+ΔS)/2; eq. 7
``loss.eta``                            1.0                 0.5                 §2 "0.25·(sparsity)"; eq. 3, 8 η
``loss.scale``                          0.5                 1.0                 §2 "Total … / 2"; eq. 7
``loss.lambda_fp``                      0.25                0.25 (unused)       §2 "0.25·CE_fp"
``eval.mode``                           center_crop         auto                §2 "Evaluation forced to centre-crop"
``eval.select``                         best_of_both        momentum            §2 "Both nets … best"; §1 eq. 6 "only Θm"
======================================  ==================  ==================  =====================================

``auto`` evaluation means original size for pascal/scenes and sliding window
for cityscapes (SPEC §1). Both label resizes sample the feature grid the
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
:data:`derprop.propagation.PAPER_NORMS`; the book's *Derivative label
propagation* chapter shows the literal form, *Paper vs released code* the
training curves of all three). Ablations (Tables 1–4) are the switches
``method.dlp``, ``method.derivative_loss``, ``method.momentum``,
``method.Q``, ``method.sparsity`` and ``method.op``, independent of the profile.

Batch size and learning rate: ``optim.batch_size`` is per process; the global
batch is ``batch_size × world_size`` and ``optim.lr`` is used as given (the
release's 1e-3 for a global batch of 8 on VOC). With ``optim.ref_batch`` set,
the lr is scaled linearly, ``lr × global_batch / ref_batch``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from derprop.model import ModelConfig

# --------------------------------------------------------------------------- #
# Sections
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on (see :mod:`derprop.data`).

    ``layout`` (pascal, cityscapes, scenes)/``root``/``split`` select the UniMatch-style lists; the
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
    crop_size: int = 321
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

    ``warm_start``: a checkpoint (a run's ``best.pt`` or ``last.pt``) whose model weights initialise Θb,
    and so Θm, before the first step; the book's CPU runs start from one shared supervised run.
    """

    epochs: int = 80
    batch_size: int = 4
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0001
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    ref_batch: int | None = None
    iters_per_epoch: int | None = None
    warm_start: str | None = None
    amp: str = "none"
    channels_last: bool = False


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
    crop_size: int = 321
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


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "loss": LossConfig,
    "method": MethodConfig,
    "eval": EvalConfig,
}

EVAL_MODES = ("original", "sliding", "center_crop", "auto")

CHOICES: dict[str, tuple] = {
    "profile": ("official", "paper"),
    "data.layout": ("pascal", "cityscapes", "scenes"),
    "optim.amp": ("none", "bf16", "fp16"),
    "method.Q": (0, 1, 2, 3),
    "method.op": ("forward", "central", "sum", "second"),
    "method.dlp_form": ("softmax", "linear"),
    "method.blend_space": ("logit", "prob"),
    "method.feature_norm": ("softmax", "l1"),
    "method.label_resize": ("bilinear", "nearest"),
    "method.paper_dlp_norm": ("none", "row_sum", "mean"),
    "method.cutmix_partner": ("same_image", "other_image"),
    "method.momentum_timing": ("epoch_start", "epoch_end"),
    "method.threshold": ("fixed", "ema"),
    "method.pseudo_label_source": ("momentum", "backprop"),
    "method.unlabeled_ce": ("soft", "hard"),
    "eval.mode": EVAL_MODES,
    "eval.select": ("best_of_both", "momentum"),
}
"""Allowed values of the string (and small integer) keys."""

PROFILES: dict[str, dict[str, Any]] = {
    "official": {
        "model.two_heads": True,
        "method.dlp_form": "softmax",
        "method.blend_space": "logit",
        "method.feature_norm": "softmax",
        "method.label_resize": "bilinear",
        "method.labeled_der_detached": True,
        "method.spatial_softmax_sparsity": True,
        "method.momentum_timing": "epoch_start",
        "method.momentum_buffers": True,
        "method.threshold": "ema",
        "method.pseudo_label_source": "momentum",
        "method.unlabeled_ce": "soft",
        "method.cutmix_consistent_targets": False,
        "method.cutmix_partner": "same_image",
        "method.weak_propagated_ce": True,
        "method.fp_branch": True,
        "method.region_propagation": True,
        "loss.lambda_der": 0.25,
        "loss.eta": 1.0,
        "loss.scale": 0.5,
        "eval.mode": "center_crop",
        "eval.select": "best_of_both",
    },
    "paper": {
        "model.two_heads": False,
        "method.dlp_form": "linear",
        "method.blend_space": "prob",
        "method.feature_norm": "l1",
        "method.label_resize": "nearest",
        "method.labeled_der_detached": False,
        "method.spatial_softmax_sparsity": False,
        "method.momentum_timing": "epoch_end",
        "method.momentum_buffers": False,
        "method.threshold": "fixed",
        "method.pseudo_label_source": "backprop",
        "method.unlabeled_ce": "hard",
        "method.cutmix_consistent_targets": True,
        "method.cutmix_partner": "other_image",
        "method.weak_propagated_ce": False,
        "method.fp_branch": False,
        "method.region_propagation": False,
        "loss.lambda_der": 0.5,
        "loss.eta": 0.5,
        "loss.scale": 1.0,
        "eval.mode": "auto",
        "eval.select": "momentum",
    },
}
"""Switch values of each profile (dotted keys); see the table in the module doc."""

assert PROFILES["official"].keys() == PROFILES["paper"].keys()

# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads every float notation (``1e-3`` too) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def read_yaml(text: str, source: str, col_offset: int = 0) -> Any:
    """Parse YAML ``text``; a syntax error becomes ``ValueError("<source>:<line>:<col>: <problem>")``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1 + (col_offset if mark.line == 0 else 0)}" if mark else "1:1"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise ValueError(f"{source}:{where}: {problem}" + (f" ({context})" if context else "")) from None


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file merged over its ``base:`` chain (bases are relative to the file)."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"config {path} inherits from itself (base chain {[str(p) for p in seen]})")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    raw = read_yaml(path.read_text(), str(path)) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path} must be a YAML mapping of keys to values, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    parent = _load_yaml((path.parent / base), seen + (path,))
    return _merge(parent, raw)


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` → ``("a.b", value read as YAML)``."""
    if "=" not in text:
        hint = "; a checkpoint to resume from goes after --resume-from" if text.endswith(".pt") or "/" in text else ""
        raise ValueError(f"override {text!r} must look like key.sub=value (e.g. method.dlp=false){hint}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has no key")
    if not value.strip():
        return key, None
    return key, read_yaml(value, f"override {text!r}", col_offset=len(text) - len(value))


def _flatten(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Nested user dict → ``{dotted key: value}``, checking every key exists."""
    flat: dict[str, Any] = {}
    top_allowed = [f.name for f in fields(TrainConfig)]
    for k, v in raw.items():
        if k in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ValueError(f"config section {k!r} must be a mapping of keys, got {v!r}")
            allowed = [f.name for f in fields(SECTIONS[k])]
            for sk, sv in v.items():
                if sk not in allowed:
                    raise ValueError(f"unknown config key '{k}.{sk}'; allowed keys in '{k}': {allowed}")
                flat[f"{k}.{sk}"] = sv
        elif k in top_allowed:
            flat[k] = v
        else:
            raise ValueError(f"unknown config key '{k}'; allowed top-level keys: {top_allowed + ['base']}")
    return flat


def _check_key(key: str) -> None:
    _flatten(_nest({key: None}))


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split(".")
        if len(parts) > 2:
            raise ValueError(f"unknown config key '{key}'; keys have at most one dot (section.key)")
        if len(parts) == 2:
            out.setdefault(parts[0], {})
            if not isinstance(out[parts[0]], dict):
                raise ValueError(f"unknown config key '{key}': '{parts[0]}' is not a section")
            out[parts[0]][parts[1]] = v
        else:
            out[key] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (following ``base:``), apply dotted ``overrides``, expand the profile.

    Raises:
        ValueError: unknown key (named with the allowed keys) or bad value
            (named with the allowed values).
    """
    raw = _load_yaml(Path(path)) if path is not None else {}
    flat = _flatten(raw)
    for text in overrides:
        key, value = parse_override(text)
        _check_key(key)
        if _is_str_key(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = text.split("=", 1)[1].strip()  # "split=1_8": YAML would read the number 18
        flat[key] = value
    return config_from_flat(flat)


def _is_str_key(key: str) -> bool:
    section, _, name = key.rpartition(".")
    tp = _field_type(SECTIONS[section] if section else TrainConfig, name)
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a nested dict (e.g. :func:`resolved` output, a checkpoint's config)."""
    return config_from_flat(_flatten(d))


def config_from_flat(user: Mapping[str, Any]) -> TrainConfig:
    """Profile values first, then the user's explicit keys, then validation."""
    profile = user.get("profile", TrainConfig.profile)
    _check_choice("profile", profile)
    values = {**PROFILES[profile], **user}
    nested = _nest(values)
    sections = {}
    for name, cls in SECTIONS.items():
        given = nested.get(name, {})
        kwargs = {k: _coerce(f"{name}.{k}", _field_type(cls, k), v) for k, v in given.items()}
        if name == "model" and "num_classes" not in given:
            kwargs["num_classes"] = _dataset_classes(nested.get("data", {}))
        sections[name] = cls(**kwargs)
    top = {k: _coerce(k, _field_type(TrainConfig, k), v) for k, v in nested.items() if k not in SECTIONS}
    cfg = TrainConfig(**top, **sections)
    _validate(cfg)
    return cfg


def _dataset_classes(data: Mapping[str, Any]) -> int:
    if data.get("num_classes") is not None:
        return data["num_classes"]
    from derprop.data import DATASETS

    name = data.get("layout", DataConfig.layout)
    _check_choice("data.layout", name)
    return DATASETS[name].num_classes


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(key: str, tp: Any, v: Any) -> Any:
    """Check ``v`` against the annotation ``tp``; lists become tuples; ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], v)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"config key '{key}' must be a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, args[0], x) for x in v)
        if len(v) != len(args):
            raise ValueError(f"config key '{key}' must be a list of {len(args)} values, got {v!r}")
        return tuple(_coerce(key, a, x) for a, x in zip(args, v))
    if tp is bool:
        if not isinstance(v, bool):
            raise ValueError(f"config key '{key}' must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"config key '{key}' must be an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"config key '{key}' must be a number, got {v!r}")
        return float(v)
    if tp is str:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)  # split: 92 (write '1_8' in quotes: YAML reads 1_8 as 18)
        if not isinstance(v, str):
            raise ValueError(f"config key '{key}' must be a string, got {v!r}")
        return v
    return v


def _check_choice(key: str, value: Any) -> None:
    allowed = CHOICES[key]
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")


def _validate(cfg: TrainConfig) -> None:
    flat = _flat_values(cfg)
    for key in CHOICES:
        _check_choice(key, flat[key])
    for mode in cfg.eval.final_modes:
        if mode not in EVAL_MODES:
            raise ValueError(f"config key 'eval.final_modes' entries must be in {list(EVAL_MODES)}, got {mode!r}")
    positive = ["data.crop_size", "optim.epochs", "optim.batch_size", "optim.lr", "eval.crop_size", "eval.every",
                "method.region_samples", "method.dlp_temperature"]
    for key in positive:
        if not flat[key] > 0:
            raise ValueError(f"config key '{key}' must be > 0, got {flat[key]!r}")
    for key in ["optim.iters_per_epoch", "optim.ref_batch", "method.chunk", "data.labeled_limit",
                "data.unlabeled_limit", "data.val_limit"]:
        if flat[key] is not None and not flat[key] > 0:
            raise ValueError(f"config key '{key}' must be null or > 0, got {flat[key]!r}")
    lo, hi = cfg.data.scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"config key 'data.scale_range' must be [low, high] with 0 < low <= high, got {[lo, hi]}")
    for key in ["data.cutmix_p", "method.threshold_value", "method.threshold_init", "method.threshold_momentum"]:
        if not 0.0 <= flat[key] <= 1.0:
            raise ValueError(f"config key '{key}' must be in [0, 1], got {flat[key]!r}")
    if cfg.data.num_workers < 0 or cfg.data.diag_images < 0:
        raise ValueError("config keys 'data.num_workers' and 'data.diag_images' must be >= 0")
    data_classes = cfg.data.num_classes if cfg.data.num_classes is not None else _dataset_classes({"layout": cfg.data.layout})
    if cfg.model.num_classes != data_classes:
        raise ValueError(
            f"config key 'model.num_classes' ({cfg.model.num_classes}) must equal the dataset's number of classes "
            f"({data_classes}); leave model.num_classes out to take it from the data"
        )
    if cfg.data.split is None and cfg.data.labeled_list is None:
        raise ValueError("config needs 'data.split' (e.g. '92', '1_8') or an explicit 'data.labeled_list'")


def _flat_values(cfg: TrainConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            for sf in fields(v):
                flat[f"{f.name}.{sf.name}"] = getattr(v, sf.name)
        else:
            flat[f.name] = v
    return flat


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


def eval_mode(cfg: TrainConfig, mode: str) -> str:
    """``auto`` → ``sliding`` for cityscapes, ``original`` otherwise (SPEC §1)."""
    if mode != "auto":
        return mode
    return "sliding" if cfg.data.layout == "cityscapes" else "original"


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what ``runs/NAME/config.yaml`` holds); loads back to the same config."""
    return yaml.safe_dump(resolved(cfg), sort_keys=False)
