"""The loader (derprop.data.datasets): layouts, palette decoding, train ids, and every bad input named clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from derprop.data import datasets as data
from derprop.data.datasets import (DatasetError, SegmentationDataset, cityscapes_id_to_train_id, read_image, read_label,
                                   read_split)
from derprop.data.labels import CITYSCAPES_CLASSES, IGNORE_INDEX, voc_palette
from tests.fixtures import bomb_png, cityscapes_tree, scenes_tree, voc_pair, voc_samples, voc_tree


@pytest.fixture
def voc(tmp_path, monkeypatch):
    root, splits = voc_tree(tmp_path)
    monkeypatch.setattr(data, "SPLITS_DIR", splits)
    return root


def test_real_voc_image_loads_with_its_label(voc):
    ds = SegmentationDataset.from_split("pascal", voc, "92", "labeled")
    assert len(ds) == 1 and ds.class_names[15] == "person"
    image, mask = ds[0]
    assert isinstance(image, tv_tensors.Image) and isinstance(mask, tv_tensors.Mask)
    assert image.dtype == torch.uint8 and image.shape == (3, 375, 500)
    assert mask.dtype == torch.int64 and mask.shape == (375, 500)
    expected_image, expected_label = voc_samples()["2007_000001"]
    assert (mask.numpy() == expected_label).all()
    assert set(np.unique(mask.numpy())) == {0, 5, 9, 11, 15}  # background, bottle, chair, diningtable, person
    assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - expected_image).mean() < 3  # JPEG round trip


def test_kinds_unlabeled_and_val(voc):
    unlabeled = SegmentationDataset.from_split("pascal", voc, "92", "unlabeled")
    assert unlabeled.items == [voc_pair("2007_000002")] and not unlabeled.labeled
    image = unlabeled[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 200, 300)
    val = SegmentationDataset.from_split("pascal", voc, kind="val")
    _, mask = val[0]
    assert mask.shape == (375, 250)
    crop = SegmentationDataset.from_split("pascal", voc, kind="train")[1]
    assert isinstance(crop, tv_tensors.Image)  # "train" lists all training images, as unlabeled
    labeled_crop = SegmentationDataset(voc, [voc_pair("2007_000002")], num_classes=21)
    assert (labeled_crop[0][1][:3] == IGNORE_INDEX).all()  # 255 (ignore) is a valid label value


def test_transforms_see_image_and_mask_together(voc):
    t = v2.Compose([v2.RandomCrop(64), v2.RandomHorizontalFlip(1.0)])
    ds = SegmentationDataset.from_split("pascal", voc, "92", "labeled", transforms=t)
    torch.manual_seed(0)
    image, mask = ds[0]
    assert image.shape == (3, 64, 64) and mask.shape == (64, 64) and isinstance(mask, tv_tensors.Mask)
    unlabeled = SegmentationDataset.from_split("pascal", voc, "92", "unlabeled", transforms=v2.Resize(32))
    assert unlabeled[0].shape == (3, 32, 48)


def test_palette_png_is_read_as_indices_not_colours(tmp_path):
    label = np.array([[0, 1, 2], [15, 20, 255]], dtype=np.uint8)
    im = Image.fromarray(label)
    im.putpalette(voc_palette())
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert (read_label(tmp_path / "p.png", 21) == label).all()
    Image.open(tmp_path / "p.png").convert("RGB").save(tmp_path / "rgb.png")
    with pytest.raises(DatasetError, match=r"rgb\.png.*mode 'RGB'"):
        read_label(tmp_path / "rgb.png", 21)


def test_cityscapes_id_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels

    lut = cityscapes_id_to_train_id()
    for label in labels:
        if 0 <= label.id < 34:
            expected = label.trainId if 0 <= label.trainId < 19 else IGNORE_INDEX
            assert lut[label.id] == expected, label.name
    assert [lbl.name for lbl in sorted(labels, key=lambda x: x.trainId) if 0 <= lbl.trainId < 19] == list(
        CITYSCAPES_CLASSES
    )


def test_cityscapes_tree_and_label_ids_are_mapped_to_train_ids(tmp_path, monkeypatch):
    root, splits = cityscapes_tree(tmp_path, train_ids=True)
    monkeypatch.setattr(data, "SPLITS_DIR", splits)
    ds = SegmentationDataset.from_split("cityscapes", root, "1_16", "labeled")
    image, mask = ds[0]
    assert image.shape == (3, 32, 64) and set(np.unique(mask.numpy())) == {0, 10, 13, 18, 255}
    # the same polygons drawn as raw label ids (*_labelIds.png) read as the same train ids
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    polygons = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json"
    annotation = Annotation()
    annotation.fromJsonFile(str(polygons))
    ids_png = tmp_path / "aachen_000000_000019_gtFine_labelIds.png"
    createLabelImage(annotation, "ids").save(ids_png)
    raw = np.array(Image.open(ids_png))
    assert 26 in raw and 33 in raw  # car, bicycle as label ids
    assert (read_label(ids_png, 19) == mask.numpy()).all()
    bad = raw.copy()
    bad[0, 0] = 40  # no such Cityscapes id
    Image.fromarray(bad).save(ids_png)
    with pytest.raises(DatasetError, match="labelIds.png holds values 254"):
        read_label(ids_png, 19)


def test_scenes_are_read_by_the_same_loader(tmp_path):
    manifest = scenes_tree(tmp_path / "scenes")
    ds = SegmentationDataset.from_split("scenes", tmp_path / "scenes", "1_4", "labeled")
    assert len(ds) == 8 and ds.class_names == tuple(manifest["class_names"])
    image, mask = ds[0]
    assert image.shape == (3, 48, 48) and mask.max() <= 10
    assert len(SegmentationDataset.from_split("scenes", tmp_path / "scenes", "1_4", "unlabeled")) == 24


# --- bad inputs: each a DatasetError naming the file -------------------------


def _one(root, image_id="2007_000001"):
    return SegmentationDataset(root, [voc_pair(image_id)], num_classes=21, fix="Fix: rerun prep.")


def test_missing_image_and_label(voc):
    (voc / "SegmentationClass/2007_000001.png").unlink()
    with pytest.raises(DatasetError, match=r"missing label .*2007_000001\.png\. Fix: rerun prep\."):
        _one(voc)[0]
    (voc / "JPEGImages/2007_000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"missing image .*2007_000001\.jpg"):
        _one(voc)[0]
    assert len(_one(voc).missing_files()) == 2


def test_truncated_jpeg(voc):
    path = voc / "JPEGImages/2007_000001.jpg"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=r"cannot decode image .*2007_000001\.jpg .*truncated or corrupt"):
        _one(voc)[0]


def test_label_of_wrong_size(voc):
    label = np.zeros((10, 10), np.uint8)
    Image.fromarray(label).save(voc / "SegmentationClass/2007_000001.png")
    message = r"label .*2007_000001\.png is 10×10 but its image .*2007_000001\.jpg is 500×375"
    with pytest.raises(DatasetError, match=message):
        _one(voc)[0]


def test_label_values_out_of_range(voc):
    label = np.zeros((375, 500), np.uint8)
    label[0, :3] = [21, 100, 254]
    Image.fromarray(label).save(voc / "SegmentationClass/2007_000001.png")
    with pytest.raises(DatasetError, match=r"2007_000001\.png holds values 21, 100, 254 outside 0\.\.20 and 255"):
        _one(voc)[0]


@pytest.mark.parametrize("line", ["JPEGImages/a.jpg", "JPEGImages/a.jpg SegmentationClass/a.png extra"])
def test_split_line_with_one_or_three_paths(tmp_path, line):
    path = tmp_path / "list.txt"
    path.write_text("JPEGImages/b.jpg SegmentationClass/b.png\n" + line + "\n")
    n = len(line.split())
    with pytest.raises(DatasetError, match=rf"list\.txt, line 2: expected 2 paths .* found {n}"):
        read_split(path)


def test_split_list_problems(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_split(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        read_split(tmp_path / "empty.txt")
    (tmp_path / "abs.txt").write_text("/etc/passwd SegmentationClass/a.png\n")
    with pytest.raises(DatasetError, match="relative to the dataset root"):
        read_split(tmp_path / "abs.txt")
    with pytest.raises(DatasetError, match="unknown pascal split '7'"):
        data.split_items("pascal", "7")
    with pytest.raises(DatasetError, match="unknown dataset"):
        data.split_items("coco")


def test_an_image_listed_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "val.txt"
    path.write_text("JPEGImages/a.jpg SegmentationClass/a.png\n\nJPEGImages/b.jpg SegmentationClass/b.png\n"
                    "JPEGImages/a.jpg SegmentationClass/a.png\n")
    with pytest.raises(DatasetError) as err:
        read_split(path)
    assert str(err.value) == (f"{path}, line 4: 'JPEGImages/a.jpg' is listed again (first on line 1); an image is "
                              "listed once: remove the repeated line")


def test_from_split_error_says_how_to_fix(voc):
    (voc / "JPEGImages/2007_000001.jpg").unlink()
    ds = SegmentationDataset.from_split("pascal", voc, "92")
    with pytest.raises(DatasetError, match=r"Fix: run `python -m data_prep\.voc --root .*` .*--check"):
        ds[0]


def test_a_split_list_with_a_byte_order_mark_reads_its_first_path(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes("\ufeffJPEGImages/a.jpg SegmentationClass/a.png\n".encode("utf-8"))
    assert read_split(path) == [("JPEGImages/a.jpg", "SegmentationClass/a.png")]
    path.write_bytes(b"JPEGImages/\xe9.jpg SegmentationClass/a.png\n")
    with pytest.raises(DatasetError, match=rf"split list {path} is not UTF-8 text \(byte 0xe9 at offset 11\)"):
        read_split(path)


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    grey = np.array([[0, 257, 32896], [65535, 1000, 65280]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    image = read_image(tmp_path / "g16.png")
    assert image.dtype == np.uint8 and image.shape == (2, 3, 3)
    assert image[..., 0].tolist() == [[0, 1, 128], [255, 4, 254]] and (image[..., 0] == image[..., 2]).all()
    Image.fromarray(np.full((2, 2), -5, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(DatasetError, match=r"i32\.tif holds values outside 0\.\.65535"):
        read_image(tmp_path / "i32.tif")
    Image.fromarray(np.zeros((2, 2), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DatasetError, match=r"f\.tif holds floating-point pixels"):
        read_image(tmp_path / "f.tif")


def test_a_decompression_bomb_is_refused_in_one_line(voc):
    bomb_png(voc / "JPEGImages/2007_000001.jpg")
    with pytest.raises(DatasetError) as exc:
        _one(voc)[0]
    message = str(exc.value)
    assert message.startswith(f"image {voc / 'JPEGImages/2007_000001.jpg'} is too large to read (Image size "
                              "(900000000 pixels) exceeds limit") and "resize it. Fix: rerun prep." in message
    bomb_png(voc / "SegmentationClass/2007_000002.png")
    with pytest.raises(DatasetError, match=r"label .*2007_000002\.png is too large to read"):
        _one(voc, "2007_000002")[0]
