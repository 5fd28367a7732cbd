"""Cityscapes, ready for training: ``python -m data_prep.cityscapes --root DIR --from-archives DIR``.

Cityscapes needs a login at https://www.cityscapes-dataset.com, so there are two ways in:

- ``--from-archives DIR``: the two official archives you downloaded,
  ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``;
- ``--download``: ``cityscapesscripts``' downloader (``csDownload``) fetches
  them into ``DIR/archives`` with your credentials (it asks for them, or
  reads the ones it stored).

Then the train and val parts are extracted into ``DIR`` (the zip's CRC of
every file is checked while reading), ``*_gtFine_labelTrainIds.png`` are
made from the polygons with ``cityscapesscripts`` (as its
``csCreateTrainIdLabelImgs`` does), and the tree is checked against the split
lists. ``--check`` only checks. Each step is safe to interrupt and rerun.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from data_prep.common import check_split_hashes, check_tree, run_cli
from derprop.data.datasets import DatasetError
from derprop.training import atomic, cli

ZIPS = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
PARTS = ("train/", "val/")  # the test part has no public labels; it is not extracted


def _cityscapesscripts():
    try:
        import cityscapesscripts  # noqa: F401
    except ImportError as e:
        raise DatasetError(
            "cityscapesscripts is not installed; `pip install cityscapesscripts` (it makes the train-id labels)"
        ) from e


def download_zips(dest: Path) -> Path:
    """Fetch both zips with cityscapesscripts' downloader (asks for your Cityscapes login); resumes."""
    _cityscapesscripts()
    from cityscapesscripts.download import downloader

    dest.mkdir(parents=True, exist_ok=True)
    session = downloader.login()
    missing = [name for name in ZIPS if not (dest / (name + ".done")).is_file()]
    if missing:
        downloader.download_packages(session=session, package_names=missing, destination_path=str(dest), resume=True)
        for name in missing:  # download_packages raises on an md5 mismatch, so reaching here means verified
            (dest / (name + ".done")).write_text("md5 verified by cityscapesscripts\n")
    return dest


def extract(zip_path: Path, root: Path, progress: bool = True) -> int:
    """Extract the train/val members of one official zip into ``root``; returns files written."""
    if not zip_path.is_file():
        raise DatasetError(
            f"{zip_path} not found; download {zip_path.name} from https://www.cityscapes-dataset.com/downloads/ "
            "(login needed) into that folder, or use --download"
        )
    written = 0
    try:
        with zipfile.ZipFile(zip_path) as z:
            members = [
                m for m in z.infolist()
                if not m.is_dir() and m.filename.split("/", 1)[-1].startswith(PARTS) and ".." not in m.filename
            ]  # fmt: skip
            if not members:
                raise DatasetError(f"{zip_path} holds no train/ or val/ files; is it {zip_path.name} from Cityscapes?")
            for m in tqdm(members, desc=f"extracting {zip_path.name}", unit="file", disable=not progress):
                target = root / m.filename
                if target.is_file() and target.stat().st_size == m.file_size:
                    continue
                atomic.write_bytes(target, z.read(m))  # ZipFile.read checks the member's CRC
                written += 1
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{zip_path} is damaged ({e}); download it again") from e
    return written


def polygons_to_train_ids(json_path: str | Path) -> bytes:
    """PNG bytes of the train-id label image that cityscapesscripts draws from one ``*_polygons.json``."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    annotation = Annotation()
    annotation.fromJsonFile(str(json_path))
    buf = io.BytesIO()
    createLabelImage(annotation, "trainIds").save(buf, format="PNG")
    return buf.getvalue()


def _convert_one(json_path: Path) -> None:
    try:
        png = polygons_to_train_ids(json_path)
    except (SystemExit, Exception) as e:  # cityscapesscripts calls sys.exit on an unknown label
        raise DatasetError(f"cannot convert {json_path} ({e!r}); re-extract it from gtFine_trainvaltest.zip") from None
    atomic.write_bytes(str(json_path).replace("_polygons.json", "_labelTrainIds.png"), png)


def make_train_ids(root: Path, workers: int | None = None, progress: bool = True) -> int:
    """Create the missing ``*_gtFine_labelTrainIds.png`` under ``root/gtFine/{train,val}``; returns how many."""
    _cityscapesscripts()
    todo = [
        p for part in PARTS for p in sorted((root / "gtFine" / part).glob("*/*_gtFine_polygons.json"))
        if not Path(str(p).replace("_polygons.json", "_labelTrainIds.png")).is_file()
    ]  # fmt: skip
    if not todo:
        return 0
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(todo) < 8:
        for p in tqdm(todo, desc="labelTrainIds", unit="file", disable=not progress):
            _convert_one(p)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(tqdm(pool.map(_convert_one, todo, chunksize=16), total=len(todo), desc="labelTrainIds",
                      unit="file", disable=not progress))  # fmt: skip
    return len(todo)


def prepare(root: Path, from_archives: Path | None = None, download: bool = False, progress: bool = True) -> int:
    root.mkdir(parents=True, exist_ok=True)
    check_split_hashes()
    if download:
        from_archives = download_zips(root / "archives")
    if from_archives is None:
        raise DatasetError(
            "Cityscapes needs a login: download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
            "https://www.cityscapes-dataset.com/downloads/ and pass their folder with --from-archives, "
            "or pass --download to fetch them with your credentials (cityscapesscripts' csDownload)"
        )
    for name in ZIPS:
        print(f"{name}: {extract(from_archives / name, root, progress)} files extracted")
    print(f"labelTrainIds: {make_train_ids(root, progress=progress)} made")
    return check_tree("cityscapes", root)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("data_prep.cityscapes", __doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="dataset root (leftImg8bit/, gtFine/ end up here)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--from-archives", type=Path, help="folder holding the two official zips")
    source.add_argument("--download", action="store_true", help="fetch the zips with csDownload (needs a login)")
    return run_cli(parser, "cityscapes", "Cityscapes",
                   lambda args: prepare(args.root, args.from_archives, args.download, progress=not args.quiet), argv)


if __name__ == "__main__":
    sys.exit(main())
