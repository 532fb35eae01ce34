"""The 2-D benchmark's claims over several seeds: mean, spread and per-seed KL.

    python benchmarks/toy2d_seeds.py --teacher checkerboard --seeds 0,1,2

Same protocol as ``benchmarks/toy2d.py`` (each row trained by the package's trainer,
``run_distillation``, with ``toy2d.run_config``'s settings; same MLP, budget and KL
measure); each seed changes the student's initialisation and every training
draw. The trainer's run folders go into a temporary folder this script removes.
Writes ``benchmarks/results/toy2d-seeds-<teacher>.json``:
``{objective: {"kl_mean": {...}, "kl_std": {...}, "kl_per_seed": {seed: {...}},
"wins_vs": {other: {steps: seeds won}}, "seconds": [...]}}``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from toy2d import CONFIGS, STEPS, VELOCITY_ROWS, flow_map_sampler, kls, train_row

from ttfm_distill.fileio import write_json
from ttfm_distill.teachers.analytic import get_analytic_teacher


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="checkerboard")
    p.add_argument("--objectives", default="itvm,itvm_terminal,itvm_initial_term,lfmd_fd")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--output", default="benchmarks/results")
    args = p.parse_args()
    teacher = get_analytic_teacher(args.teacher)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.objectives.split(",")
    flow_rows = [n for n in names if n not in CONFIGS or n in VELOCITY_ROWS]
    if flow_rows:
        p.error(f"not flow-map rows of toy2d.CONFIGS: {flow_rows}")
    t0 = time.perf_counter()
    per = {n: {} for n in names}
    secs = {n: [] for n in names}
    workdir = tempfile.mkdtemp(prefix="toy2d-seeds-runs-")  # the trainer's run folders
    try:
        for seed in seeds:
            for name in names:
                model, seconds, _ = train_row(args.teacher, name, workdir, args.steps, args.batch_size, args.lr,
                                              seed, args.width, args.depth)
                kl, _, _ = kls(teacher, flow_map_sampler(model))
                per[name][str(seed)] = kl
                secs[name].append(round(seconds, 1))
                print(args.teacher, f"seed {seed}", name, {k: round(v, 3) for k, v in kl.items()}, f"{seconds:.0f}s",
                      flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res = {}
    for n in names:
        ks = [str(k) for k in STEPS]
        vals = {k: [per[n][str(s)][k] for s in seeds] for k in ks}
        res[n] = {
            "kl_mean": {k: statistics.mean(v) for k, v in vals.items()},
            "kl_std": {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in vals.items()},
            "kl_per_seed": per[n],
            "wins_vs": {m: {k: sum(per[n][str(s)][k] < per[m][str(s)][k] for s in seeds) for k in ks}
                        for m in names if m != n},
            "seconds": secs[n],
        }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"toy2d-seeds-{args.teacher}.json", res)
    write_json(out / f"toy2d-seeds-{args.teacher}-settings.json", {
        **vars(args), "total_seconds": round(time.perf_counter() - t0, 1),
        "protocol": "as benchmarks/toy2d.py: ttfm_distill's trainer (AdamW, weight decay 0), 50 warm-up steps, grad "
                    "clip 1, KL on 64k samples, 50x50 grid",
        "command": f"python benchmarks/toy2d_seeds.py --teacher {args.teacher} --seeds {args.seeds} "
                   f"--objectives {args.objectives} --steps {args.steps}"})
    print(f"wrote {out}/toy2d-seeds-{args.teacher}.json", flush=True)


if __name__ == "__main__":
    main()
