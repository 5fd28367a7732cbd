"""Place and verify the ImageNet ResNet-101 the VOC/Cityscapes configs load. ``python -m data_prep.weights``.

The configs' ``model.pretrained: pretrained/resnet101.pth`` is the deep-stem
ResNet-101 ImageNet checkpoint the release (and UniMatch, CorrMatch) train from
(book chapter *Paper vs released code*). It cannot be downloaded here: it is
linked from UniMatch's README (section "Pretrained Backbone",
https://github.com/LiheYoung/UniMatch#pretrained-backbone). ::

    python -m data_prep.weights --from ~/Downloads/resnet101.pth   # verify, then copy to pretrained/resnet101.pth
    python -m data_prep.weights                                     # verify what is there
    python -m data_prep.weights --root /data/derprop --dest pretrained/resnet101.pth

Verification: the file loads safely (``weights_only``), and every tensor of
:class:`derprop.training.backbones.ResNetBackbone` ``("resnet101", deep_stem=True)``
(stem ``conv1.0/.1/.3/.4/.6``, ``bn1`` of 128 channels, ``layer1``–``layer4``;
BN ``num_batches_tracked`` counters excepted) is present with its shape, after
stripping ``module.``/``backbone.`` prefixes; only ``fc.*`` may be extra. Its
SHA-256 is printed; no checksum is published for it, so none is enforced.

The fallback that needs no manual download: train with
``model.pretrained=torchvision model.deep_stem=false`` (torchvision's
``ResNet101_Weights.IMAGENET1K_V2``, fetched into the torch hub cache).

Exit status 2 with one ``error:`` line naming the file and where to get it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from derprop.errors import DerPropError
from derprop.training import atomic, cli

DEFAULT_DEST = Path("pretrained") / "resnet101.pth"
SOURCE = ("UniMatch's ImageNet deep-stem ResNet-101 (resnet101.pth, linked in "
          "https://github.com/LiheYoung/UniMatch#pretrained-backbone)")
FALLBACK = ("or train without it: model.pretrained=torchvision model.deep_stem=false "
            "(torchvision ResNet101_Weights.IMAGENET1K_V2)")


class WeightsError(DerPropError, ValueError):
    """A checkpoint that is missing or does not fit the deep-stem ResNet-101; the message says what to do."""


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor the deep-stem, output-stride-8 ResNet-101 backbone loads."""
    from derprop.training.backbones import ResNetBackbone

    net = ResNetBackbone("resnet101", output_stride=8, deep_stem=True)
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def verify(path: str | Path) -> dict[str, int]:
    """Check ``path`` (see module doc); returns counts ``{"tensors", "matched", "extra_fc"}``."""
    from derprop.training.backbones import PretrainedWeightsError, read_checkpoint_state_dict
    from derprop.training.checkpoint import strip_prefixes

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist: download {SOURCE} and run "
                           f"python -m data_prep.weights --from FILE, {FALLBACK}")
    try:
        sd = strip_prefixes(read_checkpoint_state_dict(path))
    except PretrainedWeightsError as exc:
        raise WeightsError(f"{path} is not a readable checkpoint ({exc}); download {SOURCE} again") from exc
    want = expected_shapes()
    missing = sorted(set(want) - set(sd))
    wrong = sorted(f"{k} {tuple(sd[k].shape)} (want {want[k]})" for k in set(want) & set(sd)
                   if tuple(sd[k].shape) != want[k])
    extra = sorted(k for k in set(sd) - set(want) if not k.endswith("num_batches_tracked"))
    unexpected = [k for k in extra if not k.startswith("fc.")]
    if missing or wrong or unexpected:
        parts = [f"{name} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                 for name, keys in (("missing", missing), ("wrong shapes", wrong), ("unexpected", unexpected)) if keys]
        shown = "; ".join(parts) + "; "
        plain = " (a plain 7x7-stem ResNet: use model.deep_stem=false)" if "conv1.weight" in sd else ""
        raise WeightsError(f"{path} is not the deep-stem ResNet-101: {shown}{len(missing)} missing, "
                           f"{len(wrong)} mis-shaped, {len(unexpected)} unexpected tensors{plain}; "
                           f"download {SOURCE}, {FALLBACK}")
    return {"tensors": len(sd), "matched": len(want), "extra_fc": len(extra)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = cli.parser("data_prep.weights", __doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", default=None, metavar="FILE",
                    help="a downloaded resnet101.pth to verify and copy into place")
    ap.add_argument("--root", default=".", help="project folder the destination is relative to (default: here)")
    ap.add_argument("--dest", default=str(DEFAULT_DEST), help=f"where the configs expect it (default {DEFAULT_DEST})")
    args = ap.parse_args(argv)
    return cli.run(lambda: _place(args))


def _place(args: argparse.Namespace) -> None:
    from data_prep.common import file_hash

    dest = Path(args.root) / args.dest
    counts = verify(args.source or dest)
    if args.source:
        with open(args.source, "rb") as src, atomic.open_atomic(dest) as out:
            while block := src.read(1 << 24):
                out.write(block)
    print(f"{dest}: deep-stem ResNet-101, {counts['matched']} backbone tensors match "
          f"({counts['extra_fc']} extra fc/classifier tensors ignored); sha256 {file_hash(dest)}")


if __name__ == "__main__":
    raise SystemExit(main())
