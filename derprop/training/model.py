"""DeepLabV3+ with DerProp's projection head (Fig. 2; book chapters *Notation* and *Paper vs released code*).

::

    x in [0, 255] ─ normalize ─ backbone ─┬─ F1 (stride 4) ─ reduce 1×1 → 48 ──────────┐
                                          │                                           cat
                                          ├─ F4 (stride OS) ─ ASPP → W ─ upsample ────┘
                                          │                    fuse (two 3×3, W) ─ classifier → L
                                          └─ F4 ─ J: 3×3 → W (bias) ─ BN ─ ReLU ─ Dropout2d(0.1)
                                                   ├─ 1×1 → D : f1
                                                   └─ 1×1 → D : f2   (two_heads; else f2 is f1)

W = ``head_channels`` (256 in the release).

* ``L`` (``SegOutput.logits``) is bilinearly upsampled to the input size;
  ``SegOutput.logits_grid`` is the decoder output resized to the F4 grid
  (where f1/f2 live), which label propagation (eq. 1/4) works on.
* ``f1``/``f2`` are V of the paper: the released code uses two separate 1×1
  heads with D = C (the similarity f1ᵀf2 is then asymmetric); the paper has
  one head (``two_heads=False``; ``f2`` is then the very same tensor as
  ``f1``) with D configurable (``feature_dim``).
* ``perturb=True`` adds the release's feature-perturbation branch (inherited
  from UniMatch/CorrMatch): Dropout2d(0.5) on F1 and F4, decoded by the same
  decoder in the same batch as the clean features, giving ``logits_fp``.

**Input normalisation lives here and only here**: :meth:`DerPropNet.forward`
calls :func:`normalize` as its first op, so the model takes images with pixel
values in [0, 255] (``uint8``, or float after augmentation/CutMix). Do not
normalise before calling the model; a float input with negative values is
rejected on the first call (it was probably normalised already).

All bilinear resizes use ``align_corners=True``: for crop sizes 8k+1 (321,
513) the stride-4/8 grids then sit exactly on input pixels (321 → 81 → 41).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from derprop.training.backbones import build_backbone
from derprop.training.config import ModelConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: mean colour in [0, 255]; padding an image with it gives 0 after :func:`normalize`.
IMAGENET_MEAN_255 = tuple(255.0 * m for m in IMAGENET_MEAN)

REDUCE_CHANNELS = 48
FP_DROPOUT = 0.5


def normalize(img: Tensor) -> Tensor:
    """ImageNet normalisation of an RGB image batch with values in [0, 255].

    ``img``: (B, 3, H, W) or (3, H, W), ``uint8`` or floating point in
    [0, 255]. Returns float32 (or the input's floating dtype)
    ``(img / 255 - mean) / std``. The single place where normalisation
    happens; :meth:`DerPropNet.forward` calls it.
    """
    if img.shape[-3] != 3:
        raise ValueError(f"expected RGB images with 3 channels at dim -3, got shape {tuple(img.shape)}")
    x = img.float() if not img.is_floating_point() else img
    mean, std = _mean_std(x.device, x.dtype)
    return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(3,1,1) mean/std in [0, 255] units, made once per device and dtype (no copy per forward).

    Made outside inference mode so the cached tensors also serve autograd later.
    """
    with torch.inference_mode(False):
        mean = torch.tensor(IMAGENET_MEAN_255, dtype=dtype, device=device).view(3, 1, 1)
        std = torch.tensor([255.0 * s for s in IMAGENET_STD], dtype=dtype, device=device).view(3, 1, 1)
    return mean, std


@dataclass
class SegOutput:
    """What :meth:`DerPropNet.forward` returns.

    - ``logits``: (B, C, H, W) at the input size, L of the paper.
    - ``f1``, ``f2``: (B, D, h, w) projection features V at the F4 grid;
      ``f2 is f1`` when ``two_heads=False``; both None from ``forward(..., heads=False)``.
    - ``logits_fp``: (B, C, H, W) feature-perturbation branch, only with ``perturb=True``.
    - ``logits_grid``: (B, C, h, w) decoder logits resized to the f1 grid (for propagation).
    """

    logits: Tensor
    f1: Tensor | None
    f2: Tensor | None
    logits_fp: Tensor | None
    logits_grid: Tensor


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPPPooling(nn.Module):
    """Image-level branch of ASPP: global average pool, 1×1 conv-BN-ReLU, broadcast back."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = _conv_bn_relu(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(F.adaptive_avg_pool2d(x, 1))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1, one 3×3 per dilation, image pooling; 1×1 projection."""

    def __init__(self, cin: int, dilations: tuple[int, ...], cout: int):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, cout, 1)] + [_conv_bn_relu(cin, cout, 3, d) for d in dilations]
        )
        self.pool = ASPPPooling(cin, cout)
        self.project = _conv_bn_relu(cout * (len(dilations) + 2), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([b(x) for b in self.branches] + [self.pool(x)], dim=1))


class DerPropNet(nn.Module):
    """DeepLabV3+ (backbone, ASPP, decoder, classifier) + projection head J (see module doc)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(
            cfg.backbone, output_stride=cfg.output_stride, deep_stem=cfg.deep_stem, pretrained=cfg.pretrained
        )
        low, high = self.backbone.low_channels, self.backbone.high_channels
        w = cfg.head_channels
        self.aspp = ASPP(high, cfg.aspp_dilations, w)
        self.reduce = _conv_bn_relu(low, REDUCE_CHANNELS, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(w + REDUCE_CHANNELS, w, 3),
            _conv_bn_relu(w, w, 3),
        )
        self.classifier = nn.Conv2d(w, cfg.num_classes, 1)
        self.proj = nn.Sequential(
            nn.Conv2d(high, w, 3, padding=1, bias=True),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Dropout2d(cfg.proj_dropout),
        )
        self.head1 = nn.Conv2d(w, cfg.dim, 1)
        self.head2 = nn.Conv2d(w, cfg.dim, 1) if cfg.two_heads else None
        self.fp_dropout = nn.Dropout2d(FP_DROPOUT)
        self._input_checked = False

    # ------------------------------------------------------------------ #
    def decode(self, c1: Tensor, c4: Tensor) -> Tensor:
        """DeepLabV3+ decoder: logits at the F1 grid (stride 4)."""
        a = F.interpolate(self.aspp(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([self.reduce(c1), a], dim=1)))

    def _check_input(self, x: Tensor) -> None:
        if self._input_checked or not x.is_floating_point():
            return
        self._input_checked = True
        if bool((x < 0).any()):
            raise ValueError(
                "DerPropNet.forward expects pixel values in [0, 255] and normalises them itself; "
                "the input has negative values, so it was probably normalised already"
            )

    def forward(self, x: Tensor, *, perturb: bool = False, heads: bool = True) -> SegOutput:
        """``x``: (B, 3, H, W) RGB in [0, 255] (uint8 or float). See :class:`SegOutput`.

        ``heads=False`` skips J and the 1×1 heads (``f1 = f2 = None``): a pass that only reads ``L``
        (the release's momentum pass for the CutMix partner) saves J's 3×3 conv on F4, about 5 % of a
        ResNet-101 forward at output stride 8.
        """
        self._check_input(x)
        size = x.shape[-2:]
        c1, c4 = self.backbone(normalize(x))
        if perturb:
            both = self.decode(
                torch.cat([c1, self.fp_dropout(c1)]), torch.cat([c4, self.fp_dropout(c4)])
            )
            out, out_fp = both.chunk(2)
            logits_fp = F.interpolate(out_fp, size=size, mode="bilinear", align_corners=True)
        else:
            out, logits_fp = self.decode(c1, c4), None
        f1 = f2 = None
        if heads:
            p = self.proj(c4)
            f1 = self.head1(p)
            f2 = self.head2(p) if self.head2 is not None else f1
        return SegOutput(
            logits=F.interpolate(out, size=size, mode="bilinear", align_corners=True),
            f1=f1,
            f2=f2,
            logits_fp=logits_fp,
            logits_grid=F.interpolate(out, size=c4.shape[-2:], mode="bilinear", align_corners=True),
        )

    # ------------------------------------------------------------------ #
    def param_groups(self, lr: float, head_lr_mult: float = 1.0) -> list[dict]:
        """Two optimizer groups: backbone at ``lr``, everything else at ``lr * head_lr_mult``.

        Each dict has keys ``params``, ``lr``, ``name`` ("backbone"/"head") and
        ``lr_mult`` (1 / head_lr_mult) so a poly scheduler can recompute lr.
        Parameters with ``requires_grad=False`` are left out.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if id(p) not in ids and p.requires_grad]
        return [
            {"params": backbone, "lr": lr, "name": "backbone", "lr_mult": 1.0},
            {"params": head, "lr": lr * head_lr_mult, "name": "head", "lr_mult": float(head_lr_mult)},
        ]


def build_model(cfg: ModelConfig | Mapping[str, Any]) -> DerPropNet:
    """Build :class:`DerPropNet` from a :class:`ModelConfig` (or a dict of its fields)."""
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_dict(cfg)
    return DerPropNet(cfg)


def model_config_of(ckpt: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from ``ckpt["config"]["model"]`` with ``pretrained="none"``: the weights come from the checkpoint."""
    section = dict((ckpt.get("config") or {}).get("model") or {})
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        log.warning("ignoring unknown model config keys %s", unknown)
    section = {k: v for k, v in section.items() if k in known}
    section["pretrained"] = "none"
    return ModelConfig.from_dict(section)
