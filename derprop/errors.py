"""The one base of every error a user can cause, so that every command reports them the same way.

Each error kind of the package (:class:`ConfigError` here, ``DatasetError``, ``CheckpointError``,
``RunDirError``, ``WriteError``, ``NonFiniteLossError``, ``PretrainedWeightsError``, …) derives from
:class:`DerPropError`; :func:`derprop.training.cli.run` turns any of them into one ``error: …`` line and exit
status 2. Their messages name the file or setting at fault and the fix. An exception of another kind
is a bug and keeps its traceback.
"""

from __future__ import annotations


class DerPropError(Exception):
    """Bad input (a file, a setting, an argument) that the user can fix; the message says how."""


class ConfigError(DerPropError, ValueError):
    """A config file, key, value or command-line setting that cannot be used; the message names it."""


SHOWN = 120
"""The most characters of a value that a message shows (:func:`shown`)."""


def shown(value: object, limit: int = SHOWN) -> str:
    """``repr(value)`` for a message, cut to ``limit`` characters: a value read from a file may be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}… ({len(text):,} characters)"
