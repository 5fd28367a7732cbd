"""Look at pseudo-labels before and after derivative label propagation.

Explained in the book chapter *Pseudo-label rectification, interactively*
(``book/rectification.md``).

The trainer saves, after every epoch, a snapshot of the pseudo-labels of a
fixed set of unlabeled images whose labels are known:
``<run>/pseudo_labels/epoch_XXX.npz`` with the arrays ``image`` (N, H, W, 3)
uint8, ``gt`` (N, H, W), ``pl_before`` (N, H, W) = argmax softmax(L),
``pl_after`` (N, H, W) = argmax of the eq. 5 blend, ``confidence`` (N, H, W)
= max of the blend, ``names`` (N,), ``attn`` (N, h, w) = the normalised propagation
weights that one chosen pixel ``attn_pixel`` (N, 2; row, column on the h × w feature
grid) receives from every pixel, and the scalars ``eta_ep``, ``epoch`` and
``stat_*`` (the run's diagnostics over all its diagnostic images, e.g.
``stat_pl_fixed``, ``stat_attn_own_share``). ``epoch_000`` is the state before the
first step. A run without DLP has no ``pl_after``/``attn``: nothing propagates.

This module reads them (:func:`load_snapshots`), compares before and after
(:func:`compare`), draws a static figure (:func:`snapshot_figure`) and builds a
viewer (:func:`make_viewer`) that works with and without a kernel.

**A viewer in two forms** (:class:`Viewer`). In a live kernel it is an ipywidgets
box that redraws on every change. A built book has no kernel, so the same panels
are pre-rendered for every combination of the viewer's :class:`Axis` values
(image × epoch here; a third axis, such as a similarity bonus κ, is one more
:class:`Axis` and its frames) and the book's ``book/_static/frame-viewer.js``
shows the frame that the controls select. Displaying a :class:`Viewer` sends
both forms; Jupyter shows the widget, and the book, which prefers ``text/html``
to widgets (``nb_mime_priority_overrides`` in ``_config.yml``), the frames.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from derprop.book.display import CHANGE_COLOURS, add_legend, change_image, class_colours, colorize, escape_html
from derprop.data.labels import IGNORE_INDEX, default_class_names
from derprop.training.snapshots import SNAPSHOT_KEYS, change_masks

SNAPSHOT_PATTERN = re.compile(r"epoch_(\d+)\.npz$")


@dataclass(frozen=True)
class Comparison:
    """Pixel counts for one image (or a stack) of pseudo-labels before/after DLP."""

    valid: int
    correct_before: int
    correct_after: int
    fixed: int
    broken: int

    @property
    def acc_before(self) -> float:
        return self.correct_before / max(self.valid, 1)

    @property
    def acc_after(self) -> float:
        return self.correct_after / max(self.valid, 1)


def compare(gt: np.ndarray, before: np.ndarray, after: np.ndarray,
            ignore_index: int = IGNORE_INDEX) -> Comparison:
    """Counts of correct, fixed and broken pixels (any leading shape)."""
    valid = gt != ignore_index
    fixed, broken = change_masks(gt, before, after, ignore_index)
    return Comparison(
        valid=int(valid.sum()),
        correct_before=int((valid & (before == gt)).sum()),
        correct_after=int((valid & (after == gt)).sum()),
        fixed=int(fixed.sum()),
        broken=int(broken.sum()),
    )


def snapshot_paths(run_dir: str | os.PathLike) -> dict[int, Path]:
    """``{epoch: path}`` of the run's ``pseudo_labels/epoch_XXX.npz`` files, in epoch order."""
    folder = Path(run_dir) / "pseudo_labels"
    found = {}
    for p in folder.glob("epoch_*.npz") if folder.is_dir() else ():
        m = SNAPSHOT_PATTERN.search(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def load_snapshots(run_dir: str | os.PathLike) -> dict[int, dict[str, np.ndarray]]:
    """Read every snapshot of a run: ``{epoch: {array name: array}}``.

    Raises:
        FileNotFoundError: if the run has no ``pseudo_labels/epoch_XXX.npz``.
        KeyError: if a snapshot lacks one of the arrays listed in the module doc.
    """
    paths = snapshot_paths(run_dir)
    if not paths:
        raise FileNotFoundError(f"no pseudo_labels/epoch_XXX.npz under {run_dir}: train the run first")
    out = {}
    for epoch, path in paths.items():
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in SNAPSHOT_KEYS if k not in z.files]
            if missing:
                raise KeyError(f"{path}: missing arrays {missing}; found {z.files}")
            out[epoch] = {k: z[k] for k in z.files}
    names = run_class_names(run_dir)
    if names:
        for snap in out.values():
            snap["class_names"] = np.array(names)
    return out


def run_class_names(run_dir: str | os.PathLike) -> list[str]:
    """The class names of a finished run (the keys of its ``results.json`` IoU table); ``[]`` before it finishes."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return []
    results = json.loads(path.read_text())
    return list(results["final"][results["miou_net"]][results["miou_mode"]]["iou_per_class"])


def class_names_of(snap: Mapping[str, np.ndarray]) -> list[str]:
    """A snapshot's class names: the run's (``load_snapshots``), else generic ones for the labels it holds."""
    if "class_names" in snap:
        return [str(n) for n in snap["class_names"]]
    labels = np.concatenate([snap["gt"].ravel(), snap["pl_before"].ravel()])
    return list(default_class_names(int(labels[labels != IGNORE_INDEX].max(initial=0)) + 1))


def _panels(snap: dict[str, np.ndarray], i: int, overlay: bool, confidence: bool, palette) -> list[tuple[str, np.ndarray]]:
    image, gt = snap["image"][i], snap["gt"][i]
    before, after = snap["pl_before"][i], snap["pl_after"][i]
    c = compare(gt, before, after)

    def show(label):
        rgb = colorize(label, palette)
        return (0.5 * image + 0.5 * rgb).astype(np.uint8) if overlay else rgb

    panels = [
        ("image", image),
        ("ground truth", show(gt)),
        (f"before DLP ({c.acc_before:.1%})", show(before)),
        (f"after DLP ({c.acc_after:.1%})", show(after)),
        (f"fixed {c.fixed} / broke {c.broken}", change_image(*change_masks(gt, before, after))),
    ]
    if confidence:
        panels.append(("confidence of the blend", snap["confidence"][i].astype(np.float32)))
    return panels


def draw_snapshot(ax_row, snap: dict[str, np.ndarray], i: int, *, overlay: bool = False,
                  confidence: bool = False, palette=None, row_title: str | None = None, fontsize: float = 9) -> None:
    """Draw one image's panels (image, GT, before, after, fixed/broken[, confidence]) on a row of axes."""
    for ax, (title, im) in zip(ax_row, _panels(snap, i, overlay, confidence, palette)):
        if im.ndim == 2:
            ax.imshow(im, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(im, interpolation="nearest")
        ax.set_title(title, fontsize=fontsize)
        ax.set_xticks([])
        ax.set_yticks([])
    if row_title:
        ax_row[0].set_ylabel(row_title, fontsize=9)


def snapshot_figure(snapshots: dict[int, dict[str, np.ndarray]], *, epochs: Sequence[int] | None = None,
                    images: Sequence[int] = (0, 1, 2), overlay: bool = False, palette=None):
    """A static matplotlib figure: one row per (epoch, image), five panels per row.

    The book shows it below the interactive viewer, so the rendered HTML is
    useful without a running kernel. ``epochs`` (keys of ``snapshots``: epochs, or κ values of
    :func:`derprop.book.dlp_map.kappa_snapshots`) defaults to the first and the last snapshot.
    """
    import matplotlib.pyplot as plt

    all_epochs = list(snapshots)
    epochs = list(epochs) if epochs is not None else sorted({all_epochs[0], all_epochs[-1]})
    n_img = len(snapshots[epochs[0]]["image"])
    images = [i for i in images if i < n_img]
    rows = [(e, i) for e in epochs for i in images]
    fig, axes = plt.subplots(len(rows), 5, figsize=(7.5, 1.9 * len(rows)), squeeze=False, constrained_layout=True)
    for ax_row, (e, i) in zip(axes, rows):
        snap = snapshots[e]
        draw_snapshot(ax_row, snap, i, overlay=overlay, palette=palette,
                      row_title=heading(snap).replace(" (", "\n(", 1) + f"\n{snap['names'][i]}")  # fits the row
    return fig


def render_png(snap: dict[str, np.ndarray], i: int, *, overlay: bool = False, confidence: bool = False,
               palette=None, dpi: int = 80) -> bytes:
    """PNG bytes of one image's panels, two rows of three with a legend of the classes and of fixed / broken
    pixels: what the viewer shows, legible at the width of the book's text column."""
    from matplotlib.figure import Figure  # no pyplot: leaves the notebook's backend alone

    fig = Figure(figsize=(8, 6.2), layout="constrained")
    axes = fig.subplots(2, 3)
    draw_snapshot(axes.flat, snap, i, overlay=overlay, confidence=confidence, palette=palette, fontsize=13)
    if not confidence:
        axes.flat[-1].set_axis_off()
    shown = [snap["gt"][i], snap["pl_before"][i], snap["pl_after"][i]]
    present = sorted(set(np.unique(np.concatenate([m.ravel() for m in shown])).tolist()) - {IGNORE_INDEX})
    add_legend(fig, {**class_colours(class_names_of(snap), present, palette), **CHANGE_COLOURS}, ncol=3, fontsize=12)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


@dataclass(frozen=True)
class Axis:
    """One control of a :class:`Viewer`: a name and the labels of its values, shown as a drop-down, or as a
    slider for ordered values (epochs, κ); ``start`` is the index shown first."""

    name: str
    labels: tuple[str, ...]
    slider: bool = False
    start: int = 0


Frame = tuple[bytes, str]
"""A pre-rendered frame: PNG bytes and its caption (HTML)."""


def frames_html(axes: Sequence[Axis], frames: Mapping[tuple[int, ...], Frame]) -> str:
    """The kernel-free form of a viewer: one ``<figure>`` per frame (keyed by its index on each axis) and one
    control per axis. The controls are disabled until ``book/_static/frame-viewer.js`` wires them to show the
    selected frame, so a page without the script shows the first frame and no control that does nothing."""
    start = tuple(a.start for a in axes)
    controls = []
    for n, a in enumerate(axes):
        name = escape_html(a.name)
        if a.slider:
            labels = escape_html(json.dumps(list(a.labels)))
            controls.append(f'<label>{name} <input type="range" min="0" max="{len(a.labels) - 1}" value="{a.start}" '
                            f'data-axis="{n}" data-labels="{labels}" disabled> '
                            f'<output>{escape_html(a.labels[a.start])}</output></label>')
        else:
            options = "".join(f'<option value="{k}"{" selected" if k == a.start else ""}>{escape_html(label)}</option>'
                              for k, label in enumerate(a.labels))
            controls.append(f'<label>{name} <select data-axis="{n}" disabled>{options}</select></label>')
    figures = []
    for key, (png, caption) in frames.items():
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        figures.append(f'<figure data-key="{",".join(map(str, key))}"{"" if key == start else " hidden"}>'
                       f'<figcaption>{caption}</figcaption><img src="{src}" alt="{escape_html(_plain(caption))}">'
                       f'</figure>')
    return (f'<div class="derprop-frames"><div class="derprop-frames-controls">{" ".join(controls)}</div>'
            f'{"".join(figures)}</div>')


def _plain(caption: str) -> str:
    """The text of an HTML caption."""
    return html.unescape(re.sub(r"<[^>]+>", "", caption))


class Viewer:
    """A viewer for a live kernel and for a static page: ``widget`` (ipywidgets) redraws on every change;
    ``render(key)`` pre-renders the frame of one combination of ``axes`` values for :func:`frames_html`.

    Displaying it sends both forms (the frames are rendered then, once); see the module doc for which one
    a reader sees. ``widget.controls`` and ``widget.picture`` are the live form's controls and picture.
    """

    def __init__(self, widget: Any, axes: Sequence[Axis], render: Callable[[tuple[int, ...]], Frame]):
        self.widget, self.axes, self._render = widget, list(axes), render
        self._frames: dict[tuple[int, ...], Frame] | None = None

    @property
    def frames(self) -> dict[tuple[int, ...], Frame]:
        """Every frame, keyed by its index on each axis (rendered on first use)."""
        if self._frames is None:
            self._frames = {key: self._render(key)
                            for key in itertools.product(*(range(len(a.labels)) for a in self.axes))}
        return self._frames

    def _repr_mimebundle_(self, include=None, exclude=None) -> dict[str, Any]:
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude) or {})
        bundle["text/html"] = frames_html(self.axes, self.frames)
        return bundle


def heading(snap: Mapping[str, Any]) -> str:
    """What a snapshot is: its ``heading`` (a κ frame of :func:`derprop.book.dlp_map.kappa_snapshots`), else its epoch
    and ``η_ep``."""
    if "heading" in snap:
        return str(snap["heading"])
    eta = float(snap["eta_ep"]) if "eta_ep" in snap else float("nan")
    return f"epoch {int(snap['epoch'])} (η_ep = {eta:.2f})"


def status(snap: dict[str, np.ndarray], i: int) -> str:
    """One line of HTML on image ``i`` of a snapshot: :func:`heading`, accuracy before → after, fixed and broken;
    the texts a snapshot holds (its heading, the image's name) show as text (:func:`derprop.book.display.escape_html`)."""
    c = compare(snap["gt"][i], snap["pl_before"][i], snap["pl_after"][i])
    return (f"<b>{escape_html(heading(snap))}</b>, <b>{escape_html(snap['names'][i])}</b>: "
            f"accuracy {c.acc_before:.1%} → {c.acc_after:.1%}; DLP fixed {c.fixed} pixels and broke {c.broken}")


def make_viewer(run_dir: str | os.PathLike | None = None, *, snapshots: dict | None = None, palette=None,
                slider: str = "epoch", start: int = -1) -> Viewer:
    """The before/after-DLP :class:`Viewer`: image picker, epoch slider, overlay and confidence toggles.

    Pass a run directory or already loaded ``snapshots``. In a live kernel all four controls redraw; the
    pre-rendered frames cover every image × epoch, without overlay or confidence. ``slider`` names what the
    snapshots' keys are (``"κ"`` for :func:`derprop.book.dlp_map.kappa_snapshots`), ``start`` the one shown first.
    """
    import ipywidgets as W

    snapshots = snapshots if snapshots is not None else load_snapshots(run_dir)
    epochs = list(snapshots)
    names = [str(n) for n in snapshots[epochs[-1]]["names"]]
    image = W.Dropdown(options=[(n, i) for i, n in enumerate(names)], value=0, description="image")
    epoch = W.SelectionSlider(options=epochs, value=epochs[start], description=slider, continuous_update=False)
    overlay = W.ToggleButton(value=False, description="overlay on image", icon="")
    confidence = W.ToggleButton(value=False, description="show confidence", icon="")
    picture = W.Image(format="png")
    line = W.HTML()

    def update(*_):
        snap = snapshots[epoch.value]
        picture.value = render_png(snap, image.value, overlay=overlay.value, confidence=confidence.value,
                                   palette=palette)
        line.value = status(snap, image.value)

    for w in (image, epoch, overlay, confidence):
        w.observe(update, names="value")
    update()
    box = W.VBox([W.HBox([image, epoch]), W.HBox([overlay, confidence]), line, picture])
    box.controls = {"image": image, "epoch": epoch, "overlay": overlay, "confidence": confidence}
    box.picture = picture

    def frame(key: tuple[int, int]) -> Frame:
        snap = snapshots[epochs[key[1]]]
        return render_png(snap, key[0], palette=palette), status(snap, key[0])

    axes = [Axis("image", tuple(names)), Axis(slider, tuple(f"{e:g}" for e in epochs), slider=True,
                                              start=range(len(epochs))[start])]
    return Viewer(box, axes, frame)


def summary(snapshots: dict[int, dict[str, np.ndarray]]) -> list[dict[str, float]]:
    """Per epoch, the run's diagnostics over all its diagnostic images (the snapshots' ``stat_*``)."""
    return [{"epoch": e, "eta_ep": float(snap.get("eta_ep", np.nan)),
             **{k[5:]: float(v) for k, v in snap.items() if k.startswith("stat_")}} for e, snap in snapshots.items()]


def attention_figure(stages: Mapping[str, dict[str, np.ndarray]], images: Sequence[int] = (0,), palette=None):
    """For a chosen pixel of each image (cross), the propagation weights it receives from every pixel (eq. 4,
    normalised to sum 1) in each snapshot of ``stages`` (title → one epoch's snapshot of the same images);
    uniform weights would be ``1/(h·w)`` everywhere."""
    import matplotlib.pyplot as plt

    snaps = list(stages.values())
    fig, axes = plt.subplots(len(images), len(snaps) + 1, figsize=(7.5, 2.2 * len(images)),
                             squeeze=False, constrained_layout=True)
    for row, i in zip(axes, images):
        gt = snaps[-1]["gt"][i]
        r, c = snaps[-1]["attn_pixel"][i]
        h, w = snaps[-1]["attn"][i].shape
        row[0].imshow(colorize(gt, palette), interpolation="nearest")
        row[0].plot([(c + 0.5) * gt.shape[1] / w], [(r + 0.5) * gt.shape[0] / h], "w+", ms=14, mew=3)
        row[0].set_title("ground truth, chosen pixel", fontsize=8)
        vmax = max(float(snap["attn"][i].max()) for snap in snaps)
        for ax, (title, snap) in zip(row[1:], stages.items()):
            a = snap["attn"][i]
            im = ax.imshow(a, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.plot([c], [r], "c+", ms=14, mew=3)
            own, uniform = _own_share(a, gt, int(r), int(c))
            ax.set_title(f"{title}\nown class {own:.0%} (uniform {uniform:.0%})", fontsize=8)
        fig.colorbar(im, ax=row[-1], shrink=0.8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def _own_share(attn: np.ndarray, gt: np.ndarray, r: int, c: int) -> tuple[float, float]:
    """Share of the weights on the chosen pixel's class, and that class's share of the grid (nearest grid label)."""
    h, w = attn.shape
    ys = (np.arange(h) * gt.shape[0] / h).astype(int)
    xs = (np.arange(w) * gt.shape[1] / w).astype(int)
    grid = gt[np.ix_(ys, xs)]
    same = grid == grid[r, c]
    valid = grid != IGNORE_INDEX
    return float(attn[same & valid].sum() / max(attn[valid].sum(), 1e-30)), float(same.sum() / max(valid.sum(), 1))
