"""The command-line front that every entry point shares: its parser, its error line, its Ctrl-C line.

``python -m derprop.train``, ``derprop.evaluate``, ``derprop.predict``, ``derprop.book_runs``,
``data_prep.*`` and ``pipelines.run_matrix`` build their parser with :func:`parser` and run their
body with :func:`run`, so that every one of them

- names itself in ``--help`` as it was called (``derprop-train`` through the console script of
  ``pyproject.toml``, ``python -m derprop.train`` otherwise) and prints the installed derprop
  version with ``--version``;
- reports a bad argument, and any :class:`~derprop.errors.DerPropError` raised while it runs, as one
  ``error: …`` line on stderr with exit status 2, never a traceback;
- reports Ctrl-C as one ``interrupted: …`` line (what was kept, how to go on) with exit status 130.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Callable, NoReturn

from derprop.errors import DerPropError
from derprop.provenance import version

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for Ctrl-C


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error:`` line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


def prog_name(module: str) -> str:
    """How ``module``'s command was called: its console script, ``python path/to/it.py``, or ``python -m module``."""
    called = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    scripts = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts") if ep.module == module}
    if called in scripts:
        return called
    if getattr(sys.modules.get("__main__"), "__spec__", None) is None and called == f"{module.rpartition('.')[2]}.py":
        return f"python {sys.argv[0]}"
    return f"python -m {module}"


def parser(module: str, description: str) -> Parser:
    """The argument parser of ``module``'s command, named as it was called, with ``--version``."""
    ap = Parser(prog=prog_name(module), description=description)
    ap.add_argument("--version", action="version", version=f"derprop {version()}")
    return ap


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def one_line(err: BaseException) -> str:
    """The message of ``err``; from a DataLoader worker, whose message holds the worker's traceback, its last line
    without the exception's class name."""
    text = str(err).strip()
    if "Traceback" in text:
        text = re.sub(r"^[\w.]+: ", "", text.splitlines()[-1])
    return text


def run(body: Callable[[], int | None], interrupted: Callable[[], str] = lambda: "stopped") -> int:
    """Run a command's ``body``; returns its exit status (see module doc). ``interrupted()`` says what Ctrl-C left."""
    try:
        return body() or 0
    except DerPropError as err:
        sys.stdout.flush()
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stdout.flush()
        print(f"interrupted: {interrupted()}", file=sys.stderr)
        return EXIT_INTERRUPTED
