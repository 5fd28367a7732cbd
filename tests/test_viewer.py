"""The viewer's two forms (derprop.book.viewer): ipywidgets for a kernel, pre-rendered frames for a static page."""

from __future__ import annotations

import re

import numpy as np
import pytest

from derprop.book.viewer import Axis, Viewer, frames_html, load_snapshots, make_viewer, status
from tests.fixtures import poisoned_results


def snapshot(epoch: int, n: int = 2, size: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(epoch)
    gt = rng.integers(0, 3, (n, size, size)).astype(np.uint8)
    return {"image": rng.integers(0, 255, (n, size, size, 3)).astype(np.uint8), "gt": gt,
            "pl_before": gt.copy(), "pl_after": np.where(rng.random(gt.shape) < 0.2 * epoch, 0, gt).astype(np.uint8),
            "confidence": rng.random(gt.shape).astype(np.float16), "names": np.array([f"img{i}" for i in range(n)]),
            "eta_ep": np.float32(epoch / 2), "epoch": np.int32(epoch)}


def test_frames_html_has_one_figure_per_key_and_disabled_controls():
    axes = [Axis("image", ("a", "b")), Axis("κ", ("0", "3", "20"), slider=True, start=2)]
    frames = {(i, k): (bytes([i, k]), f"<b>frame {i}, {k}</b>") for i in range(2) for k in range(3)}
    html = frames_html(axes, frames)
    assert len(re.findall(r"<figure data-key=", html)) == 6
    assert re.findall(r'<figure data-key="(\d,\d)"(?! hidden)', html) == ["0,2"]  # only the start frame is shown
    assert html.count(" disabled") == 2  # until book/_static/frame-viewer.js wires them
    assert 'data-labels="[&quot;0&quot;, &quot;3&quot;, &quot;20&quot;]"' in html and 'alt="frame 0, 0"' in html


def test_viewer_sends_the_widget_and_every_frame():
    pytest.importorskip("ipywidgets")
    snaps = {e: snapshot(e) for e in (0, 1, 2)}
    viewer = make_viewer(snapshots=snaps)
    assert isinstance(viewer, Viewer)
    assert set(viewer.widget.controls) == {"image", "epoch", "overlay", "confidence"}
    bundle = viewer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert set(viewer.frames) == {(i, e) for i in range(2) for e in range(3)}
    assert bundle["text/html"].count("<figure") == 6 and "data:image/png;base64," in bundle["text/html"]
    assert 'data-key="0,2">' in bundle["text/html"]  # the last epoch of the first image is shown first


def test_status_shows_the_names_a_snapshot_holds_as_text(tmp_path):
    snaps = load_snapshots(poisoned_results(tmp_path) / "run")
    line = status(snaps[1], 0)
    assert "<img" not in line and "<script" not in line and line.count("<b>") == 2
    assert "&lt;img src=x onerror=&quot;window.pwned=1&quot;&gt;" in line
    page = frames_html(make_viewer(snapshots=snaps).axes, make_viewer(snapshots=snaps).frames)
    assert "<img src=x" not in page and "<script" not in page
