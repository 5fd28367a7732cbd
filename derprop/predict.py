"""Inference on your own images with a trained checkpoint (book chapter *Full reproduction on a GPU*).

::

    python -m derprop.predict --checkpoint runs/voc_92/best.pt --image a.jpg [--mode original|sliding]
        [--crop-size N] [--which auto|model|momentum] [--device cpu|cuda] --out a.png [--overlay a_overlay.png]

Writes ``--out``: the label map as a palette PNG (one class index per pixel,
the VOC colour map, so it opens as a coloured image and reads back with
``Image.open(p)`` as indices), and ``--overlay`` (default ``<out>_overlay.png``):
the image with the label colours blended in at 50 %. Both are written
atomically.

``--mode original`` runs the whole image at once (the paper's VOC protocol),
``sliding`` averages windows of ``--crop-size`` (default: the checkpoint's
``eval.crop_size``; the paper's Cityscapes protocol), as in
:mod:`derprop.evaluate`.

:func:`load_model` is the same loading as a library call:
``net, config = derprop.load_model("runs/x/best.pt")``.

``--out`` and ``--overlay`` must be ``.png`` files, neither an input (by path or inode) nor inside a
dataset tree, and replace only a PNG; they are checked before any work (:func:`derprop.training.paths.check_output`, the
guard ``derprop.evaluate --out`` shares). Exit status 2 with one ``error:`` line for an unreadable
checkpoint or image, or such an output (:mod:`derprop.training.cli`).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from derprop.data.datasets import label_png_bytes, read_image
from derprop.data.labels import voc_palette
from derprop.training import atomic, cli, paths
from derprop.training import checkpoint as ckpt_io
from derprop.training.config import EVAL_MODES, RELEASE_CROP, eval_crop_size
from derprop.training.distributed import pick_device
from derprop.training.evaluation import logits_of, sliding_window_logits
from derprop.training.model import DerPropNet, build_model, model_config_of

WHICH = ("auto", "model", "momentum")
PREDICT_MODES = tuple(m for m in EVAL_MODES if m != "center_crop")
"""A prediction labels the whole image: no centre crop."""


def load_model(path: str | Path, *, which: str = "auto",
               device: str | torch.device = "cpu") -> tuple[DerPropNet, dict[str, Any]]:
    """The network of a trainer checkpoint, in ``eval()`` mode on ``device``, and its resolved config.

    ``which="auto"`` takes the momentum network Θm of eq. 6 when the checkpoint
    holds one (``last.pt``; only Θm is evaluated at test time), else its
    ``model`` weights (``best.pt`` holds just the selected network).
    Raises :class:`derprop.training.checkpoint.CheckpointError` naming the file.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {list(WHICH)}, got {which!r}")
    ckpt = ckpt_io.load(path)
    if which == "auto":
        which = "momentum" if ckpt.get("momentum") is not None else "model"
    net = build_model(model_config_of(ckpt))
    ckpt_io.load_net(net, ckpt, which, path, "pass another checkpoint, or --which model")
    return net.to(device).eval(), dict(ckpt.get("config") or {})


@torch.no_grad()
def predict(net: DerPropNet, image: np.ndarray, *, mode: str = "original", crop_size: int = RELEASE_CROP) -> np.ndarray:
    """Class index per pixel (H×W uint8) of an H×W×3 uint8 RGB ``image``."""
    if mode not in PREDICT_MODES:
        raise ValueError(f"mode must be one of {list(PREDICT_MODES)}, got {mode!r}")
    device = next(net.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).unsqueeze(0).to(device)
    logits = sliding_window_logits(net, x, crop_size=crop_size) if mode == "sliding" else logits_of(net, x)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


def overlay_png(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> bytes:
    """RGB PNG bytes of ``image`` with the label colours blended in at ``alpha``."""
    colours = np.asarray(voc_palette(), dtype=np.float32).reshape(-1, 3)[label]
    mixed = ((1 - alpha) * image.astype(np.float32) + alpha * colours).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(mixed).save(buf, format="PNG")
    return buf.getvalue()


def build_parser() -> cli.Parser:
    ap = cli.parser("derprop.predict", __doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="trainer checkpoint (best.pt or last.pt)")
    ap.add_argument("--image", required=True, help="an RGB image (jpg, png, ...)")
    ap.add_argument("--out", required=True, help="label map, written as a palette PNG (.png)")
    ap.add_argument("--overlay", default=None, help="colour overlay PNG (default <out>_overlay.png)")
    ap.add_argument("--mode", choices=PREDICT_MODES, default="original")
    ap.add_argument("--crop-size", type=cli.at_least(1), default=None,
                    help="sliding window size (default: eval.crop_size)")
    ap.add_argument("--which", choices=WHICH, default="auto", help="weights to use (auto: momentum if present)")
    ap.add_argument("--device", default=None, help="default: cuda if available else cpu")
    return ap


def is_png(path: Path) -> bool:
    """Whether ``path`` starts like a PNG file: predict's own earlier output, which it may replace."""
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def check_output(path: Path, flag: str, inputs: Mapping[str, Path]) -> None:
    """Refuse an output that is not a ``.png``, is a folder, an input or a file of another kind, or lies in a
    dataset tree, before any work (:func:`derprop.training.paths.check_output`)."""
    paths.check_output(path, flag, command="predict", kind="predictions", suffix=".png", inputs=inputs,
                       replaces=is_png)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(lambda: _predict(build_parser().parse_args(argv)))


def _predict(args: argparse.Namespace) -> None:
    out = Path(args.out)
    overlay = Path(args.overlay) if args.overlay else out.with_name(f"{out.stem}_overlay.png")
    inputs = {"--image": Path(args.image), "--checkpoint": Path(args.checkpoint)}
    check_output(out, "--out", inputs)
    check_output(overlay, "--overlay", {**inputs, "--out": out})
    net, config = load_model(args.checkpoint, which=args.which, device=pick_device(args.device))
    image = read_image(args.image, fix="pass --image with a readable RGB image")
    crop = args.crop_size or eval_crop_size(config)
    label = predict(net, image, mode=args.mode, crop_size=crop)
    atomic.write_bytes(out, label_png_bytes(label))
    atomic.write_bytes(overlay, overlay_png(image, label))
    classes = np.unique(label).tolist()
    print(f"{out}: {label.shape[1]}x{label.shape[0]} label map ({args.mode}), classes {classes}; overlay {overlay}")


if __name__ == "__main__":
    raise SystemExit(main())
