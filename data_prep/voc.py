"""Pascal VOC 2012 + SBD ("train_aug"), ready for training: ``python -m data_prep.voc --root DIR``.

Steps, each safe to interrupt and run again (a complete tree is left alone):

1. get ``VOCtrainval_11-May-2012.tar`` and SBD's ``benchmark.tgz`` (download
   into ``DIR/archives`` with resume and checksum, or ``--from-archives``);
2. extract VOC's ``JPEGImages``, ``SegmentationClass`` and
   ``ImageSets/Segmentation`` to ``DIR``;
3. convert SBD's ``cls/<id>.mat`` (``GTcls.Segmentation``) to palette PNGs in
   ``DIR/SegmentationClass`` for every image of ``train_aug.txt`` and
   ``val.txt`` that VOC gives no mask for (VOC's own masks win);
4. check the tree against the split lists.

``--check`` does step 4 only (``--deep`` also decodes every file).
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.common import check_split_hashes, check_tree, run_cli, save_label_png
from data_prep.download import REGISTRY, download, verify
from derprop.data.datasets import DatasetError, read_split, splits_dir
from derprop.training import atomic, cli

VOC_PREFIX = "VOCdevkit/VOC2012/"
VOC_FOLDERS = ("JPEGImages/", "SegmentationClass/", "ImageSets/Segmentation/")
SBD_CLS_PREFIX = "benchmark_RELEASE/dataset/cls/"


def archives(root: Path, from_archives: Path | None, progress: bool = True) -> dict[str, Path]:
    """Paths of the two verified archives, downloaded into ``root/archives`` unless ``from_archives`` is given."""
    found = {}
    for name in ("voc2012_trainval", "sbd"):
        resource = REGISTRY[name]
        if from_archives is None:
            found[name] = download(resource, root / "archives", progress=progress)
            continue
        path = from_archives / resource.filename
        if not path.is_file():
            raise DatasetError(
                f"{path} not found; --from-archives needs {resource.filename} there "
                f"(download it from {resource.urls[0]}), or leave out --from-archives to download it."
            )
        print(f"verifying {path} ...", flush=True)
        actual = verify(path, resource.checksum)
        if actual:
            raise DatasetError(
                f"{path} has checksum {actual}, expected {resource.checksum}: the archive is damaged or a "
                f"different release; download it again from {resource.urls[0]}."
            )
        found[name] = path
    return found


def _members(tar: tarfile.TarFile, progress: bool, desc: str):
    """Regular files of a tar stream, with a progress bar over the compressed bytes read."""
    raw = getattr(tar.fileobj, "fileobj", tar.fileobj)  # the compressed file under a gzip/bz2 stream
    total = Path(tar.name).stat().st_size
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress) as bar:
        for member in tar:
            bar.update(max(0, raw.tell() - bar.n))
            if member.isfile():
                yield member.name.removeprefix("./"), member


def extract_voc(tar_path: Path, root: Path, progress: bool = True) -> int:
    """Extract VOC's images, masks and segmentation image sets from the tar into ``root``; returns files written."""
    written = 0
    with tarfile.open(tar_path, "r:*") as tar:
        for name, member in _members(tar, progress, "extracting VOC2012"):
            rel = name.removeprefix(VOC_PREFIX)
            if rel == name or not rel.startswith(VOC_FOLDERS) or ".." in Path(rel).parts:
                continue
            target = root / rel
            if target.is_file() and target.stat().st_size == member.size:
                continue
            atomic.write_bytes(target, tar.extractfile(member).read())
            written += 1
    return written


def sbd_mat_to_label(data: bytes | str | Path) -> np.ndarray:
    """The class label map (uint8, ``H×W``) of one SBD ``cls/<id>.mat`` file (``GTcls.Segmentation``)."""
    from scipy.io import loadmat

    mat = loadmat(io.BytesIO(data) if isinstance(data, bytes) else data)
    if "GTcls" not in mat:
        raise DatasetError("not an SBD class label file: it has no GTcls struct")
    segmentation = np.asarray(mat["GTcls"]["Segmentation"][0][0])
    if segmentation.ndim != 2 or segmentation.size == 0 or segmentation.max() > 20:
        raise DatasetError(f"SBD GTcls.Segmentation has shape {segmentation.shape} / values above 20")
    return segmentation.astype(np.uint8)


def needed_ids() -> set[str]:
    """Ids of every image in ``train_aug.txt`` and ``val.txt``."""
    folder = splits_dir("pascal")
    return {Path(image).stem for path in ("train_aug.txt", "val.txt") for image, _ in read_split(folder / path)}


def convert_sbd(tgz_path: Path, root: Path, ids: set[str], progress: bool = True) -> int:
    """Write ``SegmentationClass/<id>.png`` from SBD for every id in ``ids`` that has no mask yet; returns how many."""
    masks = root / "SegmentationClass"
    todo = {i for i in ids if not (masks / f"{i}.png").is_file()}
    written = 0
    if not todo:
        return 0
    with tarfile.open(tgz_path, "r:*") as tar:
        for name, member in _members(tar, progress, "converting SBD"):
            if not (name.startswith(SBD_CLS_PREFIX) and name.endswith(".mat")):
                continue
            image_id = Path(name).stem
            if image_id not in todo:
                continue
            try:
                label = sbd_mat_to_label(tar.extractfile(member).read())
            except (DatasetError, ValueError, KeyError) as e:
                raise DatasetError(f"{tgz_path}:{name}: {e}; the archive is damaged, download it again") from e
            save_label_png(masks / f"{image_id}.png", label)
            todo.discard(image_id)
            written += 1
    return written


def prepare(root: Path, from_archives: Path | None = None, progress: bool = True) -> int:
    """Run all steps (skipping those already done); returns the number of images checked."""
    root.mkdir(parents=True, exist_ok=True)
    check_split_hashes()
    try:
        n = check_tree("pascal", root)
        print(f"{root} already holds every file of the split lists; nothing to do")
        return n
    except DatasetError:
        pass
    paths = archives(root, from_archives, progress)
    # VOC first, so that its masks win over SBD's; files already there (same size) are skipped
    n = extract_voc(paths["voc2012_trainval"], root, progress)
    print(f"VOC2012: {n} files extracted")
    n = convert_sbd(paths["sbd"], root, needed_ids(), progress)
    print(f"SBD: {n} masks converted")
    return check_tree("pascal", root)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("data_prep.voc", __doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="dataset root (JPEGImages/ etc. end up here)")
    parser.add_argument("--from-archives", type=Path, help="folder holding the two archives already (no download)")
    return run_cli(parser, "pascal", "VOC",
                   lambda args: prepare(args.root, args.from_archives, progress=not args.quiet), argv)


if __name__ == "__main__":
    sys.exit(main())
