"""derprop.training.metrics.ConfusionMatrix against torchmetrics and by hand."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from derprop.training.metrics import ConfusionMatrix

MulticlassJaccardIndex = pytest.importorskip("torchmetrics.classification").MulticlassJaccardIndex


def sample(c=6, shape=(3, 20, 24), seed=0, absent=()):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target, torch.randint(0, c, shape, generator=g))
    for a in absent:  # class a occurs in neither targets nor predictions
        target[target == a] = (a + 1) % c
        pred[pred == a] = (a + 1) % c
    target[torch.rand(shape, generator=g) < 0.1] = 255
    return pred, target


@pytest.mark.parametrize("absent", [(), (2,), (0, 4)])
def test_matches_torchmetrics(absent):
    c = 6
    cm = ConfusionMatrix(c)
    tm_none = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="none")
    tm_macro = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="macro")
    for seed in range(3):
        pred, target = sample(c, seed=seed, absent=absent)
        cm.update(pred, target)
        tm_none.update(pred, target)
        tm_macro.update(pred, target)
    ours = cm.iou_per_class()
    theirs = tm_none.compute().double()
    present = [i for i in range(c) if i not in absent]
    torch.testing.assert_close(ours[present], theirs[present])
    # convention: absent classes are NaN here, 0 in torchmetrics' "none", and left out of both means
    assert all(math.isnan(ours[a]) for a in absent) and all(theirs[a] == 0 for a in absent)
    assert cm.miou() == pytest.approx(float(tm_macro.compute()), abs=1e-6)


def test_pixel_accuracy_and_logits_input():
    pred, target = sample(seed=5)
    logits = torch.nn.functional.one_hot(pred, 6).permute(0, 3, 1, 2).float()
    cm = ConfusionMatrix(6)
    cm.update(logits, target)
    keep = target != 255
    assert cm.pixel_accuracy() == pytest.approx(float((pred[keep] == target[keep]).double().mean()))
    assert int(cm.mat.sum()) == int(keep.sum())
    ref = np.zeros((6, 6), dtype=np.int64)
    np.add.at(ref, (target[keep].numpy(), pred[keep].numpy()), 1)
    assert np.array_equal(cm.mat.numpy(), ref)


def test_hand_example():
    target = torch.tensor([[0, 0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2 absent
    iou = cm.iou_per_class()
    assert iou[0] == pytest.approx(0.5) and iou[1] == pytest.approx(2 / 3) and math.isnan(iou[2])
    assert cm.miou() == pytest.approx((0.5 + 2 / 3) / 2)
    assert cm.pixel_accuracy() == pytest.approx(3 / 4)
    assert math.isnan(ConfusionMatrix(3).miou())


def test_counts_of_the_parts_add_up_to_the_whole():
    """What :meth:`ConfusionMatrix.reduce_` relies on to sum the ranks' matrices under DDP."""
    pred, target = sample(seed=1)
    whole, a, b = ConfusionMatrix(6), ConfusionMatrix(6), ConfusionMatrix(6)
    whole.update(pred, target)
    a.update(pred[:1], target[:1])
    b.update(pred[1:], target[1:])
    assert torch.equal(a.mat + b.mat, whole.mat)


def test_bad_labels_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


def test_reduce_without_and_with_a_process_group(tmp_path):
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert torch.equal(cm.reduce_().mat, torch.tensor([[1, 1], [0, 0]]))  # no process group: no-op
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo backend")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert torch.equal(cm.reduce_().mat, torch.tensor([[1, 1], [0, 0]]))  # one rank: the sum is itself
    finally:
        dist.destroy_process_group()
