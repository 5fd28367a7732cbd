"""Label conventions: the ignore value, the class names of VOC and Cityscapes, and the VOC colour map.

Explained in the book chapter *Training on a CPU* (its label maps are drawn with
:func:`voc_palette`). Plain Python with no imports, so that :mod:`derprop.book.viewer` can
use them without loading torch; :mod:`derprop.data.datasets` reads labels with them.
"""

from __future__ import annotations

IGNORE_INDEX = 255
"""Label value that the losses and metrics skip (VOC's object boundaries, Cityscapes' void)."""

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """Names of ``num_classes`` classes that nothing names: VOC's for 21, Cityscapes' for 19, else ``class_<i>``."""
    for names in (VOC_CLASSES, CITYSCAPES_CLASSES):
        if num_classes == len(names):
            return names
    return tuple(f"class_{i}" for i in range(num_classes))


def voc_palette() -> list[int]:
    """The standard 256-entry VOC colour map as a flat ``[r, g, b, r, g, b, ...]`` list.

    Index ``i``'s colour spreads the bits of ``i`` over the high bits of the
    three channels (VOC devkit's ``labelcolormap``); 255 is (224, 224, 192).
    """
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette
