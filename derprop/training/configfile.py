"""Reading training configs: YAML files, ``base:`` chains, dotted overrides, coercion and validation.

A config file is YAML with the sections of :mod:`derprop.training.config` (``model``, ``data``, ``optim``,
``loss``, ``method``, ``eval``, plus ``profile``, ``seed`` and ``name``). A
file may start with ``base: other.yaml`` (relative to itself) to inherit
everything and override some keys. :func:`load_config` also takes dotted
command-line overrides, ``method.dlp=false`` or ``optim.lr=0.01``, whose
values are parsed as YAML too. Every float notation reads as a number
(``1e-3``, ``5E-3``, ``.5``; plain YAML 1.1 would read ``1e-3`` as a string).
An unknown key raises :class:`~derprop.errors.ConfigError` naming the full dotted key and the keys
allowed there; a bad value names the allowed values; a YAML syntax error is
``<file>:<line>:<col>: <problem>`` (``override 'k=v'`` for an override). YAML aliases (``*name``) are
refused, and so are a file above :data:`MAX_CONFIG_BYTES` and a ``base:`` chain deeper than :data:`MAX_BASE_DEPTH`
bases: no config can grow past its text, and a value named in a message is cut (:func:`derprop.errors.shown`).
"""

from __future__ import annotations

import copy
import re
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from derprop.errors import ConfigError, shown
from derprop.training.config import PROFILES, SECTIONS, TrainConfig, check_choice, dataset_classes, flatten, resolved
from derprop.training.paths import resolve


MAX_CONFIG_BYTES = 1_000_000
"""The largest config file read (the project's are about 1 kB)."""
MAX_BASE_DEPTH = 16
"""The most bases a config's ``base:`` chain follows (the project's follow one)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads every float notation (``1e-3`` too) as a float, as YAML 1.2 does, and refuses aliases
    (``*name``): each one copies a whole value, so a few nested ones make a file of a kilobyte gigabytes big."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"an alias (*{event.anchor}) repeats a value; configs "
                                              "take no aliases: write the value out", event.start_mark)
        return super().compose_node(parent, index)


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
    path = resolve(path, "config")
    what = f"config {path}" + (f" (the base of {seen[-1]})" if seen else "")
    if path in seen:
        raise ConfigError(f"config {path} inherits from itself (base chain {[str(p) for p in seen]})")
    if len(seen) > MAX_BASE_DEPTH:
        raise ConfigError(f"config {seen[0]}: its base: chain goes more than {MAX_BASE_DEPTH} bases deep (to {path}); "
                          "inherit from fewer files")
    if path.is_dir():
        example = next((p.name for p in sorted(path.glob("*.yaml"))), "cpu_scenes.yaml")
        raise ConfigError(f"{what} is a folder; name a YAML file, e.g. {path / example}")
    if not path.is_file():
        raise ConfigError(f"{what} does not exist")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} is {path.stat().st_size:,} bytes, more than a config's {MAX_CONFIG_BYTES:,}; "
                          "name a YAML config file")
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
                          f"e.g. base: voc.yaml; got {shown(base)}")
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


def _user_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config file's nested dict → ``{dotted key: value}`` (:func:`~derprop.training.config.flatten`), every key checked."""
    for k, v in raw.items():
        if k in SECTIONS and v is not None and not isinstance(v, Mapping):
            raise ConfigError(f"config section {k!r} must be a mapping of keys, got {shown(v)}")
    flat = flatten({k: v for k, v in raw.items() if not (k in SECTIONS and v is None)})
    for key in flat:
        _check_key(key)
    return flat


def _check_key(key: str) -> None:
    """Raise a :class:`ConfigError` naming the allowed keys unless ``key`` (``section.key`` or top-level) exists."""
    top_allowed = [f.name for f in fields(TrainConfig) if f.name not in SECTIONS]
    section, dot, name = key.partition(".")
    if "." in name:
        raise ConfigError(f"unknown config key '{key}'; keys have at most one dot (section.key)")
    if not dot and key in top_allowed:
        return
    if not dot or section not in SECTIONS:
        raise ConfigError(f"unknown config key '{section}'; allowed top-level keys: "
                          f"{[f.name for f in fields(TrainConfig)] + ['base']}")
    allowed = [f.name for f in fields(SECTIONS[section])]
    if name not in allowed:
        raise ConfigError(f"unknown config key '{key}'; allowed keys in '{section}': {allowed}")


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


def given_keys(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The dotted keys that a config file (its ``base:`` chain included) and ``overrides`` set themselves: what
    makes a run that config, as opposed to the profile's and the defaults' values."""
    keys = set(_user_keys(_load_yaml(Path(path)))) if path is not None else set()
    return keys | {parse_override(text)[0] for text in overrides}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (following ``base:``), apply dotted ``overrides``, expand the profile.

    Raises:
        ConfigError: unknown key (named with the allowed keys) or bad value
            (named with the allowed values).
    """
    raw = _load_yaml(Path(path)) if path is not None else {}
    flat = _user_keys(raw)
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


def config_from_flat(user: Mapping[str, Any]) -> TrainConfig:
    """Profile values first, then the user's explicit keys; :class:`TrainConfig` validates them."""
    profile = user.get("profile", TrainConfig.profile)
    check_choice("profile", profile)
    values = {**PROFILES[profile], **user}
    nested = _nest(values)
    sections = {}
    for name, cls in SECTIONS.items():
        given = nested.get(name, {})
        kwargs = {k: _coerce(f"{name}.{k}", _field_type(cls, k), v) for k, v in given.items()}
        if name == "model" and "num_classes" not in given:
            kwargs["num_classes"] = dataset_classes(nested.get("data", {}))
        sections[name] = cls(**kwargs)
    top = {k: _coerce(k, _field_type(TrainConfig, k), v) for k, v in nested.items() if k not in SECTIONS}
    return TrainConfig(**top, **sections)


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
            raise ConfigError(f"config key '{key}' must be a list, got {shown(v)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, args[0], x) for x in v)
        if len(v) != len(args):
            raise ConfigError(f"config key '{key}' must be a list of {len(args)} values, got {shown(v)}")
        return tuple(_coerce(key, a, x) for a, x in zip(args, v))
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {shown(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {shown(v)}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {shown(v)}")
        return float(v)
    if tp is str:
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)  # split: 92 (write '1_8' in quotes: YAML reads 1_8 as 18)
        if not isinstance(v, str):
            raise ConfigError(f"config key '{key}' must be a string, got {shown(v)}")
        return v
    return v


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML (what ``runs/NAME/config.yaml`` holds); loads back to the same config."""
    return yaml.safe_dump(resolved(cfg), sort_keys=False)
