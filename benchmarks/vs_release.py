"""DerProp against the released code, side by side on this machine: the similarity block and the whole step.

    python -m benchmarks.vs_release --release DIR     # DIR: a checkout of the authors' release (GitHub
                                                      # ForawardStar/DerProp) that you fetched; needs einops
    python -m benchmarks.vs_release --release DIR --parts memory   # one step's memory at crops up to 801
    python -m benchmarks.vs_release                   # no release given: says so in one line and stops

Parts (``--parts``, default ``block step``): ``block``, the similarity block below; ``step``, the whole official
training step of derprop in fp32 (``configs/voc_92.yaml``) and with the fast recipe (``configs/voc_92_fast.yaml``)
against the release's, after a value check, timed at ``--step-crops`` (:mod:`benchmarks.release_step`); ``memory``,
one step's peak memory of each side at ``--memory-sizes`` (up to crop 801, each process limited to ``--limit-gib``)
and its scaling to one GPU. Each part replaces its own section of the results file and keeps the others.

The release is **imported at run time** from ``DIR`` (its ``model/semseg/segmentation.py``, class ``Corr``:
the two similarity heads, L̃, the similarity matrices of its loss and the region maps); nothing of it is
copied into this repository. Its per-step loss arithmetic and its region loop live in its ``main.py``, which
cannot be imported; they are restated here (:func:`release_block`), line references in the comments.

The block, on one batch of ``B`` labeled + ``B`` unlabeled images (weak view) and ``B`` strong views, from the
projection features J(F4) and the decoder logits on, forward and backward:

- the two 1×1 heads and L̃ (eq. 4, the release's row softmax) of the weak and the strong batch, upsampled to the
  crop, each under a cross-entropy against fixed targets (so that L̃ has a gradient);
- the derivative loss (eq. 8/9 as the release computes it): labeled, unlabeled and the sparsity term;
- region propagation (CorrMatch) on the unlabeled weak images, 128 sampled rows.

``derprop-dense`` is the official profile with ``method.chunk=null``, ``derprop-tiled`` with ``--chunk`` rows
per tile. Before any timing, at every crop, one pass of each must agree with the release: L̃ and the
unlabeled derivative and sparsity terms (``--rtol``), the gradients of the heads and of the features
(``--grad-rtol``, relative norm), and the region-propagated pseudo-labels and confident pixels (at least
``--region-agree`` of the pixels: derprop counts each region's classes before any region is applied, the
release region by region, see :func:`derprop.training.pseudo_labels.region_propagation`). The labeled derivative
term's value differs by design (no gradient on either side; ``derprop.training.tables.DIVERGENCES``,
``method.labeled_der_detached``): its two values are recorded, with the release's recomputed from that note.

Then, interleaved (``--rounds`` rounds, each running every implementation once), each measurement in a fresh
process: the median time of ``--repeats`` calls and the peak memory of one call, as the rise of the process's
resident-size high-water mark (``/proc/self/clear_refs``, :func:`benchmarks.common.measure`). Figures are the
medians over the rounds. ``*-region`` rows time region propagation alone (the release: sampling its full
similarity matrix, its region maps and its relabelling loop; derprop: :func:`~derprop.training.pseudo_labels.region_propagation`),
per image.

Block goals (issue 20, on an idle CPU): derprop's block at least 1.5× the release's speed at crop 321 and at most 1/3
of its peak memory at crop 801; region propagation per image no slower than the release's at 321.
``results/vs_release_<device>.json`` says met / not met.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.common import (RESULTS, gradient_gap, machine_info, measure, print_table, repo_path, run_isolated,
                               write_results)

MODULE = "benchmarks.vs_release"
IMPLS = ("release", "derprop-dense", "derprop-tiled", "release-region", "derprop-region")
BLOCKS = ("release", "derprop-dense", "derprop-tiled")
SAMPLES = 128          # region rows, the release's
PROJ_CHANNELS = 256    # J's width, the release's
SPEED_GOAL = 1.5       # release time / derprop time, crop 321
MEMORY_GOAL = 1 / 3    # derprop peak / release peak, crop 801
RELEASE_IGNORE_CLASS = 22  # the release's main.py line 312


def grid_side(crop: int) -> int:
    """Side of the output-stride-8 feature grid (321 → 41, 801 → 101)."""
    s = crop
    for _ in range(3):
        s = (s + 1) // 2
    return s


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #


def make_inputs(batch: int, crop: int, classes: int, seed: int = 0) -> dict[str, Any]:
    """One batch, the same for every implementation: features that follow a blocky class map, decoder logits,
    labels with an ignored border, a pseudo-label with wrong blobs, a CutMix box, the head weights."""
    g = torch.Generator().manual_seed(seed)
    side = grid_side(crop)
    n = 2 * batch  # labeled + unlabeled weak view; the strong view has `batch` images
    cls = F.interpolate(torch.randint(0, classes, (3 * batch, 1, 6, 6), generator=g).float(), size=(side, side),
                        mode="nearest")[:, 0].long()
    emb = torch.randn(classes, PROJ_CHANNELS, generator=g)
    proj = (emb[cls] + torch.randn(3 * batch, side, side, PROJ_CHANNELS, generator=g)).permute(0, 3, 1, 2)
    logits_grid = 2 * torch.randn(3 * batch, classes, side, side, generator=g) + 4 * F.one_hot(cls, classes).permute(
        0, 3, 1, 2)
    full = F.interpolate(cls.unsqueeze(1).float(), size=(crop, crop), mode="nearest")[:, 0].long()
    label = full[:batch].clone()
    border = max(1, crop // 16)
    label[:, -border:] = 255
    wrong = F.interpolate(torch.rand(batch, 1, 8, 8, generator=g), size=(crop, crop), mode="nearest")[:, 0] < 0.15
    mask_c = torch.where(wrong, torch.randint(0, classes, (batch, crop, crop), generator=g), full[batch:n])
    ign_c = torch.zeros(batch, crop, crop, dtype=torch.long)
    ign_c[:, -border:] = 255
    keep_c = (torch.rand(batch, crop, crop, generator=g) < 0.97) & (ign_c != 255)
    box = torch.zeros(batch, crop, crop, dtype=torch.bool)
    box[:, crop // 5:crop // 2, crop // 3:crop // 3 + crop // 4] = True
    heads = [torch.nn.Conv2d(PROJ_CHANNELS, classes, 1) for _ in range(2)]
    for h in heads:
        torch.nn.init.normal_(h.weight, std=0.5 / math.sqrt(PROJ_CHANNELS), generator=g)
        torch.nn.init.normal_(h.bias, std=0.1, generator=g)
    return {
        "proj_w": proj[:n].contiguous(), "proj_s": proj[n:].contiguous(),
        "grid_w": logits_grid[:n].contiguous(), "grid_s": logits_grid[n:].contiguous(),
        "target_w": torch.cat([label, full[batch:n]]), "target_s": full[n:],
        "label": label, "mask_c": mask_c, "keep_c": keep_c, "ign_c": ign_c, "box": box, "tau": 0.85,
        "heads": [{k: v.detach().clone() for k, v in h.state_dict().items()} for h in heads],
        "batch": batch, "crop": crop, "classes": classes,
    }


def _heads(inp: dict, classes: int) -> list[torch.nn.Conv2d]:
    heads = [torch.nn.Conv2d(PROJ_CHANNELS, classes, 1, device=inp["proj_w"].device) for _ in range(2)]
    for h, state in zip(heads, inp["heads"]):
        h.load_state_dict(state)
    return heads


def to_device(inp: dict, device: str) -> dict:
    """``inp`` with every tensor (the heads' weights too) on ``device``."""
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, list):
            return [{k: t.to(device) for k, t in state.items()} for state in v]
        return v

    return {k: move(v) for k, v in inp.items()}


# --------------------------------------------------------------------------- #
# the release's block: its Corr module (imported), its main.py arithmetic (restated)
# --------------------------------------------------------------------------- #


def import_release(release: str):
    """The release's ``Corr`` class, imported from the checkout ``release``."""
    root = Path(release).resolve()
    if not (root / "model" / "semseg" / "segmentation.py").is_file():
        raise SystemExit(f"{root} is not a checkout of the release: model/semseg/segmentation.py is missing")
    sys.path.insert(0, str(root))
    try:
        from model.semseg.segmentation import Corr  # the release's own module, read from DIR at run time
    except ModuleNotFoundError as err:
        raise SystemExit(f"the release's model code needs {err.name!r}: pip install {err.name}") from err
    return Corr


def release_region_loop(maps: torch.Tensor, mask_c: torch.Tensor, keep_c: torch.Tensor, box: torch.Tensor,
                        ign_c: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The release's region relabelling (its main.py lines 259–291), restated: region by region, each seeing the
    label map as the earlier ones left it."""
    mask = mask_c.clone()
    regions = (maps * ~box.unsqueeze(1) * (ign_c != 255).unsqueeze(1)).bool()
    segments = (regions * keep_c.unsqueeze(1)).bool()
    keep = keep_c.clone()
    for i in range(maps.shape[0]):
        for s in range(maps.shape[1]):
            segment, region = segments[i, s], regions[i, s]
            hits = torch.sum(segment)
            if hits == 0 or hits / torch.sum(region) < tau:
                continue
            cls, count = torch.unique(mask[i][segment], return_counts=True)
            if torch.max(count) / torch.sum(count) > tau:
                mask[i][region] = cls[torch.argmax(count)]
                keep[i] = keep[i] | region
    return mask, keep | keep_c


def release_labeled_target(label: torch.Tensor, side: int) -> torch.Tensor:
    """The release's S_GT (main.py lines 309–313): the label resized bilinearly to the grid (the release writes
    41×41, crop 321; here the crop's grid), 255 → 22, one-hot over 0..max, YᵀY/√(K−2)."""
    grid = F.interpolate(label.unsqueeze(1).float(), (side, side), mode="bilinear", align_corners=True).flatten(1)
    grid[grid == 255] = RELEASE_IGNORE_CLASS
    y = F.one_hot(grid.long()).float()
    return y @ y.transpose(1, 2) / math.sqrt(y.shape[2] - 2)


def release_block(Corr, inp: dict, seed: int) -> dict[str, Any]:
    """The release's similarity block, forward and backward; returns its values, gradients and pseudo-labels."""
    b, c, crop = inp["batch"], inp["classes"], inp["crop"]
    corr = Corr(nclass=c)
    for conv, state in zip((corr.conv1, corr.conv2), inp["heads"]):
        conv.load_state_dict(state)
    proj_w, proj_s = inp["proj_w"].clone().requires_grad_(), inp["proj_s"].clone().requires_grad_()
    size = (crop, crop)
    # the network's `out` at the crop size, which Corr resizes back to the grid (exact at crops 8k + 1)
    out_w = F.interpolate(inp["grid_w"], size=size, mode="bilinear", align_corners=True)
    out_s = F.interpolate(inp["grid_s"], size=size, mode="bilinear", align_corners=True)
    torch.manual_seed(seed)  # Corr draws its 128 region rows with the global generator
    res_w = corr(proj_w, out_w)
    res_s = corr(proj_s, out_s)
    prop_w = F.interpolate(res_w["out"], size=size, mode="bilinear", align_corners=True)
    prop_s = F.interpolate(res_s["out"], size=size, mode="bilinear", align_corners=True)
    ce = F.cross_entropy(prop_w, inp["target_w"], ignore_index=255) + F.cross_entropy(prop_s, inp["target_s"])
    # main.py 313–319: L1 means over B·M·M, orders 0 and 1 averaged; the weak view's matrices detached
    target = release_labeled_target(inp["label"], grid_side(crop))
    cons_x = (F.l1_loss(res_w["corr_map_ori"][:b].detach(), target)
              + F.l1_loss(res_w["corr_map_ori_1st_diff"][:b].detach(), target)) / 2
    cons_u = (F.l1_loss(res_s["corr_map_ori"], res_w["corr_map_ori"][b:].detach())
              + F.l1_loss(res_s["corr_map_ori_1st_diff"], res_w["corr_map_ori_1st_diff"][b:].detach())) / 2
    norm_x = (res_w["f1_2nd_diff"][:b].abs().mean() + res_w["f2_2nd_diff"][:b].abs().mean()) / 2
    norm_u = (res_s["f1_2nd_diff"].abs().mean() + res_s["f2_2nd_diff"].abs().mean()) / 2
    total = ce + 0.5 * (cons_x + cons_u) + 0.25 * (norm_x + norm_u)
    total.backward()
    with torch.no_grad():
        mask, keep = release_region_loop(res_w["corr_map"][b:], inp["mask_c"], inp["keep_c"], inp["box"],
                                         inp["ign_c"], inp["tau"])
    return {"prop_w": prop_w.detach(), "prop_s": prop_s.detach(), "der_u": (2 * cons_u + norm_u).detach(),
            "der_x": (2 * cons_x + norm_x).detach(), "mask": mask, "keep": keep,
            "grads": [corr.conv1.weight.grad, corr.conv1.bias.grad, corr.conv2.weight.grad, corr.conv2.bias.grad,
                      proj_w.grad, proj_s.grad]}


# --------------------------------------------------------------------------- #
# derprop's block: the package's own functions
# --------------------------------------------------------------------------- #


def official(chunk: int | None):
    """The official profile's method and loss sections, DLP and the derivative loss tiled by ``chunk`` rows."""
    from derprop.training.configfile import load_config

    cfg = load_config(None, ["profile=official", f"method.chunk={'null' if chunk is None else chunk}"])
    return cfg.method, cfg.loss


def derprop_block(inp: dict, m, lc, rows: torch.Tensor) -> dict[str, Any]:
    """The same block through derprop (``m, lc``: :func:`official`): heads,
    :func:`~derprop.training.pseudo_labels.propagated_logits`, the derivative terms of :mod:`derprop.training.objective`,
    :func:`~derprop.training.pseudo_labels.region_propagation`."""
    from derprop.training.model import SegOutput
    from derprop.training.objective import derivative_options, labeled_derivative_term, unlabeled_derivative_term
    from derprop.training.pseudo_labels import dlp_options, propagated_logits, region_propagation, weak_features

    b, c, crop = inp["batch"], inp["classes"], inp["crop"]
    head1, head2 = _heads(inp, c)
    proj_w, proj_s = inp["proj_w"].clone().requires_grad_(), inp["proj_s"].clone().requires_grad_()
    size = (crop, crop)

    def seg(proj: torch.Tensor, grid: torch.Tensor) -> SegOutput:
        return SegOutput(logits=grid, f1=head1(proj), f2=head2(proj), logits_fp=None, logits_grid=grid)

    out_w, out_s = seg(proj_w, inp["grid_w"]), seg(proj_s, inp["grid_s"])
    dlp, der = dlp_options(m), derivative_options(m, lc)
    prop_w, prop_s = propagated_logits(out_w, size, **dlp), propagated_logits(out_s, size, **dlp)
    ce = F.cross_entropy(prop_w, inp["target_w"], ignore_index=255) + F.cross_entropy(prop_s, inp["target_s"])
    der_x = labeled_derivative_term(out_w, b, inp["label"], label_resize=m.label_resize,
                                    detached=m.labeled_der_detached, options=der)
    der_u = unlabeled_derivative_term(out_w, out_s, out_s, b, inp["box"],
                                      consistent_targets=m.cutmix_consistent_targets, options=der)
    total = ce + lc.lambda_der * (der_x + der_u)
    total.backward()
    f1, f2, grid = weak_features(out_w, b, m.dlp_temperature)
    mask, keep = region_propagation(f1, f2, grid, rows, inp["mask_c"], inp["keep_c"], inp["box"], inp["ign_c"],
                                    inp["tau"], m.op, c)
    return {"prop_w": prop_w.detach(), "prop_s": prop_s.detach(), "der_u": der_u.detach(), "der_x": der_x.detach(),
            "mask": mask, "keep": keep,
            "grads": [head1.weight.grad, head1.bias.grad, head2.weight.grad, head2.bias.grad, proj_w.grad,
                      proj_s.grad]}


def release_rows(seed: int, pixels: int) -> torch.Tensor:
    """The rows the release's ``Corr.sample`` draws first after ``torch.manual_seed(seed)`` (``randint(0, M − 1)``)."""
    torch.manual_seed(seed)
    return torch.randint(0, pixels - 1, [SAMPLES])


def derprop_labeled_as_the_release(inp: dict) -> float:
    """The release's labeled term, recomputed from the DIVERGENCES note with derprop's loss: all B·M² pairs,
    255 → class 22, target YᵀY/√(K−2) (the check that the note states it exactly)."""
    from derprop.method.losses import derivative_loss

    b, c = inp["batch"], inp["classes"]
    head1, head2 = _heads(inp, c)
    with torch.no_grad():
        f1, f2 = head1(inp["proj_w"][:b]).flatten(2), head2(inp["proj_w"][:b]).flatten(2)
        side = grid_side(inp["crop"])
        grid = F.interpolate(inp["label"].unsqueeze(1).float(), (side, side), mode="bilinear",
                             align_corners=True).flatten(1).long()
        y = F.one_hot(torch.where(grid == 255, RELEASE_IGNORE_CLASS, grid)).transpose(1, 2).float()
        k = y.shape[1]
        return float(derivative_loss(f1, f2, y * math.sqrt(k / (k - 2)), y, labeled=True, normalize="softmax",
                                     eta=1.0, spatial_softmax_sparsity=True))


# --------------------------------------------------------------------------- #
# agreement, then timing
# --------------------------------------------------------------------------- #


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    return float((a - b).norm()) / max(float(b.norm()), floor)


def _grad_rel(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Worst ‖g − g_ref‖ / max(‖g_ref‖, 10⁻³‖all g_ref‖) (:func:`benchmarks.common.gradient_gap`): a bias whose
    true gradient is about 0 is rounding alone."""
    return gradient_gap(dict(enumerate(ref)), dict(enumerate(ours)))["max"]


def run_check(case: dict) -> dict:
    """One pass of the release and of derprop (dense and tiled) on the same batch; their differences."""
    Corr = import_release(case["release"])
    inp = make_inputs(case["batch"], case["crop"], case["classes"])
    seed = 1234
    ref = release_block(Corr, inp, seed)
    rows = release_rows(seed, grid_side(case["crop"]) ** 2)
    out: dict[str, Any] = {"crop": case["crop"], "M": grid_side(case["crop"]) ** 2, "batch": case["batch"]}
    labeled_note = derprop_labeled_as_the_release(inp)
    out["labeled_term"] = {"release": float(ref["der_x"]), "release_from_the_note": labeled_note,
                           "note_rel_diff": abs(labeled_note - float(ref["der_x"])) / abs(float(ref["der_x"]))}
    passed = out["labeled_term"]["note_rel_diff"] <= case["rtol"]
    for impl, chunk in (("derprop-dense", None), ("derprop-tiled", case["chunk"])):
        ours = derprop_block(inp, *official(chunk), rows)
        res = {
            "prop_rel_diff": max(_rel(ours["prop_w"], ref["prop_w"]), _rel(ours["prop_s"], ref["prop_s"])),
            "der_u_rel_diff": abs(float(ours["der_u"] - ref["der_u"])) / abs(float(ref["der_u"])),
            "grad_rel_diff": _grad_rel(ours["grads"], ref["grads"]),
            "mask_agree": float((ours["mask"] == ref["mask"]).float().mean()),
            "keep_agree": float((ours["keep"] == ref["keep"]).float().mean()),
            "relabelled_fraction": float((ref["mask"] != inp["mask_c"]).float().mean()),
            "labeled_term": float(ours["der_x"]),
            "labeled_term_rel_diff": abs(float(ours["der_x"] - ref["der_x"])) / abs(float(ref["der_x"])),
        }
        res["passed"] = (res["prop_rel_diff"] <= case["rtol"] and res["der_u_rel_diff"] <= case["rtol"]
                         and res["grad_rel_diff"] <= case["grad_rtol"]
                         and min(res["mask_agree"], res["keep_agree"]) >= case["region_agree"])
        passed = passed and res["passed"]
        out[impl] = res
    out["passed"] = passed
    return out


def block_step(case: dict) -> Callable[[], None]:
    """The measured call of one implementation."""
    inp = make_inputs(case["batch"], case["crop"], case["classes"])
    pixels = grid_side(case["crop"]) ** 2
    impl = case["impl"]
    if impl.startswith("release"):
        Corr = import_release(case["release"])
    if impl == "release":
        return lambda: release_block(Corr, inp, 0)
    if impl in ("derprop-dense", "derprop-tiled"):
        m, lc = official(None if impl == "derprop-dense" else case["chunk"])
        return lambda: derprop_block(inp, m, lc, release_rows(0, pixels))
    from derprop.method.propagation import official_similarity_factors

    if impl == "derprop-region":
        return region_step(inp)
    side = grid_side(case["crop"])
    f1, f2, args = region_inputs(inp)
    corr = Corr(nclass=case["classes"])
    with torch.no_grad():  # its full similarity matrix, which the release computes for L̃ anyway
        g1, g2 = official_similarity_factors(f1, f2)
        full = (g1.transpose(1, 2) @ g2).softmax(-1)

    def release_region() -> None:
        with torch.no_grad():
            maps = corr.normalize_corr_map(corr.sample(full, side, side), side, side, case["crop"], case["crop"])
            release_region_loop(maps, *args)

    return release_region


def region_inputs(inp: dict) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """``f1, f2`` of the unlabeled weak images (the heads on their features) and the pseudo-label arguments of
    region propagation (``mask_c, keep_c, box, ign_c, tau``)."""
    b = inp["batch"]
    head1, head2 = _heads(inp, inp["classes"])
    with torch.no_grad():
        f1, f2 = head1(inp["proj_w"][b:]).flatten(2), head2(inp["proj_w"][b:]).flatten(2)
    return f1, f2, (inp["mask_c"], inp["keep_c"], inp["box"], inp["ign_c"], inp["tau"])


def region_step(inp: dict) -> Callable[[], Any]:
    """derprop's region propagation of the unlabeled weak images, 128 rows, as one call."""
    from derprop.training.pseudo_labels import region_propagation

    side = grid_side(inp["crop"])
    f1, f2, args = region_inputs(inp)
    rows = release_rows(0, side * side).to(f1.device)
    return lambda: region_propagation(f1, f2, (side, side), rows, *args, "forward", inp["classes"])


def run_case(case: dict) -> dict:
    """One measurement (``--case JSON``, in its own process)."""
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    if case["kind"] == "check":
        return run_check(case)
    fig = measure(block_step(case), "cpu", case["repeats"])
    region = case["impl"].endswith("region")
    per = case["batch"] if region else 1
    return {**{k: case[k] for k in ("impl", "crop", "batch")}, "M": grid_side(case["crop"]) ** 2,
            "seconds": fig["seconds"] / per, "peak_mib": fig["peak_mib"] / per, "per": "image" if region else "block"}


def summarise(samples: list[dict]) -> list[dict]:
    """Median over the rounds of each implementation and crop."""
    rows = []
    for key in dict.fromkeys((s["impl"], s["crop"]) for s in samples):
        mine = [s for s in samples if (s["impl"], s["crop"]) == key]
        rows.append({**{k: mine[0][k] for k in ("impl", "crop", "M", "batch", "per")},
                     "seconds": statistics.median(s["seconds"] for s in mine),
                     "peak_mib": statistics.median(s["peak_mib"] for s in mine),
                     "rounds": len(mine), "seconds_each": [s["seconds"] for s in mine]})
    return rows


def goals(rows: list[dict]) -> list[dict]:
    """The issue's targets with met / not met (``None`` where a crop was not run)."""
    by = {(r["impl"], r["crop"]): r for r in rows}
    out = []
    for impl in ("derprop-dense", "derprop-tiled"):
        rel, ours = by.get(("release", 321)), by.get((impl, 321))
        speed = rel["seconds"] / ours["seconds"] if rel and ours else None
        out.append({"goal": f"{impl}: >= {SPEED_GOAL}x the release's speed at crop 321, region propagation included",
                    "value": speed, "met": None if speed is None else speed >= SPEED_GOAL})
        rel, ours = by.get(("release", 801)), by.get((impl, 801))
        mem = ours["peak_mib"] / max(rel["peak_mib"], 1e-9) if rel and ours else None
        out.append({"goal": f"{impl}: <= 1/3 of the release's peak memory at crop 801, region propagation included",
                    "value": mem, "met": None if mem is None else mem <= MEMORY_GOAL})
    rel, ours = by.get(("release-region", 321)), by.get(("derprop-region", 321))
    ratio = ours["seconds"] / rel["seconds"] if rel and ours else None
    out.append({"goal": "region propagation per image no slower than the release's at crop 321",
                "value": ratio, "met": None if ratio is None else ratio <= 1.0})
    ours = by.get(("derprop-region", 801))
    out.append({"goal": "region propagation under 100 MB extra per image at crop 801",
                "value": ours["peak_mib"] * 2**20 / 1e6 if ours else None,
                "met": None if ours is None else ours["peak_mib"] * 2**20 < 100e6})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", help="a checkout of the release (its model/ folder is imported from there)")
    parser.add_argument("--crops", type=int, nargs="+", default=[321, 801])
    parser.add_argument("--batch", type=int, default=1, help="B: B labeled + B unlabeled (weak) + B strong images")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--chunk", type=int, default=512, help="rows per tile of derprop-tiled")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (a fresh process per measurement)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (after a warm-up)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--rtol", type=float, default=1e-4, help="L̃, unlabeled derivative and sparsity terms")
    parser.add_argument("--grad-rtol", type=float, default=1e-4, help="heads' and features' gradients (relative norm)")
    parser.add_argument("--region-agree", type=float, default=0.999,
                        help="least fraction of pixels whose region-propagated label and confidence agree")
    parser.add_argument("--parts", nargs="+", choices=("block", "step", "memory"), default=["block", "step"],
                        help="block: the similarity block; step: the whole official step timed (benchmarks.release_step); "
                             "memory: one step's peak memory at --memory-sizes (default: block step)")
    parser.add_argument("--step-crops", type=int, nargs="+", default=[321], help="crops of the timed whole step")
    parser.add_argument("--step-batch", type=int, default=2, help="B of the whole step: B labeled + B unlabeled")
    parser.add_argument("--step-check-crop", type=int, default=321, help="crop of the whole step's value check")
    parser.add_argument("--step-rtol", type=float, default=1e-4, help="the whole step's loss terms")
    parser.add_argument("--step-grad-rtol", type=float, default=1e-4, help="the whole step's gradient (relative norm)")
    parser.add_argument("--memory-sizes", nargs="+", default=["801x2", "321x2"], metavar="CROPxB",
                        help="crop x B of the memory part; B >= 2 (the batch norm after the ASPP pooling branch "
                             "needs two images); a smaller crop is scaled to 801 with the block part's rows")
    parser.add_argument("--limit-gib", type=float, default=14.0,
                        help="data memory one whole-step process may take; beyond it the row says it does not fit")
    parser.add_argument("--out", default=str(RESULTS / "vs_release_cpu.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return {}
    if not args.release:
        print("benchmarks.vs_release: skipped, no --release DIR (a checkout of the authors' release to compare with)")
        return {}
    import_release(args.release)  # a missing checkout or dependency fails here, in one line
    print(f"importing the release's model code from {args.release} at run time (nothing of it is copied here)",
          flush=True)
    base = {"release": str(Path(args.release).resolve()), "batch": args.batch, "classes": args.classes,
            "chunk": args.chunk, "threads": args.threads}
    out = Path(args.out)
    payload = json.loads(out.read_text()) if out.is_file() else {}  # the sections of parts not run are kept
    commit = subprocess.run(["git", "-C", args.release, "rev-parse", "HEAD"], capture_output=True, text=True)
    payload |= {"benchmark": "vs_release",
                "release": {"dir": repo_path(args.release), "commit": commit.stdout.strip() or None,
                            "imported": "model/semseg/segmentation.py (Corr, SegmentationNet), at run time"}}
    command = "python -m benchmarks.vs_release " + " ".join(sys.argv[1:] if argv is None else argv)
    if "block" in args.parts:
        payload |= block_part(args, base) | {"command": command}
    if {"step", "memory"} & set(args.parts):
        from benchmarks import release_step

        steps = {k: base[k] for k in ("release", "classes", "threads")}
        if "step" in args.parts:
            payload["step"] = release_step.steps_part(args, steps) | {"command": command}
        if "memory" in args.parts:
            payload["step_memory"] = (release_step.memory_part(args, steps, payload.get("rows", []))
                                      | {"command": command})
    payload = write_results(out, payload)
    print(f"\nwrote {out}")
    return payload


def block_part(args: argparse.Namespace, base: dict) -> dict:
    """The similarity block (module doc): checks, interleaved timing, goals; the results file's top-level keys."""
    started = time.time()
    checks = []
    for crop in args.crops:
        check = run_isolated(MODULE, {**base, "kind": "check", "crop": crop, "rtol": args.rtol,
                                      "grad_rtol": args.grad_rtol, "region_agree": args.region_agree})
        checks.append(check)
        for impl in ("derprop-dense", "derprop-tiled"):
            r = check[impl]
            print(f"  check crop {crop} {impl}: L̃ {r['prop_rel_diff']:.1e}, unlabeled derivative {r['der_u_rel_diff']:.1e}, "
                  f"gradients {r['grad_rel_diff']:.1e}, region labels {r['mask_agree']:.5f} / confident "
                  f"{r['keep_agree']:.5f} agree -> {'ok' if r['passed'] else 'FAILED'}", flush=True)
        lt = check["labeled_term"]
        print(f"  labeled term (no gradient either side): release {lt['release']:.5f}, derprop "
              f"{check['derprop-tiled']['labeled_term']:.5f}; the DIVERGENCES note gives {lt['release_from_the_note']:.5f}",
              flush=True)
    if not all(c["passed"] for c in checks):
        raise SystemExit("derprop and the release disagree, so their timings are not comparable; nothing was timed:\n"
                         + "\n".join(json.dumps(c) for c in checks if not c["passed"]))
    samples = []
    for r in range(args.rounds):
        for crop in args.crops:
            for impl in args.impls:
                row = run_isolated(MODULE, {**base, "kind": "time", "impl": impl, "crop": crop,
                                            "repeats": args.repeats})
                samples.append(row)
                print(f"  round {r + 1} crop {crop:4d} {impl:15s} {row['seconds']:8.3f} s/{row['per']:5s} "
                      f"{row['peak_mib']:9.1f} MiB", flush=True)
    rows = summarise(samples)
    judged = goals(rows)
    print()
    print_table(rows, [("impl", "implementation", "s"), ("crop", "crop", "d"), ("M", "M", "d"), ("per", "per", "s"),
                       ("seconds", "median s", ".3f"), ("peak_mib", "peak MiB", ".1f")])
    print()
    for g in judged:
        state = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        print(f"  [{state:12s}] {g['goal']}: {value}")
    return {
        "machine": machine_info("cpu"),
        "memory": "rise of the resident-size high-water mark over one call, a fresh process per measurement",
        "config": {k: v for k, v in vars(args).items() if k in ("crops", "batch", "classes", "chunk", "impls", "rounds",
                                                                   "repeats", "threads", "rtol", "grad_rtol",
                                                                   "region_agree")}
                  | {"wall_s": time.time() - started},
        "check": checks, "rows": rows, "goals": judged,
    }


if __name__ == "__main__":
    main()
