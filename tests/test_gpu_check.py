"""make gpu-check's plan, checked on a CPU (--dry-run): the CUDA parts are skipped, the plan must be valid."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check


def test_dry_run_checks_the_whole_plan(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for part in gpu_check.PARTS:
        assert f"[ok] {part}" in out
    assert '"cases": 8' in out and '"iterations": 300' in out  # crops 321, 801 x 4 configs x official; 300 iterations
    assert '"801"' in out and "tiled-amp-cl" in out and "model.backbone=resnet101" in out


def test_a_broken_plan_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "SCENES_OVERRIDES", [*gpu_check.SCENES_OVERRIDES, "optim.no_such_key=1"])
    assert gpu_check.main(["--dry-run", "--parts", "scenes_run"]) == 1
    assert "[FAILED] scenes_run" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_without_cuda_it_refuses_with_one_line(capsys):
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA device") and err.count("\n") == 1
