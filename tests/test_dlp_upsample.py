"""``method.dlp_upsample``: how L̃ reaches full resolution (chapter *Where DLP can help*), against a dense reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from derprop.errors import ConfigError
from derprop.method.propagation import propagate
from derprop.provenance import source
from derprop.training.configfile import load_config
from derprop.training.loaders import loaders
from derprop.training.model import SegOutput
from derprop.training.pseudo_labels import dlp_options, propagated_logits
from derprop.training.trainer import Trainer

TINY = source() / "configs" / "cpu_scenes_tiny.yaml"


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)``: bilinear interpolation with the end points aligned (output ``o`` sits at input
    coordinate ``o·(n_in − 1)/(n_out − 1)``), written out weight by weight."""
    a = np.zeros((n_out, n_in))
    for o in range(n_out):
        x = o * (n_in - 1) / (n_out - 1)
        i = min(int(np.floor(x)), n_in - 2)
        t = x - i
        a[o, i] += 1 - t
        a[o, i + 1] += t
    return a


def dense_reference(out: SegOutput, upsample: str) -> np.ndarray:
    """L̃ at full resolution pixel by pixel: ``L̃_grid = L_grid·W`` (eq. 4, release form), then each full-resolution
    pixel's bilinear mix of grid values, of ``L̃`` (``bilinear``) or of ``L̃ − L_grid`` added to ``L`` (``detail``)."""
    b, c, h, w = out.logits_grid.shape
    big_h, big_w = out.logits.shape[-2:]
    lt = propagate(out.logits_grid.flatten(2), out.f1.flatten(2), None, form="softmax", op="forward").view(b, c, h, w)
    source_grid = (lt if upsample == "bilinear" else lt - out.logits_grid).double().numpy()
    ay, ax = interpolation_matrix(h, big_h), interpolation_matrix(w, big_w)
    full = np.zeros((b, c, big_h, big_w))
    for y in range(big_h):
        for x in range(big_w):
            full[:, :, y, x] = np.einsum("i,j,bcij->bc", ay[y], ax[x], source_grid)
    return full + (out.logits.double().numpy() if upsample == "detail" else 0)


def seg_output(seed: int = 0, b: int = 2, c: int = 3, grid: int = 5, size: int = 17) -> SegOutput:
    g = torch.Generator().manual_seed(seed)
    logits_grid = torch.randn(b, c, grid, grid, generator=g) * 3
    logits = torch.randn(b, c, size, size, generator=g) * 3  # a full-resolution L with detail the grid lacks
    f1 = torch.randn(b, 8, grid, grid, generator=g)
    return SegOutput(logits=logits, f1=f1, f2=f1, logits_fp=None, logits_grid=logits_grid)


@pytest.mark.parametrize("upsample", ["bilinear", "detail"])
def test_upsampling_matches_the_dense_reference(upsample):
    out = seg_output()
    got = propagated_logits(out, (17, 17), temperature=1.0, form="softmax", op="forward", chunk=None,
                            paper_norm="row_sum", upsample=upsample)
    np.testing.assert_allclose(got.double().numpy(), dense_reference(out, upsample), atol=1e-4)


def test_the_two_upsamplings_differ_by_what_the_grid_cannot_hold():
    """``detail − bilinear = L − up(L_grid)``: zero where L is itself the grid's interpolation."""
    out = seg_output(seed=1)
    kw = dict(temperature=1.0, form="softmax", op="forward", chunk=None, paper_norm="row_sum")
    detail, bilinear = (propagated_logits(out, (17, 17), upsample=u, **kw) for u in ("detail", "bilinear"))
    smooth = torch.nn.functional.interpolate(out.logits_grid, size=(17, 17), mode="bilinear", align_corners=True)
    torch.testing.assert_close(detail - bilinear, out.logits - smooth, atol=1e-5, rtol=0)
    flat = SegOutput(logits=smooth, f1=out.f1, f2=out.f2, logits_fp=None, logits_grid=out.logits_grid)
    torch.testing.assert_close(propagated_logits(flat, (17, 17), upsample="detail", **kw),
                               propagated_logits(flat, (17, 17), upsample="bilinear", **kw), atol=1e-5, rtol=0)


def test_the_switch_is_validated_and_bilinear_in_both_profiles():
    for profile in ("official", "paper"):
        assert load_config(TINY, [f"profile={profile}"]).method.dlp_upsample == "bilinear"
    with pytest.raises(ConfigError, match="method.dlp_upsample"):
        load_config(TINY, ["method.dlp_upsample=nearest"])


def test_training_reads_the_switch(scenes_tiny, tmp_path):
    """One step from the same weights and batch: only the terms that read L̃ change with the upsampling."""
    logs = {}
    for upsample in ("bilinear", "detail"):
        cfg = load_config(TINY, [f"data.root={scenes_tiny}", "profile=official", "method.region_samples=16",
                                 "data.diag_images=0", f"method.dlp_upsample={upsample}"])
        tr = Trainer(cfg, tmp_path / upsample)
        assert dlp_options(cfg.method)["upsample"] == upsample
        batch = next(iter(zip(*loaders(tr.data, tr.cfg, tr.d))))
        torch.manual_seed(0)
        _, logs[upsample] = tr.compute_loss(batch, 1)
    assert logs["bilinear"]["ce_x"] == logs["detail"]["ce_x"]
    assert logs["bilinear"]["ce_x_prop"] != logs["detail"]["ce_x_prop"]
