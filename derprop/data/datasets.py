"""Datasets: one loader for Pascal VOC, Cityscapes and the CPU scenes.

Explained in the book chapters *Training on a CPU* (the scenes) and *Full reproduction on a GPU*
(VOC, Cityscapes). Every dataset is a root directory plus
split lists in UniMatch's format, one ``<image path> <label path>`` pair a
line, both relative to the root:

- ``pascal``: the VOC 2012 + SBD tree that ``python -m data_prep.voc`` makes
  (``JPEGImages/*.jpg``, ``SegmentationClass/*.png`` palette PNGs). Lists in
  ``data_prep/splits/pascal``.
- ``cityscapes``: the official tree (``leftImg8bit/``, ``gtFine/``) with the
  ``*_gtFine_labelTrainIds.png`` that ``python -m data_prep.cityscapes``
  makes. Lists in ``data_prep/splits/cityscapes``. A ``*_labelIds.png``
  label is mapped to train ids on reading.
- ``scenes``: the CPU dataset of real images composed into scenes, in VOC
  layout (``python -m data_prep.scenes``); its lists are in ``<root>/splits``.
- ``folder``: the reader's own images in VOC layout, labels for some of them
  (``python -m data_prep.folder``, book appendix *Your own data*); its lists
  and manifest are in the folder, as a scenes tree's.

Labels are single-channel PNGs of class indices (palette PNGs read as their
indices, never their colours), with 255 = ignore. Every bad input raises
:class:`DatasetError`, naming the file and how to fix it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from derprop.data.labels import CITYSCAPES_CLASSES, IGNORE_INDEX, VOC_CLASSES, default_class_names, voc_palette
from derprop.errors import DerPropError
from derprop.provenance import source

SPLITS_DIR = source() / "data_prep" / "splits"
"""UniMatch's split lists for VOC and Cityscapes (see its README)."""

LABELED_KINDS = ("labeled", "val")
KINDS = ("labeled", "unlabeled", "train", "val")


class DatasetError(DerPropError, ValueError):
    """A dataset file or split list is missing or wrong; the message says which and how to fix it."""


def label_png_bytes(label: np.ndarray) -> bytes:
    """Encode an ``H×W`` uint8 index array as a VOC palette PNG (reads back as the same indices)."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label must be a 2-D uint8 array, got {label.dtype} {label.shape}")
    im = Image.fromarray(label)
    im.putpalette(voc_palette())  # mode L becomes P; the indices stay as they are
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# Cityscapes label id -> train id (cityscapesscripts/helpers/labels.py; a test
# checks this table against it). Ids 0..33 exist; 255 marks "ignore".
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                         24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
NUM_CITYSCAPES_IDS = 34


def cityscapes_id_to_train_id() -> np.ndarray:
    """Lookup table (256 entries, uint8) from Cityscapes label ids to train ids.

    Ids outside 0..33 map to 254, a value no label may hold, so that the
    range check of :func:`read_label` reports them.
    """
    lut = np.full(256, 254, dtype=np.uint8)
    lut[:NUM_CITYSCAPES_IDS] = IGNORE_INDEX
    for label_id, train_id in _CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


@dataclass(frozen=True)
class DatasetSpec:
    """What the loader needs to know about one dataset layout."""

    name: str
    num_classes: int
    class_names: tuple[str, ...]
    train_list: str  # all training images; unlabeled = this minus the labeled list
    labeled_splits: tuple[str, ...]
    prepare: str  # the command that (re)creates the tree; ``{root}`` is filled in


DATASETS = {
    "pascal": DatasetSpec(
        "pascal", 21, VOC_CLASSES, "train_aug.txt", ("92", "183", "366", "732", "1464"),
        "python -m data_prep.voc --root {root}",
    ),
    "cityscapes": DatasetSpec(
        "cityscapes", 19, CITYSCAPES_CLASSES, "train.txt", ("1_16", "1_8", "1_4"),
        "python -m data_prep.cityscapes --root {root} --from-zips DIR",
    ),
    "scenes": DatasetSpec(
        "scenes", 11, ("background",) + tuple(f"class {i}" for i in range(10)), "train.txt",
        ("1_16", "1_8", "1_4"), "python -m data_prep.scenes --root {root}",
    ),
    "folder": DatasetSpec(
        "folder", 2, ("background", "object"), "train.txt", ("labeled",),
        "python -m data_prep.folder --root {root} --classes NAME NAME ...",
    ),
}

TREE_LAYOUTS = ("scenes", "folder")
"""Layouts whose tree carries its own split lists (``<root>/splits``) and a manifest of its classes and files."""


def labeled_splits(name: str, root: str | Path | None = None) -> tuple[str, ...]:
    """The labeled splits of a dataset: the layout's, or for a scenes tree those its manifest records
    (``python -m data_prep.scenes --splits``)."""
    if name in TREE_LAYOUTS and root is not None:
        return tuple(scenes_manifest(root)["settings"].get("splits") or dataset_spec(name).labeled_splits)
    return dataset_spec(name).labeled_splits


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


SCENES_MANIFEST = "manifest.json"
"""What ``python -m data_prep.scenes`` writes last: its settings, class names and the sha256 of every file."""
SCENES_IN_PROGRESS = ".scenes-in-progress"
"""Present in a scenes root while the generator swaps a new tree in (a kill leaves it)."""


def scenes_manifest(root: str | Path) -> dict:
    """The manifest of a finished scenes tree; a tree in the making, or without a readable manifest, raises
    :class:`DatasetError` naming the fix."""
    root = Path(root)
    fix = (f"Fix: run the `python -m data_prep.scenes --root {root} ...` that made it again (same options), "
           f"or `python -m data_prep.scenes --check --root {root}` to list the problems.")
    if (root / SCENES_IN_PROGRESS).exists():
        raise DatasetError(f"the scenes tree {root} is half-made: its generation is in progress or was interrupted "
                           f"({root / SCENES_IN_PROGRESS} exists). {fix}")
    path = root / SCENES_MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing: {root} is not a finished scenes tree. {fix}") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} is unreadable ({e}). {fix}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest.get("class_names"):
        raise DatasetError(f"{path} is not a manifest of python -m data_prep.scenes. {fix}")
    return manifest


def manifest_sha256(name: str, root: str | Path) -> str | None:
    """The sha256 of a scenes tree's manifest (which holds the hash of every file: the data a run trained on),
    recorded in every checkpoint and ``results.json``; None for a tree without one (VOC, Cityscapes)."""
    path = Path(root) / SCENES_MANIFEST
    if name not in TREE_LAYOUTS or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_classes(root: str | Path) -> int | None:
    """How many classes the scenes tree at ``root`` has, by its manifest; None without a readable one (the tree is
    not made yet: training and evaluation then refuse it with :func:`scenes_manifest`'s message)."""
    try:
        names = json.loads((Path(root) / SCENES_MANIFEST).read_text(encoding="utf-8")).get("class_names")
    except (OSError, ValueError, AttributeError):
        return None
    return len(names) if isinstance(names, list) and len(names) >= 2 else None


def fits_tree(tree_classes: int, model_classes: int, set_in_config: bool) -> bool:
    """Whether a model of ``model_classes`` classes trains, or is evaluated, on a tree of ``tree_classes``: one
    rule for both. The counts are equal, or the model has more because the config sets ``data.num_classes``
    itself (a benchmark sizes the head as VOC's); the extra classes stay unused, and a label above the tree's
    classes is still an error."""
    return tree_classes == model_classes or (set_in_config and tree_classes < model_classes)


def class_names(name: str, root: str | Path | None = None, items: Sequence[tuple[str, str]] = ()) -> tuple[str, ...]:
    """Class names of a dataset; for a scenes or folder tree, those its manifest records (:func:`scenes_manifest`),
    after checking that the manifest lists every file of ``items`` that exists (else it is stale: the tree changed
    after it; an unlabeled image of a folder tree has no label file)."""
    if name not in TREE_LAYOUTS or root is None:
        return dataset_spec(name).class_names
    manifest = scenes_manifest(root)
    stale = next((rel for pair in items for rel in pair
                  if rel not in manifest["files"] and (Path(root) / rel).exists()), None)
    if stale is not None:
        again = (f"python -m data_prep.scenes --root {root} --force ..." if name == "scenes"
                 else f"python -m data_prep.folder --root {root} --classes ...")
        raise DatasetError(f"{Path(root) / SCENES_MANIFEST} is stale: it does not list {Path(root) / stale}. "
                           f"Fix: regenerate the tree ({again}).")
    return tuple(manifest["class_names"])


DATASET_FOLDERS = (("JPEGImages", "SegmentationClass"), ("leftImg8bit", "gtFine"))
"""The folder pairs that make a dataset root: VOC layout (pascal, scenes) and Cityscapes."""


def dataset_tree_of(path: str | Path) -> Path | None:
    """The dataset root (:data:`DATASET_FOLDERS`) that ``path`` lies in, or None."""
    for folder in Path(path).resolve().parents:
        if any(all((folder / name).is_dir() for name in pair) for pair in DATASET_FOLDERS):
            return folder
    return None


def fix_hint(name: str, root: str | Path) -> str:
    """The sentence that error messages end with: how to (re)create or check the tree."""
    command = dataset_spec(name).prepare.format(root=root)
    check = f"{command.split(' --root')[0]} --check --root {root}"
    return (
        f"Fix: run `{command}` to recreate missing files (delete damaged ones first), "
        f"or `{check}` to list every problem."
    )


def splits_dir(name: str, root: str | Path | None = None) -> Path:
    """Directory of a dataset's split lists: ``data_prep/splits/<name>``, or ``<root>/splits`` for a scenes or
    folder tree."""
    dataset_spec(name)
    if name in TREE_LAYOUTS:
        if root is None:
            raise DatasetError(f"the {name} dataset keeps its split lists under its root; pass root")
        return Path(root) / "splits"
    return SPLITS_DIR / name


# ---------------------------------------------------------------------------
# Split lists
# ---------------------------------------------------------------------------


def read_split(path: str | Path) -> list[tuple[str, str]]:
    """Read a split list: one ``<image path> <label path>`` pair a line, relative paths.

    Blank lines and a leading byte-order mark are skipped; any other line that is not exactly two
    relative paths, or that lists an image a line above lists already (it would count twice), raises
    :class:`DatasetError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"split list {path} does not exist; check the dataset name and split")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # an editor's byte-order mark is not part of the first path
    except UnicodeDecodeError as e:
        raise DatasetError(f"split list {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                           "save it as UTF-8") from None
    items = []
    seen: dict[str, int] = {}  # image → the line that lists it
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DatasetError(
                f"{path}, line {n}: expected 2 paths '<image> <label>', found {len(fields)}: {line.strip()!r}; "
                "fix the line (paths must not contain spaces)"
            )
        for field in fields:
            if Path(field).is_absolute() or ".." in Path(field).parts:
                raise DatasetError(
                    f"{path}, line {n}: {field!r} must be a path relative to the dataset root, without '..'"
                )
        if fields[0] in seen:
            raise DatasetError(f"{path}, line {n}: {fields[0]!r} is listed again (first on line {seen[fields[0]]}); "
                               "an image is listed once: remove the repeated line")
        seen[fields[0]] = n
        items.append((fields[0], fields[1]))
    if not items:
        raise DatasetError(f"split list {path} is empty")
    return items


def derive_unlabeled(train: Sequence[tuple[str, str]], labeled: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """All training pairs minus the labeled ones, in the training list's order (UniMatch's rule)."""
    taken = {image for image, _ in labeled}
    return [item for item in train if item[0] not in taken]


def split_items(
    name: str, split: str | None = None, kind: str = "labeled", root: str | Path | None = None
) -> list[tuple[str, str]]:
    """The ``(image, label)`` pairs of one split of a dataset.

    ``kind``: ``"labeled"`` (the split's labeled list), ``"unlabeled"`` (train
    minus labeled), ``"train"`` (all training images) or ``"val"``. ``split``
    names the labeled subset (``"92"`` ... ``"1464"`` for pascal, ``"1_16"``,
    ``"1_8"``, ``"1_4"`` for cityscapes and scenes); it is needed for the
    first two kinds only.
    """
    spec = dataset_spec(name)
    if kind not in KINDS:
        raise DatasetError(f"unknown split kind {kind!r}; choose one of {KINDS}")
    folder = splits_dir(name, root)
    if kind == "val":
        return read_split(folder / "val.txt")
    train = read_split(folder / spec.train_list)
    if kind == "train":
        return train
    known = labeled_splits(name, root)
    if split not in known:
        raise DatasetError(f"unknown {name} split {split!r}; choose one of {known}")
    labeled = read_split(folder / split / "labeled.txt")
    return labeled if kind == "labeled" else derive_unlabeled(train, labeled)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _decoded(path: Path, what: str, fix: str) -> Image.Image:
    """``path`` opened and fully decoded, so that a truncated file fails here and not later."""
    if path.is_dir():
        raise DatasetError(f"{what} {path} is a folder; name a file in it. {fix}".strip())
    if not path.is_file():
        raise DatasetError(f"missing {what} {path}. {fix}".strip())
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()  # the pixels outlive the file (a multi-frame one stays open until closed)
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{what} {path} is too large to read ({e}); resize it. {fix}".strip()) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot decode {what} {path} ({e}); the file is truncated or corrupt. {fix}".strip()) from e


def read_image(path: str | Path, fix: str = "") -> np.ndarray:
    """Decode an image file fully to an ``H×W×3`` uint8 array; a missing or damaged one raises :class:`DatasetError`.

    16-bit greyscale images are scaled to 8 bits (PIL's own conversion would clip them to 0 and 255);
    32-bit integer images must hold 16-bit values; floating-point images are refused.
    """
    path = Path(path)
    im = _decoded(path, "image", fix)
    if im.mode == "F":
        raise DatasetError(f"image {path} holds floating-point pixels (mode 'F'); save it as 8-bit RGB. {fix}".strip())
    if not im.mode.startswith("I"):
        return np.array(im.convert("RGB"))
    grey = np.array(im).astype(np.int64)
    if grey.size and (grey.min() < 0 or grey.max() > 65535):
        raise DatasetError(f"image {path} holds values outside 0..65535 (mode {im.mode!r}); save it as 8-bit RGB. "
                           f"{fix}".strip())
    return np.repeat(np.rint(grey / 257).astype(np.uint8)[..., None], 3, axis=2)


def read_label(path: str | Path, num_classes: int, fix: str = "") -> np.ndarray:
    """Read a label PNG as an ``H×W`` uint8 array of class indices in ``{0..C-1, 255}``.

    Palette PNGs (mode ``P``, VOC and scenes) give their indices, not their
    colours; grey PNGs (mode ``L``, Cityscapes) their values. A Cityscapes
    ``*_labelIds.png`` is mapped to train ids. Any other value raises
    :class:`DatasetError` naming the file.
    """
    path = Path(path)
    im = _decoded(path, "label", fix)
    mode = im.mode
    label = np.array(im)
    if mode not in ("P", "L"):
        raise DatasetError(
            f"label {path} has mode {mode!r}; labels must be single-channel PNGs of class indices "
            f"(mode 'P' palette or 'L'), not colour images. {fix}".strip()
        )
    if path.name.endswith("_labelIds.png"):
        label = cityscapes_id_to_train_id()[label]
    valid = np.zeros(256, dtype=bool)
    valid[:num_classes] = True
    valid[IGNORE_INDEX] = True
    bad = np.unique(label[~valid[label]])
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise DatasetError(
            f"label {path} holds values {shown} outside 0..{num_classes - 1} and {IGNORE_INDEX} (ignore); "
            f"it is not a label of this dataset or is corrupt. {fix}".strip()
        )
    return label


# ---------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------


class SegmentationDataset(Dataset):
    """Images (and labels) listed as ``(image, label)`` pairs relative to ``root``.

    ``labeled=True``: items are ``(tv_tensors.Image, tv_tensors.Mask)``, passed
    through ``transforms(image, mask)``; the mask is int64 with 255 = ignore
    and has the image's size (checked). ``labeled=False``: items are a
    ``tv_tensors.Image``, passed through ``transforms(image)``; label paths
    are not read. Images are uint8, ``3×H×W``. A label's values must be below
    ``label_classes`` (default ``num_classes``): a tree of fewer classes than
    the model (:func:`fits_tree`) keeps its labels to its own classes.
    """

    def __init__(
        self,
        root: str | Path,
        items: Sequence[tuple[str, str]],
        *,
        num_classes: int,
        labeled: bool = True,
        transforms: Callable | None = None,
        class_names: Sequence[str] | None = None,
        fix: str = "",
        label_classes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.items = list(items)
        self.num_classes = num_classes
        self.labeled = labeled
        self.transforms = transforms
        self.class_names = tuple(class_names) if class_names else default_class_names(num_classes)
        self.label_classes = label_classes or num_classes
        self.fix = fix
        if not self.root.is_dir():
            raise DatasetError(f"dataset root {self.root} does not exist. {fix}".strip())

    @classmethod
    def from_split(
        cls,
        name: str,
        root: str | Path,
        split: str | None = None,
        kind: str = "labeled",
        transforms: Callable | None = None,
    ) -> SegmentationDataset:
        """A dataset from its name (``pascal``, ``cityscapes``, ``scenes``), root and split, with the tree's classes
        (:func:`class_names`).

        ``kind`` is ``labeled``, ``unlabeled``, ``train`` or ``val`` (see
        :func:`split_items`); ``unlabeled`` and ``train`` give images only.
        """
        items = split_items(name, split, kind, root)
        names = class_names(name, root, items)
        return cls(root, items, num_classes=len(names), labeled=kind in LABELED_KINDS, transforms=transforms,
                   class_names=names, fix=fix_hint(name, root))

    def __len__(self) -> int:
        return len(self.items)

    def name(self, index: int) -> str:
        """The image's file name without extension (its id)."""
        return Path(self.items[index][0]).stem

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The raw ``H×W×3`` image and ``H×W`` label arrays (label ``None`` when unlabeled), validated."""
        image_rel, label_rel = self.items[index]
        image = read_image(self.root / image_rel, self.fix)
        if not self.labeled:
            return image, None
        label = read_label(self.root / label_rel, self.label_classes, self.fix)
        if label.shape != image.shape[:2]:
            raise DatasetError(
                f"label {self.root / label_rel} is {label.shape[1]}×{label.shape[0]} but its image "
                f"{self.root / image_rel} is {image.shape[1]}×{image.shape[0]}; they must match. {self.fix}".strip()
            )
        return image, label

    def __getitem__(self, index: int):
        image, label = self.load(index)
        image = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous())
        if label is None:
            return self.transforms(image) if self.transforms else image
        mask = tv_tensors.Mask(torch.from_numpy(label.astype(np.int64)))
        return self.transforms(image, mask) if self.transforms else (image, mask)

    def missing_files(self) -> list[Path]:
        """Files the split lists name that do not exist (cheap: no decoding)."""
        missing = []
        for image_rel, label_rel in self.items:
            for rel in (image_rel, label_rel) if self.labeled else (image_rel,):
                if not (self.root / rel).is_file():
                    missing.append(self.root / rel)
        return missing
