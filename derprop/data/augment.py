"""Data augmentation for semi-supervised training, with ``torchvision.transforms.v2``.

Used in the book chapter *Training on a CPU*; the release's CutMix partner in chapter *Paper vs released code*.

Images stay ``uint8`` ``tv_tensors.Image`` (3, H, W) and labels
``tv_tensors.Mask`` (H, W) throughout; v2 transforms resize a mask with
nearest-neighbour and leave it alone in photometric transforms, so one
pipeline serves both. Normalisation happens in the model
(:func:`derprop.training.model.normalize`).

=============  ============================================================
view           transforms (the release's, from UniMatch)
=============  ============================================================
weak           random scale in ``scale_range`` (0.5–2.0), random crop of
               ``crop_size`` (padding: image 0, label 255 = ignore),
               horizontal flip p = 0.5
strong         weak, then colour jitter (0.5, 0.5, 0.5, 0.25) p = 0.8,
               grayscale p = 0.2, Gaussian blur σ ∈ [0.1, 2] p = 0.5, and a
               CutMix box (p = 0.5, area 2–40 %, aspect 0.3–3.3)
=============  ============================================================

An unlabeled image gets a mask of zeros before the weak transforms, so after
cropping its 255 pixels mark the padding (the ``ignore`` mask of the release).

Every sample is augmented under its own seed (:func:`seeded`), drawn from
(run seed, epoch, index): the same image gets the same crop whatever the
number of workers or DDP ranks, which makes CPU runs reproducible and lets a
2-process run see exactly the batches of a 1-process run.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from derprop.data.labels import IGNORE_INDEX

BLUR_SIGMA = (0.1, 2.0)


class RandomScale(v2.Transform):
    """Resize image and mask together by one factor drawn uniformly from ``scale_range``.

    The release draws the long side uniformly in ``[0.5, 2.0] × long side``;
    this is the same distribution of factors. Masks are resized with
    nearest-neighbour by v2's dispatch.
    """

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.scale_range = tuple(scale_range)

    def make_params(self, flat_inputs: list) -> dict:
        h, w = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        s = float(torch.empty(()).uniform_(lo, hi))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt, params: dict):
        return TF.resize(inpt, params["size"], antialias=True)


def geometric(crop_size: int, scale_range: tuple[float, float], flip: bool = True) -> v2.Compose:
    """Random scale, random crop (pad image 0 / label 255), horizontal flip: the weak view."""
    steps: list = [
        RandomScale(scale_range),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(steps)


def photometric(crop_size: int) -> v2.Compose:
    """Colour jitter, grayscale and blur: the strong view's extra transforms (image only)."""
    kernel = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1  # covers ±3σ at the largest σ
    kernel = min(kernel, (crop_size - 1) // 2 * 2 + 1)
    return v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=BLUR_SIGMA)], p=0.5),
        ]
    )


def cutmix_box(
    size: int,
    p: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> Tensor:
    """A ``(size, size)`` bool mask, True inside one random box (with probability ``p``).

    Box area uniform in ``area × size²``, aspect ratio uniform in ``ratio``;
    redrawn until it fits inside the image (UniMatch's rule).
    """
    box = torch.zeros(size, size, dtype=torch.bool)
    if float(torch.rand(())) > p:
        return box
    while True:
        a = float(torch.empty(()).uniform_(*area)) * size * size
        r = float(torch.empty(()).uniform_(*ratio))
        w, h = int(math.sqrt(a / r)), int(math.sqrt(a * r))
        x, y = int(torch.randint(0, size + 1, ())), int(torch.randint(0, size + 1, ()))
        if w >= 1 and h >= 1 and x + w <= size and y + h <= size:
            break
    box[y : y + h, x : x + w] = True
    return box


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's global RNG seeded by ``seed``; restores the RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def sample_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    """A 63-bit seed for one sample of one epoch (``stream`` separates labeled/unlabeled/mix); any run seed of
    the config (up to 2**63 - 1) fits the generator's 64 bits."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + stream) % 2**64)
    return (int(torch.randint(0, 2**62, (1,), generator=g)) + index * 0x9E3779B97F4A7C15) % (2**63 - 1)


class EpochSeeded:
    """Mixin: a dataset whose per-sample seeds depend on the run seed and the current epoch."""

    def __init__(self, seed: int, stream: int):
        self.seed, self.stream, self.epoch = seed, stream, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _seed(self, index: int) -> int:
        return sample_seed(self.seed, self.epoch, index, self.stream)


class LabeledTrainSet(EpochSeeded, Dataset):
    """Labeled training pairs, weak-augmented: ``(image uint8 (3,S,S), label int64 (S,S))``.

    ``length`` repeats the list (the release makes the labeled set as long as
    the unlabeled one, so one epoch sees every unlabeled image once).
    """

    def __init__(self, base: Dataset, cfg_data, *, seed: int, length: int | None = None):
        EpochSeeded.__init__(self, seed, stream=1)
        self.base = base
        self.length = length or len(base)
        self.tf = geometric(cfg_data.crop_size, cfg_data.scale_range, cfg_data.flip)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.base[index % len(self.base)]
        with seeded(self._seed(index)):
            image, mask = self.tf(image, mask)
        return image.as_subclass(Tensor), mask.as_subclass(Tensor).long()


class UnlabeledTrainSet(EpochSeeded, Dataset):
    """Unlabeled images: ``(weak, strong, ignore, box)``.

    ``weak``/``strong``: uint8 (3,S,S) views of the same crop; ``ignore``:
    uint8 (S,S), 255 on padding; ``box``: bool (S,S) CutMix box for this sample.
    """

    def __init__(self, base: Dataset, cfg_data, *, seed: int, stream: int = 2):
        EpochSeeded.__init__(self, seed, stream=stream)
        self.base = base
        self.crop = cfg_data.crop_size
        self.cutmix_p = cfg_data.cutmix_p
        self.weak = geometric(cfg_data.crop_size, cfg_data.scale_range, cfg_data.flip)
        self.strong = photometric(cfg_data.crop_size)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        image = self.base[index]
        if isinstance(image, tuple):  # a labeled dataset used as unlabeled: drop the label
            image = image[0]
        mask = tv_tensors.Mask(torch.zeros(image.shape[-2:], dtype=torch.uint8))
        with seeded(self._seed(index)):
            weak, ignore = self.weak(image, mask)
            strong = self.strong(weak)
            box = cutmix_box(self.crop, self.cutmix_p)
        return weak.as_subclass(Tensor), strong.as_subclass(Tensor), ignore.as_subclass(Tensor), box
