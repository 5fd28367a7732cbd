"""The paper's tables (derprop.training.tables): the matrix, the ablation rows, and every place that must agree with them."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from derprop.provenance import source
from derprop.training.config import resolved
from derprop.training.configfile import load_config
from derprop.training.tables import ABLATIONS, MATRIX, overrides_for, run_name


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, source() / "scripts" / f"{name}.py")
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_matrix_covers_tables_1_to_4_with_the_papers_numbers(repo):
    cells = {(e.table, e.row, e.column): e.paper for e in MATRIX}
    assert cells[("1", "DerProp", "92")] == 77.6 and cells[("1", "w/o DLP", "92")] == 66.6
    assert ("1", "w/o DLP", "1464") not in cells  # not applicable with every image labeled
    assert cells[("2", "DerProp", "744")] == 62.1
    assert cells[("3", "L_2", "w/o sparsity")] == 76.0 and cells[("3", "L_1", "w/ sparsity")] == 77.6
    assert cells[("4", "eq. 11 (sum)", "183")] == 77.1
    assert len([e for e in MATRIX if e.table == "1"]) == 4 * 5 - 1
    for e in MATRIX:
        assert (repo / e.config).is_file(), e.config
        assert e.ablation in ("", *ABLATIONS), e.ablation


def test_a_run_that_several_tables_report_has_one_number():
    names = {(e.table, e.row, e.column): e.name for e in MATRIX}
    assert names[("1", "DerProp", "92")] == names[("3", "L_1", "w/ sparsity")] == names[("4", "eq. 2 (forward)", "92")]
    assert run_name("configs/voc_92.yaml", "Q2_nosparsity") == "voc_92_Q2_nosparsity"
    numbers: dict[str, set] = {}
    for e in MATRIX:
        numbers.setdefault(e.name, set()).add(e.paper)
    assert {name: n for name, n in numbers.items() if len(n) > 1} == {}


def test_overrides_load_into_a_valid_config(repo):
    for abl in ABLATIONS:
        ov = overrides_for(split="183", profile="paper", ablation=abl, size="smoke", seed=3)
        cfg = load_config(repo / "configs/voc_92.yaml", ov)
        assert cfg.data.split == "183" and cfg.profile == "paper" and cfg.seed == 3 and cfg.optim.epochs == 1
    with pytest.raises(ValueError, match="unknown ablation"):
        overrides_for(ablation="nope")


def test_the_ablation_configs_are_what_the_generator_writes(repo):
    gen = _script("ablation_configs")
    files = gen.generated()
    for path, text in files.items():
        assert path.read_text() == text, f"{path.name} is stale: run python -m scripts.ablation_configs"
        split, ablation = path.stem.split("_", 2)[1:]
        assert resolved(load_config(path)) == resolved(
            load_config(repo / f"configs/voc_{split}.yaml", ABLATIONS[ablation].overrides))
    ablation_files = {p for p in (repo / "configs").glob("voc_*_*.yaml") if p.stem.split("_", 2)[2] in ABLATIONS}
    assert ablation_files == set(files)


def test_the_cpu_benchmarks_run_the_rows_of_the_tables(repo):
    from experiments import ablations_cpu, cpu_evidence

    def config(overrides):
        return resolved(load_config(repo / "configs/cpu_scenes.yaml", list(overrides)))

    rows = {a.row: a.overrides for a in ABLATIONS.values()} | {"eq. 2 (forward)": ()}
    for group in ("Q", "op"):
        for name, overrides in ablations_cpu.GROUPS[group].items():
            assert config(overrides) == config([*ablations_cpu.ACTIVE_DER, *rows[name]]), name
    for key, overrides in cpu_evidence.VARIANTS.items():
        expected = {"full": (), cpu_evidence.BASELINE: ("method.semi_supervised=false",),
                    "detail_upsample": ("method.dlp_upsample=detail",)}.get(key)
        assert config(overrides) == config(ABLATIONS[key].overrides if expected is None else expected), key
    assert config(cpu_evidence.VARIANTS[cpu_evidence.BASELINE])["method"]["momentum"]  # the baseline keeps Θm
