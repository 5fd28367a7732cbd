"""The trainer on a tiny scenes tree: outputs, profiles, ablation switches, faults, exact resume."""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from derprop.data.datasets import DatasetError
from derprop.provenance import source
from derprop.train import main
from derprop.training import checkpoint as ck
from derprop.training.configfile import load_config
from derprop.training.guards import NonFiniteLossError
from derprop.training.loaders import loaders
from derprop.training.objective import ohem_ce
from derprop.training.pseudo_labels import Threshold, blend, region_propagation
from derprop.training.trainer import Trainer
from tests.fixtures import TrainingInterrupted

TINY = source() / "configs" / "cpu_scenes_tiny.yaml"


def tiny(root, *overrides):
    return load_config(TINY, [f"data.root={root}", *overrides])


@pytest.fixture(scope="module")
def reference_run(scenes_tiny, tmp_path_factory):
    """One uninterrupted 2-epoch tiny run through the CLI (paper profile)."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    assert main(["--config", str(TINY), "--out", str(out), f"data.root={scenes_tiny}"]) == 0
    return out


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("train_time_s")
    return rows


def test_run_writes_every_output(reference_run):
    out = reference_run
    for name in ("config.yaml", "metrics.jsonl", "steps.jsonl", "last.pt", "best.pt", "results.json"):
        assert (out / name).is_file(), name
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_ce_x", "train_kl", "train_der_x", "train_der_u", "miou_backprop",
                "miou_momentum", "pl_acc_before", "pl_acc_after", "pl_miou_before", "pl_miou_after"):
        assert key in rows[-1], key
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["profile"] == "paper" and res["miou_net"] == "momentum"
    assert set(res["final"]) == {"backprop", "momentum"}
    assert set(res["final"]["momentum"]) == {"original", "center_crop"}
    assert len(res["final"]["momentum"]["original"]["iou_per_class"]) == 11
    for key in ("wall_time_s", "device", "torch_version"):
        assert res[key]
    state = ck.load(out / "last.pt")
    for key in ("model", "momentum", "optimizer", "scheduler", "threshold", "rng", "epoch", "config"):
        assert key in state, key
    assert state["epoch"] == 2
    snap = np.load(out / "pseudo_labels" / "epoch_002.npz")
    n = len(snap["names"])
    assert 1 <= n <= 8
    assert snap["image"].shape == (n, 32, 32, 3) and snap["image"].dtype == np.uint8
    for key in ("gt", "pl_before", "pl_after", "confidence"):
        assert snap[key].shape == (n, 32, 32)


def test_resume_after_a_kill_matches_the_uninterrupted_run(reference_run, scenes_tiny, tmp_path):
    cfg = tiny(scenes_tiny)

    def kill(event, epoch=None, step=None, **_):
        if event == "step_end" and epoch == 1 and step == 0:
            raise TrainingInterrupted("simulated kill in epoch 2")

    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path, hook=kill).fit()
    assert ck.load(tmp_path / "last.pt")["epoch"] == 1
    Trainer(cfg, tmp_path, resume=True).fit()
    assert _metrics(tmp_path) == _metrics(reference_run)
    a, b = ck.load(tmp_path / "last.pt"), ck.load(reference_run / "last.pt")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    ra = json.loads((tmp_path / "results.json").read_text())
    rb = json.loads((reference_run / "results.json").read_text())
    assert ra["final"] == rb["final"]


def test_corrupt_checkpoint_on_resume_is_a_clear_error_and_nothing_changes(reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(["--config", str(TINY), "--out", str(run), "--resume"]) == 2
    with pytest.raises(ck.CheckpointError, match="truncated or not a DerProp checkpoint"):
        Trainer(tiny("/nonexistent"), run, resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(scenes_tiny, tmp_path, monkeypatch):
    cfg = tiny(scenes_tiny, "optim.iters_per_epoch=1", "data.diag_images=0", "data.val_limit=1")
    real_step = Trainer.compute_loss

    def step(self, batch, epoch):
        loss, logs = real_step(self, batch, epoch)
        return (loss * float("nan") if epoch == 1 else loss), logs

    monkeypatch.setattr(Trainer, "compute_loss", step)
    seen = {}

    def hook(event, **info):
        if event == "epoch_end":
            seen["bytes"] = (tmp_path / "last.pt").read_bytes()

    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 1.*last finite checkpoint"):
        Trainer(cfg, tmp_path, hook=hook).fit()
    assert (tmp_path / "last.pt").read_bytes() == seen["bytes"]
    assert ck.load(tmp_path / "last.pt")["epoch"] == 1
    assert not (tmp_path / "results.json").exists()


def _all_finite(path):
    state = ck.load(path)
    tensors = {**state["model"], **(state.get("momentum") or {}).get("model", {})}
    return ck.first_non_finite(tensors) is None


@pytest.mark.parametrize("fault", ["buffer", "gradient"])
def test_non_finite_weights_or_gradients_never_reach_a_checkpoint(scenes_tiny, tmp_path, monkeypatch, fault):
    """A finite loss can still leave NaN weights (BN statistics) or inf gradients: epoch 1's state is kept."""
    cfg = tiny(scenes_tiny, "optim.iters_per_epoch=1", "data.diag_images=0", "data.val_limit=1",
               "eval.final_modes=[original]")
    real_step = Trainer.compute_loss

    def step(self, batch, epoch):
        loss, logs = real_step(self, batch, epoch)
        if epoch == 1 and fault == "buffer":
            bn = next(m for m in self.net.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.data[0] = float("nan")  # .data: the step's autograd graph keeps the buffer
        if epoch == 1 and fault == "gradient":
            self.net.classifier.weight.register_hook(lambda g: g * float("inf"))
        return loss, logs

    monkeypatch.setattr(Trainer, "compute_loss", step)
    what = r"backprop network tensor \S+running_var became nan during epoch 2" if fault == "buffer" else \
        r"gradient norm became (inf|nan) at epoch 2, step 1"
    with pytest.raises(NonFiniteLossError, match=what + r".*last finite checkpoint .*last.pt \(epoch 1\)"):
        Trainer(cfg, tmp_path).fit()
    assert ck.load(tmp_path / "last.pt")["epoch"] == 1 and _all_finite(tmp_path / "last.pt")
    assert [json.loads(r)["epoch"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_huge_lr_stops_with_finite_checkpoints_and_resumes_with_a_lower_one(scenes_tiny, tmp_path, capsys, caplog):
    args = ["--config", str(TINY), "--out", str(tmp_path), f"data.root={scenes_tiny}", "optim.iters_per_epoch=1",
            "data.diag_images=0", "data.val_limit=1", "eval.final_modes=[original]"]
    assert main([*args, "optim.lr=1.0e+10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "became" in err and "\n" not in err
    for name in ("last.pt", "best.pt"):
        if (tmp_path / name).exists():
            assert _all_finite(tmp_path / name), name
    if (tmp_path / "last.pt").exists():  # a resume may lower the lr (here the weights are already too large)
        with caplog.at_level(logging.WARNING):
            main([*args, "--resume", "optim.lr=1e-3"])
        assert "changed settings: optim.lr 10000000000.0 → 0.001" in caplog.text
        assert "different config" not in capsys.readouterr().err
    assert main([*args, "--overwrite", "optim.lr=1e-3"]) == 0
    assert _all_finite(tmp_path / "last.pt") and _all_finite(tmp_path / "best.pt")


def test_every_seed_the_config_takes_trains(scenes_tiny, tmp_path, capsys):
    from derprop.data.augment import sample_seed

    # the seeds that trained before are as they were (a run resumed across versions replays its augmentations)
    g = torch.Generator().manual_seed((7 * 1_000_003 + 2) * 1_000_033 + 1)
    assert sample_seed(7, 2, 5, 1) == (int(torch.randint(0, 2**62, (1,), generator=g)) + 5 * 0x9E3779B97F4A7C15) \
        % (2**63 - 1)
    args = ["--config", str(TINY), f"data.root={scenes_tiny}", "optim.epochs=1", "optim.iters_per_epoch=1",
            "data.val_limit=1", "data.diag_images=0", "eval.final_modes=[original]"]
    for seed in (20240101, 2**63 - 1):
        assert main([*args, "--out", str(tmp_path / str(seed)), "--seed", str(seed)]) == 0
    assert main([*args, "--out", str(tmp_path / "too_big"), "--seed", str(2**63)]) == 2
    assert capsys.readouterr().err.endswith("error: config key 'seed' must be in [0, 2**63 - 1], got "
                                            "9223372036854775808\n")


def test_the_class_count_comes_from_the_tree_and_evaluation_agrees(tmp_path, capsys):
    from derprop import evaluate
    from tests.fixtures import scenes_tree

    root = tmp_path / "four"
    scenes_tree(root, classes=(0, 1, 8), size=32, num_train=16, num_val=2)  # the CPU default's classes: 4 with background
    args = ["--config", str(TINY), f"data.root={root}", "optim.epochs=1", "optim.iters_per_epoch=1", "data.val_limit=2",
            "data.diag_images=1", "eval.final_modes=[original]"]
    assert tiny(root).model.num_classes == 4  # cpu_scenes_tiny names no class count: the tree's manifest gives it
    # the tree's count, or a larger one the config sets itself (a benchmark's VOC-sized head): training and
    # evaluation take the same trees
    for name, extra in (("run", []), ("run11", ["data.num_classes=11"])):
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
        assert evaluate.main(["--checkpoint", str(tmp_path / name / "last.pt"), "--workers", "0", "--device", "cpu"]) == 0
        assert "images: 2" in capsys.readouterr().out
    label = root / "SegmentationClass" / "val_00000.png"  # a class the tree does not have
    im = Image.open(label)
    pixels = np.array(im)
    pixels[0, 0] = 7
    out = Image.fromarray(pixels)
    out.putpalette(im.getpalette())
    out.save(label)
    for name, extra in (("run7", []), ("run7_11", ["data.num_classes=11"])):
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: label {label} holds values 7 outside 0..3 and 255 (ignore); it is not a label of this "
                       f"dataset or is corrupt. Fix: run `python -m data_prep.scenes --root {root}` to recreate "
                       f"missing files (delete damaged ones first), or `python -m data_prep.scenes --check --root "
                       f"{root}` to list every problem.\n")


def test_official_profile_and_ablation_switches(scenes_tiny, tmp_path):
    """Every release extra runs; each ablation switch removes exactly its terms."""
    cfg = tiny(scenes_tiny, "profile=official", "optim.epochs=1", "optim.iters_per_epoch=1", "data.val_limit=2",
               "data.diag_images=2", "method.region_samples=16")
    res = Trainer(cfg, tmp_path).fit()
    assert res["miou_mode"] == "center_crop"
    row = _metrics(tmp_path)[0]
    for key in ("train_ce_x_prop", "train_ce_u_prop", "train_ce_fp", "train_der_x", "train_der_u"):
        assert key in row, key
    assert row["train_threshold"] < 0.85 + 1e-9  # EMA from 0.85
    variants = {
        (): {"ce_x", "ce_x_prop", "ce_u", "ce_u_prop", "kl", "der_x", "der_u"},
        ("method.dlp=false",): {"ce_x", "ce_u", "kl", "der_x", "der_u"},
        ("method.derivative_loss=false",): {"ce_x", "ce_x_prop", "ce_u", "ce_u_prop", "kl"},
        ("method.momentum=false",): {"ce_x", "ce_x_prop", "ce_u", "ce_u_prop", "kl", "der_x", "der_u"},
        ("method.Q=3", "method.op=second", "method.sparsity=false"): {"ce_x", "ce_x_prop", "ce_u", "ce_u_prop",
                                                                      "kl", "der_x", "der_u"},
    }
    for over, expected in variants.items():
        tr = Trainer(tiny(scenes_tiny, *over), tmp_path / "v")
        assert (tr.momentum is None) == ("method.momentum=false" in over)
        batch = next(iter(zip(*loaders(tr.data, tr.cfg, tr.d))))
        loss, logs = tr.compute_loss(batch, 1)
        assert torch.isfinite(loss)
        assert set(logs) - {"threshold", "mask_ratio"} == expected, over
        loss.backward()


@pytest.mark.parametrize(("profile", "heads"), [("official", False), ("paper", True)])
def test_the_cutmix_partner_pass_computes_the_heads_only_where_a_term_reads_them(scenes_tiny, tmp_path, profile,
                                                                                 heads):
    """The official step reads only the partner's L (Θm); with the heads forced on, its loss and gradients are the
    same bit for bit. The paper profile reads the partner's f1/f2 (its L̃ and the box's derivative targets)."""
    tr = Trainer(tiny(scenes_tiny, f"profile={profile}", "method.region_samples=16", "data.diag_images=0"), tmp_path)
    partner = tr.momentum.module if profile == "official" else tr.net
    calls = []
    forward = partner.forward

    def spy(x, *, perturb=False, heads=True, force=False):
        calls.append(heads)
        return forward(x, perturb=perturb, heads=heads or force)

    batch = next(iter(zip(*loaders(tr.data, tr.cfg, tr.d))))
    state = {k: v.clone() for k, v in tr.net.state_dict().items()}
    results = []
    for force in (False, True):
        tr.net.load_state_dict(state)
        partner.forward = functools.partial(spy, force=force)
        torch.manual_seed(0)
        tr.net.zero_grad(set_to_none=True)
        loss, _ = tr.compute_loss(batch, 1)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in tr.net.parameters() if p.grad is not None]))
    assert calls[0] is heads
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_paper_blend_is_in_probability_space_and_official_in_logit_space(scenes_tiny, tmp_path):
    logits, prop = torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2) * 5
    paper = tiny(scenes_tiny).method.blend_space
    official = tiny(scenes_tiny, "profile=official").method.blend_space
    torch.testing.assert_close(blend(logits, prop, 0.25, paper), 0.75 * logits.softmax(1) + 0.25 * prop.softmax(1))
    torch.testing.assert_close(blend(logits, prop, 0.25, official), (0.75 * logits + 0.25 * prop).softmax(1))
    torch.testing.assert_close(blend(logits, None, 0.25, paper), logits.softmax(1))


@pytest.mark.parametrize("fault", ["root", "image", "size", "values"])
def test_bad_data_gives_one_error_naming_the_file(scenes_tiny, tmp_path, fault):
    root = tmp_path / "scenes"
    shutil.copytree(scenes_tiny, root)
    line = (root / "splits" / "1_8" / "labeled.txt").read_text().split()
    image, label = root / line[0], root / line[1]
    if fault == "root":
        shutil.rmtree(root)
        named = str(root)
    elif fault == "image":
        image.unlink()
        named = str(image)
    elif fault == "size":
        lab = Image.open(label)
        lab.resize((lab.width // 2, lab.height)).save(label)
        named = str(label)
    else:
        lab = Image.open(label)
        arr = np.array(lab)
        arr[0, 0] = 77
        bad = Image.fromarray(arr, "P")
        bad.putpalette(lab.getpalette())
        bad.save(label)
        named = str(label)
    cfg = tiny(root, "optim.epochs=1", "optim.iters_per_epoch=4", "data.labeled_limit=1", "data.diag_images=0")
    with pytest.raises(DatasetError) as exc:
        Trainer(cfg, tmp_path / "run").fit()
    assert named in str(exc.value)
    rc = main(["--config", str(TINY), "--out", str(tmp_path / "cli"), f"data.root={root}", "optim.epochs=1",
               "optim.iters_per_epoch=4", "data.labeled_limit=1", "data.diag_images=0"])
    assert rc == 2


def test_cli_reports_bad_config_keys(capsys):
    assert main(["--config", str(TINY), "method.dlpp=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'method.dlpp'")


def test_threshold_ema_and_fixed():
    probs = torch.zeros(1, 3, 2, 2)
    probs[0, 0] = torch.tensor([[0.9, 0.6], [0.2, 0.2]])
    probs[0, 1] = torch.tensor([[0.1, 0.4], [0.7, 0.5]])
    probs[0, 2] = 1 - probs[0, 0] - probs[0, 1]
    ignore = torch.zeros(1, 2, 2, dtype=torch.long)
    t = Threshold("ema", 0.95, 0.85, 0.999)
    t.update(probs, ignore)
    # classes predicted: 0 (max conf 0.9) and 1 (max 0.7) → mean 0.8
    assert t.value == pytest.approx(0.999 * 0.85 + 0.001 * 0.8)
    fixed = Threshold("fixed", 0.95, 0.85, 0.999)
    fixed.update(probs, ignore)
    assert fixed.value == 0.95


def test_ohem_keeps_hard_pixels():
    logits = torch.tensor([[[[5.0, -5.0, 0.0, 0.0]]], [[[-5.0, 5.0, 0.0, 0.0]]]]).transpose(0, 1).contiguous()
    target = torch.tensor([[[0, 0, 0, 255]]])
    # probs of class 0: ≈1, ≈0, 0.5 — with thresh 0.7 the easy pixel is dropped
    full = torch.nn.functional.cross_entropy(logits, target, ignore_index=255, reduction="none")[0, 0]
    assert ohem_ce(logits, target, 0.7, 1).item() == pytest.approx(((full[1] + full[2]) / 2).item())


def test_region_propagation_fills_an_agreeing_region():
    """A region of pixels that share features, mostly confident and one class, gets that class everywhere."""
    b, c, h, w, k = 1, 3, 4, 4, 8
    f = torch.zeros(b, c, h, w)
    f[:, 0, :, :2] = 20.0  # left half: one feature direction
    f[:, 2, :, 2:] = 20.0  # right half: another
    mask = torch.zeros(b, h, w, dtype=torch.long)
    mask[:, :, 2:] = 2
    keep = torch.ones(b, h, w, dtype=torch.bool)
    keep[0, 0, 0] = False  # one unconfident pixel in the left region
    mask[0, 0, 0] = 1  # with a wrong label
    box = torch.zeros(b, h, w, dtype=torch.bool)
    ign = torch.zeros(b, h, w, dtype=torch.long)
    rows = torch.randint(0, h * w, (k,), generator=torch.Generator().manual_seed(0))
    new_mask, new_keep = region_propagation(f.flatten(2), f.flatten(2), (h, w), rows, mask, keep, box, ign, 0.8, "forward",
                                            c)
    assert new_keep.all()
    assert (new_mask[0, :, :2] == 0).all() and (new_mask[0, :, 2:] == 2).all()


def test_cpu_evidence_benchmark_runs_and_aggregates(scenes_tiny, tmp_path):
    from experiments import cpu_evidence

    out = tmp_path / "evidence.json"
    cpu_evidence.main(["--size", "smoke", "--seeds", "0", "1", "--held-out", "1", "--variants", "full", "wo_dlp",
                       cpu_evidence.BASELINE, "--runs-dir", str(tmp_path / "runs"), "--out", str(out),
                       f"data.root={scenes_tiny}", "optim.epochs=1", "optim.iters_per_epoch=1", "data.val_limit=2",
                       "data.diag_images=2", "eval.final_modes=[original]"])
    payload = json.loads(out.read_text())
    summary = payload["summary"]
    assert set(summary) == {"full", "wo_dlp", cpu_evidence.BASELINE}
    runs = {(r["row"], r["seed"]): r for r in payload["runs"]}
    full, wo, base = summary["full"], summary["wo_dlp"], summary[cpu_evidence.BASELINE]
    assert full["seeds"] == [0, 1] and set(full["nets"]) == {"backprop", "momentum", "headline"}
    assert set(wo["nets"]) == {"backprop", "headline"}  # w/o DLP drops the momentum network, as the paper's row
    assert "diff" not in base["nets"]["backprop"]  # the reference
    for net, key in cpu_evidence.NETS.items():  # paired seed by seed, network by network, as JSON keys
        assert full["nets"][net]["diff_per_seed"] == pytest.approx(
            {str(s): runs[("full", s)][key] - runs[(cpu_evidence.BASELINE, s)][key] for s in (0, 1)})
    assert full["nets"]["backprop"]["mean"] == pytest.approx((runs[("full", 0)]["miou_backprop"]
                                                              + runs[("full", 1)]["miou_backprop"]) / 2)
    assert payload["seeds"] == {"selection": [0], "held_out": [1]}
    claim = payload["claim"]
    assert claim["measured"] and claim["seeds"] == [1]
    assert claim["met"] == all(d >= cpu_evidence.MARGIN for per in claim["diff_per_seed"].values() for d in per.values())
    assert "pl_acc_after_mean" in full and "pl_acc_after_mean" not in wo  # no "after DLP" without DLP
    assert [r["seed"] for r in payload["warm_start"]["runs"]] == [0, 1]
    assert payload["configs"]["wo_dlp"]["method"]["dlp"] is False
    assert payload["configs"][cpu_evidence.BASELINE]["method"]["semi_supervised"] is False


def test_supervised_warm_start_then_diagnostics_with_and_without_dlp(scenes_tiny, tmp_path):
    from derprop.book.runs import WARM_START, WITHOUT_DLP
    from derprop.book.viewer import load_snapshots

    warm = Trainer(tiny(scenes_tiny, *WARM_START, "optim.epochs=1", "data.val_limit=1", "data.diag_images=0"),
                   tmp_path / "warm")
    warm.fit()
    steps = [json.loads(line) for line in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    assert "train_ce_x" in steps[0] and "train_ce_u" not in steps[0] and "train_der_x" in steps[0]
    start = tmp_path / "warm" / "last.pt"
    for name, extra in (("dlp", ()), ("nodlp", WITHOUT_DLP)):
        tr = Trainer(tiny(scenes_tiny, f"optim.warm_start={start}", "optim.epochs=1", "optim.iters_per_epoch=1",
                          "data.val_limit=1", "data.diag_images=3", *extra), tmp_path / name)
        for k, v in ck.load(start)["model"].items():
            assert torch.equal(tr.net.state_dict()[k], v), k  # the warm start's weights, exactly
        tr.fit()
        row = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        snaps = load_snapshots(tmp_path / name)
        assert list(snaps) == [0, 1] and row["pl_images"] == 3
        if name == "dlp":
            assert {"pl_acc_after", "pl_fixed", "pl_broken", "attn_own_share", "attn_support"} <= set(row)
            assert snaps[1]["attn"].shape[0] == 3 and np.allclose(snaps[1]["attn"].sum((1, 2)), 1, atol=1e-4)
        else:
            assert not {k for k in row if "after" in k or k.startswith("attn")}
            assert "pl_after" not in snaps[1] and "attn" not in snaps[1]
    with pytest.raises(ck.CheckpointError, match="optim.warm_start"):
        Trainer(tiny(scenes_tiny, f"optim.warm_start={tmp_path / 'none.pt'}"), tmp_path / "x")


def test_bf16_autocast_and_channels_last_step(scenes_tiny, tmp_path):
    tr = Trainer(tiny(scenes_tiny, "optim.amp=bf16", "optim.channels_last=true", "profile=official",
                      "method.chunk=5", "data.diag_images=0"), tmp_path)
    batch = next(iter(zip(*loaders(tr.data, tr.cfg, tr.d))))
    loss, logs = tr.compute_loss(batch, 1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tr.net.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(tiny(scenes_tiny, "optim.amp=fp16"), tmp_path / "x", device="cpu")


def test_resume_with_a_different_config_is_refused(reference_run, scenes_tiny):
    with pytest.raises(ck.CheckpointError, match=r"different config: loss.lambda_kl: 0.25 there, 0.5 here.*optim.lr"):
        Trainer(tiny(scenes_tiny, "loss.lambda_kl=0.5", "optim.lr=0.5"), reference_run, resume=True)
    with pytest.raises(ck.CheckpointError, match=r"finished epoch 2, more than optim.epochs=1"):
        Trainer(tiny(scenes_tiny, "optim.epochs=1"), reference_run, resume=True)


def test_evaluation_runs_in_fp32_with_the_configs_loader_workers(scenes_tiny, tmp_path, monkeypatch):
    """A bf16 run's mIoU is an fp32 evaluation (comparable with an fp32 run's), loaded by data.num_workers workers;
    a CPU run records no CUDA memory."""
    import derprop.training.trainer as trainer_module

    seen = []

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), kwargs["num_workers"]))
        return real(*args, **kwargs)

    real = trainer_module.evaluate
    monkeypatch.setattr(trainer_module, "evaluate", spy)
    res = Trainer(tiny(scenes_tiny, "optim.amp=bf16", "optim.epochs=1", "optim.iters_per_epoch=1", "data.val_limit=2",
                       "data.diag_images=0", "data.num_workers=1"), tmp_path).fit()
    assert seen and all(s == (False, 1) for s in seen)
    assert "peak_cuda_mib" not in res
    assert "peak CUDA memory" not in (tmp_path / "train.log").read_text()
