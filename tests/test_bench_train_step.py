"""The training-step benchmark: quick preset end to end, the dense == tiled gate, the ratios, the time split."""

import json

import pytest

from benchmarks import common, train_step
from derprop.training.guards import NonFiniteLossError


def test_grid_pixels_match_the_issue():
    assert train_step.grid_pixels(321) == 1681
    assert train_step.grid_pixels(801) == 10201
    assert train_step.grid_pixels(161) == 441


def test_quick_preset_writes_results(tmp_path, scenes_tiny):
    out = tmp_path / "bench_train_step_cpu.json"
    payload = train_step.main(["--size", "quick", "--device", "cpu", "--scenes-root", str(scenes_tiny),
                               "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert payload["machine"]["device"] == "cpu" and payload["machine"]["torch"]
    assert set(payload["resolved_configs"]) == {"official", "paper"}
    assert payload["resolved_configs"]["official"]["method"]["chunk"] == 8

    # dense and tiled agree before anything is timed
    assert [c["profile"] for c in payload["check"]] == ["official", "paper"]
    for c in payload["check"]:
        assert c["passed"], c
        assert c["loss_rel_diff"] <= 1e-4 and c["grad_max_rel_diff"] <= 1e-4
        assert c["params_with_grad"] > 10 and not c["params_grad_mismatch"]
        assert c["tiles"] and c["chunks_used"]["tiled"] == {"dlp": 8, "derivative_loss": 8}

    configs = train_step.PRESETS["quick"]["configs"]
    assert len(payload["rows"]) == 2 * len(configs)
    for row in payload["rows"]:
        assert "error" not in row, row
        assert row["M"] == 25 and row["batch"] == 2
        assert row["images_per_s"] > 0 and row["seconds"] > 0 and row["peak_mib"] >= 0
        assert 0 < row["dlp_loss_share"] and row["dlp_loss_calls"] >= 3
        # the step's time split by the Trainer's record_function ranges: every part found, nothing counted twice
        shares = row["split_shares"]
        assert set(shares) == set(common.SPLIT) and sum(shares.values()) == pytest.approx(1.0)
        assert min(shares.values()) >= 0 and shares["backbone"] > 0 and shares["optimizer"] > 0
        assert row["region_propagation_calls"] == (row["profile"] == "official")
        assert (shares["region_propagation"] > 0) == (row["profile"] == "official")
        assert row["loss_finite"]
        assert f"method.chunk={8 if row['impl'] == 'tiled' else 'null'}" in row["overrides"]
    amp_rows = [r for r in payload["rows"] if r["config"] == "tiled-amp-cl"]
    assert all(r["amp"] == "bf16" and r["channels_last"] for r in amp_rows)

    assert {(r["profile"], r["crop"]) for r in payload["ratios"]} == {("official", 33), ("paper", 33)}
    for r in payload["ratios"]:
        # in-process (quick) the resident-size rise of a step may be 0: freed memory stays with malloc
        assert r["tiled_vs_dense_memory"] >= 0 and r["tiled_vs_dense_throughput"] > 0
        assert r["best_config"] in configs
    assert "goals" not in payload  # the goals of a past issue are not this benchmark's business


def test_the_benchmark_steps_through_the_trainers_optimize(scenes_tiny, tmp_path):
    """``Trainer.fit`` and the benchmark take the same optimisation step: the gradient guard stops both
    (``test_trainer`` checks it for ``fit``)."""
    case = {"profile": "official", "config": "tiled-fp32", "backbone": "resnet18", "deep_stem": False, "crop": 33,
            "batch": 2, "chunk": 8, "classes": 21, "device": "cpu", "scenes_root": str(scenes_tiny)}
    trainer = train_step.build_trainer(case, str(tmp_path))
    trainer.net.classifier.weight.register_hook(lambda g: g * float("inf"))
    step = common.step_fn(trainer, common.synthetic_batch(2, 33, 21), 1)
    with pytest.raises(NonFiniteLossError, match="gradient norm became"):
        step()


@pytest.mark.parametrize("tiled", ["tiled-fp32", "dense-fp32"])
def test_the_check_passes_only_when_its_second_pass_tiles(scenes_tiny, tmp_path, monkeypatch, tiled):
    """Both passes on one implementation fail the check: a trainer reads ``method.chunk`` when it is built, so
    the check builds one per implementation (swapping the config of a live trainer compared dense with itself)."""
    monkeypatch.setattr(train_step, "TILED", tiled)
    case = {"kind": "check", "profile": "official", "config": "dense-fp32", "backbone": "resnet18",
            "deep_stem": False, "crop": 33, "M": train_step.grid_pixels(33), "batch": 2, "chunk": 8, "classes": 21,
            "device": "cpu", "scenes_root": str(scenes_tiny), "rtol": 1e-4, "grad_rtol": 1e-4}
    res = train_step.run_check(case, str(tmp_path))
    real = tiled == "tiled-fp32"
    assert res["chunks_used"]["dense"] == {"dlp": None, "derivative_loss": None}
    assert res["chunks_used"]["tiled"] == ({"dlp": 8, "derivative_loss": 8} if real
                                           else {"dlp": None, "derivative_loss": None})
    assert res["tiles"] is real and res["passed"] is real
    assert res["loss_rel_diff"] <= 1e-4 and res["grad_max_rel_diff"] <= 1e-4  # the numbers agree either way


def test_disagreement_stops_the_benchmark(tmp_path, scenes_tiny, monkeypatch):
    def bad_check(case, out_dir):
        return {"profile": case["profile"], "crop": case["crop"], "loss_dense": 1.0, "loss_tiled": 1.5,
                "loss_rel_diff": 0.5, "max_term_rel_diff": 0.5, "grad_max_rel_diff": 0.1, "grad_global_rel_diff": 0.1,
                "grad_worst_param": "head1.weight", "params_grad_mismatch": [], "passed": False, "tiles": True,
                "chunks_used": {"dense": {"dlp": None}, "tiled": {"dlp": None}}}

    monkeypatch.setattr(train_step, "run_check", bad_check)
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit, match="dense and tiled disagree"):
        train_step.main(["--size", "quick", "--device", "cpu", "--scenes-root", str(scenes_tiny), "--out", str(out)])
    assert not out.exists()


def _row(profile, config, crop, ips, peak):
    return {"profile": profile, "config": config, "crop": crop, "M": train_step.grid_pixels(crop),
            "images_per_s": ips, "peak_mib": peak}


def test_ratios_compare_each_config_with_dense_fp32():
    rows = [
        _row("official", "dense-fp32", 321, 10.0, 9000), _row("official", "tiled-fp32", 321, 10.5, 8000),
        _row("official", "tiled-amp-cl", 321, 16.0, 5000),
        _row("official", "dense-fp32", 801, 2.0, 60000), _row("official", "tiled-fp32", 801, 2.2, 15000),
        _row("official", "tiled-amp-cl", 801, 3.0, 9000),
    ]
    by = {r["crop"]: r for r in train_step.compute_ratios(rows, ["official"], [321, 801])}
    assert by[801]["tiled_vs_dense_memory"] == pytest.approx(0.25)
    assert by[801]["tiled_vs_dense_throughput"] == pytest.approx(1.1)
    assert by[321]["best_config"] == "tiled-amp-cl" and by[321]["best_vs_dense_throughput"] == pytest.approx(1.6)

    # dense out of memory at 801 while tiled runs: no ratio, the error named
    rows[3] = {"profile": "official", "config": "dense-fp32", "crop": 801, "M": 10201, "error": "out of memory"}
    by = {r["crop"]: r for r in train_step.compute_ratios(rows, ["official"], [321, 801])}
    assert "tiled_vs_dense_memory" not in by[801] and by[801]["dense-fp32_error"] == "out of memory"


def test_gradient_gap_names_the_worst_parameter_and_what_only_one_side_has():
    import torch

    ref = {"a": torch.ones(4), "b": torch.zeros(2), "c": torch.ones(1)}
    other = {"a": torch.ones(4) * 1.5, "b": torch.full((2,), 1e-9)}
    gap = common.gradient_gap(ref, other)
    assert gap["worst"] == "a" and gap["max"] == pytest.approx(0.5) and gap["missing"] == ["c"]
    assert gap["compared"] == 2 and gap["global"] == pytest.approx(1.0 / gap["norm"], rel=1e-6)
    assert common.gradient_gap(ref, ref)["max"] == 0.0


def _event(name, parent=None, device="CPU", cpu_us=0.0, device_us=0.0, seq=-1):
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(name=name, cpu_parent=parent, device_type=getattr(torch.autograd.DeviceType, device),
                           cpu_time_total=cpu_us, device_time_total=device_us, sequence_nr=seq)


def test_the_split_counts_cuda_side_annotations_once():
    """On CUDA the profiler reports each record_function range twice: the CPU-side range (whose device time covers
    its kernels) and a GPU user annotation of the same name. Only the first may count."""
    dlp = _event("derprop.dlp", device_us=300.0)
    gpu_twin = _event("derprop.dlp", device="CUDA", device_us=300.0)
    region = _event("derprop.region_propagation", device_us=100.0)
    split = common.split_events([dlp, gpu_twin, region], wall_us=1000.0, device="cuda")
    assert split["shares"]["dlp_derivative_loss"] == pytest.approx(0.3)
    assert split["shares"]["region_propagation"] == pytest.approx(0.1)
    assert split["dlp_loss_calls"] == 1 and split["region_propagation_calls"] == 1
