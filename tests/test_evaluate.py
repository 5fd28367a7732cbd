"""derprop.evaluate: the three modes, the result dict, the table and the CLI."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from derprop.evaluate import main
from derprop.method.momentum import MomentumNetwork
from derprop.training import checkpoint
from derprop.training.config import ModelConfig
from derprop.training.evaluation import center_crop, evaluate, format_iou_table, sliding_window_logits
from derprop.training.metrics import ConfusionMatrix
from derprop.training.model import build_model
from tests.fixtures import scenes_tree

torch.set_num_threads(min(2, torch.get_num_threads()))
C = 4


class ColourModel(nn.Module):
    """Pointwise 'segmenter': class = red channel // 64. No context, so any windowing gives the same logits."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        cls = (x[:, 0].float() // 64).long().clamp(0, C - 1)
        return F.one_hot(cls, C).permute(0, 3, 1, 2).float() * 5 + x[:, 1:2].float() / 255 + self.dummy


def colour_image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def colour_label(img):
    return (img[0].long() // 64).clamp(0, C - 1)


def test_sliding_equals_original_for_a_pointwise_model():
    model = ColourModel()
    x = colour_image(70, 101)[None]
    ref = model(x)
    for crop, stride in [(33, None), (33, 11), (64, 40), (128, None)]:
        out = sliding_window_logits(model, x, crop_size=crop, stride=stride, window_batch=3)
        torch.testing.assert_close(out, ref)


def test_sliding_equals_original_when_the_crop_is_the_image():
    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone="resnet18", num_classes=C, aspp_dilations=(2, 4))).eval()
    x = colour_image(65, 65)[None]
    with torch.no_grad():
        ref = net(x).logits
        out = sliding_window_logits(net, x, crop_size=65)
    torch.testing.assert_close(out, ref)
    # a window grid: a pixel covered by one window only gets exactly that window's logits
    x = colour_image(65, 97)[None]
    with torch.no_grad():
        out = sliding_window_logits(net, x, crop_size=65, stride=32)  # windows at x = 0, 32
        first = net(x[..., :65]).logits
    torch.testing.assert_close(out[..., :32], first[..., :32])


def test_modes_and_result_dict():
    model = ColourModel()
    imgs = [colour_image(50, 60, s) for s in range(3)]
    data = [(im, colour_label(im)) for im in imgs]
    for mode in ("original", "sliding", "center_crop"):
        res = evaluate(model, data, num_classes=C, mode=mode, crop_size=32)
        assert res["miou"] == pytest.approx(1.0) and res["pixel_acc"] == pytest.approx(1.0)
        assert res["mode"] == mode and res["num_images"] == 3 and len(res["iou_per_class"]) == C
    assert evaluate(model, data, num_classes=C, mode="sliding", crop_size=30)["stride"] == 20
    with pytest.raises(ValueError, match="mode"):
        evaluate(model, data, num_classes=C, mode="full")


def test_center_crop_scores_only_the_centre():
    """Labels wrong outside the central square: centre-crop scores 1, original less."""
    model = ColourModel()
    im = colour_image(40, 50)
    lab = colour_label(im)
    wrong = (lab + 1) % C
    lab_bad = wrong.clone()
    lab_bad[4:36, 9:41] = lab[4:36, 9:41]  # central 32x32 is right
    data = [(im, lab_bad)]
    assert evaluate(model, data, num_classes=C, mode="center_crop", crop_size=32)["miou"] == pytest.approx(1.0)
    assert evaluate(model, data, num_classes=C, mode="original")["miou"] < 0.9
    ci, cl = center_crop(im[None], lab[None], 64)  # larger than the image: the whole image
    assert ci.shape[-2:] == (40, 50) and cl.shape[-2:] == (40, 50)


def test_input_forms_ignore_and_absent_classes():
    model = ColourModel()
    im = colour_image(30, 30)
    lab = colour_label(im)
    lab[:5] = 255
    hwc = im.permute(1, 2, 0).numpy()
    r1 = evaluate(model, [(hwc, lab.numpy())], num_classes=C + 1)  # class C never occurs
    r2 = evaluate(model, [(im, lab)], num_classes=C + 1)
    loader = torch.utils.data.DataLoader([(im, lab), (im, lab)], batch_size=2)
    r3 = evaluate(model, loader, num_classes=C + 1)
    assert r1["iou_per_class"] == r2["iou_per_class"] == r3["iou_per_class"]
    assert r1["iou_per_class"][C] is None and r3["num_images"] == 2
    table = format_iou_table(r1)
    assert "class_4" in table and "-" in table.splitlines()[2 + C] and "mode: original" in table


def test_evaluate_restores_training_mode_and_accepts_momentum_net():
    torch.manual_seed(0)
    net = build_model(ModelConfig(backbone="resnet18", num_classes=C, aspp_dilations=(2, 4))).train()
    data = [(colour_image(33, 33, s), colour_label(colour_image(33, 33, s))) for s in range(2)]
    res = evaluate(net, data, num_classes=C)
    assert net.training
    mom = MomentumNetwork(net)
    res_m = evaluate(mom, data, num_classes=C)
    assert res_m["miou"] == pytest.approx(res["miou"])  # same weights, both in eval mode


def test_format_iou_table():
    res = {"miou": 0.5, "iou_per_class": [0.25, 0.75, None], "pixel_acc": 0.9, "mode": "sliding",
           "crop_size": 321, "stride": 214, "num_images": 7}
    table = format_iou_table(res, ["bg", "cat", "dog"])
    assert "cat" in table and "75.00" in table and "50.00" in table and "90.00" in table
    assert "mode: sliding (crop 321, stride 214)" in table
    with pytest.raises(ValueError):
        format_iou_table(res, ["bg"])


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "JPEGImages").mkdir()
    (root / "SegmentationClass").mkdir()
    lines = []
    rng = np.random.default_rng(0)
    for i in range(2):
        img = rng.integers(0, 256, (41, 49, 3), dtype=np.uint8)
        lab = rng.integers(0, C, (41, 49), dtype=np.uint8)
        lab[:3] = 255
        Image.fromarray(img).save(root / "JPEGImages" / f"im{i}.png")
        Image.fromarray(lab, mode="L").save(root / "SegmentationClass" / f"im{i}.png")
        lines.append(f"JPEGImages/im{i}.png SegmentationClass/im{i}.png")
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", num_classes=C, aspp_dilations=(2, 4), two_heads=False)
    net = build_model(cfg)
    mom = MomentumNetwork(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = root / "last.pt"
    checkpoint.save(path, {
        "model": net.state_dict(),
        "momentum": mom.state_dict(),
        "epoch": 3,
        "config": {"model": dataclasses.asdict(cfg),
                   "data": {"root": str(root), "layout": "pascal", "val_list": "val.txt", "num_classes": C}},
    })
    return root, path, net, mom


def test_cli_evaluates_both_weight_sets(tiny_run, tmp_path, capsys):
    root, path, net, mom = tiny_run
    out = tmp_path / "res" / "eval.json"
    rc = main(["--checkpoint", str(path), "--device", "cpu", "--mode", "sliding", "--crop-size", "33",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "== model weights" in printed and "== momentum weights" in printed and "mIoU" in printed
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"model", "momentum"} and res["epoch"] == 3
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # no temp file left behind
    # the CLI's numbers equal evaluate() on the same weights
    from derprop.training.evaluation import eval_dataset

    ds = eval_dataset({"root": str(root), "val_list": str(root / "val.txt"), "num_classes": C})
    for name, model in (("model", net), ("momentum", mom)):
        direct = evaluate(model, ds, num_classes=C, mode="sliding", crop_size=33)
        assert res["results"][name]["miou"] == pytest.approx(direct["miou"])
        assert res["results"][name]["mode"] == "sliding"


def test_cli_crops_as_the_checkpoint_says_unless_told(tiny_run, tmp_path):
    root, path, _, _ = tiny_run
    state = checkpoint.load(path)
    state["config"]["eval"] = {"crop_size": 25}
    checkpoint.save(tmp_path / "c.pt", state)
    for given, used in (([], 25), (["--crop-size", "33"], 33)):
        out = tmp_path / f"r{used}.json"
        args = ["--checkpoint", str(tmp_path / "c.pt"), "--device", "cpu", "--mode", "center_crop", "--which", "model"]
        assert main([*args, *given, "--workers", "0", "--out", str(out)]) == 0
        assert json.loads(out.read_text())["results"]["model"]["crop_size"] == used


def test_cli_corrupt_checkpoint(tiny_run, tmp_path, capsys):
    _, path, _, _ = tiny_run
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:2000])
    assert main(["--checkpoint", str(broken), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "broken.pt" in err and "error:" in err and err.strip().endswith("pass another file with --checkpoint")
    assert "--resume-from" not in err  # a training option: evaluate has none
    assert main(["--checkpoint", str(tmp_path / "absent.pt")]) == 2
    assert "absent.pt" in capsys.readouterr().err


def test_cli_only_model_and_missing_list(tiny_run, tmp_path, capsys):
    root, path, _, _ = tiny_run
    args = ["--checkpoint", str(path), "--device", "cpu", "--which", "model", "--limit", "1", "--workers", "0"]
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "== model weights" in printed and "momentum" not in printed and "images: 1" in printed
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["num_images"] == res["results"]["model"]["num_images"] == 1  # what was evaluated, not the list
    assert main(["--checkpoint", str(path), "--val-list", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_confusion_matrix_sanity_with_cli_data(tiny_run):
    """evaluate's mIoU is ConfusionMatrix over argmax predictions (no hidden reweighting)."""
    root, _, net, _ = tiny_run
    from derprop.training.evaluation import eval_dataset

    ds = eval_dataset({"root": str(root), "val_list": "val.txt", "num_classes": C})
    cm = ConfusionMatrix(C)
    net.eval()
    with torch.no_grad():
        for img, lab in ds:
            cm.update(net(img[None].as_subclass(torch.Tensor)).logits.argmax(1), lab[None])
    assert evaluate(net, ds, num_classes=C)["miou"] == pytest.approx(cm.miou())


def test_eval_dataset_from_layout(scenes_tiny, tmp_path):
    """Without a list file the layout's own val split is used (scenes keeps its lists under its root)."""
    from derprop.training.evaluation import eval_dataset

    ds = eval_dataset({"layout": "scenes", "root": str(scenes_tiny), "val_list": None, "num_classes": None})
    assert len(ds) == 8 and ds.num_classes == 11 and len(ds.class_names) == 11
    # a tree of fewer classes (the CPU default's): its manifest's count, not the layout's eleven
    root = tmp_path / "three"
    scenes_tree(root, classes=(0, 1, 8), size=32, num_train=16, num_val=2)
    ds = eval_dataset({"layout": "scenes", "root": str(root), "val_list": None, "num_classes": 4})
    assert ds.num_classes == 4 and len(ds.class_names) == 4 and ds.class_names[0] == "background"
    with pytest.raises(ValueError, match="val_list"):
        eval_dataset({"layout": "nowhere", "root": str(scenes_tiny)})


def _scenes_checkpoint(path, num_classes, root, trained_root=None):
    cfg = ModelConfig(backbone="resnet18", num_classes=num_classes, aspp_dilations=(2, 4), two_heads=False)
    state = {"model": build_model(cfg).state_dict(), "epoch": 1,
             "config": {"model": dataclasses.asdict(cfg), "data": {"root": root, "layout": "scenes", "val_list": None,
                                                         "num_classes": None}}}
    if trained_root is not None:
        state["data_root"] = trained_root
    checkpoint.save(path, state)
    return path


def test_cli_refuses_a_checkpoint_of_another_class_count(scenes_tiny, tmp_path, capsys):
    path = _scenes_checkpoint(tmp_path / "c12.pt", 12, str(scenes_tiny))
    assert main(["--checkpoint", str(path), "--device", "cpu", "--workers", "0", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: checkpoint {path} predicts 12 classes but the dataset under {scenes_tiny} has 11; "
                   f"pass --data-root with the dataset it was trained on (its data.root was '{scenes_tiny}'), "
                   "or another --checkpoint")


def test_cli_resolves_a_relative_root_as_training_did_and_says_so(scenes_tiny, tmp_path, monkeypatch, capsys, caplog):
    rel = Path("data") / "scenes_tiny"
    path = _scenes_checkpoint(tmp_path / "c11.pt", 11, str(rel), trained_root=str(scenes_tiny))
    monkeypatch.chdir(tmp_path)  # another folder than the training run's: data/scenes_tiny is not here
    args = ["--checkpoint", str(path), "--device", "cpu", "--workers", "0", "--limit", "1", "--which", "model"]
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert f"dataset root {scenes_tiny} (the checkpoint's data.root '{rel}' as the training run resolved it)" \
        in caplog.text
    assert f"== model weights of {path} on {scenes_tiny} ==" in capsys.readouterr().out
    old = _scenes_checkpoint(tmp_path / "old.pt", 11, str(rel))  # no data_root: the current folder, else an error
    assert main(["--checkpoint", str(old), "--device", "cpu"]) == 2
    assert f"dataset root '{rel}' of the checkpoint is not found (tried {tmp_path / rel}); pass --data-root DIR" \
        in capsys.readouterr().err


def test_cli_refuses_a_val_list_that_lists_an_image_twice(scenes_tiny, tmp_path, capsys):
    path = _scenes_checkpoint(tmp_path / "c11.pt", 11, str(scenes_tiny))
    line = (scenes_tiny / "splits" / "val.txt").read_text().splitlines()[0]
    (tmp_path / "val.txt").write_text("\n".join([line] * 9) + "\n")  # one image nine times: it would count nine
    assert main(["--checkpoint", str(path), "--val-list", str(tmp_path / "val.txt"), "--workers", "0"]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'val.txt'}, line 2: {line.split()[0]!r} is listed again "
                                       "(first on line 1); an image is listed once: remove the repeated line\n")


def test_cli_out_replaces_only_an_earlier_evaluation_and_is_checked_before_the_work(scenes_tiny, tmp_path,
                                                                                    monkeypatch, capsys):
    from derprop.training import paths

    path = _scenes_checkpoint(tmp_path / "c11.pt", 11, str(scenes_tiny))
    args = ["--checkpoint", str(path), "--device", "cpu", "--workers", "0", "--limit", "1", "--which", "model"]
    victim = tmp_path / "victim.pt"
    victim.write_bytes(path.read_bytes())
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"miou": 0.5, "final": {}}')
    tree = tmp_path / "scenes"
    for folder in ("JPEGImages", "SegmentationClass"):
        (tree / folder).mkdir(parents=True)
    (tree / "manifest.json").write_text("{}")
    (tmp_path / "a_file").write_text("x")
    before = {p: p.read_bytes() for p in (victim, run / "results.json", tree / "manifest.json")}
    refusals = {
        victim: "evaluation results are JSON files; give the file a .json name",
        run / "results.json": "already exists and is not an earlier output of evaluate (evaluation results), so it "
                              "is left as it is",
        tree / "manifest.json": f"lies in the dataset tree {tree}; evaluation results are never written into a dataset",
        path: "evaluation results are JSON files",
        tmp_path / "a_file" / "r.json": f"cannot use output folder {tmp_path / 'a_file'}: {tmp_path / 'a_file'} is not "
                                        "a folder",
        tmp_path / "full" / "r.json": f"cannot write to output folder {tmp_path / 'full'}: No space left on device",
    }

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("the checkpoint was read before --out was checked"))
        for out, words in refusals.items():
            if out.parent.name == "full":
                m.setattr(paths.tempfile, "mkstemp", full)
            assert main([*args, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: ") and words in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in before} == before
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "r.json")]) == 0  # its own earlier output is replaced
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 1


@pytest.mark.parametrize("flag, value, least", [("--stride", "-5", 1), ("--window-batch", "0", 1), ("--limit", "0", 1),
                                                ("--crop-size", "0", 1), ("--workers", "-1", 0)])
def test_cli_refuses_bad_numbers_in_one_line(flag, value, least, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "x.pt", flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: argument {flag}: must be an integer >= {least}, got {value} "
                                       "(see python -m derprop.evaluate --help)\n")
