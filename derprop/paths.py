"""The paths a command is given: resolved without a traceback, and outputs checked before any work.

:func:`resolve` turns a symbolic-link loop (``ln -s a.yaml a.yaml``) into one error line. :func:`check_output` is
the one guard of every file a command writes beside its inputs (``derprop.evaluate --out``,
``derprop.predict --out/--overlay``), run before the checkpoint is read or a model is built: the output has the
command's suffix; it is no folder, no input of the command (by path or by inode) and no file inside a dataset
tree; it replaces only an earlier output of the same command (a checkpoint, a run's ``results.json`` or a
dataset's ``manifest.json`` is never overwritten); and its folder can be written, with space left
(:func:`derprop.rundir.check_writable`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping

from derprop.errors import ConfigError


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
    from derprop.data import dataset_tree_of
    from derprop.rundir import check_writable

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
