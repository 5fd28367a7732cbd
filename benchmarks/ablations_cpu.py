"""CPU-scale ablations of the book's chapter *Ablations at CPU scale*: Tables 3 and 4, profiles, switches.

    python -m benchmarks.ablations_cpu                         # every group, 3 seeds, size "small"
    python -m benchmarks.ablations_cpu --groups Q op --seeds 0 1 2 3 4 --size full
    python -m benchmarks.ablations_cpu --size smoke --seeds 0  # seconds per run: checks the plumbing

Groups (overrides on top of the book's CPU run, :data:`derprop.viewer.BOOK_RUNS`):

=========  ================================================================
Q          eq. 9 with Q = 0..3, with and without the sparsity term (Table 3)
op         the derivative operator: eq. 2, 10, 11, 12 (Table 4)
profile    ``profile=paper`` vs ``profile=official`` (chapter *Paper vs released code*)
switches   single release switches flipped on the paper profile
=========  ================================================================

Every run is ``runs/ablations_cpu/<size>/<name>_s<seed>`` and is reused when
its ``results.json`` exists, so an interrupted benchmark continues. The number
is the run's headline mIoU (``results.json``), reported as mean ± sample
standard deviation over seeds. Output: ``results/ablations_cpu.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, machine_info, print_table
from derprop import atomic
from derprop.viewer import BOOK_RUNS, ensure_scenes, load_or_train

ACTIVE_DER = ("method.labeled_der_detached=false", "method.spatial_softmax_sparsity=false")
"""The Q and op groups run the CPU config (release profile) with its two zero-gradient loss quirks off,
so that every term of eq. 9 that Tables 3 and 4 vary actually trains the features."""

GROUPS: dict[str, dict[str, list[str]]] = {
    "Q": {
        **{f"L_{q}": [*ACTIVE_DER, f"method.Q={q}"] for q in range(4)},
        **{f"L_{q} w/o sparsity": [*ACTIVE_DER, f"method.Q={q}", "method.sparsity=false"] for q in range(4)},
    },
    "op": {
        "eq. 2 (forward)": [*ACTIVE_DER, "method.op=forward"],
        "eq. 10 (central)": [*ACTIVE_DER, "method.op=central"],
        "eq. 11 (sum)": [*ACTIVE_DER, "method.op=sum"],
        "eq. 12 (second)": [*ACTIVE_DER, "method.op=second"],
    },
    "profile": {
        "paper": ["profile=paper"],
        "official": ["profile=official"],
    },
    "switches": {
        "paper profile": ["profile=paper"],
        "+ release DLP form (softmax)": ["profile=paper", "method.dlp_form=softmax"],
        "+ logit-space blend": ["profile=paper", "method.blend_space=logit"],
        "+ softmax feature norm": ["profile=paper", "method.feature_norm=softmax"],
        "+ two heads (asymmetric S)": ["profile=paper", "model.two_heads=true"],
    },
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run(size: str, name: str, overrides: list[str], seed: int) -> dict[str, Any]:
    s = BOOK_RUNS[size]
    out = ROOT / "runs" / "ablations_cpu" / size / f"{slug(name)}_s{seed}"
    res = load_or_train(ROOT / s["config"], out,
                        [f"data.root={ensure_scenes(size)}", *s["overrides"], *overrides, f"seed={seed}"])
    return {"miou": res["miou"], "miou_mode": res["miou_mode"], "miou_net": res["miou_net"],
            "wall_time_s": res["wall_time_s"], "device": res.get("device")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ablations_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--size", default="small", choices=list(BOOK_RUNS))
    ap.add_argument("--out", default=str(RESULTS / "ablations_cpu.json"))
    args = ap.parse_args(argv)
    t0 = time.time()
    groups: dict[str, list[dict[str, Any]]] = {}
    modes, devices = set(), set()
    for g in args.groups:
        rows = []
        for name, overrides in GROUPS[g].items():
            runs = []
            for seed in args.seeds:
                print(f"== {g}: {name}, seed {seed}", file=sys.stderr, flush=True)
                runs.append(run(args.size, name, overrides, seed))
            mious = [r["miou"] for r in runs]
            modes |= {r["miou_mode"] for r in runs}
            devices |= {r["device"] for r in runs}
            rows.append({"name": name, "overrides": overrides, "n": len(mious), "mious": mious,
                         "mean": statistics.fmean(mious), "std": statistics.stdev(mious) if len(mious) > 1 else 0.0})
        groups[g] = rows
    machine = machine_info("cpu")
    payload = {
        "what": "headline mIoU on the scenes val set, mean ± sample std over seeds; book CPU run settings "
                "(derprop.viewer.BOOK_RUNS) plus each row's overrides",
        "command": "python -m benchmarks.ablations_cpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "size": args.size, "base": BOOK_RUNS[args.size], "seeds": len(args.seeds),
        "eval_mode": ", ".join(sorted(modes)), "device": ", ".join(sorted(d for d in devices if d)),
        "date": machine["date"][:10], "machine": machine, "groups": groups,
        "total_wall_time_s": time.time() - t0,
    }
    atomic.write_json(Path(args.out), payload)
    print_table([{"group": g, "name": r["name"], "miou": 100 * r["mean"], "std": 100 * r["std"], "n": r["n"]}
                 for g, rows in groups.items() for r in rows],
                [("group", "group", "s"), ("name", "run", "s"), ("miou", "mIoU %", ".2f"), ("std", "± std", ".2f"),
                 ("n", "seeds", "d")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
