"""Progress lines for non-interactive runs: train.log, stdout, the fields the issue asks for."""

from __future__ import annotations

import re

import pytest

from derprop.provenance import source
from derprop.train import main
from derprop.training.progress import ProgressLog

TINY = source() / "configs" / "cpu_scenes_tiny.yaml"
FIELDS = re.compile(r"^epoch (\d+)/2 it (\d+)/4 \(\d+\.\d%\) loss [-\d.e+]+ .*ce_x .* lr [\d.e+-]+ "
                    r"threshold [\d.]+ mask_ratio [\d.]+ [\d.]+ img/s ETA \d+:\d\d:\d\d$")


def test_a_line_every_n_iterations_with_window_means(tmp_path, capsys):
    log = ProgressLog(tmp_path, total_steps=5, steps_per_epoch=5, epochs=1, images_per_step=8, every=2)
    lines = [log.step(i, {"ce_x": float(i), "threshold": 0.9, "mask_ratio": 0.5, "loss": 2.0 * i}, 1e-3)
             for i in range(1, 6)]
    assert [line is not None for line in lines] == [False, True, False, True, True]  # every 2, and the last
    assert " loss 3 ce_x 1.5 " in lines[1]  # means over iterations 1-2, the total first
    assert (tmp_path / "train.log").read_text().splitlines() == [line for line in lines if line]
    assert capsys.readouterr().out.splitlines() == [line for line in lines if line]
    with pytest.raises(ValueError, match="log_every"):
        ProgressLog(tmp_path, total_steps=1, steps_per_epoch=1, epochs=1, images_per_step=1, every=0)


def test_train_cli_writes_train_log_and_stdout(scenes_tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", str(TINY), "--out", str(out), "--log-every", "1", f"data.root={scenes_tiny}"]) == 0
    lines = (out / "train.log").read_text().splitlines()
    assert [int(FIELDS.match(line).group(2)) for line in lines] == [1, 2, 3, 4], lines
    assert [int(FIELDS.match(line).group(1)) for line in lines] == [1, 1, 2, 2]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert printed == lines


def test_an_eta_of_any_length_is_written(tmp_path):
    log = ProgressLog(tmp_path, total_steps=2 * 10**20, steps_per_epoch=2, epochs=10**20, images_per_step=4, every=1,
                      echo=False)  # optim.epochs=100000000000000000000 --log-every 1
    line = log.step(1, {"loss": 1.0, "threshold": 0.9, "mask_ratio": 0.5}, 1e-3)
    assert re.search(r" ETA [\d.e+]+ years$", line), line
    assert ProgressLog(tmp_path, total_steps=3, steps_per_epoch=3, epochs=1, images_per_step=1, every=1,
                       echo=False).format(1, {}, 1e-3, 1 / 3600).endswith("ETA 2:00:00")
