"""DerProp: semi-supervised semantic segmentation via derivative label propagation.

The package is the single source of truth for the book: each module's docstring names the chapter that
explains it. It is built in four parts, each importing only the parts listed before it
(``tests/test_imports.py`` checks it):

:mod:`derprop.method`
    the paper's equations as functions of tensors (derivatives, propagation, the derivative loss, the EMA);
:mod:`derprop.data`
    label conventions, datasets on disk, augmentation (independent of the method);
:mod:`derprop.training`
    the config, the network, the method applied to a batch, the trainer, evaluation and run safety;
:mod:`derprop.book`
    what the chapters show: tables, figures, sentences from numbers, sources, the viewer, the book's runs.

Below them, :mod:`derprop.errors` (every error a user can cause) and :mod:`derprop.provenance` (what made a
run); above them, the commands ``python -m derprop.train``, ``derprop.evaluate`` and ``derprop.predict``.
``derprop.load_model(path)`` (:func:`derprop.predict.load_model`) returns a trained network in ``eval()``
mode and its config; ``derprop.propagate`` is :func:`derprop.method.propagation.propagate` (eq. 4);
``derprop.__version__`` is the installed version (:func:`derprop.provenance.version`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model", "propagate"]


def __getattr__(name: str) -> Any:
    # `import derprop` stays light (no torch import) until a name that needs it is used.
    if name == "__version__":
        from derprop.provenance import version

        return version()
    if name == "load_model":
        from derprop.predict import load_model

        return load_model
    if name == "propagate":
        from derprop.method.propagation import propagate

        return propagate
    raise AttributeError(f"module 'derprop' has no attribute {name!r}")
