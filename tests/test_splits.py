"""The shipped split lists (UniMatch's): hashes, counts, and the subset / disjointness rules."""

from __future__ import annotations

import shutil

import pytest

from data_prep.common import check_split_hashes
from derprop.data.datasets import DATASETS, SPLITS_DIR, DatasetError, read_split, split_items

COUNTS = {
    "pascal": {"92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464, "train": 10582, "val": 1449},
    "cityscapes": {"1_16": 186, "1_8": 372, "1_4": 744, "train": 2975, "val": 500},
}


def test_hashes_match_and_licence_is_kept():
    check_split_hashes()
    assert (SPLITS_DIR / "LICENSE.UniMatch-splits").read_text().startswith("MIT License")
    assert "UniMatch" in (SPLITS_DIR / "README.md").read_text()
    listed = {line.split()[1].removeprefix("./") for line in (SPLITS_DIR / "SHA256SUMS").read_text().splitlines()}
    shipped = {p.relative_to(SPLITS_DIR).as_posix() for p in SPLITS_DIR.rglob("*.txt")}
    assert listed == shipped


@pytest.mark.parametrize("name", ["pascal", "cityscapes"])
def test_counts_and_rules(name):
    counts = COUNTS[name]
    train = split_items(name, kind="train")
    val = split_items(name, kind="val")
    assert len(train) == len(set(train)) == counts["train"]
    assert len(val) == len(set(val)) == counts["val"]
    assert not {i for i, _ in train} & {i for i, _ in val}, "val ∩ train must be empty"
    for split in DATASETS[name].labeled_splits:
        labeled = split_items(name, split, "labeled")
        unlabeled = split_items(name, split, "unlabeled")
        assert len(labeled) == len(set(labeled)) == counts[split]
        assert set(labeled) <= set(train), f"{name}/{split}: labeled ⊄ train"
        assert len(unlabeled) == counts["train"] - counts[split]
        assert not set(labeled) & set(unlabeled)


def test_pascal_labeled_lists_come_from_voc_train():
    # all five labeled subsets are images of VOC's own 1,464 (1464/labeled.txt is that list)
    voc_train = set(read_split(SPLITS_DIR / "pascal/1464/labeled.txt"))
    for split in ("92", "183", "366", "732"):
        assert set(split_items("pascal", split)) <= voc_train


def test_cityscapes_labels_are_train_ids():
    for image, label in split_items("cityscapes", kind="train") + split_items("cityscapes", kind="val"):
        assert image.endswith("_leftImg8bit.png") and label.endswith("_gtFine_labelTrainIds.png")
        assert image.replace("leftImg8bit", "gtFine", 1).rsplit("_", 1)[0] == label.rsplit("_", 2)[0]


def test_tampered_list_is_detected(tmp_path):
    copy = tmp_path / "splits"
    shutil.copytree(SPLITS_DIR, copy)
    target = copy / "pascal/92/labeled.txt"
    target.chmod(0o644)
    target.write_text(target.read_text() + "JPEGImages/x.jpg SegmentationClass/x.png\n")
    with pytest.raises(DatasetError, match="92/labeled.txt"):
        check_split_hashes(copy)
