"""Your own images in VOC layout: check them, write the split lists and the manifest that training reads.

    python -m data_prep.folder --root DIR --classes background cat dog [--val N] [--seed S]
    python -m data_prep.folder --check --root DIR

``DIR`` holds ``JPEGImages/`` (``.jpg``, ``.jpeg`` or ``.png``) and ``SegmentationClass/`` with a label PNG
of the same name for the images you labeled: single-channel class indices ``0..C-1`` (``C`` = the number of
``--classes``, in order; a VOC palette PNG reads as its indices), 255 where a pixel is to be ignored. Images
without a label are the unlabeled images that the semi-supervised terms train on.

Every image is decoded and every label checked (mode, values, size equal to its image's); any problem is
reported with its file before anything is written. Then ``--val`` labeled images (default: a fifth of them,
at least one), drawn with ``--seed``, become the validation list, the other labeled images the labeled split
``labeled``, and every image that is not a validation image the training list: ``DIR/splits/train.txt``,
``val.txt``, ``labeled/labeled.txt`` and ``labeled/unlabeled.txt``, UniMatch's format. ``DIR/manifest.json``
(written last) records the classes, the settings and the sha256 of every file, as a scenes tree's does, so
that ``data.layout=folder data.root=DIR data.split=labeled`` trains on it and a changed file is noticed.
Book appendix *Your own data* runs this on a tiny example.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from data_prep.common import file_hash, write_split
from derprop.data.datasets import (SCENES_MANIFEST, DatasetError, derive_unlabeled, read_image, read_label, read_split,
                                   scenes_manifest)
from derprop.data.labels import IGNORE_INDEX
from derprop.training import atomic, cli

IMAGE_DIR, LABEL_DIR = "JPEGImages", "SegmentationClass"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SPLIT = "labeled"
"""The one labeled split of a folder tree (``data.split``)."""
MAX_REPORT = 20


def _problems(root: Path, classes: int) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """``(image, label, labeled)`` of every image, and every problem found (decoding, label values, sizes)."""
    images = sorted(p for p in (root / IMAGE_DIR).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    stems = {p.stem for p in images}
    problems = [f"{p}: no image {IMAGE_DIR}/{p.stem}.* for this label"
                for p in sorted((root / LABEL_DIR).glob("*.png")) if p.stem not in stems]
    items = []
    for image in images:
        label = root / LABEL_DIR / f"{image.stem}.png"
        rel = (f"{IMAGE_DIR}/{image.name}", f"{LABEL_DIR}/{label.name}")
        try:
            pixels = read_image(image)
            if label.is_file():
                values = read_label(label, classes)
                if values.shape != pixels.shape[:2]:
                    raise DatasetError(f"label {label} is {values.shape[1]}×{values.shape[0]} but its image is "
                                       f"{pixels.shape[1]}×{pixels.shape[0]}; they must match")
                if (values == IGNORE_INDEX).all():
                    raise DatasetError(f"label {label} holds only 255 (ignore): nothing to learn from")
        except DatasetError as e:
            problems.append(str(e))
            continue
        items.append((*rel, label.is_file()))
    return items, problems


def prepare(root: str | Path, classes: list[str], val: int | None = None, seed: int = 0) -> dict:
    """Check the folder, write its split lists and manifest (module doc); returns the manifest."""
    root = Path(root)
    for name in (IMAGE_DIR, LABEL_DIR):
        if not (root / name).is_dir():
            raise DatasetError(f"{root / name} is not a folder: put your images in {root / IMAGE_DIR} and their "
                               f"labels (class-index PNGs of the same names) in {root / LABEL_DIR}")
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise DatasetError(f"--classes needs two or more distinct names (background first), got {classes}")
    items, problems = _problems(root, len(classes))
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORT} more" if len(problems) > MAX_REPORT else ""
        raise DatasetError(f"{root}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:MAX_REPORT]) + more
                           + "\nFix: correct or remove those files, then run the same command again.")
    labeled = [(i, lab) for i, lab, has in items if has]
    if len(labeled) < 2:
        raise DatasetError(f"{root / LABEL_DIR} holds {len(labeled)} label(s) of {len(items)} images: at least two "
                           "are needed, one to train on and one to validate with")
    n_val = max(1, len(labeled) // 5) if val is None else val
    if not 1 <= n_val < len(labeled):
        raise DatasetError(f"--val {n_val}: must leave at least one of the {len(labeled)} labeled images to train "
                           "on and take at least one")
    shuffled = random.Random(seed).sample(labeled, len(labeled))
    val_items = sorted(shuffled[:n_val])
    held, has_label = set(val_items), set(labeled)
    train = [(i, lab) for i, lab, _ in items if (i, lab) not in held]
    train_labeled = [pair for pair in train if pair in has_label]
    splits = root / "splits"
    write_split(splits / "train.txt", train)
    write_split(splits / "val.txt", val_items)
    write_split(splits / SPLIT / "labeled.txt", train_labeled)
    write_split(splits / SPLIT / "unlabeled.txt", derive_unlabeled(train, train_labeled))
    files = {rel: file_hash(root / rel) for i, lab, has in items for rel in ((i, lab) if has else (i,))}
    manifest = {"settings": {"source": "folder", "splits": [SPLIT], "val": n_val, "seed": seed},
                "class_names": list(classes), "files": files,
                "counts": {"images": len(items), "labeled": len(train_labeled), "val": n_val,
                           "unlabeled": len(items) - len(labeled)}}
    atomic.write_text(root / SCENES_MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def check(root: str | Path) -> dict:
    """Check a prepared folder against its manifest and lists (files unchanged, lists consistent); returns the
    manifest."""
    root = Path(root)
    manifest = scenes_manifest(root)
    fix = f"Fix: run `python -m data_prep.folder --root {root} --classes {' '.join(manifest['class_names'])}` again."
    problems = [f"{root / rel}: missing" if not (root / rel).is_file() else f"{root / rel}: changed since prepared"
                for rel, digest in manifest["files"].items()
                if not (root / rel).is_file() or file_hash(root / rel) != digest]
    splits = root / "splits"
    train, val = read_split(splits / "train.txt"), read_split(splits / "val.txt")
    labeled = read_split(splits / SPLIT / "labeled.txt")
    if {i for i, _ in train} & {i for i, _ in val}:
        problems.append(f"{splits}: train.txt and val.txt share images")
    for i, lab in labeled + val:
        if lab not in manifest["files"]:
            problems.append(f"{root / lab}: a listed label the manifest does not know")
    if problems:
        raise DatasetError(f"{root}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:MAX_REPORT]) + f"\n{fix}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("data_prep.folder", __doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder with JPEGImages/ and SegmentationClass/")
    parser.add_argument("--classes", nargs="+", metavar="NAME", help="class names in index order, background first")
    parser.add_argument("--val", type=int, default=None, help="labeled images to validate with (default: a fifth)")
    parser.add_argument("--seed", type=int, default=0, help="draws the validation images (default 0)")
    parser.add_argument("--check", action="store_true", help="only check a prepared folder against its manifest")
    args = parser.parse_args(argv)
    return cli.run(lambda: _run(args), interrupted=lambda: "nothing half-written is left; run the command again")


def _run(args: argparse.Namespace) -> None:
    if args.check:
        manifest = check(args.root)
        print(f"ok: {args.root} matches its manifest ({len(manifest['files'])} files)")
        return
    if not args.classes:
        raise DatasetError("--classes is needed: the class names in index order, background first")
    m = prepare(args.root, args.classes, args.val, args.seed)
    c = m["counts"]
    print(f"ok: {args.root}: {c['images']} images, {c['labeled']} labeled for training, {c['val']} for validation, "
          f"{c['unlabeled']} unlabeled; classes {', '.join(m['class_names'])}. Train with "
          f"data.layout=folder data.root={args.root} data.split={SPLIT}")


if __name__ == "__main__":
    sys.exit(main())
