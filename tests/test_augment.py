"""Augmentation: torchvision v2 pipelines, label handling, per-sample seeding, CutMix boxes."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from derprop.data.augment import (LabeledTrainSet, RandomScale, UnlabeledTrainSet, cutmix_box, geometric, photometric,
                                  seeded)

CFG = SimpleNamespace(crop_size=32, scale_range=(0.5, 2.0), flip=True, cutmix_p=1.0)


def _pair(h=40, w=50):
    g = torch.Generator().manual_seed(0)
    img = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
    mask = tv_tensors.Mask(torch.randint(0, 5, (h, w), generator=g))
    return img, mask


def test_pipelines_are_torchvision_v2():
    tf = geometric(32, (0.5, 2.0))
    assert isinstance(tf, v2.Compose) and isinstance(tf.transforms[0], RandomScale)
    assert isinstance(tf.transforms[1], v2.RandomCrop)
    assert isinstance(photometric(32), v2.Compose)


def test_geometric_keeps_labels_and_pads_with_ignore():
    img, mask = _pair()
    tf = geometric(32, (0.5, 0.5))  # always smaller than the crop: padding is certain
    with seeded(0):
        out_img, out_mask = tf(img, mask)
    assert out_img.shape == (3, 32, 32) and out_img.dtype == torch.uint8
    assert out_mask.shape == (32, 32)
    values = set(out_mask.unique().tolist())
    assert 255 in values and values <= set(range(5)) | {255}  # nearest resize: no new classes
    # padded pixels of the image are 0 where the label is ignore
    assert (out_img[:, out_mask == 255] == 0).all()


def test_same_seed_same_sample_and_epochs_differ():
    img, mask = _pair()

    class Base(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return img, mask

    ds = LabeledTrainSet(Base(), CFG, seed=1, length=6)
    a, b = ds[2], ds[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(ds) == 6
    ds.set_epoch(1)
    c = ds[2]
    assert not torch.equal(a[0], c[0])
    other = LabeledTrainSet(Base(), CFG, seed=2, length=6)
    assert not torch.equal(other[2][0], a[0])


def test_unlabeled_views_share_geometry():
    img, _ = _pair(24, 24)  # smaller than the crop: padded, so the ignore mask is non-empty

    class Base(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return img

    ds = UnlabeledTrainSet(Base(), SimpleNamespace(**{**vars(CFG), "scale_range": (1.0, 1.0)}), seed=0)
    weak, strong, ignore, box = ds[0]
    assert weak.shape == strong.shape == (3, 32, 32) and weak.dtype == strong.dtype == torch.uint8
    assert ignore.shape == (32, 32) and set(ignore.unique().tolist()) == {0, 255}
    assert (weak[:, ignore == 255] == 0).all()
    assert box.dtype == torch.bool and box.any()  # cutmix_p = 1
    w2, s2, i2, b2 = ds[0]
    assert torch.equal(strong, s2) and torch.equal(box, b2)


def test_cutmix_box_area_and_probability():
    with seeded(0):
        boxes = [cutmix_box(64, p=1.0) for _ in range(50)]
    for b in boxes:
        frac = b.float().mean().item()
        assert 0.0 < frac <= 0.4 + 1e-6
        ys, xs = torch.nonzero(b, as_tuple=True)
        assert b[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()  # one rectangle
    with seeded(0):
        assert not cutmix_box(64, p=0.0).any()
