"""make gpu-check's plan, checked on a CPU (--dry-run), and its kill-and-resume part run for real with gloo."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check
from derprop.provenance import source


def test_dry_run_checks_the_whole_plan(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for part in gpu_check.PARTS:
        assert f"[ok] {part}" in out
    assert '"cases": 8' in out and '"iterations": 200' in out  # crops 321, 801 x 4 configs x official; 200 iterations
    assert '"801"' in out and "tiled-amp-cl" in out and "model.backbone=resnet101" in out
    assert "2 processes (torchrun) when two GPUs are visible" in out and "--resume" in out  # the DDP and resume part
    assert "fp16 (GradScaler); bf16 where the GPU has it natively" in out
    assert "data.crop_size=321" in out and "tests/test_cuda.py" in out
    assert "peak memory (peak_cuda_mib)" in out


def test_a_broken_plan_is_reported(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "SCENES_OVERRIDES", [*gpu_check.SCENES_OVERRIDES, "optim.no_such_key=1"])
    assert gpu_check.main(["--dry-run", "--parts", "scenes_run"]) == 1
    assert "[FAILED] scenes_run" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_without_cuda_it_refuses_with_one_line(capsys):
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no CUDA device") and err.count("\n") == 1


@pytest.mark.slow
def test_kill_and_resume_of_two_processes(scenes_tiny, tmp_path):
    """The ddp_resume part on a CPU: torchrun with 2 gloo processes, every process SIGKILLed after epoch 1's commit,
    then --resume takes over the stale lock and finishes; each epoch is logged once."""
    overrides = [f"data.root={scenes_tiny}", "optim.batch_size=4", "optim.epochs=3", "optim.iters_per_epoch=4",
                 "data.val_limit=2", "data.diag_images=0", "eval.final_modes=[original]"]
    run = gpu_check.kill_and_resume(source() / "configs" / "cpu_scenes_tiny.yaml", tmp_path / "run", overrides,
                                    processes=2, device="cpu", timeout=300)
    assert run["killed"] >= 3  # torchrun and its two workers
    assert run["epochs"] == [1, 2, 3] and run["world_size"] == 2 and run["took_over_stale_lock"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epochs"] == 3
