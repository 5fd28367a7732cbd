"""The data of a training run: labeled, unlabeled, CutMix-partner, val and diagnostic sets, and their loaders.

Explained in the book chapter *Training on a CPU* (which images a run reads, and how an epoch is made).

The lists come from the config's ``data`` section (:class:`derprop.training.config.DataConfig`): the
UniMatch-style split lists of ``layout``/``split``, or explicit list files. Every list is checked
before training starts: a missing root, an empty list or a missing file is one
:class:`~derprop.data.datasets.DatasetError` naming it and the command that recreates the tree.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from derprop.data import datasets as data_io
from derprop.data.augment import LabeledTrainSet, UnlabeledTrainSet
from derprop.data.datasets import DatasetError, SegmentationDataset
from derprop.training.config import TrainConfig
from derprop.training.distributed import Dist


@dataclass
class TrainingData:
    """The sets a run reads; ``iters_per_epoch`` is how many batches an epoch takes from them."""

    train_l: LabeledTrainSet
    train_u: UnlabeledTrainSet
    train_mix: UnlabeledTrainSet
    val_set: SegmentationDataset
    diag_set: SegmentationDataset | None
    iters_per_epoch: int

    def set_epoch(self, epoch: int) -> None:
        for ds in (self.train_l, self.train_u, self.train_mix):
            ds.set_epoch(epoch)


def build_training_data(cfg: TrainConfig, d: Dist) -> TrainingData:
    """Read and check every list of ``cfg.data``; the diagnostic set is the first unlabeled images, with labels."""
    c, seed = cfg.data, cfg.seed
    labeled = _dataset(cfg, "labeled", True, c.labeled_limit)
    unlabeled = _dataset(cfg, "unlabeled", False, c.unlabeled_limit)
    val_set = _dataset(cfg, "val", True, c.val_limit)
    n_u = len(unlabeled)
    train_l = LabeledTrainSet(labeled, c, seed=seed, length=max(n_u, len(labeled)))
    train_u = UnlabeledTrainSet(unlabeled, c, seed=seed, stream=2)
    train_mix = UnlabeledTrainSet(unlabeled, c, seed=seed, stream=3)
    diag_set = diagnostic_set(cfg, unlabeled) if d.is_main else None
    b = cfg.optim.per_process_batch(d.world_size)
    per_rank = len(train_u) // d.world_size
    if per_rank < b:
        raise DatasetError(
            f"{len(train_u)} unlabeled images are fewer than one global batch "
            f"(optim.batch_size={cfg.optim.batch_size}); lower optim.batch_size"
        )
    iters = per_rank // b
    if cfg.optim.iters_per_epoch:
        iters = min(iters, cfg.optim.iters_per_epoch)
    return TrainingData(train_l, train_u, train_mix, val_set, diag_set, iters)


def diagnostic_set(cfg: TrainConfig, unlabeled: SegmentationDataset | None = None) -> SegmentationDataset | None:
    """The first ``data.diag_images`` unlabeled images with their labels; None when off or the labels do not
    exist (only scenes and VOC have them). ``unlabeled``: the run's unlabeled set, when already read."""
    unlabeled = unlabeled if unlabeled is not None else _dataset(cfg, "unlabeled", False, cfg.data.unlabeled_limit)
    n = min(cfg.data.diag_images, len(unlabeled))
    if not n:
        return None
    diag = SegmentationDataset(cfg.data.root, unlabeled.items[:n], num_classes=cfg.model.num_classes, labeled=True,
                               label_classes=unlabeled.label_classes)
    return None if diag.missing_files() else diag


def loader(ds: Dataset, cfg: TrainConfig, d: Dist, sampler_seed: int) -> DataLoader:
    """A shuffling loader of this process's shard of ``ds`` in per-process batches (full batches only)."""
    sampler = DistributedSampler(ds, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=sampler_seed,
                                 drop_last=True)
    nw = cfg.data.num_workers
    return DataLoader(ds, batch_size=cfg.optim.per_process_batch(d.world_size), sampler=sampler, num_workers=nw,
                      drop_last=True, pin_memory=d.device.type == "cuda", persistent_workers=False,
                      multiprocessing_context="fork" if nw and sys.platform == "linux" else None)


def loaders(data: TrainingData, cfg: TrainConfig, d: Dist) -> tuple[DataLoader, DataLoader, DataLoader]:
    """Labeled, unlabeled and CutMix-partner loaders (``method.cutmix_partner``).

    ``same_image``: the partner's sampler replays the unlabeled order, so each image is mixed
    with another augmentation of itself (the release zips one loader twice).
    """
    seed = cfg.seed
    mix_seed = seed if cfg.method.cutmix_partner == "same_image" else seed + 1
    return (loader(data.train_l, cfg, d, seed), loader(data.train_u, cfg, d, seed),
            loader(data.train_mix, cfg, d, mix_seed))


def _items(cfg: TrainConfig, kind: str) -> list[tuple[str, str]]:
    c = cfg.data
    explicit = {"labeled": c.labeled_list, "unlabeled": c.unlabeled_list, "val": c.val_list}[kind]
    if explicit:
        return data_io.read_split(explicit)
    if kind == "unlabeled" and c.labeled_list:
        train = data_io.read_split(c.train_list) if c.train_list else data_io.split_items(
            c.layout, None, "train", c.root)
        return data_io.derive_unlabeled(train, data_io.read_split(c.labeled_list))
    return data_io.split_items(c.layout, c.split, kind, c.root)


def _dataset(cfg: TrainConfig, kind: str, labeled: bool, limit: int | None) -> SegmentationDataset:
    c = cfg.data
    root = Path(c.root)
    spec = data_io.dataset_spec(c.layout)
    if not root.is_dir():
        raise DatasetError(
            f"dataset root {root} does not exist. Fix: run `{spec.prepare.format(root=root)}` "
            "or set data.root to where the data is"
        )
    items = _items(cfg, kind)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise DatasetError(f"the {kind} list of {c.layout} split {c.split!r} under {root} is empty")
    fix = data_io.fix_hint(c.layout, root)
    names = data_io.class_names(c.layout, root, items)  # a scenes tree: checked finished, its classes its own
    n = cfg.model.num_classes
    if c.layout in data_io.TREE_LAYOUTS and not data_io.fits_tree(len(names), n, c.num_classes is not None):
        raise DatasetError(f"the {c.layout} tree {root} has {len(names)} classes ({root / data_io.SCENES_MANIFEST}) "
                           f"but the config trains {n}; leave data.num_classes and model.num_classes out (the "
                           "tree's manifest gives the count), or point data.root at a tree made for this config")
    ds = SegmentationDataset(root, items, num_classes=n, labeled=labeled,
                             class_names=names if len(names) == n else None, fix=fix, label_classes=len(names))
    missing = ds.missing_files()
    if missing:
        raise DatasetError(f"{len(missing)} file(s) named in the {kind} list are missing, first: {missing[0]}. {fix}")
    return ds
