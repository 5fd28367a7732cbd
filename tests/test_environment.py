"""The pins in environment.yml mirror requirements*.txt; pyproject declares ranges."""


import yaml

from derprop.provenance import source


def pins(name: str) -> list[str]:
    lines = (source() / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_environment_yml_mirrors_requirements(repo):
    env = yaml.safe_load((repo / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml needs exactly one `pip:` list"
    expected = pins("requirements.txt") + pins("requirements-dev.txt")
    assert sorted(pip_lists[0]) == sorted(expected), (
        "environment.yml drifted from requirements*.txt: copy the pins across "
        f"(only in yml: {sorted(set(pip_lists[0]) - set(expected))}, "
        f"only in requirements: {sorted(set(expected) - set(pip_lists[0]))})"
    )


def test_requirements_are_exact_pins():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in pins(name):
            assert "==" in line, f"{name}: `{line}` is not pinned with =="


FLOOR_APIS = {
    # the oldest release with each API derprop calls: pyproject's floors are these, not older
    ("torch", "2.6"): ("torch.nn.utils.get_total_norm", "derprop/training/guards.py"),
    ("torchvision", "0.21"): ("torchvision.transforms.v2.Transform.make_params", "derprop/data/augment.py"),
}
"""Measured on 2026-12-07: torch 2.6.0 + torchvision 0.21.0 (PyPI) ran a tiny training run through ``derprop.train``
and 259 tests of ``tests/test_{propagation,losses,augment,checkpoint,model,derivatives,region_propagation,schedule,
trainer,evaluate}.py`` on a CPU; the one other test there needs psutil, which that environment lacked."""


def test_pyproject_floors_are_the_releases_that_brought_the_api_derprop_calls(repo):
    import importlib
    import tomllib

    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    floors = dict(d.split(">=") for d in project["dependencies"] if ">=" in d)
    for (package, version), (api, user) in FLOOR_APIS.items():
        assert floors[package] == version, f"pyproject.toml: {package}>={floors[package]}, but {user} needs {version}"
        assert api.rsplit(".", 1)[1] in (repo / user).read_text(), f"{user} no longer calls {api}: lower the floor?"
        module, _, attr = api.partition(".")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    # the pins (numpy 2.4, scipy 1.17, pandas 3.1, ipython 9) need Python 3.11: pip on 3.10 fails with a resolver error
    assert project["requires-python"] == ">=3.11"
    assert project["license"] == "MIT"  # an SPDX string: setuptools stops building the table form in 2027
    # make setup's editable install builds without isolation, with the setuptools it installs into the venv
    build = tomllib.loads((repo / "pyproject.toml").read_text())["build-system"]["requires"]
    assert f"'{build[0]}'" in (repo / "Makefile").read_text()


def test_constraints_pin_the_same_versions_as_requirements():
    constraints = dict(line.split("==", 1) for line in pins("constraints.txt"))
    constraints = {k.lower().replace("_", "-"): v for k, v in constraints.items()}
    for line in pins("requirements.txt") + pins("requirements-dev.txt"):
        name, version = line.split("==")
        key = name.lower().replace("_", "-")
        assert constraints.get(key) == version, f"constraints.txt pins {name} at {constraints.get(key)}, not {version}"
    assert not any(k.startswith("derprop") for k in constraints), "constraints.txt must not pin derprop itself"


def test_pyproject_runtime_is_lean_and_extras_cover_the_pins(repo):
    import tomllib

    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    runtime = {d.split(">")[0].split("=")[0].lower() for d in project["dependencies"]}
    assert runtime == {"torch", "torchvision", "numpy", "pyyaml", "pillow", "tqdm"}
    extras = project["optional-dependencies"]
    assert {"demo", "book", "cityscapes", "bench", "dev"} <= set(extras)
    declared = runtime | {d.split(">")[0].split("=")[0].split("<")[0].lower() for ds in extras.values() for d in ds}
    for line in pins("requirements.txt") + pins("requirements-dev.txt"):
        assert line.split("==")[0].lower() in declared, f"{line} is pinned but in no extra of pyproject.toml"


def test_make_setup_stops_in_one_line_on_python_3_10(repo, tmp_path):
    """Before pip runs: the pins need 3.11, and pip's resolver error on 3.10 would name none of this."""
    import os
    import shutil
    import subprocess

    fake = tmp_path / "python3.10"
    fake.write_text("#!/bin/sh\necho '3.10 0'\n")  # what the Makefile's version probe prints on Python 3.10
    fake.chmod(0o755)
    work = tmp_path / "checkout"
    work.mkdir()
    shutil.copy(repo / "Makefile", work)
    env = {**os.environ, "MAKEFLAGS": "", "MAKELEVEL": ""}
    for goal in ("setup", "test", "demo"):
        proc = subprocess.run(["make", "--no-print-directory", goal, f"PYTHON={fake}"], cwd=work, capture_output=True,
                              text=True, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert f"{fake} is Python 3.10" in lines[0] and "needs Python 3.11" in lines[0] and "PYTHON=python3.11" in lines[0]
    assert not (work / ".venv").exists()
    (work / ".venv" / "bin").mkdir(parents=True)  # `python3.10 -m venv .venv` first, then make setup
    shutil.copy(fake, work / ".venv" / "bin" / "python")
    proc = subprocess.run(["make", "--no-print-directory", "setup"], cwd=work, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "rm -rf .venv then make setup PYTHON=python3.11" in proc.stderr
