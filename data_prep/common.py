"""File helpers shared by the preparation commands: hashes, label PNGs, split checks.

Every file the commands write goes through :mod:`derprop.training.atomic`, so an
interrupted run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from derprop.data import datasets as data
from derprop.data.datasets import (DatasetError, SegmentationDataset, dataset_spec, fix_hint, label_png_bytes,
                                   read_split, splits_dir)
from derprop.training import atomic, cli


def file_hash(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file, read in chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_label_png(path: str | Path, label: np.ndarray) -> None:
    atomic.write_bytes(path, label_png_bytes(label))


def write_split(path: str | Path, items: Iterable[tuple[str, str]]) -> None:
    atomic.write_text(path, "".join(f"{image} {label}\n" for image, label in items))


def check_split_hashes(folder: str | Path | None = None) -> None:
    """Verify split lists (default: the shipped ones) against the ``SHA256SUMS`` in ``folder``."""
    folder = Path(folder) if folder is not None else data.SPLITS_DIR
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
    lists = [folder / spec.train_list, folder / "val.txt"] + [folder / s / "labeled.txt" for s in data.labeled_splits(name, root)]
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


def run_cli(parser: argparse.ArgumentParser, layout: str, what: str,
            prepare: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """The shared tail of ``python -m data_prep.voc`` / ``.cityscapes``: ``--check``, ``--deep``, ``--quiet``.

    ``prepare(args)`` builds the tree and returns the number of images checked; errors and Ctrl-C are
    reported by :func:`derprop.training.cli.run`.
    """
    parser.add_argument("--check", action="store_true", help="only check the tree against the split lists")
    parser.add_argument("--deep", action="store_true", help="with --check: also decode and validate every file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.check:
            check_split_hashes()
            n = check_tree(layout, args.root, deep=args.deep)
        else:
            n = prepare(args)
        print(f"ok: {args.root} holds all {n} images and labels of the {what} split lists")

    return cli.run(body, interrupted=lambda: "every file written so far is complete; run the same command again "
                                             "to go on from there")
