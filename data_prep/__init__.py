"""Dataset preparation: one command per dataset, from nothing to a checked, training-ready tree.

- ``python -m data_prep.voc --root DIR``: Pascal VOC 2012 + SBD (train_aug).
- ``python -m data_prep.cityscapes --root DIR --from-archives DIR``: Cityscapes.
- ``python -m data_prep.scenes --root DIR``: the CPU dataset of real-image scenes.

Each takes ``--check`` to validate a tree. Split lists are in ``splits/``.
"""
