"""File helpers shared by the preparation commands: atomic writes, hashes, label PNGs, split checks.

Every file the commands write goes to a temporary file in the same directory
first and is moved into place with ``os.replace``, so an interrupted run never
leaves a half-written file under its final name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from derprop import data
from derprop.data import (
    DatasetError,
    SegmentationDataset,
    dataset_spec,
    fix_hint,
    read_split,
    splits_dir,
    voc_palette,
)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb"):
    """Open a temporary file beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def file_hash(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def label_png_bytes(label: np.ndarray) -> bytes:
    """Encode an ``H×W`` uint8 index array as a VOC palette PNG."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label must be a 2-D uint8 array, got {label.dtype} {label.shape}")
    im = Image.fromarray(label)
    im.putpalette(voc_palette())  # mode L becomes P; the indices stay as they are
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_label_png(path: str | Path, label: np.ndarray) -> None:
    atomic_write_bytes(path, label_png_bytes(label))


def write_split(path: str | Path, items: Iterable[tuple[str, str]]) -> None:
    atomic_write_text(path, "".join(f"{image} {label}\n" for image, label in items))


def check_split_hashes(folder: str | Path | None = None) -> None:
    """Verify split lists (default: the shipped ones) against the ``SHA256SUMS`` in ``folder``."""
    folder = Path(folder) if folder is not None else data.SPLITS_ROOT
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split()
        path = folder / rel
        if not path.is_file():
            raise DatasetError(f"split list {path} is missing; restore it with `git checkout -- {path}`")
        if file_hash(path) != digest:
            raise DatasetError(
                f"split list {path} does not match SHA256SUMS (edited?); restore it with `git checkout -- {path}`"
            )


def check_tree(name: str, root: str | Path, deep: bool = False, max_report: int = 20) -> int:
    """Check that every file of a dataset's split lists exists (``deep``: and decodes and is valid).

    Returns the number of distinct (image, label) pairs checked; raises
    :class:`DatasetError` listing the first ``max_report`` problems and the
    command that fixes them.
    """
    spec = dataset_spec(name)
    folder = splits_dir(name, root)
    lists = [folder / spec.train_list, folder / "val.txt"] + [folder / s / "labeled.txt" for s in spec.labeled_splits]
    items = list(dict.fromkeys(item for path in lists for item in read_split(path)))
    ds = SegmentationDataset(root, items, num_classes=spec.num_classes, fix=fix_hint(name, root))
    problems: list[str] = [f"missing {p}" for p in ds.missing_files()]
    if deep and not problems:
        from tqdm import tqdm

        for i in tqdm(range(len(ds)), desc=f"checking {name}", unit="img", leave=False):
            try:
                ds.load(i)
            except DatasetError as e:
                problems.append(str(e).replace(ds.fix, "").strip())
                if len(problems) >= max_report:
                    break
    if problems:
        shown = "\n  ".join(problems[:max_report])
        more = f"\n  ... and {len(problems) - max_report} more" if len(problems) > max_report else ""
        raise DatasetError(f"{name} tree at {root} has {len(problems)} problem(s):\n  {shown}{more}\n{ds.fix}")
    return len(items)
