"""The fast recipe: its configs resolve to the settings that were measured, and the benchmark's verdict applies
the criterion written before the runs (``experiments.fast_recipe``)."""

import pytest

from experiments import fast_recipe
from derprop.provenance import source
from derprop.training.config import flatten, resolved
from derprop.training.configfile import load_config
from pipelines import run_matrix

FAST_CONFIGS = {"voc_92_fast": "voc_92", "cityscapes_186_fast": "cityscapes_186"}


def _measured() -> dict[str, str]:
    """The overrides the CPU benchmark trained with, as dotted key → value."""
    return dict(o.split("=", 1) for o in fast_recipe.FAST)


@pytest.mark.parametrize(("fast", "base"), FAST_CONFIGS.items())
def test_fast_configs_turn_on_the_measured_settings_and_nothing_else(fast, base):
    fast_cfg, base_cfg = (load_config(source() / "configs" / f"{n}.yaml") for n in (fast, base))
    a, b = flatten(resolved(fast_cfg)), flatten(resolved(base_cfg))
    differ = {k for k in a if a[k] != b[k]} - {"name"}
    measured = _measured()
    assert differ <= set(measured), differ  # nothing the CPU benchmark did not train with
    assert fast_cfg.optim.amp == measured["optim.amp"]
    assert str(fast_cfg.optim.channels_last).lower() == measured["optim.channels_last"]
    side = (fast_cfg.data.crop_size - 1) // 8 + 1
    assert fast_cfg.method.chunk is not None and fast_cfg.method.chunk < side * side  # DLP really tiles
    assert base_cfg.optim.amp == "none"  # the reproduction configs themselves stay fp32


def test_the_cpu_arm_tiles_the_cpu_defaults_grid():
    cfg = load_config(source() / "configs" / "cpu_scenes.yaml", list(fast_recipe.FAST))
    side = cfg.data.crop_size // cfg.model.output_stride
    assert cfg.method.chunk < side * side and cfg.optim.amp == "bf16" and cfg.optim.channels_last


def test_make_reproduce_takes_a_fast_config(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(run_matrix, "execute", lambda notebook, params, label: seen.append(params))
    out = run_matrix.run_one("configs/voc_92_fast.yaml", size="small", runs_root=tmp_path, results_root=None,
                             device="cpu")  # no GPU here: a VOC config asks for the CPU by name
    assert out == tmp_path / "small" / "voc_92_fast" and seen[0]["CONFIG"] == "configs/voc_92_fast.yaml"


def _summary(fp32: dict[int, float], fast: dict[int, float]) -> dict:
    nets = lambda per, ref: {net: {"per_seed": per, **({"diff_per_seed": {s: v - ref[s] for s, v in per.items()}}
                                                        if ref else {})} for net in ("backprop", "momentum")}
    return {"fp32": {"nets": nets(fp32, None)}, "fast": {"nets": nets(fast, fp32)}}


FP32 = {0: 0.45, 1: 0.43, 2: 0.47, 3: 0.44, 4: 0.46, 5: 0.42}  # sample std 0.0187


@pytest.mark.parametrize(("shift", "met"), [(0.0, True), (0.015, True), (-0.015, True), (-0.025, False),
                                            (0.025, False)])
def test_verdict_needs_the_mean_within_the_seed_spread(shift, met):
    v = fast_recipe.verdict(_summary(FP32, {s: x + shift for s, x in FP32.items()}))
    assert v["met"] is met and v["complete"] and v["nets"]["backprop"]["within_spread"] is met


def test_verdict_fails_a_seed_worse_than_the_machine_noise():
    fast = {**FP32, 3: FP32[3] - 0.021, 4: FP32[4] + 0.02}  # mean about 0: within the spread, one seed 2.1 pp worse
    v = fast_recipe.verdict(_summary(FP32, fast))
    assert v["nets"]["momentum"]["within_spread"] and not v["nets"]["momentum"]["no_seed_beyond_noise"]
    assert not v["met"]


def test_verdict_is_judged_on_a_prefix_of_the_declared_seeds():
    first = {s: FP32[s] for s in (0, 1, 2)}
    v = fast_recipe.verdict(_summary(FP32, first))
    assert v["measured"] and v["met"] and not v["complete"] and v["nets"]["backprop"]["seeds"] == [0, 1, 2]
    gap = {s: FP32[s] for s in (0, 1, 3, 4)}  # seed 2 missing: only 0 and 1 count, fewer than MIN_SEEDS
    v = fast_recipe.verdict(_summary(FP32, gap))
    assert not v["measured"] and not v["met"]
