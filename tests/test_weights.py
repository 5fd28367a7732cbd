"""python -m data_prep.weights: verifies the deep-stem ResNet-101 checkpoint by keys and shapes."""

from __future__ import annotations

import pytest
import torch

from data_prep.weights import expected_shapes, main


@pytest.fixture(scope="module")
def deep_stem_state() -> dict[str, torch.Tensor]:
    """Zero tensors of the right shapes, plus an ImageNet classifier, under a DDP-style prefix."""
    sd = {f"module.{k}": torch.zeros(s) for k, s in expected_shapes().items()}
    sd["module.fc.weight"], sd["module.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    return sd


def test_places_and_verifies(deep_stem_state, tmp_path, capsys):
    src = tmp_path / "download.pth"
    torch.save({"state_dict": deep_stem_state}, src)
    assert main(["--from", str(src), "--root", str(tmp_path)]) == 0
    assert (tmp_path / "pretrained" / "resnet101.pth").read_bytes() == src.read_bytes()
    assert main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 extra fc" in out and "sha256 " in out


def test_missing_or_wrong_files_give_one_line_with_the_source(deep_stem_state, tmp_path, capsys):
    assert main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "UniMatch" in err and "model.pretrained=torchvision model.deep_stem=false" in err
    plain = {k: v for k, v in deep_stem_state.items() if ".conv1." not in k or "layer" in k}
    plain["conv1.weight"] = torch.zeros(64, 3, 7, 7)
    torch.save(plain, tmp_path / "plain.pth")
    assert main(["--from", str(tmp_path / "plain.pth"), "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not the deep-stem ResNet-101" in err and "use model.deep_stem=false" in err
    assert not (tmp_path / "pretrained").exists()
