"""The whole official training step, derprop's against the release's (``python -m benchmarks.vs_release --steps``).

The release's network (``model/semseg/segmentation.py``, ``SegmentationNet``: ResNet-101 deep stem, output stride 8,
ASPP 12/24/36, its ``Corr`` heads) is **imported at run time** from the user's checkout; nothing of it is copied
here. Its training step lives in its ``main.py``, which cannot be imported (it parses arguments and needs CUDA and a
process group at import); :func:`release_step` restates it, line references in the comments. Its CUDA-only
``ThreshController`` is restated by :func:`release_threshold`.

One step, either side, is one iteration of the training loop on ``B`` labeled + ``B`` unlabeled images at one crop:
the momentum network's pass over the CutMix partner, the Θb passes over ``[x; u_w]`` (with the feature-perturbation
branch) and over the mixed strong view, DLP, the threshold, region propagation, every loss term, backward and the SGD
step. derprop's step is :meth:`derprop.training.trainer.Trainer.compute_loss` + :meth:`~derprop.training.trainer.Trainer.optimize` (what
``benchmarks.train_step`` times) under a reproduction config: ``configs/voc_92.yaml`` (fp32) or
``configs/voc_92_fast.yaml`` (the fast recipe), with the network from scratch (no ImageNet file needed) and synthetic
batches (:func:`benchmarks.common.synthetic_batch`; the release gets the same images normalised as its data
pipeline does). derprop's Trainer keeps its deterministic kernels on a CPU, as in training (``benchmarks.train_step``
measured no cost for them there); the release never asks for them.

**Value check** (:func:`run_check`, before any timing): the release's network gets derprop's fp32 weights (the module
names differ, the tensors are the same: :data:`RENAMES`), both sides take one step's loss on the same batch at the
same epoch, dropout off on both sides (the only randomness of the networks, drawn in different orders) and region
propagation off (its 128 sampled rows are drawn in different orders; the block benchmark checks its labels). Every
loss term must agree to ``--step-rtol`` except the labeled derivative term, which differs by design and has no
gradient on either side (``derprop.training.tables.DIVERGENCES``); so does the total without it, and every parameter's
gradient to ``--step-grad-rtol`` (relative norm of the whole gradient).

**Timing and memory** (:func:`run_case`), each side in its own fresh process: one warm-up step, then the peak memory of
one step (rise of the resident-size high-water mark over the state held between steps, plus the absolute peak) and
the median time of ``--repeats`` steps; rounds interleave the sides. A case with ``limit_gib`` runs under a memory
limit (:func:`benchmarks.common.run_isolated`) and comes back as "does not fit" instead of exhausting the machine.
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.common import (gradient_gap, machine_info, make_scenes, measure, peak_mib, print_table, run_isolated,
                               step_fn, synthetic_batch)

RECIPES = {"fp32": "configs/voc_92.yaml", "fast": "configs/voc_92_fast.yaml"}
"""derprop's side: the reproduction config of each recipe (the fast one is what ``experiments.fast_recipe`` tested)."""

RELEASE_CFG = {"backbone": "resnet101", "pretrain": False, "multi_grid": False,
               "replace_stride_with_dilation": [False, True, True], "dilations": [12, 24, 36]}
"""The release's configs/pascal.yaml model section, without its ImageNet file (both sides start from scratch)."""

RELEASE_LR, RELEASE_LR_MULTI = 0.001, 10.0  # its configs/pascal.yaml
THRESH_INIT, THRESH_MOMENTUM = 0.85, 0.999   # its configs/pascal.yaml, main.py line 146

RENAMES = [
    (r"^aspp\.branches\.(\d)\.", r"head.b\1."), (r"^aspp\.pool\.conv\.0\.", "head.b4.gap.1."),
    (r"^aspp\.pool\.conv\.1\.", "head.b4.gap.2."), (r"^aspp\.project\.", "head.project."),
    (r"^fuse\.0\.0\.", "fuse.0."), (r"^fuse\.0\.1\.", "fuse.1."), (r"^fuse\.1\.0\.", "fuse.3."),
    (r"^fuse\.1\.1\.", "fuse.4."), (r"^head1\.", "corr.conv1."), (r"^head2\.", "corr.conv2."),
]
"""derprop's module names → the release's (the backbone, ``reduce``, ``classifier`` and ``proj`` are named alike)."""


def release_name(name: str) -> str:
    for pattern, repl in RENAMES:
        name, n = re.subn(pattern, repl, name)
        if n:
            break
    return name


def import_release_net(release: str):
    """The release's ``SegmentationNet``, imported from the checkout ``release``."""
    root = Path(release).resolve()
    sys.path.insert(0, str(root))
    try:
        from model.semseg.segmentation import SegmentationNet  # the release's own module, read at run time
    except ModuleNotFoundError as err:
        raise SystemExit(f"the release's model code needs {err.name!r}: pip install {err.name}") from err
    return SegmentationNet


def release_threshold(tau: torch.Tensor | float, pred: torch.Tensor, ignore: torch.Tensor) -> float:
    """The release's global threshold update (its util/thresh_helper.py, one process): for every predicted class,
    the highest confidence among its valid pixels; their mean; ``τ ← 0.999 τ + 0.001 · mean``."""
    conf, cls = pred.softmax(1).max(1)
    valid = ignore != 255
    tops = [conf[(cls == k) & valid].max() for k in cls.unique() if ((cls == k) & valid).any()]
    if not tops:
        return float(tau)
    return float(THRESH_MOMENTUM * tau + (1 - THRESH_MOMENTUM) * torch.stack(tops).mean())


class ReleaseState:
    """The release's training state: Θb, Θm (a copy at epoch 0, its main.py line 164), SGD, the threshold."""

    def __init__(self, release: str, classes: int, state: dict[str, torch.Tensor] | None = None):
        net_cls = import_release_net(release)
        self.net = net_cls({**RELEASE_CFG, "nclass": classes})
        if state is not None:
            self.net.load_state_dict(state)
        self.momentum = net_cls({**RELEASE_CFG, "nclass": classes})
        self.momentum.load_state_dict(self.net.state_dict())
        head = [p for n, p in self.net.named_parameters() if "backbone" not in n]
        self.optimizer = torch.optim.SGD([{"params": self.net.backbone.parameters(), "lr": RELEASE_LR},
                                          {"params": head, "lr": RELEASE_LR * RELEASE_LR_MULTI}],
                                         lr=RELEASE_LR, momentum=0.9, weight_decay=1e-4)
        self.tau = THRESH_INIT
        self.classes = classes


def release_step(s: ReleaseState, batch, alpha: float, *, region: bool = True, backward: bool = True
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One iteration of the release's training loop (its main.py lines 179–362), restated; returns the loss and its
    terms under derprop's names (``der_x``/``der_u``: ``2·consistency + sparsity``, as eq. 9 weighs them)."""
    from benchmarks.vs_release import grid_side, release_labeled_target, release_region_loop
    from derprop.training.model import normalize

    (x, y), (uw, us, ign, box), (uw2, us2, ign2, _) = batch
    x, uw, us, uw2, us2 = (normalize(t) for t in (x, uw, us, uw2, us2))  # its data pipeline's normalisation
    ign, ign2 = ign.long(), ign2.long()
    with torch.no_grad():  # lines 195–205: Θm on the partner; CutMix of the strong view
        s.momentum.eval()
        pred_mix = s.momentum(uw2, need_fp=False, use_corr=False)["out"].detach()
        conf_mix, mask_mix = pred_mix.softmax(1).max(1)
        us = torch.where(box.unsqueeze(1), us2, us)
    s.net.train()
    nb = x.shape[0]
    res_w = s.net(torch.cat((x, uw)), need_fp=True, use_corr=True)  # line 216
    res_s = s.net(us, need_fp=False, use_corr=True)  # line 244
    pred_x, pred_uw = res_w["out"].split([nb, nb])
    corr_x, corr_uw = res_w["corr_out"].split([nb, nb])
    blend = (1 - alpha) * pred_uw.detach() + alpha * corr_uw.detach()  # line 255
    conf_w, mask_w = blend.softmax(1).max(1)
    mask_c, conf_c = torch.where(box, mask_mix, mask_w), torch.where(box, conf_mix, conf_w)  # lines 262–269
    ign_c = torch.where(box, ign2, ign)
    s.tau = release_threshold(s.tau, blend, ign_c)  # lines 274–275
    keep_c = (conf_c >= s.tau) & (ign_c != 255)
    keep_all = keep_c
    if region:  # lines 277–300: region by region
        mask_c, keep_all = release_region_loop(res_w["corr_map"].detach()[nb:], mask_c, keep_c, box, ign_c, s.tau)
    n_c, n_w = (ign_c != 255).sum().item(), (ign != 255).sum().item()
    keep_w = ((conf_w >= s.tau) & (ign != 255)).float()
    soft_w, logsm_s = blend.softmax(1), F.log_softmax(res_s["out"], 1)
    target = release_labeled_target(y, grid_side(x.shape[-1]))  # lines 307–313 (its grid is 41 × 41 fixed; here the crop's)
    w_ori, w_diff = res_w["corr_map_ori"].detach(), res_w["corr_map_ori_1st_diff"].detach()
    cons_x = (F.l1_loss(w_ori[:nb], target) + F.l1_loss(w_diff[:nb], target)) / 2  # line 316
    cons_u = (F.l1_loss(res_s["corr_map_ori"], w_ori[nb:])
              + F.l1_loss(res_s["corr_map_ori_1st_diff"], w_diff[nb:])) / 2  # line 317
    norm_x = (res_w["f1_2nd_diff"].abs().mean() + res_w["f2_2nd_diff"].abs().mean()) / 2  # lines 319–320
    norm_u = (res_s["f1_2nd_diff"].abs().mean() + res_s["f2_2nd_diff"].abs().mean()) / 2
    u_s1 = (-(logsm_s * soft_w) * keep_all.unsqueeze(1)).sum() / n_c  # lines 332–334
    corr_s = (F.cross_entropy(res_s["corr_out"], mask_c, reduction="none") * keep_all).sum() / n_c
    corr_w = (F.cross_entropy(corr_uw, mask_w, reduction="none") * keep_w).sum() / n_w
    kl = ((soft_w * (soft_w.log() - logsm_s)).sum(1) * keep_c).sum() / n_c  # lines 349–351: no region labels
    fp = (F.cross_entropy(res_w["out_fp"][nb:], mask_w, reduction="none") * keep_w).sum() / n_w
    terms = {"ce_x": F.cross_entropy(pred_x, y, ignore_index=255), "ce_x_prop": F.cross_entropy(corr_x, y, ignore_index=255),
             "ce_u": u_s1, "ce_u_prop": 0.5 * (corr_s + corr_w), "kl": kl, "ce_fp": fp,
             "der_x": 2 * cons_x + norm_x, "der_u": 2 * cons_u + norm_u}
    loss = (0.5 * terms["ce_x"] + 0.5 * terms["ce_x_prop"] + 0.25 * kl + 0.25 * u_s1 + 0.25 * fp
            + 0.25 * terms["ce_u_prop"] + 0.5 * (cons_x + cons_u) + 0.25 * (norm_x + norm_u)) / 2  # line 358
    if backward:  # lines 360–362
        s.optimizer.zero_grad()
        loss.backward()
        s.optimizer.step()
    return loss, terms


# --------------------------------------------------------------------------- #
# derprop's side
# --------------------------------------------------------------------------- #


def build_trainer(case: dict, out_dir: str, extra: tuple[str, ...] = ()):
    """derprop's Trainer under the recipe's reproduction config, sized to the case, on a throwaway scenes tree."""
    from derprop.training.configfile import load_config
    from derprop.provenance import project_root
    from derprop.training.trainer import Trainer

    root = Path(out_dir) / "scenes"
    make_scenes(root)
    cfg = load_config(project_root() / RECIPES[case["recipe"]], [
        "model.pretrained=none", "data.layout=scenes", f"data.root={root}", "data.split=1_8",
        f"data.num_classes={case['classes']}", f"data.crop_size={case['crop']}", "data.num_workers=0",
        "data.diag_images=0", f"optim.batch_size={case['batch']}", *extra])
    return Trainer(cfg, Path(out_dir) / "run", device="cpu", progress=False)


def _epoch(trainer) -> int:
    return trainer.cfg.optim.epochs // 2  # η = α = 1/2: both parts of the blend are live


# --------------------------------------------------------------------------- #
# the value check
# --------------------------------------------------------------------------- #


def _no_dropout(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def run_check(case: dict) -> dict:
    """One step's loss terms and gradients, derprop (fp32 config) and the release, same weights, batch and epoch."""
    F.dropout2d = _no_dropout  # this check's process only: dropout off on both sides (module doc)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_release_step_") as tmp:
        trainer = build_trainer({**case, "recipe": "fp32"}, tmp, ("method.region_propagation=false",))
        batch = synthetic_batch(case["batch"], case["crop"], case["classes"])
        epoch = _epoch(trainer)
        state = {release_name(k): v.clone() for k, v in trainer.net.state_dict().items()}
        loss, logs = trainer.compute_loss(batch, epoch)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ours = {release_name(n): p.grad for n, p in trainer.net.named_parameters() if p.grad is not None}
        tau = trainer.threshold.value
    rel = ReleaseState(case["release"], case["classes"], state)
    ref, terms = release_step(rel, batch, epoch / trainer.cfg.optim.epochs, region=False, backward=False)
    ref.backward()
    theirs = {n: p.grad for n, p in rel.net.named_parameters() if p.grad is not None}
    term_diff = {k: abs(logs[k] - float(v.detach())) / max(abs(float(v.detach())), 1e-12) for k, v in terms.items() if k in logs}
    weight = trainer.cfg.loss.scale * trainer.cfg.loss.lambda_der  # the labeled term's weight in both totals
    total_ours, total_ref = float(loss) - weight * logs["der_x"], float(ref) - weight * float(terms["der_x"])
    gap = gradient_gap(theirs, ours)
    out = {"crop": case["crop"], "batch": case["batch"], "loss": float(loss), "loss_release": float(ref),
           "loss_without_labeled_term_rel_diff": abs(total_ours - total_ref) / abs(total_ref),
           "term_rel_diff": term_diff, "labeled_term": {"derprop": logs["der_x"], "release": float(terms["der_x"])},
           "threshold": {"derprop": tau, "release": rel.tau}, "grad_rel_diff": gap["global"],
           "params_compared": gap["compared"], "params_missing": gap["missing"],
           "rtol": case["rtol"], "grad_rtol": case["grad_rtol"]}
    judged = [v for k, v in term_diff.items() if k != "der_x"]
    out["passed"] = (not gap["missing"] and max(judged) <= case["rtol"] and out["loss_without_labeled_term_rel_diff"]
                     <= case["rtol"] and out["grad_rel_diff"] <= case["grad_rtol"]
                     and abs(tau - rel.tau) <= 1e-6)
    return out


# --------------------------------------------------------------------------- #
# one timed side, in its own process
# --------------------------------------------------------------------------- #


IMPLS = {"release-step": None, "derprop-step-fp32": "fp32", "derprop-step-fast": "fast"}
"""The timed sides → derprop's recipe (:data:`RECIPES`; None: the release)."""


def step_of(case: dict, tmp: str) -> tuple[Callable[[], Any], int]:
    """The measured call of one side and the number of parameters it trains."""
    torch.manual_seed(0)
    batch = synthetic_batch(case["batch"], case["crop"], case["classes"])
    recipe = IMPLS[case["impl"]]
    if recipe is None:
        s = ReleaseState(case["release"], case["classes"])
        return (lambda: release_step(s, batch, 0.5)), sum(p.numel() for p in s.net.parameters())
    trainer = build_trainer({**case, "recipe": recipe}, tmp)
    return step_fn(trainer, batch, _epoch(trainer)), sum(p.numel() for p in trainer.net.parameters())


def run_case(case: dict) -> dict:
    """Warm-up, then peak memory of one step and the median of ``repeats`` steps (none: memory only); the state
    held between steps (weights, both networks, optimiser) and the absolute peak (``--case JSON``)."""
    import psutil

    from benchmarks.common import _peak_rss

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    if case.get("kind") == "check":
        return run_check(case)
    with tempfile.TemporaryDirectory(prefix="bench_release_step_") as tmp:
        step, params = step_of(case, tmp)
        step()  # warm-up: optimiser state, kernel choices
        state = psutil.Process().memory_info().rss
        row = {**{k: case[k] for k in ("impl", "crop", "batch")}, "params": params, "repeats": case["repeats"],
               "state_mib": state / 2**20}
        if case["repeats"]:
            fig = measure(step, "cpu", case["repeats"])
            row |= {"seconds": fig["seconds"], "images_per_s": 2 * case["batch"] / fig["seconds"],
                    "peak_mib": fig["peak_mib"]}
        else:  # memory only
            row["peak_mib"] = peak_mib(step, "cpu")
        return row | {"peak_total_mib": _peak_rss() / 2**20}


MODULE = "benchmarks.release_step"


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['impl']:18s} crop {row['crop']:4d} batch {row['batch']}: {row['error']}"
    speed = f"{row['seconds']:8.2f} s/step {row['images_per_s']:6.3f} img/s " if "seconds" in row else ""
    return (f"{row['impl']:18s} crop {row['crop']:4d} batch {row['batch']}: {speed}step peak {row['peak_mib']:8.0f} MiB "
            f"over a state of {row['state_mib']:6.0f} MiB")


def check(args, base: dict) -> dict:
    """The value check (:func:`run_check`) at ``--step-check-crop``; SystemExit when the two steps disagree."""
    res = run_isolated(MODULE, {**base, "kind": "check", "crop": args.step_check_crop, "rtol": args.step_rtol,
                                "grad_rtol": args.step_grad_rtol})
    worst = max(v for k, v in res["term_rel_diff"].items() if k != "der_x")
    print(f"  step check crop {res['crop']} batch {res['batch']}: loss {res['loss']:.6f} vs the release's "
          f"{res['loss_release']:.6f} (without the labeled derivative term: {res['loss_without_labeled_term_rel_diff']:.1e}), "
          f"worst term {worst:.1e}, gradients {res['grad_rel_diff']:.1e} over {res['params_compared']} tensors, threshold "
          f"{res['threshold']['derprop']:.6f} vs {res['threshold']['release']:.6f} -> {'ok' if res['passed'] else 'FAILED'}",
          flush=True)
    if not res["passed"]:
        raise SystemExit("derprop's step and the release's disagree, so their timings are not comparable; nothing "
                         "was timed:\n" + str(res))
    return res


def medians(samples: list[dict]) -> list[dict]:
    """Per side, crop and batch: the medians over the rounds (a side that did not fit stays an error row)."""
    rows = []
    for key in dict.fromkeys((s["impl"], s["crop"], s["batch"]) for s in samples):
        mine = [s for s in samples if (s["impl"], s["crop"], s["batch"]) == key]
        ok = [s for s in mine if "error" not in s]
        if not ok:
            rows.append(mine[0])
            continue
        row = {k: ok[0][k] for k in ("impl", "crop", "batch", "params", "repeats")} | {"rounds": len(ok)}
        for k in ("seconds", "images_per_s", "peak_mib", "state_mib", "peak_total_mib"):
            if k in ok[0]:
                row[k] = statistics.median(s[k] for s in ok)
        if "seconds" in row:
            row["seconds_each"] = [s["seconds"] for s in ok]
        rows.append(row)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Each recipe against the release at the same crop and batch: images/s, step peak and absolute peak."""
    by = {(r["impl"], r["crop"], r["batch"]): r for r in rows if "error" not in r}
    out = []
    for (impl, crop, batch), r in by.items():
        rel = by.get(("release-step", crop, batch))
        if IMPLS.get(impl) is None or rel is None:
            continue
        entry = {"recipe": IMPLS[impl], "crop": crop, "batch": batch,
                 "step_memory_vs_release": r["peak_mib"] / rel["peak_mib"],
                 "total_memory_vs_release": r["peak_total_mib"] / rel["peak_total_mib"]}
        if "images_per_s" in r and "images_per_s" in rel:
            entry["speed_vs_release"] = r["images_per_s"] / rel["images_per_s"]
        out.append(entry)
    return out


def measure_steps(args, base: dict, sizes: list[tuple[int, int]], repeats: int, rounds: int) -> list[dict]:
    """Interleaved rounds: every side at every ``(crop, B)``, each in a fresh process under ``--limit-gib``."""
    samples = []
    for r in range(rounds):
        for crop, batch in sizes:
            for impl in IMPLS:
                row = run_isolated(MODULE, {**base, "impl": impl, "crop": crop, "batch": batch, "repeats": repeats},
                                   limit_gib=args.limit_gib)
                samples.append({"impl": impl, "crop": crop, "batch": batch, **row})
                print(f"  round {r + 1} {_line(samples[-1])}", flush=True)
    return medians(samples)


TARGET_CROP, TARGET_BATCHES = 801, (2, 4, 8)
GPU_GIB = 80 * 10**9 / 2**30  # an "80 GB" card, about 74.5 GiB, of which the CUDA context takes about 1
BLOCK_OF = {"release-step": "release", "derprop-step-fp32": "derprop-dense", "derprop-step-fast": "derprop-tiled"}
"""Each side's similarity block in the block part's rows (fp32 DLP is dense, the fast recipe's tiled; both fp32)."""


def scaling(rows: list[dict], block_rows: list[dict]) -> list[dict]:
    """Per side, the per-GPU peak at crop :data:`TARGET_CROP` for each of :data:`TARGET_BATCHES`, from its step
    measured at a smaller crop ``c0`` with ``B0`` and the similarity block measured at both crops (``block_rows``:
    the block part's medians, per ``B = 1``). The step's peak above the state splits into the block (DLP, the
    derivative loss, region propagation: measured at the target crop) and the rest, the network's activations, which
    grow with the pixels: ``rise(c, B) = B / B0 · [(rise(c0, B0) − B0 · block(c0)) · (c / c0)² + B0 · block(c)]``;
    the peak is ``state + rise``. Beside it, the measurement at the target crop, or why there is none."""
    blocks = {(r["impl"], r["crop"]): r["peak_mib"] for r in block_rows}
    out = []
    for r in rows:
        if "error" in r or r["crop"] == TARGET_CROP:
            continue
        impl, c0, b0 = r["impl"], r["crop"], r["batch"]
        blk0, blk = blocks.get((BLOCK_OF[impl], c0)), blocks.get((BLOCK_OF[impl], TARGET_CROP))
        if blk0 is None or blk is None:
            continue
        network = (r["peak_mib"] - b0 * blk0) * (TARGET_CROP / c0) ** 2
        measured = {m["batch"]: m for m in rows if m["impl"] == impl and m["crop"] == TARGET_CROP}
        for b in TARGET_BATCHES:
            peak = (r["state_mib"] + b / b0 * (network + b0 * blk)) / 1024
            m = measured.get(b)
            out.append({"impl": impl, "crop": TARGET_CROP, "batch": b, "from_crop": c0, "from_batch": b0,
                        "network_mib_per_image": network / b0, "block_mib_per_image": blk,
                        "state_mib": r["state_mib"], "estimated_peak_gib": peak, "fits_80gb_card": peak <= GPU_GIB - 1,
                        "measured_peak_gib": None if m is None or "error" in m else m["peak_total_mib"] / 1024,
                        "measured": "not tried" if m is None else m.get("error", "measured")})
    return out


SCALING_NOTE = (
    "Per-GPU peak = the state held between steps (both networks' weights, gradients, SGD momentum; it does not grow "
    "with the batch) + the step's peak above it, which is split into the similarity block (DLP, the derivative loss, "
    "region propagation; the block part measured it per image at both crops) and the network's activations, scaled "
    "from the measured crop by the pixel count; both grow with the images per step (B labeled + B unlabeled). The "
    "per-step buffers that do not grow with B (autocast's bf16 weight copies, ~0.1 GiB) are counted per image, so the "
    "estimate errs high. CPU resident memory stands in for CUDA's allocated memory: the same tensors, without the "
    "CUDA context (~1 GiB) and cuDNN workspaces; CPU bf16 autocast keeps activations in bf16 as CUDA's does, but "
    "which ops it casts can differ. The paper trains at crop 321 with a global batch of 8 + 8 (4 + 4 on each of two "
    "GPUs, the release's configs and tools/train.sh); crop 801 is the earlier methods' Cityscapes crop. The "
    "release's own main.py resizes the labeled target to 41 x 41 (crop 321) and cannot run at another crop; its step "
    "here takes the crop's grid. Estimates from CPU measurements, not GPU measurements."
)


def steps_part(args, base: dict) -> dict:
    """``--parts step``: the value check, then the whole step of every side at ``--step-crops``, timed."""
    started = time.time()
    res = check(args, {**base, "batch": args.step_batch})
    rows = measure_steps(args, base, [(c, args.step_batch) for c in args.step_crops], args.repeats, args.rounds)
    print_table([r for r in rows if "error" not in r],
                [("impl", "side", "s"), ("crop", "crop", "d"), ("batch", "B", "d"), ("seconds", "median s", ".2f"),
                 ("images_per_s", "images/s", ".3f"), ("peak_mib", "step peak MiB", ".0f"),
                 ("peak_total_mib", "total peak MiB", ".0f")])
    judged = ratios(rows)
    for r in judged:
        print(f"  {r['recipe']:4s} crop {r['crop']}: {r.get('speed_vs_release', float('nan')):.2f}x the release's "
              f"images/s, {r['step_memory_vs_release']:.2f}x its step memory, {r['total_memory_vs_release']:.2f}x its "
              "total peak")
    return {"machine": machine_info("cpu"), "what": "the whole official training step (module doc of "
            "benchmarks.release_step), B labeled + B unlabeled images, each side in a fresh process, interleaved "
            "rounds, medians", "recipes": RECIPES, "check": res, "rows": rows, "ratios": judged,
            "config": {"crops": args.step_crops, "batch": args.step_batch, "rounds": args.rounds,
                       "repeats": args.repeats, "threads": args.threads, "limit_gib": args.limit_gib,
                       "wall_s": time.time() - started}}


def memory_part(args, base: dict, block_rows: list[dict]) -> dict:
    """``--parts memory``: one step's peak memory of every side at ``--memory-sizes`` (no timing), and
    :func:`scaling` with the block part's rows (``block_rows``)."""
    started = time.time()
    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.memory_sizes]
    rows = measure_steps(args, base, sizes, 0, 1)
    scaled = scaling(rows, block_rows)
    for r in scaled:
        print(f"  {r['impl']:18s} crop {r['crop']} B {r['batch']}: estimated {r['estimated_peak_gib']:6.1f} GiB per GPU"
              f" from crop {r['from_crop']} ({'fits' if r['fits_80gb_card'] else 'does not fit'} an 80 GB card); "
              f"measured: {r['measured']}",
              flush=True)
    return {"machine": machine_info("cpu"), "what": "peak memory of one whole official step after a warm-up step "
            "(the state held between steps, the rise over it, the absolute peak), each side in a fresh process "
            f"limited to {args.limit_gib:g} GiB of data memory", "rows": rows, "ratios": ratios(rows),
            "scaling": scaled, "scaling_note": SCALING_NOTE,
            "config": {"sizes": args.memory_sizes, "threads": args.threads, "limit_gib": args.limit_gib,
                       "wall_s": time.time() - started}}


if __name__ == "__main__":  # one case in its own process: python -m benchmarks.release_step --case JSON
    import json

    print(json.dumps(run_case(json.loads(sys.argv[sys.argv.index("--case") + 1]))))
