"""The data: label conventions, the datasets on disk and their augmentation.

The label conventions (ignore index, class names, palettes: :mod:`~derprop.data.labels`), the VOC, Cityscapes,
scenes and folder layouts read and checked (:mod:`~derprop.data.datasets`), and the weak/strong views with the
CutMix box (:mod:`~derprop.data.augment`). Explained in the book chapters *Training on a CPU* and
*Your own data*.

May import: :mod:`derprop.errors`, :mod:`derprop.provenance` and the modules of this part.
"""
