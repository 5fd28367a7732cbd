"""What runs and benchmarks show: a run folder's learning curves and IoU tables, the GPU matrix, the cost of a
run, and the CPU-scale findings.

Explained in the book chapter *Full reproduction on a GPU*: ``pipelines/train.ipynb`` ends with
:func:`learning_curves` and the headline's :func:`iou_table`; ``python -m derprop.train`` prints
:func:`iou_table` for every network and evaluation mode. That chapter's table reads the published summaries
of matrix runs (:func:`matrix_results`) and estimates each run's GPU-hours from the train-step benchmark
(:func:`train_step_rows`, :func:`gpu_hours`), for fp32 and the fast recipe (:func:`recipe_costs`); the start page (*Start here*) states :func:`cpu_findings`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from derprop.book.display import escape_markdown, mean_std
from derprop.book.findings import criterion, number, verdict
from derprop.book.sources import committed
from derprop.data.datasets import split_items
from derprop.training.atomic import read_jsonl
from derprop.training.config import TrainConfig
from derprop.training.configfile import load_config
from derprop.training.evaluation import format_iou_table

NOT_LOSS_TERMS = ("threshold", "mask_ratio", "time_s")
"""The ``train_<name>`` values of ``metrics.jsonl`` that are not loss terms."""


def iou_table(results: Mapping[str, Any], net: str | None = None, mode: str | None = None) -> str:
    """The per-class IoU table of network ``net`` in evaluation ``mode`` of a ``results.json`` (default: the headline)."""
    net, mode = net or results["miou_net"], mode or results["miou_mode"]
    res = results["final"][net][mode]
    names = list(res["iou_per_class"])
    return format_iou_table({**res, "iou_per_class": list(res["iou_per_class"].values()), "mode": mode}, names)


def learning_curves(run_dir: str | os.PathLike) -> Any:
    """A matplotlib figure of a run's ``steps.jsonl`` and ``metrics.jsonl``, three panels one above the other: the
    loss per step with each loss term's epoch mean (eq. 7), the learning rate, and the validation mIoU of both
    networks."""
    import matplotlib.pyplot as plt

    run = Path(run_dir)
    steps, epochs = read_jsonl(run / "steps.jsonl"), read_jsonl(run / "metrics.jsonl")
    fig, (ax_loss, ax_lr, ax_miou) = plt.subplots(3, 1, figsize=(7.5, 9), constrained_layout=True)
    ax_loss.plot([r["global_step"] for r in steps], [r["loss"] for r in steps], color="0.6", lw=0.8,
                 label="loss, per step")
    terms = [k[6:] for k in (epochs[-1] if epochs else {}) if k.startswith("train_") and k[6:] not in NOT_LOSS_TERMS]
    for term in terms:
        ax_loss.plot([r["global_step"] for r in epochs], [r.get(f"train_{term}") for r in epochs], "o-", ms=3,
                     label=f"{term}, epoch mean")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss terms")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_lr.plot([r["global_step"] for r in steps], [r["lr"] for r in steps])
    ax_lr.set(xlabel="step", ylabel="lr (backbone)", title="learning rate (poly)")
    for net in ("backprop", "momentum"):
        rows = [r for r in epochs if r.get(f"miou_{net}") is not None]
        if rows:
            ax_miou.plot([r["epoch"] for r in rows], [100 * r[f"miou_{net}"] for r in rows], "o-", label=f"{net} net")
    mode = next((r["eval_mode"] for r in epochs if "eval_mode" in r), "?")
    ax_miou.set(xlabel="epoch", ylabel="mIoU (%)", title=f"validation mIoU ({mode})")
    ax_miou.legend(fontsize=8)
    fig.suptitle(str(run))
    return fig


SIZES = ("smoke", "small", "full")
"""Sizes of a matrix run (:data:`derprop.training.tables.SIZES`), from the quickest check to the paper's schedule."""


def matrix_results(results_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{run name: summary}`` of the published matrix runs, ``<results_dir>/matrix/<size>/<name>.json``; a
    larger size's summary of a run replaces a smaller one's."""
    found: dict[str, dict[str, Any]] = {}
    for size in SIZES:
        for path in sorted((Path(results_dir) / "matrix" / size).glob("*.json")):
            found[path.stem] = {"size": size, **json.loads(path.read_text())}
    return found


def train_step_rows(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every timed training step of ``bench_train_step_<device>.json`` and ``gpu_check_<device>.json`` (which
    nests the same payload), each row with its file's ``device`` and ``device_name``."""
    rows = []
    folder = Path(results_dir)
    for path in sorted(folder.glob("bench_train_step_*.json")) + sorted(folder.glob("gpu_check_*.json")):
        data = json.loads(path.read_text())
        data = data.get("train_step", data)
        machine = data.get("machine", {})
        rows += [{"file": path.name, "device": machine.get("device", "?"),
                  "device_name": machine.get("device_name") or machine.get("cpu") or "?", **r}
                 for r in data.get("rows", []) if "images_per_s" in r]
    return rows


def recipe(cfg: TrainConfig) -> dict[str, Any]:
    """How a config runs its step, in the train-step benchmark's terms (``benchmarks.train_step`` rows):
    ``amp``, ``channels_last`` and ``impl`` (``dense`` without ``method.chunk``, else ``tiled``)."""
    return {"amp": cfg.optim.amp, "channels_last": cfg.optim.channels_last,
            "impl": "dense" if cfg.method.chunk is None else "tiled"}


def gpu_hours(config: str | os.PathLike, rows: list[dict[str, Any]], data_root: str | os.PathLike | None = None
              ) -> tuple[float, dict[str, Any]] | None:
    """GPU-hours of one full run of ``config`` on one GPU, from the fastest step measured on a CUDA device for its
    backbone at its crop with the config's own :func:`recipe` (fp32 or the fast recipe; a compiled step does not
    count, training does not compile), with that row; ``None`` without such a row (``rows``: :func:`train_step_rows`).

    A step trains on one batch of labeled and one of unlabeled images (``images_per_s`` counts both), an epoch
    takes ``N_u // batch`` steps, so a run takes ``epochs · N_u · 2 / images_per_s`` seconds (data loading and
    evaluation not counted): an estimate. On ``n`` GPUs divide by about ``n``.
    """
    on_gpu = [r for r in rows if r["device"] != "cpu"]
    if not on_gpu:
        return None
    cfg = load_config(config)
    want = recipe(cfg)
    fits = [r for r in on_gpu if r.get("crop") == cfg.data.crop_size
            and r.get("backbone", cfg.model.backbone) == cfg.model.backbone and not r.get("compile")
            and all(r.get(k) == v for k, v in want.items())]
    if not fits:
        return None
    best = max(fits, key=lambda r: r["images_per_s"])
    n_u = len(split_items(cfg.data.layout, cfg.data.split, "unlabeled", data_root))
    return cfg.optim.epochs * n_u * 2 / best["images_per_s"] / 3600, best


RECIPE_PAIRS = (("configs/voc_92.yaml", "configs/voc_92_fast.yaml"),
                ("configs/cityscapes_186.yaml", "configs/cityscapes_186_fast.yaml"))
"""Reproduction configs in fp32 and with the fast recipe (bf16 autocast, channels-last, tiled DLP)."""


def recipe_costs(root: str | os.PathLike, rows: list[dict[str, Any]], data_root: str | os.PathLike | None = None
                 ) -> list[dict[str, Any]]:
    """Per config of :data:`RECIPE_PAIRS`: its :func:`recipe` and the estimated GPU-hours of one full run
    (:func:`gpu_hours`; ``None`` where no CUDA step of that recipe was measured), with the step it came from."""
    out = []
    for pair in RECIPE_PAIRS:
        for config in pair:
            cfg = load_config(Path(root) / config)
            cost = gpu_hours(Path(root) / config, rows, data_root)
            used = cost[1] if cost else None
            out.append({"config": config, **recipe(cfg), "chunk": cfg.method.chunk,
                        "hours": cost[0] if cost else None,
                        "source": None if used is None else
                        f"{used['file']} ({used['device_name']}, {used['config']}, crop {used['crop']}: "
                        f"{used['images_per_s']:.1f} images/s)"})
    return out


def cpu_findings(results_dir: str | os.PathLike) -> list[str]:
    """What the CPU-scale runs found, in sentences with their numbers (Markdown), each ending with its source
    (:func:`derprop.book.sources.committed`: the file, its date, machine and threads), from ``cpu_evidence.json``
    (``python -m experiments.cpu_evidence``) and ``dlp_map.json`` (``python -m experiments.dlp_map``); a sentence
    saying which file is missing where one is; then, where ``dlp_regime.json`` exists, :func:`regime_findings`.
    Every value read from the files shows as text (:func:`_quote`)."""
    folder = Path(results_dir)
    root = folder.parent
    out = []
    evidence = folder / "cpu_evidence.json"
    if evidence.is_file():
        data = json.loads(evidence.read_text())
        src = committed(evidence, data, root=root).markdown()
        claim = data.get("claim")
        if claim and claim.get("measured"):
            per_net = {net: " / ".join(_quote(100 * d if _is_number(d) else d, "+.1f") for d in per.values())
                       for net, per in claim["diff_per_seed"].items()}
            margin = claim["margin"]
            out.append("DerProp against supervised training with the same momentum network, on held-out seeds "
                       f"{', '.join(map(_quote, claim['seeds']))}: trained network {per_net.get('backprop', '–')} pp, "
                       f"momentum network {per_net.get('momentum', '–')} pp; "
                       + (criterion(margin, "that baseline") if _is_number(margin) else "the criterion")
                       + f" is {verdict(claim)} ({src}).")
        full = data.get("summary", {}).get("full", {})
        if "pl_fixed_mean" in full:
            out.append(f"At the last epoch DLP fixed {_quote(full['pl_fixed_mean'], ',.0f')} pseudo-label pixels and "
                       f"broke {_quote(full['pl_broken_mean'], ',.0f')} (mean of {len(full.get('seeds', []))} seeds); "
                       f"a foreground pixel took {_quote(full['attn_share_ratio_mean'], '.2f')}× the uniform share of "
                       f"its propagation weights from its own class ({src}).")
    else:
        out.append("No CPU evidence yet: `python -m experiments.cpu_evidence` writes `results/cpu_evidence.json`.")
    dlp_map = folder / "dlp_map.json"
    if dlp_map.is_file():
        data = json.loads(dlp_map.read_text())
        oracle = data["oracle"]["full"]["0.5"]
        share = (data.get("break_even_share") or {}).get("kappa")
        detail = (data.get("detail") or {}).get("break_even_share", {}).get("kappa")
        learned = data["families"]["kappa"][0]["own_share"] if data.get("families", {}).get("kappa") else None
        out.append(f"With perfect (oracle) propagation weights DLP would fix {_quote(oracle['fixed'], ',')} and break "
                   f"{_quote(oracle['broken'], ',')} pixels at $\\eta_{{ep}}$ = 0.5; "
                   + (f"it breaks even at an own-class share of {_quote(share, '.2f')}" if share is not None
                      else "no point of the κ family breaks even with the release's upsampling")
                   + (f", and at {_quote(detail, '.2f')} with a detail-preserving one" if detail is not None else "")
                   + (f"; the learned weights of the run it scored give {_quote(learned, '.2f')}"
                      if learned is not None else "")
                   + f" ({committed(dlp_map, data, root=root).markdown()}; chapter *Pseudo-label rectification, "
                   "interactively* scores this build's run).")
    else:
        out.append("No DLP map yet: `python -m experiments.dlp_map` writes `results/dlp_map.json`.")
    regime = folder / "dlp_regime.json"
    if regime.is_file():
        load = lambda name: json.loads((folder / name).read_text()) if (folder / name).is_file() else None  # noqa: E731
        out += regime_findings(json.loads(regime.read_text()), load("dlp_regime_plan.json"),
                               load("dlp_regime_miniature.json"), load("dlp_upsample_default.json"))
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _quote(value: Any, spec: str = "") -> str:
    """A value read from a results file, for a Markdown sentence: a number formatted with ``spec``, anything
    else as text that shows its characters (:func:`derprop.book.display.escape_markdown`)."""
    return format(value, spec) if _is_number(value) else escape_markdown(value)


MAP_FAMILIES = {"kappa": "κ bonus on the similarity logits", "alpha": "α mix with the oracle",
                "temperature": "temperature T (no labels)"}
"""The DLP map's families (:mod:`derprop.book.dlp_map`), as the figure's legend names them."""


def dlp_map_figure(data: Mapping[str, Any], eta: str = "0.5") -> Any:
    """The DLP map of ``results/dlp_map.json`` (``python -m experiments.dlp_map``, or
    :func:`derprop.book.dlp_map.full_map` with ``rows``): net pixels fixed − broken at blend weight ``eta``
    (``η_ep`` of eq. 5) against the own-class share of the weights, at full resolution and on the grid points
    (two panels, one above the other),
    one line per family, the oracle and every trained row marked, and at full resolution the κ family and the
    oracle with the detail-preserving upsampling (open markers; chapter *Pseudo-label rectification,
    interactively*)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(7.5, 8), layout="constrained")
    for ax, where in zip(axes, ("full", "grid")):
        for k, (family, points) in enumerate(data["families"].items()):
            pts = sorted(points, key=lambda p: p["own_share"])
            ax.plot([p["own_share"] for p in pts], [p[where][eta]["net"] for p in pts], "o-", ms=4, color=f"C{k}",
                    label=MAP_FAMILIES.get(family, family))
        oracle = data["oracle"]
        ax.plot(oracle["own_share"], oracle[where][eta]["net"], "*", ms=16, color="k", label="oracle weights")
        detail = data.get("detail")
        if detail and where == "full":
            pts = sorted(detail["families"]["kappa"], key=lambda p: p["own_share"])
            ax.plot([p["own_share"] for p in pts], [p["full"][eta]["net"] for p in pts], "o--", ms=4, color="C0",
                    mfc="white", label="κ bonus, detail-preserving upsampling")
            ax.plot(detail["oracle"]["own_share"], detail["oracle"]["full"][eta]["net"], "*", ms=16, color="k",
                    mfc="white", label="oracle, detail-preserving upsampling")
        for k, (name, row) in enumerate(data["rows"].items()):
            ax.plot(row["own_share"], row[where][eta]["net"], "D", ms=8, color=f"C{k + 4}", label=f"trained: {name}")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set(xlabel="own-class share of a foreground pixel's weights", ylabel="fixed − broken pixels",
               title=("full resolution" if where == "full" else "grid points only") + f", $\\eta_{{ep}}$ = {eta}")
    for source, style in ((data, "-"), (data.get("detail") or {}, "--")):
        share = (source.get("break_even_share") or {}).get("kappa")
        if share is not None:
            axes[0].axvline(share, color="C0", ls=style, lw=0.8, alpha=0.6)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, frameon=False, fontsize=10)
    return fig


NET_NAMES = {"backprop": "trained Θb", "momentum": "momentum Θm", "headline": "headline"}
"""The three numbers of a CPU run (``experiments.cpu_evidence.NETS``), as the book's tables name them."""


def paired_records(summary: Mapping[str, Mapping[str, Any]], nets: tuple[str, ...] = ("backprop", "momentum"),
                   names: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Table records of a CPU benchmark summary (``results/cpu_evidence.json`` or a group of
    ``results/ablations_cpu.json``; chapter *Ablations at CPU scale*): per row and network, mIoU % as mean ± std
    over seeds ("(n = 1)" for one seed), and the paired difference to the same network of the reference row seed
    by seed (pp, seeds in order) with its mean."""
    out = []
    for key, s in summary.items():
        rec = {"row": (names or {}).get(key, key), "seeds": ", ".join(map(str, s["seeds"]))}
        for net in nets:
            e = s["nets"].get(net)
            rec[net] = "–" if e is None else mean_std(100 * e["mean"], 100 * e["std"],
                                                      len(e.get("per_seed") or s["seeds"]))
            d = (e or {}).get("diff_per_seed")
            if d:
                per_seed = " / ".join(number(100 * v, 1, sign=True) for _, v in sorted(d.items(), key=lambda t: int(t[0])))
                rec[f"d_{net}"] = f"{per_seed} (mean {number(100 * e['diff']['mean'], 2, sign=True)})"
            else:
                rec[f"d_{net}"] = "reference" if key == s.get("reference") else "–"
        out.append(rec)
    return out


def paired_columns(nets: tuple[str, ...] = ("backprop", "momentum"), reference: str = "the reference") -> list[str]:
    """The columns of :func:`paired_records` for :func:`derprop.book.display.table`."""
    cols = ["row", "seeds"]
    for net in nets:
        cols += [f"{net}={NET_NAMES[net]}: mIoU %", f"d_{net}=Δ vs {reference}, per seed (pp)"]
    return cols


REGIME_LINES = {("oracle", "bilinear"): ("k", "-", "*"), ("oracle", "detail"): ("k", "--", "*"),
                ("learned", "bilinear"): ("C0", "-", "o"), ("learned", "detail"): ("C0", "--", "o")}
"""The regime figure's lines: (weights, upsampling) → colour, line style, marker."""

CHECKPOINTS = {"warm": "supervised warm start", "derprop": "after the DerProp phase"}
"""The two checkpoints of every geometry of ``results/dlp_regime.json``, as the book names them."""


def net_per_thousand(point: dict[str, Any], upsample: str, weights: str, where: str = "full",
                     eta: float = 0.5) -> float:
    """Net fixed − broken pseudo-label pixels of a :func:`~derprop.book.dlp_map.regime_point` per 1,000 pixels
    counted ``where``."""
    return 1000 * point[upsample][weights][where][f"{eta:g}"]["net"] / point["pixels"][where]


def regime_points(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The geometries of ``results/dlp_regime.json`` (``python -m experiments.dlp_regime``), by objects' extent."""
    return sorted(data["points"], key=lambda p: p["extent"]["median"])


def regime_figure(data: Mapping[str, Any], eta: str = "0.5") -> Any:
    """The regime map (chapter *Where DLP can help*): net pseudo-label pixels fixed − broken per 1,000 at full
    resolution and blend weight ``eta`` against the objects' median extent in grid cells, for the learned and the
    oracle weights with the release's bilinear and the detail-preserving upsampling; one panel per checkpoint
    (:data:`CHECKPOINTS`); the CPU default (``data["default"]``) and the paper's setting (``data["paper"]``: from
    its objects' median extent to the extent of the median object pixel) marked."""
    import matplotlib.pyplot as plt

    points = regime_points(data)
    x = [p["extent"]["median"] for p in points]
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 7.6), sharex=True, layout="constrained")
    paper = data.get("paper")
    default = next((p for p in points if p["name"] == data.get("default")), None)
    for ax, (ck, title) in zip(axes, CHECKPOINTS.items()):
        for (weights, up), (colour, style, marker) in REGIME_LINES.items():
            y = [net_per_thousand(p[ck]["map"], up, weights, eta=float(eta)) for p in points]
            ax.plot(x, y, marker=marker, ls=style, color=colour, ms=8 if marker == "*" else 5,
                    mfc="white" if up == "detail" else colour,
                    label=f"{weights} weights, {'bilinear (release)' if up == 'bilinear' else 'detail-preserving'}")
        ax.axhline(0, color="0.5", lw=0.8)
        if default is not None:
            ax.axvline(default["extent"]["median"], color="C3", lw=1, ls=":", label="CPU default")
        if paper is not None:
            ax.axvspan(paper["extent"]["median"], paper["extent"]["pixel_median"], color="C2", alpha=0.15,
                       label=f"paper: VOC at a {paper['grid']}×{paper['grid']} grid")
        ax.set(ylabel="fixed − broken per 1,000", title=f"{title}, $\\eta_{{ep}}$ = {eta}, full resolution")
    axes[-1].set(xscale="log", xlabel="objects' median extent (grid cells, √ of the area)")
    ticks = sorted({round(v, 1) for v in x} | ({round(paper["extent"]["pixel_median"])} if paper else set()))
    axes[-1].set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes[-1].minorticks_off()
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, frameon=False)
    return fig


def headroom_figure(data: Mapping[str, Any], threshold_pp: float = 8.0) -> Any:
    """Per geometry of ``results/dlp_regime.json``, val mIoU of the trained network after the two supervised phases
    (400 + 300 steps) with 62 and with every label, and of DerProp from the same warm start (left); the headroom,
    all labels minus 62, after both phases and after the first alone (right), against ``threshold_pp`` (the
    miniature's condition; chapter *Where DLP can help*)."""
    import matplotlib.pyplot as plt

    points = regime_points(data)
    x = [p["extent"]["median"] for p in points]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(7.5, 3.6), layout="constrained")
    for key, label, style in (("all_labels_supervised", "all 2,000 labels", "s-"),
                              ("supervised", "62 labels (+ momentum)", "o-"), ("derprop", "62 + DerProp", "D--")):
        ax.plot(x, [100 * p[key]["miou_backprop"] for p in points], style, label=label)
    ax.set(xscale="log", xlabel="objects' extent (cells)", ylabel="val mIoU (%)", title="after 700 steps")
    ax.legend(fontsize=10)
    bx.plot(x, [100 * p["headroom"]["full"] for p in points], "o-", color="C4", label="after 700 steps")
    bx.plot(x, [100 * p["headroom"]["warm"] for p in points], "o:", color="C4", mfc="white", label="after 400")
    bx.axhline(threshold_pp, color="0.4", ls="--", lw=1)
    bx.set(xscale="log", xlabel="objects' extent (cells)", ylabel="headroom (pp)", title="all labels − 62 labels")
    bx.legend(fontsize=10)
    for a in (ax, bx):
        a.set_xticks([round(v, 1) for v in x], [f"{v:.1f}" for v in x], fontsize=9)
        a.minorticks_off()
    return fig


def regime_records(data: Mapping[str, Any], eta: str = "0.5") -> list[dict[str, Any]]:
    """One table record per geometry of ``results/dlp_regime.json``: its settings, extent, mIoU, headroom, and per
    checkpoint the nets per 1,000 pseudo-label pixels (full resolution, ``eta``), the learned weights' own-class
    share as a multiple of uniform, the κ family's break-even share and the ceiling's whole-region part."""
    out = []
    for p in regime_points(data):
        crop = p.get("crop_size", p["size"])
        rec = {"geometry": f"{p['size']} px{f' (crop {crop})' if crop != p['size'] else ''}, OS {p['output_stride']}"
                           f"{', one large object' if 'big' in p['name'] else ''}",
               "grid": p["derprop"]["map"]["grid"][0], "extent": p["extent"]["median"],
               "warm": p["warm"]["miou"], "sup": p["supervised"]["miou_backprop"],
               "all": p["all_labels_supervised"]["miou_backprop"], "headroom": 100 * p["headroom"]["full"],
               "headroom_warm": 100 * p["headroom"]["warm"], "dlp": p["derprop"]["miou_backprop"],
               "dlp_m": p["derprop"]["miou_momentum"], "sup_m": p["supervised"]["miou_momentum"]}
        for ck in CHECKPOINTS:
            m = p[ck]["map"]
            for up in ("bilinear", "detail"):
                for weights in ("oracle", "learned"):
                    rec[f"{ck}_{weights}_{up}"] = net_per_thousand(m, up, weights, eta=float(eta))
            rec[f"{ck}_ratio"] = m["bilinear"]["learned"]["share_ratio"]
            rec[f"{ck}_break_even"] = m["bilinear"]["break_even_share"]
            rec[f"{ck}_whole"] = m["ceiling"]["whole_region"] / max(m["ceiling"]["wrong"], 1)
        out.append(rec)
    return out


def cited(name: str, data: Mapping[str, Any]) -> str:
    """Where a book number comes from (Markdown): ``committed: `results/<name>` (date, machine, threads)``, as
    :func:`derprop.book.sources.committed` writes it."""
    return committed(Path("results") / name, data, root=Path(".")).markdown()


def _first(points: list[dict[str, Any]], test) -> dict[str, Any] | None:
    return next((p for p in points if test(p)), None)


def regime_findings(regime: Mapping[str, Any], plan: Mapping[str, Any] | None = None,
                    miniature: Mapping[str, Any] | None = None,
                    upsample: Mapping[str, Any] | None = None) -> list[str]:
    """What chapter *Where DLP can help* found, in sentences with their numbers and sources (Markdown), from
    ``results/dlp_regime.json`` and, where they exist, ``dlp_regime_plan.json``, ``dlp_regime_miniature.json`` and
    ``dlp_upsample_default.json``; the chapter's verdict and the start page's finding."""
    points = regime_points(regime)
    lo, hi = points[0], points[-1]
    oracle = lambda p, ck, up="bilinear": p[ck]["map"][up]["oracle"]["full"]["0.5"]["net"]  # noqa: E731
    inside = _first(points, lambda p: oracle(p, "warm") > 0 and oracle(p, "derprop") > 0)
    out = [f"From {lo['extent']['median']:.1f} to {hi['extent']['median']:.1f} grid cells across "
           f"({len(points)} geometries, `results/dlp_regime.json`), oracle weights with the release's upsampling "
           f"net {number(net_per_thousand(lo['derprop']['map'], 'bilinear', 'oracle'), 1, sign=True)} and "
           f"{number(net_per_thousand(hi['derprop']['map'], 'bilinear', 'oracle'), 1, sign=True)} pseudo-label pixels per 1,000 after "
           "the DerProp phase; "
           + (f"they fix more than they break on both checkpoints from {inside['extent']['median']:.1f} cells on"
              if inside else "they never fix more than they break on both checkpoints")
           + f". The learned weights net {number(net_per_thousand(lo['derprop']['map'], 'bilinear', 'learned'), 1, sign=True)} and "
           f"{number(net_per_thousand(hi['derprop']['map'], 'bilinear', 'learned'), 1, sign=True)}."]
    enough = [p for p in points if 100 * p["headroom"]["full"] >= 8]
    out.append(f"The headroom (all labels − 62 after the same 700 supervised steps) is "
               f"{number(100 * lo['headroom']['full'], 1, sign=True)} pp at the CPU default and {number(100 * hi['headroom']['full'], 1, sign=True)} pp "
               "at the largest extent; "
               + ("8 pp or more at " + ", ".join(f"{p['extent']['median']:.1f}" for p in enough) + " cells."
                  if enough else "never 8 pp."))
    if plan is not None and plan.get("chosen") and miniature is not None:
        c = miniature["claim"]
        per = {net: " / ".join(number(100 * v, 1, sign=True) for v in c["diff_per_seed"][net].values()) for net in c["diff_per_seed"]}
        out.append(f"At the chosen geometry ({plan['chosen']}, `results/dlp_regime_miniature.json`) DerProp − supervised "
                   f"+ momentum on held-out seeds {', '.join(map(str, c['seeds']))}: trained network "
                   f"{per.get('backprop', '–')} pp, momentum network {per.get('momentum', '–')} pp; the claim "
                   f"(≥ {100 * c['margin']:g} pp on every seed, this book's criterion) is {verdict(c)}.")
    elif plan is not None and not plan.get("chosen"):
        out.append("No geometry of the sweep meets both conditions of the miniature (`results/dlp_regime_plan.json`).")
    for name, data in (("dlp_upsample_default.json", upsample), ("dlp_regime_miniature.json", miniature)):
        detail = ((data or {}).get("summary_vs_full") or {}).get("detail_upsample")
        if detail:
            d = {net: 100 * detail["nets"][net]["diff"]["mean"] for net in ("backprop", "momentum")
                 if "diff" in detail["nets"].get(net, {})}
            out.append(f"Detail-preserving against bilinear upsampling, trained (`results/{name}`, seeds "
                       f"{', '.join(map(str, detail['seeds']))}): trained network {d.get('backprop', float('nan')):+.2f} "
                       f"pp, momentum network {d.get('momentum', float('nan')):+.2f} pp on average.")
    return out
