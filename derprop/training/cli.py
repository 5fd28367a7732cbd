"""The command-line front that every entry point shares: its parser, its error line, its Ctrl-C line.

``python -m derprop.train``, ``derprop.evaluate``, ``derprop.predict``, ``derprop.book.runs``,
``data_prep.*`` and ``pipelines.run_matrix`` build their parser with :func:`parser` and run their
body with :func:`run`, so that every one of them

- names itself in ``--help`` as it was called (``derprop-train`` through the console script of
  ``pyproject.toml``, ``python -m derprop.train`` otherwise) and prints the installed derprop
  version with ``--version``;
- reports a bad argument, and any :class:`~derprop.errors.DerPropError` raised while it runs, as one
  ``error: …`` line on stderr with exit status 2, never a traceback;
- reports Ctrl-C as one ``interrupted: …`` line (what was kept, how to go on) with exit status 130, and
  SIGTERM and SIGHUP (a ``kill``, a closed terminal, a batch scheduler's stop) the same way, as
  ``interrupted by SIGTERM: …`` with exit status 143 (129 for SIGHUP): the signal raises :class:`Stopped`, a
  ``KeyboardInterrupt``, so every ``finally`` runs (locks released, worker processes stopped) on all three;
- exits quietly, with status 141 (128 + SIGPIPE, as a shell reports ``yes | head -1``), when its standard
  output is a pipe whose reader has gone (``run_matrix list | head -1``);
- keeps an error line readable: one longer than :data:`MAX_LINE` characters is cut.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import re
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator, NoReturn

from derprop.errors import DerPropError
from derprop.provenance import version

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for Ctrl-C
EXIT_CLOSED_PIPE = 128 + 13  # SIGPIPE
MAX_LINE = 2000
"""The longest error line printed (a value named in a message may be huge: a config's list, a file's text)."""
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
"""The signals handled like Ctrl-C (:func:`stop_signals`)."""


class Stopped(KeyboardInterrupt):
    """A stop signal (:data:`STOP_SIGNALS`) arrived: handled like Ctrl-C; ``signum`` sets the exit status."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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


def cut(text: str, limit: int = MAX_LINE) -> str:
    """``text``, cut to ``limit`` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """While the block runs, each of :data:`STOP_SIGNALS` raises :class:`Stopped` in this process, as SIGINT
    raises ``KeyboardInterrupt``; the previous handlers come back afterwards. A process forked meanwhile (a
    worker) inherits the handler but not the role: there the signal does what it does by default, so a worker
    that its parent terminates ends without a traceback. Outside the main thread nothing changes (Python
    handles signals only there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def ends_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets SIGTERM when this process dies, also by kill -9
    (Linux's ``PR_SET_PDEATHSIG``; None elsewhere). libc's ``prctl`` is looked up here, in the parent, so that
    the forked child only calls it; a parent that died before the call is noticed too."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return in_child


def stop_children(children: Iterable[subprocess.Popen], grace: float = 60.0) -> None:
    """Send SIGTERM to each child still running and wait for it (``grace`` seconds, then SIGKILL): a training
    child keeps its finished epochs and releases its lock."""
    alive = [c for c in children if c.poll() is None]
    for child in alive:
        child.terminate()
    for child in alive:
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _stdout_gone() -> bool:
    """Whether standard output is a pipe that no one reads any more."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no file descriptor (a captured stdout)
        return False


def run(body: Callable[[], int | None], interrupted: Callable[[], str] = lambda: "stopped") -> int:
    """Run a command's ``body``; returns its exit status (see module doc). ``interrupted()`` says what Ctrl-C, or a
    stop signal, left."""
    try:
        with stop_signals():
            code = body() or 0
            sys.stdout.flush()  # a reader that has gone shows here, not at exit
            return code
    except DerPropError as err:
        sys.stdout.flush()
        print(f"error: {cut(one_line(err))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as stop:
        sys.stdout.flush()
        by = f" by {signal.Signals(stop.signum).name}" if isinstance(stop, Stopped) else ""
        print(f"interrupted{by}: {interrupted()}", file=sys.stderr)
        return 128 + stop.signum if isinstance(stop, Stopped) else EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush goes nowhere
        return EXIT_CLOSED_PIPE
