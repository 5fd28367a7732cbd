"""Training checkpoints: written atomically, read back safely.

Explained in the book chapter *Training on a CPU* (``book/training_cpu.md``).

A checkpoint is a plain dictionary of tensors, numbers, strings, lists and
dicts, so it loads with ``torch.load(weights_only=True)`` and no pickled code
runs on load. :func:`save` writes it to a temporary file in the same folder and
renames it over the target (``os.replace``), so a crash mid-write never leaves
a half-written ``last.pt``: the previous one stays intact; a failed write
(disk full) is one ``derprop.training.atomic.WriteError`` naming the file and its size. :func:`load` turns
every way a file can be broken (truncated, not a zip, not ours) into one
:class:`CheckpointError` that names the file.

Random-number-generator states are stored as tensors and lists
(:func:`rng_state` / :func:`set_rng_state`) for the same reason. What a
``last.pt`` holds to resume from is written by :func:`training_state` and read
back by :func:`restore_training_state`, so its parts are named in one place.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from derprop.errors import DerPropError
from derprop.training import atomic

FORMAT = "derprop-checkpoint"
VERSION = 1
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes that DDP and ``torch.compile`` add to a wrapped module's state dict."""


class CheckpointError(DerPropError, RuntimeError):
    """A checkpoint file that cannot be used; the message names the file."""


def save(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same folder + rename).

    The format tag and version are added; the file at ``path`` is replaced only
    once the new one is complete on disk.
    """
    payload = {"format": FORMAT, "version": VERSION, **state}
    with atomic.open_atomic(path, size_hint=_nbytes(payload)) as f:
        torch.save(payload, f)
    return Path(path)


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts/lists): about the size of the saved file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
         fix: str = "pass another checkpoint file") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; ``fix`` ends the error messages (the command's own option).

    Raises:
        CheckpointError: the file is missing, truncated, corrupt, or not a
            DerProp checkpoint. Nothing is written or deleted.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # zip/pickle/EOF errors all mean the same to the user
        reason = refused_code(err) or f"is truncated or not a DerProp checkpoint ({load_error(err)})"
        raise CheckpointError(f"checkpoint {path} {reason}; {fix}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a DerProp checkpoint (no '{FORMAT}' tag); {fix}")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has version {state.get('version')}, this code reads version {VERSION}")
    return state


WEIGHTS_ONLY_FAILED = "Weights only load failed"
"""How ``torch.load(weights_only=True)`` starts the message of a file it refused: a hint about loading it unsafely,
which is no way out here, so the messages of derprop say what happened in their own words."""


def refused_code(err: BaseException) -> str | None:
    """Our words for a ``torch.load(weights_only=True)`` that refused a file because its pickle names a class or a
    function (code that loading would run); None for any other failure."""
    if isinstance(err, pickle.UnpicklingError) and str(err).startswith(WEIGHTS_ONLY_FAILED) \
            and "unsupported global" in str(err).lower():  # "Unsupported global: GLOBAL print", "unsupported GLOBAL posix.mkdir"
        return ("holds pickled Python objects besides tensors and plain values (a class or a function: code that "
                "loading would run), so it is not a DerProp checkpoint or state dict, and it was not loaded")
    return None


def load_error(err: BaseException) -> str:
    """A failed ``torch.load`` in a few words: the exception's kind, and its first line unless that is torch's
    hint about loading unsafely."""
    if str(err).startswith(WEIGHTS_ONLY_FAILED):
        return type(err).__name__
    return f"{type(err).__name__}: {_first_line(err)}"


def first_non_finite(tensors: dict[str, torch.Tensor]) -> tuple[str, float] | None:
    """``(name, value)`` of the first floating tensor holding a NaN/inf, or None: such weights are never saved."""
    floats = {name: t for name, t in tensors.items() if t.is_floating_point()}
    if not floats or bool(torch.stack([torch.isfinite(t).all() for t in floats.values()]).all()):
        return None
    name, t = next((n, t) for n, t in floats.items() if not bool(torch.isfinite(t).all()))
    return name, float(t[~torch.isfinite(t)].flatten()[0])


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain containers and tensors."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        # a box with fewer GPUs than the saving one restores those it has; the others' states are of no use here
        # (and the trainer re-seeds every device at the start of each epoch, distributed.epoch_seed)
        for index, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), index)


def training_state(parts: Mapping[str, Any]) -> dict[str, Any]:
    """The training state of a ``last.pt``: each part's ``state_dict()`` by name (None where a run has no such
    part: Θm without ``method.momentum``, the GradScaler without fp16) and the RNG states."""
    return {**{name: part.state_dict() if part is not None else None for name, part in parts.items()},
            "rng": rng_state()}


def restore_training_state(state: Mapping[str, Any], parts: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Load what :func:`training_state` saved into ``parts`` (those that are not None) and restore the RNG states.

    Raises :class:`CheckpointError` naming ``path`` when a part is missing or does not fit.
    """
    try:
        for name, part in parts.items():
            if part is not None:
                if state.get(name) is None:
                    raise KeyError(name)
                part.load_state_dict(state[name])
                if isinstance(part, torch.optim.Optimizer):
                    check_optimizer_state(part)
        set_rng_state(state["rng"])
    except (KeyError, RuntimeError, ValueError) as err:
        detail = " ".join(str(err).split())  # load_state_dict's text spans lines
        raise CheckpointError(f"checkpoint {path} does not fit this config ({type(err).__name__}: {detail[:300]}); "
                              "resume with the config it was written with") from err


def check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError when a loaded per-parameter state tensor (SGD's momentum buffer) has another shape than
    its parameter: ``load_state_dict`` does not check, and the first step would fail inside SGD."""
    for g, group in enumerate(optimizer.param_groups):
        for n, param in enumerate(group["params"]):
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise ValueError(f"the optimizer's {key} of parameter {n} of group {g} has shape "
                                     f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")


def strip_prefixes(sd: Mapping[str, Any], prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, Any]:
    """Remove wrapper prefixes (DDP ``module.``, ``torch.compile``'s ``_orig_mod.``, …)."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_net(net: torch.nn.Module, state: Mapping[str, Any], which: str, path: str | os.PathLike, fix: str) -> None:
    """Load the ``which`` weights (``model`` or ``momentum``) of checkpoint ``state``, read from ``path``, into ``net``.

    The one way a network gets a checkpoint's weights (a warm start, :mod:`derprop.evaluate`,
    :mod:`derprop.predict`): Θm's entry is unwrapped and wrapper prefixes are removed. Raises
    :class:`CheckpointError` naming the file and ending with ``fix``.
    """
    entry = state.get(which)
    if entry is None:
        raise CheckpointError(f"checkpoint {path} has no '{which}' weights; {fix}")
    if isinstance(entry, Mapping) and isinstance(entry.get("model"), Mapping):
        entry = entry["model"]  # MomentumNetwork.state_dict()
    try:
        net.load_state_dict(strip_prefixes(entry))
    except RuntimeError as err:
        detail = " ".join(str(err).split())  # load_state_dict's first line names only the class
        raise CheckpointError(f"checkpoint {path}: its '{which}' weights do not fit this model "
                              f"({detail[:300]}); {fix}") from err


def load_weights(net: torch.nn.Module, path: Path, setting: str) -> None:
    """Initialise ``net`` with the model weights of our checkpoint ``path``, named by the config ``setting``."""
    if not path.is_file():
        raise CheckpointError(f"{setting}: checkpoint {path} does not exist; train that run first or correct the path")
    fix = f"correct {setting}: start from a run with the same model section"
    load_net(net, load(path, fix=fix), "model", path, fix)
