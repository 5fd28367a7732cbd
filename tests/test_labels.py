"""The label conventions (derprop.data.labels): the VOC colour map, default class names, and a torch-free import."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from derprop.data.labels import VOC_CLASSES, default_class_names, voc_palette


def test_palette_is_the_standard_voc_colour_map():
    import imgviz

    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    assert (palette == imgviz.label_colormap()).all()
    assert palette[1].tolist() == [128, 0, 0] and palette[255].tolist() == [224, 224, 192]


def test_default_class_names():
    assert default_class_names(21) == VOC_CLASSES and default_class_names(19)[0] == "road"
    assert default_class_names(3) == ("class_0", "class_1", "class_2")


def test_the_viewer_loads_without_torch():
    """The viewer only draws saved snapshots: it and the label conventions must not pull in torch."""
    code = "import sys, derprop.book.viewer; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
