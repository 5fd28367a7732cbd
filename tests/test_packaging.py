"""`pip install .` (not editable) into a fresh venv that sees only the lean runtime, then predict.

Offline and fast: the fresh venv gets no packages of its own; a ``.pth`` file
points it at a folder of symlinks to exactly the installed distributions that
pyproject's runtime dependencies need (their transitive closure, markers
evaluated), so an undeclared import (scipy, matplotlib, psutil, ...) fails
here. The wheel is built from a copy of the package sources, with no build
isolation and no index.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.test_predict import save_tiny_checkpoint, write_image

from derprop.provenance import source

SOURCES = ("derprop", "data_prep", "pyproject.toml", "README.md", "LICENSE")


def runtime_requirements() -> list[str]:
    return tomllib.loads((source() / "pyproject.toml").read_text())["project"]["dependencies"]


def closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Installed distributions needed by ``requirements``, transitively (platform markers evaluated, no extras)."""
    found: dict[str, md.Distribution] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            found[name] = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # e.g. a CUDA-only dependency this machine's build does without
        todo += [Requirement(r) for r in found[name].requires or []]
    return found


def lean_site(folder: Path, dists: dict[str, md.Distribution]) -> Path:
    """A folder of symlinks to the top-level files of ``dists`` (packages, modules, .dist-info)."""
    folder.mkdir()
    for dist in dists.values():
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (folder / top).exists() and top != "__pycache__":
                (folder / top).symlink_to(src)
    return folder


@pytest.mark.slow
def test_non_editable_install_with_only_the_lean_runtime_predicts(repo, tmp_path):
    dists = closure(runtime_requirements())
    assert {"torch", "torchvision", "numpy", "pillow", "pyyaml", "tqdm"} <= set(dists)
    assert not {"scipy", "matplotlib", "psutil", "pandas"} & set(dists), "a demo package leaked into the runtime"

    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (repo / name).is_dir() else shutil.copy)(repo / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                    str(tmp_path / "wheels"), str(src)], check=True, cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "lean_runtime.pth").write_text(f"{lean_site(tmp_path / 'lean', dists)}\n")
    wheel = next((tmp_path / "wheels").glob("derprop-*.whl"))
    subprocess.run([*pip, "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)

    work = tmp_path / "work"
    work.mkdir()
    save_tiny_checkpoint(work / "best.pt")
    write_image(work / "a.jpg")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(py), *args], capture_output=True, text=True, cwd=work, env=env)

    where = run("-c", "import derprop, data_prep; print(derprop.__file__); print(data_prep.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    assert run("-c", "import scipy").returncode != 0, "the fresh venv must not see the dev environment"
    proc = run("-m", "derprop.predict", "--checkpoint", "best.pt", "--image", "a.jpg", "--out", "a.png",
               "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (work / "a.png").is_file() and (work / "a_overlay.png").is_file()
    loaded = run("-c", "import derprop; net, cfg = derprop.load_model('best.pt'); print(net.training, cfg['name'])")
    assert loaded.returncode == 0 and loaded.stdout.startswith("False"), loaded.stderr


def test_git_ignores_no_source_file():
    """A source file that .gitignore matches (``data/`` once matched ``derprop/data/__init__.py``) is on this disk
    but missing from every fresh clone: no .py, .md, .yaml or .ipynb of the package, tools, book or tests is ignored."""
    if not (source() / ".git").exists():
        pytest.skip("not a git checkout")
    folders = ["derprop", "data_prep", "benchmarks", "experiments", "pipelines", "scripts", "tests", "book", "configs"]
    listed = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--", *folders],
                            cwd=source(), capture_output=True, text=True, check=True).stdout.split()
    ignored = [p for p in listed if p.endswith((".py", ".md", ".yaml", ".ipynb")) and "/_build/" not in f"/{p}"
               and ".ipynb_checkpoints" not in p]
    assert not ignored, f".gitignore hides source files from git (anchor the pattern, e.g. /data/): {ignored}"
