"""DerProp: semi-supervised semantic segmentation via derivative label propagation.

The package is the single source of truth for the book: each module's
docstrings name the chapter that explains it. ``derprop.load_model(path)``
(:func:`derprop.predict.load_model`) returns a trained network in ``eval()``
mode and its config; ``derprop.__version__`` is the installed version
(:func:`derprop.provenance.version`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    # `import derprop` stays light (no torch import) until load_model is used.
    if name == "__version__":
        from derprop.provenance import version

        return version()
    if name == "load_model":
        from derprop.predict import load_model

        return load_model
    raise AttributeError(f"module 'derprop' has no attribute {name!r}")
