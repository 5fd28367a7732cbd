"""What a pseudo-label snapshot holds, and which of its pixels DLP fixed and broke.

Explained in the book chapter *Pseudo-label rectification, interactively*. Written by
:mod:`derprop.training.diagnostics` each epoch, read by :mod:`derprop.book.viewer` and the DLP map; no torch
import, so the viewer draws saved snapshots without it.
"""

from __future__ import annotations

from typing import Any

from derprop.data.labels import IGNORE_INDEX

SNAPSHOT_KEYS = ("image", "gt", "pl_before", "confidence", "names")
"""The arrays of every pseudo-label snapshot ``pseudo_labels/epoch_XXX.npz``: written by
:mod:`derprop.training.diagnostics`, read by :mod:`derprop.book.viewer`."""
SNAPSHOT_DLP_KEYS = ("pl_after", "attn", "attn_pixel")
"""The arrays a snapshot adds when the run propagates (``method.dlp``)."""


def change_masks(gt: Any, before: Any, after: Any, ignore_index: int = IGNORE_INDEX) -> tuple[Any, Any]:
    """Boolean maps of the pixels DLP *fixed* (wrong → right) and *broke* (right → wrong), for numpy arrays or
    torch tensors of labels (the diagnostics, the DLP map and the viewer all count with it)."""
    valid = gt != ignore_index
    return valid & (before != gt) & (after == gt), valid & (before == gt) & (after != gt)
