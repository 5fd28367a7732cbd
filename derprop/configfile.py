"""Reading training configs: YAML files, ``base:`` chains, dotted overrides, coercion and validation.

A config file is YAML with the sections of :mod:`derprop.config` (``model``, ``data``, ``optim``,
``loss``, ``method``, ``eval``, plus ``profile``, ``seed`` and ``name``). A
file may start with ``base: other.yaml`` (relative to itself) to inherit
everything and override some keys. :func:`load_config` also takes dotted
command-line overrides, ``method.dlp=false`` or ``optim.lr=0.01``, whose
values are parsed as YAML too. Every float notation reads as a number
(``1e-3``, ``5E-3``, ``.5``; plain YAML 1.1 would read ``1e-3`` as a string).
An unknown key raises :class:`~derprop.errors.ConfigError` naming the full dotted key and the keys
allowed there; a bad value names the allowed values; a YAML syntax error is
``<file>:<line>:<col>: <problem>`` (``override 'k=v'`` for an override).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from derprop.config import CHOICES, EVAL_MODES, PROFILES, SECTIONS, DataConfig, TrainConfig, resolved
from derprop.data import DATASETS
from derprop.errors import ConfigError


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
    """Parse YAML ``text``; a syntax error becomes ``ConfigError("<source>:<line>:<col>: <problem>")``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1 + (col_offset if mark.line == 0 else 0)}" if mark else "1:1"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise ConfigError(f"{source}:{where}: {problem}" + (f" ({context})" if context else "")) from None


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML file merged over its ``base:`` chain (bases are relative to the file)."""
    path = path.resolve()
    what = f"config {path}" + (f" (the base of {seen[-1]})" if seen else "")
    if path in seen:
        raise ConfigError(f"config {path} inherits from itself (base chain {[str(p) for p in seen]})")
    if path.is_dir():
        example = next((p.name for p in sorted(path.glob("*.yaml"))), "cpu_scenes.yaml")
        raise ConfigError(f"{what} is a folder; name a YAML file, e.g. {path / example}")
    if not path.is_file():
        raise ConfigError(f"{what} does not exist")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                          "save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"cannot read {what}: {err.strerror or err}") from None
    raw = read_yaml(text, str(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a YAML mapping of keys to values, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config {path}: 'base' must name another config file (relative to this one), "
                          f"e.g. base: voc.yaml; got {base!r}")
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
        raise ConfigError(f"override {text!r} must look like key.sub=value (e.g. method.dlp=false){hint}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key")
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
                raise ConfigError(f"config section {k!r} must be a mapping of keys, got {v!r}")
            allowed = [f.name for f in fields(SECTIONS[k])]
            for sk, sv in v.items():
                if sk not in allowed:
                    raise ConfigError(f"unknown config key '{k}.{sk}'; allowed keys in '{k}': {allowed}")
                flat[f"{k}.{sk}"] = sv
        elif k in top_allowed:
            flat[k] = v
        else:
            raise ConfigError(f"unknown config key '{k}'; allowed top-level keys: {top_allowed + ['base']}")
    return flat


def _check_key(key: str) -> None:
    _flatten(_nest({key: None}))


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        parts = key.split(".")
        if len(parts) > 2:
            raise ConfigError(f"unknown config key '{key}'; keys have at most one dot (section.key)")
        if len(parts) == 2:
            out.setdefault(parts[0], {})
            if not isinstance(out[parts[0]], dict):
                raise ConfigError(f"unknown config key '{key}': '{parts[0]}' is not a section")
            out[parts[0]][parts[1]] = v
        else:
            out[key] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (following ``base:``), apply dotted ``overrides``, expand the profile.

    Raises:
        ConfigError: unknown key (named with the allowed keys) or bad value
            (named with the allowed values).
    """
    raw = _load_yaml(Path(path)) if path is not None else {}
    flat = _flatten(raw)
    for text in overrides:
        key, value = parse_override(text)
        if key in SECTIONS:
            example = fields(SECTIONS[key])[0].name
            raise ConfigError(f"override {text!r}: '{key}' is a section; set one of its keys, e.g. {key}.{example}=...")
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
            raise ConfigError(f"config key '{key}' must be a list, got {v!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, args[0], x) for x in v)
        if len(v) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {v!r}")
        return tuple(_coerce(key, a, x) for a, x in zip(args, v))
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {v!r}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {v!r}")
        return float(v)
    if tp is str:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)  # split: 92 (write '1_8' in quotes: YAML reads 1_8 as 18)
        if not isinstance(v, str):
            raise ConfigError(f"config key '{key}' must be a string, got {v!r}")
        return v
    return v


def _check_choice(key: str, value: Any) -> None:
    allowed = CHOICES[key]
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")


MAX_CROP_SIZE = 4096
"""The largest crop (training and evaluation): each crop is padded to ``crop_size²`` pixels per image."""


def min_crop_size(output_stride: int) -> int:
    """The smallest crop whose feature grid is 3×3, what the central and second derivatives (eq. 10–12) need."""
    return 2 * output_stride + 1


def _validate(cfg: TrainConfig) -> None:
    flat = _flat_values(cfg)
    for key in CHOICES:
        _check_choice(key, flat[key])
    for mode in cfg.eval.final_modes:
        if mode not in EVAL_MODES:
            raise ConfigError(f"config key 'eval.final_modes' entries must be in {list(EVAL_MODES)}, got {mode!r}")
    for key, value in flat.items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else [value])):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
    positive = ["data.crop_size", "optim.epochs", "optim.batch_size", "optim.lr", "optim.head_lr_mult",
                "optim.poly_power", "eval.crop_size", "eval.every", "method.region_samples", "method.dlp_temperature"]
    for key in positive:
        if not flat[key] > 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {flat[key]!r}")
    if not 0 <= cfg.seed < 2**64:
        raise ConfigError(f"config key 'seed' must be in [0, 2**64), got {cfg.seed!r}")
    if not 0 <= cfg.optim.momentum < 1:
        raise ConfigError(f"config key 'optim.momentum' must be in [0, 1), got {cfg.optim.momentum!r}")
    if not cfg.optim.weight_decay >= 0:
        raise ConfigError(f"config key 'optim.weight_decay' must be >= 0, got {cfg.optim.weight_decay!r}")
    smallest = min_crop_size(cfg.model.output_stride)
    for key in ("data.crop_size", "eval.crop_size"):
        if not smallest <= flat[key] <= MAX_CROP_SIZE:
            raise ConfigError(f"config key '{key}' must be in [{smallest}, {MAX_CROP_SIZE}], got {flat[key]!r}: the "
                              f"network needs a 3×3 feature grid (2 × model.output_stride + 1 pixels), and a crop is "
                              f"padded to crop_size² pixels")
    for key in ["optim.iters_per_epoch", "optim.ref_batch", "optim.schedule_iters", "method.chunk", "data.labeled_limit",
                "data.unlabeled_limit", "data.val_limit"]:
        if flat[key] is not None and not flat[key] > 0:
            raise ConfigError(f"config key '{key}' must be null or > 0, got {flat[key]!r}")
    lo, hi = cfg.data.scale_range
    if not 0 < lo <= hi:
        raise ConfigError(f"config key 'data.scale_range' must be [low, high] with 0 < low <= high, got {[lo, hi]}")
    for key in ["data.cutmix_p", "method.threshold_value", "method.threshold_init", "method.threshold_momentum"]:
        if not 0.0 <= flat[key] <= 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1], got {flat[key]!r}")
    if cfg.data.num_workers < 0 or cfg.data.diag_images < 0 or cfg.optim.schedule_offset < 0:
        raise ConfigError("config keys 'data.num_workers', 'data.diag_images' and 'optim.schedule_offset' must be >= 0")
    data_classes = cfg.data.num_classes if cfg.data.num_classes is not None else _dataset_classes({"layout": cfg.data.layout})
    if cfg.model.num_classes != data_classes:
        raise ConfigError(
            f"config key 'model.num_classes' ({cfg.model.num_classes}) must equal the dataset's number of classes "
            f"({data_classes}); leave model.num_classes out to take it from the data"
        )
    if cfg.data.split is None and cfg.data.labeled_list is None:
        raise ConfigError("config needs 'data.split' (e.g. '92', '1_8') or an explicit 'data.labeled_list'")


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


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what ``runs/NAME/config.yaml`` holds); loads back to the same config."""
    return yaml.safe_dump(resolved(cfg), sort_keys=False)
