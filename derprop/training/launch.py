"""Starting a training run as processes, one or ``torchrun``'s N, with its log streamed as it comes.

Explained in the book chapter *Full reproduction on a GPU*. ``pipelines/train.ipynb`` trains through
these functions, so the papermill pipeline uses every GPU of a box and its executed notebook holds the
run's whole log; ``optim.batch_size`` is the global batch whatever the number of processes
(:meth:`derprop.training.config.OptimConfig.per_process_batch`).

``resume`` modes: ``auto`` continues from ``<out>/last.pt`` when there is one (a re-executed notebook
goes on where it stopped), ``yes`` must continue, ``no`` starts a fresh run (refused in a folder that
holds one), ``overwrite`` starts again, deleting that run's files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from derprop.errors import DerPropError

RESUME_MODES = ("auto", "yes", "no", "overwrite")
ERROR_LINE = re.compile(r"^(error: |[\w.]*(Error|Exception)\b.*: )")
"""A line that reports why a run stopped: ``derprop.train``'s ``error:`` line or a Python exception's last line."""


class RunFailed(DerPropError, RuntimeError):
    """The training processes exited with an error; the message is the run's last error line."""


def process_count(gpus: int, device: str = "") -> int:
    """How many processes to start: ``gpus`` (one per visible CUDA device when negative), at least one.

    On a CPU (``device="cpu"`` or no CUDA) ``gpus`` > 1 starts that many gloo processes.
    """
    import torch

    cuda = device != "cpu" and torch.cuda.is_available()
    visible = torch.cuda.device_count() if cuda else 0
    if gpus < 0:
        return max(visible, 1)
    if cuda and gpus > visible:
        raise ValueError(f"GPUS={gpus} but {visible} CUDA device(s) are visible; use GPUS={visible} or fewer")
    return max(gpus, 1)


def train_command(config: str, out_dir: str | os.PathLike, overrides: Sequence[str] = (), *, processes: int = 1,
                  resume: str = "auto", device: str = "") -> list[str]:
    """The command line of ``derprop.train`` on ``processes`` processes (``torchrun`` when more than one)."""
    if resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {list(RESUME_MODES)}, got {resume!r}")
    out = Path(out_dir)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*launcher, "-m", "derprop.train", "--config", str(config), "--out", str(out)]
    if resume == "yes" or (resume == "auto" and (out / "last.pt").is_file()):
        cmd.append("--resume")
    elif resume == "overwrite":
        cmd.append("--overwrite")
    if device:
        cmd += ["--device", device]
    return cmd + list(overrides)


def run(cmd: Sequence[str], *, cwd: str | os.PathLike | None = None,
        echo: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
    """Run ``cmd``, passing each line of its output (stdout and stderr) to ``echo`` as it comes.

    Raises:
        RunFailed: the command exited with an error; the message is its last error line (:data:`ERROR_LINE`),
            else its last line.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    last, error = "", ""
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            echo(line)
            if line.strip():
                last = line
            if ERROR_LINE.match(line) and "ChildFailedError" not in line:  # torchrun's own summary follows
                error = line
    finally:
        if proc.poll() is None:  # interrupted: stop the run (torchrun passes the signal on to its workers)
            proc.terminate()
        code = proc.wait()
    if code:
        raise RunFailed(error or last or f"{cmd[0]} exited with status {code}")
