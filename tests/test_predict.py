"""derprop.load_model and python -m derprop.predict on a tiny CPU checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import derprop
from derprop.predict import main, predict
from derprop.provenance import source
from derprop.training import checkpoint as ckpt_io
from derprop.training.config import resolved
from derprop.training.configfile import load_config
from derprop.training.model import build_model
from tests.fixtures import bomb_png


def save_tiny_checkpoint(path: Path, *, momentum: bool = False) -> dict:
    """A checkpoint shaped like the trainer's best.pt (or last.pt with ``momentum``) for the CPU default's network."""
    torch.manual_seed(0)
    cfg = resolved(load_config(source() / "configs" / "cpu_scenes.yaml", ["model.pretrained=none"]))
    net = build_model(cfg["model"])
    state = {"epoch": 1, "model": net.state_dict(), "config": cfg}
    if momentum:
        state["momentum"] = {"model": {k: v + 1 if v.is_floating_point() else v for k, v in net.state_dict().items()}}
    ckpt_io.save(path, state)
    return cfg


def write_image(path: Path, h: int = 40, w: int = 52) -> np.ndarray:
    img = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(img).save(path)
    return img


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_tiny_checkpoint(path)
    return path


def test_load_model_returns_eval_net_and_config(repo, tiny_ckpt):
    net, cfg = derprop.load_model(tiny_ckpt)
    assert not net.training
    classes = load_config(repo / "configs" / "cpu_scenes.yaml").model.num_classes
    assert cfg["model"]["backbone"] == "mobilenet_v2" and cfg["model"]["num_classes"] == classes
    out = net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert out.logits.shape == (1, classes, 32, 32)


def test_load_model_prefers_the_momentum_network(tmp_path):
    path = tmp_path / "last.pt"
    save_tiny_checkpoint(path, momentum=True)
    auto, _ = derprop.load_model(path)
    model, _ = derprop.load_model(path, which="model")
    name = next(k for k, v in model.state_dict().items() if v.is_floating_point())
    assert torch.equal(auto.state_dict()[name], model.state_dict()[name] + 1)


@pytest.mark.parametrize("mode", ["original", "sliding"])
def test_predict_cli_writes_palette_png_and_overlay(repo, tiny_ckpt, tmp_path, mode, capsys):
    img = write_image(tmp_path / "a.jpg")
    out = tmp_path / "a.png"
    assert main(["--checkpoint", str(tiny_ckpt), "--image", str(tmp_path / "a.jpg"), "--mode", mode,
                 "--crop-size", "32", "--out", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as im:
        assert im.mode == "P" and im.size == (52, 40)
        label = np.array(im)
    assert label.max() < load_config(repo / "configs" / "cpu_scenes.yaml").model.num_classes
    with Image.open(tmp_path / "a_overlay.png") as ov:
        assert ov.mode == "RGB" and ov.size == (52, 40)
    net, _ = derprop.load_model(tiny_ckpt)
    assert np.array_equal(label, predict(net, np.array(Image.open(tmp_path / "a.jpg")), mode=mode, crop_size=32))
    assert img.shape == (40, 52, 3)


def test_predict_bad_inputs_give_one_error_line(tiny_ckpt, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    for args in (["--checkpoint", str(broken), "--image", "x.jpg"],
                 ["--checkpoint", str(tiny_ckpt), "--image", str(tmp_path / "missing.jpg")]):
        proc = subprocess.run([sys.executable, "-m", "derprop.predict", *args, "--out", str(tmp_path / "o.png")],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "--resume-from" not in proc.stderr  # a training option: predict has none
    assert not (tmp_path / "o.png").exists()


def _predict_cli(ckpt: Path, image: Path, out: Path, *extra: str) -> int:
    return main(["--checkpoint", str(ckpt), "--image", str(image), "--out", str(out), "--device", "cpu", *extra])


def test_predict_never_overwrites_its_input(tiny_ckpt, tmp_path, capsys):
    write_image(tmp_path / "x.png")
    before = (tmp_path / "x.png").read_bytes()
    assert _predict_cli(tiny_ckpt, tmp_path / "x.png", tmp_path / "x.png") == 2
    assert capsys.readouterr().err == (f"error: --out {tmp_path / 'x.png'} is the input {tmp_path / 'x.png'}; "
                                       "predict never overwrites its input: choose another file name\n")
    (tmp_path / "link.png").hardlink_to(tmp_path / "x.png")  # another name, the same file
    assert _predict_cli(tiny_ckpt, tmp_path / "x.png", tmp_path / "out.png", "--overlay", str(tmp_path / "link.png")) == 2
    assert "--overlay" in capsys.readouterr().err
    assert _predict_cli(tiny_ckpt, tmp_path / "x.png", tmp_path / "out.png", "--overlay", str(tmp_path / "out.png")) == 2
    assert "is the input" in capsys.readouterr().err
    assert (tmp_path / "x.png").read_bytes() == before and not (tmp_path / "out.png").exists()


def test_predict_writes_nothing_into_a_dataset_tree(tiny_ckpt, scenes_tiny, tmp_path, capsys):
    image = scenes_tiny / "JPEGImages" / "val_00000.jpg"
    before = image.read_bytes()
    for overlay, words in ((image, "predictions are PNG files"),
                           (scenes_tiny / "JPEGImages" / "x.png", f"lies in the dataset tree {scenes_tiny}")):
        assert _predict_cli(tiny_ckpt, image, tmp_path / "a.png", "--overlay", str(overlay)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --overlay {overlay}") and words in err and err.count("\n") == 1
    assert image.read_bytes() == before and not (tmp_path / "a.png").exists()
    assert not (scenes_tiny / "JPEGImages" / "x.png").exists()


def test_predict_names_a_folder_a_link_loop_and_a_file_of_another_kind(tiny_ckpt, tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "self.jpg").symlink_to("self.jpg")
    write_image(tmp_path / "a.png")
    (tmp_path / "notes.png").write_text("my notes, not a picture")
    for image, out, words in (
            (tmp_path / "img", tmp_path / "o.png", f"image {tmp_path / 'img'} is a folder; name a file in it"),
            (tmp_path / "self.jpg", tmp_path / "o.png",
             f"--image {tmp_path / 'self.jpg'} is a symbolic link that leads back to itself"),
            (tmp_path / "a.png", tmp_path / "notes.png",
             f"--out {tmp_path / 'notes.png'} already exists and is not an earlier output of predict")):
        assert _predict_cli(tiny_ckpt, image, out) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {words}") and err.count("\n") == 1, err
    assert (tmp_path / "notes.png").read_text() == "my notes, not a picture" and not (tmp_path / "o.png").exists()
    assert _predict_cli(tiny_ckpt, tmp_path / "a.png", tmp_path / "o.png") == 0
    assert _predict_cli(tiny_ckpt, tmp_path / "a.png", tmp_path / "o.png") == 0  # its own output is replaced


def test_predict_output_that_cannot_be_written_is_one_line(tiny_ckpt, tmp_path, capsys):
    write_image(tmp_path / "a.png")
    (tmp_path / "dir.png").mkdir()
    assert _predict_cli(tiny_ckpt, tmp_path / "a.png", tmp_path / "dir.png") == 2
    assert capsys.readouterr().err.startswith(f"error: --out {tmp_path / 'dir.png'} is a folder; name a file in it")
    if Path("/sys").is_dir():  # read-only even for root
        assert _predict_cli(tiny_ckpt, tmp_path / "a.png", Path("/sys/derprop-out.png")) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot write to output folder /sys: ") and err.count("\n") == 1


def test_predict_reads_a_16_bit_image_and_refuses_a_bomb(tiny_ckpt, tmp_path, capsys):
    grey = (np.arange(40 * 52).reshape(40, 52) * 31).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert _predict_cli(tiny_ckpt, tmp_path / "g16.png", tmp_path / "out.png") == 0
    net, _ = derprop.load_model(tiny_ckpt)
    eight = np.repeat(np.rint(grey / 257).astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(np.array(Image.open(tmp_path / "out.png")), predict(net, eight))
    capsys.readouterr()
    assert _predict_cli(tiny_ckpt, bomb_png(tmp_path / "bomb.png"), tmp_path / "o2.png") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: image {tmp_path / 'bomb.png'} is too large to read") and err.count("\n") == 1


@pytest.mark.parametrize("device, words", [("bogus", "'bogus' is not a device"),
                                           ("cuda:99", "cuda:99")])
def test_predict_bad_device_is_one_line(tiny_ckpt, tmp_path, device, words, capsys):
    write_image(tmp_path / "a.png")
    assert main(["--checkpoint", str(tiny_ckpt), "--image", str(tmp_path / "a.png"), "--out",
                 str(tmp_path / "o.png"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device ") and words in err and err.count("\n") == 1
