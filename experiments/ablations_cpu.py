"""CPU-scale ablations of the book's chapter *Ablations at CPU scale*: Tables 3 and 4, profiles, switches.

    python -m experiments.ablations_cpu --jobs 2                # Tables 3 and 4, 3 seeds, size "small"
    python -m experiments.ablations_cpu --groups Q op --seeds 0 1 2 3 4 --size full
    python -m experiments.ablations_cpu --size smoke --seeds 0  # seconds per run: checks the plumbing

Groups (overrides on top of the book's CPU run, :data:`derprop.book.runs.BOOK_RUNS`):

=========  ================================================================
Q          eq. 9 with Q = 0..3, with and without the sparsity term (Table 3)
op         the derivative operator: eq. 2, 10, 11, 12 (Table 4)
profile    ``profile=paper`` vs ``profile=official`` (chapter *Paper vs released code*)
switches   single release switches flipped on the paper profile
=========  ================================================================

Runs are planned and trained as in :mod:`experiments.cpu_evidence` (same
``runs/cpu_bench/<size>`` directory, same warm starts, ``--warm-start``; a row whose
resolved config equals another's, e.g. ``L_1`` and ``eq. 2`` and the CPU
default, is trained once). Every row also gets the per-seed paired difference
against the CPU default (``full``). The number is the run's headline mIoU
(``results.json``), as mean ± sample standard deviation over seeds. Output:
``results/ablations_cpu.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine_info, print_table, write_results
from experiments.cpu_evidence import TABLE_COLUMNS, Plan, Row, as_row, evidence_table, measure, summarise
from derprop.book.runs import BOOK_RUNS
from derprop.provenance import project_root
from derprop.training.tables import ABLATIONS

ACTIVE_DER = ("method.labeled_der_detached=false", "method.spatial_softmax_sparsity=false")
"""The Q and op groups keep the release's two zero-gradient loss quirks off (the CPU default already
does), so that every term of eq. 9 that Tables 3 and 4 vary actually trains the features."""

GROUPS: dict[str, dict[str, list[str] | Row]] = {
    "Q": {a.row: [*ACTIVE_DER, *a.overrides] for a in ABLATIONS.values() if a.table == "3"},
    "op": {"eq. 2 (forward)": [*ACTIVE_DER, "method.op=forward"],
           **{a.row: [*ACTIVE_DER, *a.overrides] for a in ABLATIONS.values() if a.table == "4"}},
    "profile": {
        "paper": ["profile=paper"],
        "official": ["profile=official"],
    },
    "levers": {
        "paper profile (eq. 4, row-sum normalised)": Row(("profile=paper",), warm=("profile=paper",)),
        "λ_Der × 4": Row(("loss.lambda_der=1.0",), warm=("loss.lambda_der=1.0",)),
        "temperature 0.5": Row(("method.dlp_temperature=0.5",)),
        "stride-4 head (output stride 4: a 16 × 16 grid)": Row(("model.output_stride=4",), warm=("model.output_stride=4",)),
    },
    "switches": {
        "paper profile": ["profile=paper"],
        "+ release DLP form (softmax)": ["profile=paper", "method.dlp_form=softmax"],
        "+ logit-space blend": ["profile=paper", "method.blend_space=logit"],
        "+ softmax feature norm": ["profile=paper", "method.feature_norm=softmax"],
        "+ two heads (asymmetric S)": ["profile=paper", "model.two_heads=true"],
    },
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.ablations_cpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", nargs="*", default=["Q", "op"], choices=list(GROUPS))
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--size", default="small", choices=list(BOOK_RUNS))
    ap.add_argument("--runs-dir", default=None, help="default runs/cpu_bench/<size> (shared with cpu_evidence)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, one thread each")
    ap.add_argument("--out", default=str(RESULTS / "ablations_cpu.json"))
    ap.add_argument("--collect-only", action="store_true", help="train nothing: report the runs that finished")
    ap.add_argument("--train-only", nargs="+", default=None, metavar="WORD",
                    help="train only the rows whose name contains one of these words; report every finished row")
    ap.add_argument("--warm-start", type=Path, default=None,
                    help="a finished warm-start run folder shared by every seed (default: one per seed)")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    args = ap.parse_args(argv)
    t0 = time.time()
    plan = Plan(args.size, None, Path(args.runs_dir or project_root() / "runs" / "cpu_bench" / args.size), args.overrides,
                args.warm_start)
    rows = {"full": [], **{f"{g}: {name}": o for g in args.groups for name, o in GROUPS[g].items()}}
    if args.train_only and not args.collect_only:
        measure(plan, {k: v for k, v in rows.items() if any(w in k for w in args.train_only)}, args.seeds, args.jobs, 1)
    runs = measure(plan, rows, args.seeds, args.jobs, 1, collect_only=args.collect_only or bool(args.train_only))
    summary = summarise(runs, "full")

    def row(g: str, name: str, spec: Row | list[str]) -> dict:
        spec = as_row(spec)
        described = {"name": name, "overrides": list(spec.run), "warm_overrides": list(spec.warm)}
        s = summary.get(f"{g}: {name}")
        if s is None:
            return {**described, "n": 0, "status": "not yet measured"}
        return {**described, "n": len(s["seeds"]), **{k: v for k, v in s.items() if k != "row"}}

    groups = {g: [row(g, name, o) for name, o in GROUPS[g].items()] for g in args.groups}
    machine = machine_info("cpu")
    payload = {
        "what": "mIoU on the scenes val set (original size) of the trained network, the momentum network and the "
                "headline, mean ± sample std over seeds, and each network's per-seed paired difference to the same "
                "network of the CPU default (full); book CPU run settings "
                "(derprop.book.runs.BOOK_RUNS, from a supervised warm start) plus each row's overrides",
        "warm_start": str(args.warm_start) if args.warm_start else "one per seed",
        "command": "python -m experiments.ablations_cpu " + " ".join(sys.argv[1:] if argv is None else argv),
        "size": args.size, "base": BOOK_RUNS[args.size], "seeds": len(args.seeds),
        "eval_mode": ", ".join(sorted({r["miou_mode"] for r in runs})),
        "date": machine["date"][:10], "machine": machine, "jobs": args.jobs, "threads": 1,  # per run, as measure()
        "reference": summary.get("full"), "groups": groups, "runs": runs,
        "total_wall_time_s": time.time() - t0,
    }
    write_results(Path(args.out), payload)
    print_table(evidence_table({f"{g}: {r['name']}": r for g, rs in groups.items() for r in rs if r["n"]}),
                TABLE_COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
