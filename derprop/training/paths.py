"""The paths a command is given: resolved without a traceback, and outputs checked before any work.

:func:`resolve` turns a symbolic-link loop (``ln -s a.yaml a.yaml``) into one error line. :func:`check_output` is
the one guard of every file a command writes beside its inputs (``derprop.evaluate --out``,
``derprop.predict --out/--overlay``), run before the checkpoint is read or a model is built: the output has the
command's suffix; it is no folder, no input of the command (by path or by inode) and no file inside a dataset
tree; it replaces only an earlier output of the same command (a checkpoint, a run's ``results.json`` or a
dataset's ``manifest.json`` is never overwritten); and its folder can be written, with space left
(:func:`check_writable`, which a training run's folder and a generated dataset's pass as well).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

from derprop.data.datasets import dataset_tree_of
from derprop.errors import ConfigError, DerPropError
from derprop.training.atomic import TMP_SUFFIX


class OutputError(DerPropError, RuntimeError):
    """An output folder that cannot be written; the message names it, the reason and the space left."""


def resolve(path: str | os.PathLike, what: str) -> Path:
    """``path`` made absolute with its links followed; a link loop is a :class:`ConfigError` naming ``what``."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as err:  # Python before 3.13 raises RuntimeError("Symlink loop …")
        raise ConfigError(f"{what} {path} is a symbolic link that leads back to itself ({err}); "
                          "point it at a real file") from None


def check_output(path: Path, flag: str, *, command: str, kind: str, suffix: str, inputs: Mapping[str, Path],
                 replaces: Callable[[Path], bool]) -> None:
    """Refuse the output ``path`` (given to ``command`` with ``flag``) before any work (module doc).

    ``kind``: what the command writes, for the messages (``evaluation results``); ``suffix``: its file type
    (``.json``); ``inputs``: the files the command reads, by the option that names them; ``replaces(path)``: whether an existing file is an
    earlier output of the command, which it may replace.
    """
    if path.suffix.lower() != suffix:
        raise ConfigError(f"{flag} {path}: {kind} are {suffix[1:].upper()} files; give the file a {suffix} name")
    target = resolve(path, flag)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; name a file in it, e.g. {path / ('a' + suffix)}")
    for option, given in inputs.items():
        if target == resolve(given, option) or (path.exists() and given.exists() and path.samefile(given)):
            raise ConfigError(f"{flag} {path} is the input {given}; {command} never overwrites its input: "
                              "choose another file name")
    tree = dataset_tree_of(target)
    if tree is not None:
        raise ConfigError(f"{flag} {path} lies in the dataset tree {tree}; {kind} are never written into a dataset: "
                          "choose a folder outside it")
    if path.exists() and not replaces(path):
        raise ConfigError(f"{flag} {path} already exists and is not an earlier output of {command} ({kind}), "
                          "so it is left as it is: choose another file name")
    check_writable(path.parent, flag)


def check_writable(out: Path, flag: str = "--out") -> None:
    """Refuse an output folder (given by ``flag``) that cannot be written (probed in it, or its nearest existing
    parent), or that is a link to nothing (a loop, or a target that is gone)."""
    resolve(out, flag)
    if out.is_symlink() and not out.exists():
        raise OutputError(f"cannot use output folder {out}: it is a symbolic link to {os.readlink(out)}, which does "
                          f"not exist; choose another {flag} or remove the link")
    probe_dir = out
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"cannot use output folder {out}: {probe_dir} is not a folder; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=TMP_SUFFIX, dir=probe_dir)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        free = shutil.disk_usage(probe_dir).free / 1e6 if probe_dir.exists() else 0.0
        raise OutputError(
            f"cannot write to output folder {out}: {err.strerror or err} in {probe_dir} ({free:.1f} MB free); "
            f"choose another {flag} or fix its permissions"
        ) from err
