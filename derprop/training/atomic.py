"""Atomic file writes: a temporary file in the target's folder, then ``os.replace``; and the JSON-lines logs.

A crash or Ctrl-C mid-write leaves the previous file (or none), never half of
a new one. Checkpoints, ``results.json``, ``config.yaml``, metric logs,
pseudo-label snapshots, prepared datasets and benchmark results are all
written through :func:`open_atomic`. The temporary file is named
``.<name>.<random>.tmp`` (a kill can leave one behind; the trainer removes
them, :func:`derprop.training.rundir.remove_stale_temporaries`), and the finished file
gets the mode a plain ``open()`` would give it (``0666`` less the umask).

A write that fails for lack of space or permission raises :class:`WriteError`,
whose one-line message names the file and the space it needs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping

from derprop.errors import DerPropError

TMP_SUFFIX = ".tmp"


class WriteError(DerPropError, OSError):
    """A file could not be written; the message names the file, the reason and the space needed."""


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def write_error(path: Path, err: OSError, needed: int | None) -> WriteError:
    """One-line :class:`WriteError` for a failed write of ``path`` (``needed``: bytes, when known)."""
    try:
        free = f"{_mb(shutil.disk_usage(path.parent).free)} free in {path.parent}"
    except OSError:
        free = f"{path.parent} is not accessible"
    need = f"needs about {_mb(needed)}; " if needed else ""
    reason = err.strerror or str(err) or type(err).__name__
    error = WriteError(f"cannot write {path}: {reason} ({need}{free}); free some space or choose another output "
                       "folder")
    error.errno = err.errno
    return error


@contextmanager
def open_atomic(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[IO[bytes]]:
    """A binary file beside ``path``; on success it is synced and replaces ``path``, on error it is removed.

    ``size_hint``: the expected size in bytes, named in the error if the write fails.
    """
    path = Path(path)
    tmp: str | None = None
    written: int | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            except BaseException:
                written = _tell(f)
                raise
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        cause = err if isinstance(err, OSError) else _os_cause(err)
        if cause is not None and not isinstance(err, WriteError):
            raise write_error(path, cause, max(size_hint or 0, written or 0) or None) from err
        raise


def _tell(f: IO[bytes]) -> int | None:
    try:
        return f.tell()
    except (OSError, ValueError):
        return None


def _os_cause(err: BaseException) -> OSError | None:
    """The OSError behind ``err`` (torch.save reports a failed write as a RuntimeError whose context is it)."""
    seen = err.__cause__ or err.__context__
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with open_atomic(path, size_hint=len(data)) as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (UTF-8) to ``path`` (logs grow in place; a torn last line is dropped on resume)."""
    path = Path(path)
    data = text.encode("utf-8")
    try:
        with open(path, "ab") as f:
            f.write(data)
    except OSError as err:
        raise write_error(path, err, len(data)) from err


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf replaced by ``None`` (strict JSON) and keys made strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented strict JSON, atomically (NaN/inf become ``null``)."""
    write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSON-lines log (``metrics.jsonl``, ``steps.jsonl``); none if it does not exist, and a torn
    last line (a kill mid-append) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows (strict JSON) to a log."""
    append_text(path, "".join(json.dumps(jsonable(r)) + "\n" for r in rows))
