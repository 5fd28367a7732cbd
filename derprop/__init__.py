"""DerProp: semi-supervised semantic segmentation via derivative label propagation.

The package is the single source of truth for the book: each module's
docstrings name the chapter that explains it. ``derprop.load_model(path)``
(:func:`derprop.predict.load_model`) returns a trained network in ``eval()``
mode and its config.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    # `import derprop` stays light (no torch import) until load_model is used.
    if name == "load_model":
        from derprop.predict import load_model

        return load_model
    raise AttributeError(f"module 'derprop' has no attribute {name!r}")
