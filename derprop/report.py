"""What a run folder shows once trained: its learning curves and per-class IoU tables.

Explained in the book chapter *Full reproduction on a GPU*: ``pipelines/train.ipynb`` ends with
:func:`learning_curves` and the headline's :func:`iou_table`; ``python -m derprop.train`` prints
:func:`iou_table` for every network and evaluation mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from derprop.atomic import read_jsonl
from derprop.evaluate import format_iou_table

NOT_LOSS_TERMS = ("threshold", "mask_ratio", "time_s")
"""The ``train_<name>`` values of ``metrics.jsonl`` that are not loss terms."""


def iou_table(results: Mapping[str, Any], net: str | None = None, mode: str | None = None) -> str:
    """The per-class IoU table of network ``net`` in evaluation ``mode`` of a ``results.json`` (default: the headline)."""
    net, mode = net or results["miou_net"], mode or results["miou_mode"]
    res = results["final"][net][mode]
    names = list(res["iou_per_class"])
    return format_iou_table({**res, "iou_per_class": list(res["iou_per_class"].values()), "mode": mode}, names)


def learning_curves(run_dir: str | os.PathLike) -> Any:
    """A matplotlib figure of a run's ``steps.jsonl`` and ``metrics.jsonl``: the loss per step with each
    loss term's epoch mean (eq. 7), the learning rate, and the validation mIoU of both networks."""
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    steps, epochs = read_jsonl(run / "steps.jsonl"), read_jsonl(run / "metrics.jsonl")
    fig, (ax_loss, ax_lr, ax_miou) = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
    ax_loss.plot([r["global_step"] for r in steps], [r["loss"] for r in steps], color="0.6", lw=0.8,
                 label="loss, per step")
    terms = [k[6:] for k in (epochs[-1] if epochs else {}) if k.startswith("train_") and k[6:] not in NOT_LOSS_TERMS]
    for term in terms:
        ax_loss.plot([r["global_step"] for r in epochs], [r.get(f"train_{term}") for r in epochs], "o-", ms=3,
                     label=f"{term}, epoch mean")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss terms")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_lr.plot([r["global_step"] for r in steps], [r["lr"] for r in steps])
    ax_lr.set(xlabel="step", ylabel="lr (backbone)", title="learning rate (poly)")
    for net in ("backprop", "momentum"):
        rows = [r for r in epochs if r.get(f"miou_{net}") is not None]
        if rows:
            ax_miou.plot([r["epoch"] for r in rows], [100 * r[f"miou_{net}"] for r in rows], "o-", label=f"{net} net")
    mode = next((r["eval_mode"] for r in epochs if "eval_mode" in r), "?")
    ax_miou.set(xlabel="epoch", ylabel="mIoU (%)", title=f"validation mIoU ({mode})")
    ax_miou.legend(fontsize=8)
    fig.suptitle(str(run))
    return fig
