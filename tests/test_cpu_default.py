"""The CPU default still learns: a short run of configs/cpu_scenes.yaml predicts every class on its val scenes.

Not a timing test: it asserts what was learned. The budget (a few hundred scenes, a short warm start,
a few DerProp steps from it) keeps it near a minute on one core; the book's runs are longer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from derprop.book_runs import WARM_START
from derprop.configfile import load_config
from derprop.data import SegmentationDataset
from derprop.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "cpu_scenes.yaml"


def test_cpu_default_predicts_every_class(tmp_path):
    root = tmp_path / "scenes"
    subprocess.run([sys.executable, "-m", "data_prep.scenes", "--root", str(root), "--num-train", "320",
                    "--num-val", "40", "--workers", "1", "--quiet"], cwd=REPO, check=True)
    common = [f"data.root={root}", "data.diag_images=0", "eval.final_modes=[original]"]
    warm = load_config(CONFIG, [*common, *WARM_START, "optim.epochs=1", "optim.iters_per_epoch=150"])
    Trainer(warm, tmp_path / "warm").fit()
    cfg = load_config(CONFIG, [*common, f"optim.warm_start={tmp_path / 'warm' / 'last.pt'}", "optim.epochs=1",
                               "optim.iters_per_epoch=4"])
    trainer = Trainer(cfg, tmp_path / "dlp")
    results = trainer.fit()
    net = trainer._nets()[results["miou_net"]].eval()
    val = SegmentationDataset.from_split("scenes", root, None, "val")
    seen: set[int] = set()
    with torch.no_grad():
        for i in range(len(val)):
            image = val[i][0].as_subclass(torch.Tensor)
            seen |= set(net(image.unsqueeze(0)).logits.argmax(1).unique().tolist())
    assert seen == set(range(cfg.model.num_classes)), (sorted(seen), results["final"])
