"""Every headline number of the book, with its source and its chapter (book chapter *Results at a glance*).

:func:`headlines` reads what the chapters read — the committed files under ``results/`` and this build's runs
under ``runs/book/<size>/`` — and computes what the maths chapters compute, and returns one row per number: what
it is, the number (Markdown, its words from :mod:`derprop.book.findings`), where it comes from
(:mod:`derprop.book.sources`) and the chapter that shows it. A file or run that is not there gives a row that says
so, never a number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from derprop.book.display import Markdown
from derprop.book.findings import criterion, join, largest_change, number, verdict
from derprop.book.sources import committed, this_build

COMPUTED = "computed as the page was built"
"""The source of a number that the chapter computes from ``derprop`` itself (no file, no run)."""


def _row(what: str, value: str, source: str, chapter: str) -> dict[str, Any]:
    return {"what": what, "value": Markdown(value), "source": Markdown(source),
            "chapter": Markdown(f"{{doc}}`{chapter}`")}


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def maths_rows() -> list[dict[str, Any]]:
    """The maths chapters' headline numbers, computed here (Theorems 1 and 2, the switches)."""
    from derprop.method.derivatives import derivative_matrix, similarity_symmetries
    from derprop.training.tables import DIVERGENCES

    keep_all = sorted({len(similarity_symmetries(d, d - 1)) for d in range(3, 8)})
    sharp = {q: int((derivative_matrix(2 * q + 1, q - 2).T @ derivative_matrix(2 * q + 1, q - 2)).max())
             for q in range(3, 7)}
    return [
        _row("Theorem 1: orthogonal maps that keep the similarities of every order, D = 3 to 7",
             f"{join([str(n) for n in keep_all])} (the theorem says: the identity only)", COMPUTED, "theorems"),
        _row("Theorem 2: the sharp constant for q = 3 to 6",
             ", ".join(str(c) for c in sharp.values()) + " (binomial 2k over k) against the paper's "
             + ", ".join(str(4 ** (q - 2)) for q in sharp), COMPUTED, "theorems"),
        _row("Switches between the paper and the release", str(len(DIVERGENCES)), COMPUTED, "paper_vs_code"),
    ]


def committed_rows(root: str | os.PathLike) -> list[dict[str, Any]]:
    """The CPU and GPU headline numbers of the committed files under ``<root>/results``."""
    folder = Path(root) / "results"
    rows: list[dict[str, Any]] = []

    def source(name: str, data: dict[str, Any]) -> str:
        return committed(folder / name, data, root=root).markdown()

    evidence = _load(folder / "cpu_evidence.json")
    if evidence and evidence.get("claim", {}).get("measured"):
        c, src = evidence["claim"], source("cpu_evidence.json", evidence)
        for net, name in (("backprop", "trained"), ("momentum", "momentum")):
            per = " / ".join(number(100 * v, 1, sign=True) for v in c["diff_per_seed"][net].values())
            rows.append(_row(f"DerProp − supervised + momentum, {name} network, held-out seeds "
                             f"{', '.join(map(str, c['seeds']))}", f"{per} points", src, "ablations_cpu"))
        rows.append(_row(f"The claim ({criterion(c['margin'], 'supervised + momentum')})", verdict(c), src,
                         "ablations_cpu"))
        full = evidence["summary"]["full"]["nets"]["backprop"]
        rows.append(_row(f"DerProp − supervised + momentum, trained network, mean over "
                         f"{len(full['diff_per_seed'])} seeds",
                         f"{number(100 * full['diff']['mean'], 2, sign=True)} points (from "
                         f"{number(100 * full['diff']['min'], 2, sign=True)} to "
                         f"{number(100 * full['diff']['max'], 2, sign=True)})", src, "ablations_cpu"))
        warm = [w["miou"] for w in evidence["warm_start"]["runs"]]
        if len(warm) > 1:
            mean = sum(warm) / len(warm)
            std = (sum((w - mean) ** 2 for w in warm) / (len(warm) - 1)) ** 0.5
            rows.append(_row(f"Warm start over {len(warm)} seeds, mIoU", f"{number(100 * mean)} ± "
                             f"{number(100 * std)} %", src, "ablations_cpu"))
    else:
        rows.append(_row("DerProp against supervised + momentum at CPU scale", "not measured",
                         "`python -m experiments.cpu_evidence`", "ablations_cpu"))
    noise = _load(folder / "thread_noise.json")
    if noise:
        rows.append(_row("The same run at 1 and at 2 threads, mIoU apart",
                         f"{number(100 * noise['machine_range'])} points", source("thread_noise.json", noise),
                         "training_cpu"))
    dlp = _load(folder / "dlp_map.json")
    if dlp:
        src = source("dlp_map.json", dlp)
        o = dlp["oracle"]["full"]["0.5"]
        rows.append(_row("Oracle weights at full resolution, η_ep = 0.5: pixels fixed / broken",
                         f"{o['fixed']:,} / {o['broken']:,}", src, "rectification"))
        share = (dlp.get("break_even_share") or {}).get("kappa")
        learned = dlp["families"]["kappa"][0]["own_share"]
        rows.append(_row("Own-class share: learned weights, and where the κ family breaks even",
                         f"{learned:.3f}; " + ("never breaks even" if share is None else f"{share:.3f}"),
                         src + "; this build's run: in the chapter", "rectification"))
    regime = _load(folder / "dlp_regime.json")
    if regime and regime.get("points"):
        from derprop.book.report import regime_points

        points = regime_points(regime)
        oracle = [min(p[ck]["map"]["bilinear"]["oracle"]["full"]["0.5"]["net"] for ck in ("warm", "derprop"))
                  for p in points]
        first = next((p for p, n in zip(points, oracle) if n > 0), None)
        rows.append(_row("Objects' extent from which oracle weights fix more pseudo-label pixels than they break "
                         "(both checkpoints, the release's upsampling)",
                         f"from {number(first['extent']['median'], 1)} grid cells" if first else
                         f"at none of {len(points)} geometries", source("dlp_regime.json", regime), "dlp_regime"))
    ablations = _load(folder / "ablations_cpu.json")
    levers = {r["name"]: 100 * r["nets"]["backprop"]["diff"]["mean"]
              for r in ((ablations or {}).get("groups", {}).get("levers") or [])
              if r.get("n") and "diff" in r["nets"]["backprop"]}
    if levers:
        rows.append(_row("The lever that moves DerProp's trained network most",
                         largest_change(levers, what="it").removesuffix("."),
                         source("ablations_cpu.json", ablations), "ablations_cpu"))
    fast = _load(folder / "fast_recipe_cpu.json")
    if fast:
        v = fast["verdict"]
        rows.append(_row("Fast recipe (bf16, channels-last, tiled DLP) against fp32, criterion written before",
                         verdict(v) + ("" if v.get("complete") else " (first seeds)"),
                         source("fast_recipe_cpu.json", fast), "reproduction"))
    norms = _load(folder / "paper_dlp_norm.json")
    if norms:
        mious = [r["miou"] for r in norms["runs"]]
        rows.append(_row("Normalisations of the paper's eq. 4, final mIoU apart",
                         f"{number(100 * (max(mious) - min(mious)), 1)} points", source("paper_dlp_norm.json", norms),
                         "paper_vs_code"))
    from derprop.book.report import matrix_results
    from derprop.training.tables import MATRIX

    measured = matrix_results(folder)
    rows.append(_row("Cells of the paper's Tables 1–4 measured on a GPU",
                     f"{sum(e.name in measured for e in MATRIX)} of {len(MATRIX)}",
                     "committed: `results/matrix/`", "reproduction"))
    return rows


def build_rows(root: str | os.PathLike, size: str) -> list[dict[str, Any]]:
    """This build's headline numbers, from ``<root>/runs/book/<size>`` where ``make demo`` trained them; a row
    saying so where they are not trained (this page never trains)."""
    runs = Path(root) / "runs" / "book" / size
    results = {name: _load(runs / name / "results.json") for name in ("cpu_warm", "cpu_dlp", "cpu_sup")}
    if any(r is None for r in results.values()):
        return [_row("This build's CPU runs", "not trained yet", f"`make demo` trains `runs/book/{size}/`",
                     "training_cpu")]
    src = this_build(runs / "cpu_dlp", root=root).markdown()
    mode = results["cpu_dlp"]["miou_mode"]

    def net(name: str, which: str) -> float:
        return 100 * results[name]["final"][which][mode]["miou"]

    return [
        _row("Warm start, seed 0, mIoU", f"{number(100 * results['cpu_warm']['miou'])} %",
             this_build(runs / "cpu_warm", root=root).markdown(), "training_cpu"),
        _row("DerProp − supervised + momentum, seed 0, trained / momentum network",
             f"{number(net('cpu_dlp', 'backprop') - net('cpu_sup', 'backprop'), 2, sign=True)} / "
             f"{number(net('cpu_dlp', 'momentum') - net('cpu_sup', 'momentum'), 2, sign=True)} points", src,
             "training_cpu"),
    ]


def headlines(root: str | os.PathLike, size: str) -> list[dict[str, Any]]:
    """Every headline number: the maths, this build's runs, the committed files (:func:`maths_rows`,
    :func:`build_rows`, :func:`committed_rows`)."""
    return maths_rows() + build_rows(root, size) + committed_rows(root)
