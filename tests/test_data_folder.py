"""Your own images (data_prep.folder and data.layout=folder): checked, split, read, trained on, refused when wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import folder
from derprop.data.datasets import DatasetError, SegmentationDataset, class_names, label_png_bytes, split_items
from derprop.training.config import dataset_classes
from derprop.training.configfile import load_config
from derprop.training.distributed import setup_distributed
from derprop.training.loaders import build_training_data, diagnostic_set

CLASSES = ["background", "square", "disc"]


def make_folder(root: Path, n: int = 10, labeled: int = 6, size: int = 32) -> Path:
    """``n`` images of a square or a disc on noise, the first ``labeled`` with their label PNGs."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for k in range(n):
        label = np.zeros((size, size), np.uint8)
        c = size // 2 + rng.integers(-4, 5, 2)
        if k % 2:
            label[(yy - c[0]) ** 2 + (xx - c[1]) ** 2 < 64] = 2
        else:
            label[c[0] - 7:c[0] + 7, c[1] - 7:c[1] + 7] = 1
        image = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        image[label > 0] = (200, 60, 60) if k % 2 else (60, 60, 200)
        Image.fromarray(image).save(root / "JPEGImages" / f"img{k:02d}.jpg", quality=95)
        if k < labeled:
            (root / "SegmentationClass" / f"img{k:02d}.png").write_bytes(label_png_bytes(label))
    return root


def test_a_folder_is_checked_split_and_read(tmp_path, capsys):
    root = make_folder(tmp_path / "mine")
    assert folder.main(["--root", str(root), "--classes", *CLASSES, "--val", "2"]) == 0
    assert "10 images, 4 labeled for training, 2 for validation, 4 unlabeled" in capsys.readouterr().out
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["class_names"] == CLASSES and len(manifest["files"]) == 16  # 10 images + 6 labels
    val, labeled = split_items("folder", None, "val", root), split_items("folder", "labeled", "labeled", root)
    unlabeled = split_items("folder", "labeled", "unlabeled", root)
    assert len(val) == 2 and len(labeled) == 4 and len(unlabeled) == 4
    assert not {i for i, _ in val} & {i for i, _ in labeled + unlabeled}
    assert class_names("folder", root, unlabeled) == tuple(CLASSES)  # unlabeled images have no label file
    images = SegmentationDataset.from_split("folder", root, "labeled", "unlabeled")
    assert images[0].shape == (3, 32, 32)
    assert dataset_classes({"layout": "folder", "root": str(root)}) == 3
    assert folder.main(["--check", "--root", str(root)]) == 0


def test_training_reads_a_folder_and_skips_diagnostics_without_labels(tmp_path, repo):
    root = make_folder(tmp_path / "mine")
    folder.prepare(root, CLASSES, val=2)
    cfg = load_config(repo / "configs" / "cpu_scenes_tiny.yaml",
                      [f"data.root={root}", "data.layout=folder", "data.split=labeled", "data.val_limit=null"])
    assert cfg.model.num_classes == 3
    data = build_training_data(cfg, setup_distributed("cpu"))
    assert (len(data.train_l), len(data.train_u), len(data.val_set)) == (4, 4, 2)
    assert diagnostic_set(cfg) is None  # the unlabeled images' labels do not exist


def test_bad_labels_are_reported_with_their_files_before_anything_is_written(tmp_path, capsys):
    root = make_folder(tmp_path / "mine")
    bad = np.full((32, 32), 7, np.uint8)  # class 7 of three
    (root / "SegmentationClass" / "img00.png").write_bytes(label_png_bytes(bad))
    (root / "SegmentationClass" / "img01.png").write_bytes(label_png_bytes(np.zeros((16, 32), np.uint8)))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "SegmentationClass" / "img02.png")  # RGB
    (root / "SegmentationClass" / "orphan.png").write_bytes(label_png_bytes(np.zeros((32, 32), np.uint8)))
    assert folder.main(["--root", str(root), "--classes", *CLASSES]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "4 problem(s)" in err
    for name in ("img00.png holds values 7", "img01.png is 32×16", "img02.png has mode 'RGB'", "orphan.png: no image"):
        assert name in err, name
    assert not (root / "splits").exists() and not (root / "manifest.json").exists()


def test_too_few_labels_and_wrong_arguments_say_what_to_do(tmp_path):
    root = make_folder(tmp_path / "mine", labeled=1)
    with pytest.raises(DatasetError, match="at least two"):
        folder.prepare(root, CLASSES)
    with pytest.raises(DatasetError, match="two or more distinct names"):
        folder.prepare(root, ["background", "background"])
    with pytest.raises(DatasetError, match="is not a folder"):
        folder.prepare(tmp_path / "empty", CLASSES)
    root = make_folder(tmp_path / "two", labeled=3)
    with pytest.raises(DatasetError, match="--val 3"):
        folder.prepare(root, CLASSES, val=3)


def test_a_changed_file_is_noticed(tmp_path, capsys):
    root = make_folder(tmp_path / "mine")
    folder.prepare(root, CLASSES)
    shutil.copy(root / "JPEGImages" / "img09.jpg", root / "JPEGImages" / "img08.jpg")
    assert folder.main(["--check", "--root", str(root)]) == 2
    assert "img08.jpg: changed since prepared" in capsys.readouterr().err
