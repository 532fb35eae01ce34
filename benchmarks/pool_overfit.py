"""Does the 1-step student learn the data-free pool's own noises better than fresh ones?

    OMP_NUM_THREADS=1 python benchmarks/pool_overfit.py --run /work/conv-runs/long15k_def
    OMP_NUM_THREADS=1 python benchmarks/pool_overfit.py --run /work/conv-runs/long15k_pool8k --weights ema,raw

The default run's 1-step trajectory rows regress the jump from noise to data onto the pool's stored solves
(``trajectory_fraction``): the same 2048 (noise, sample) pairs, revisited about 30 times each over 15,000
steps. If the student memorises them, its 1-step jump is better on those noises than on any other, and a
larger pool (or fewer revisits) is the remedy; if not, the 1-step floor lies elsewhere.

For every checkpoint of ``--run`` (its EMA and/or raw weights) this pushes two sets of ``--num`` noises
through one student jump from 0 to 1:

* ``pool``: the first ``--num`` noises of the run's own pool, against their stored solves;
* ``fresh``: ``--num`` noises the run never saw, solved by the same code with the same solver, steps and
  precision (``data.pool.build_pool`` with another seed, cached in ``RUN/../_eval-cache``);

and reports, for each, the relative error ``E|x - x_solve|^2 / E|x_solve|^2`` (``metrics.flow_map_error``) and
the FD to the Fashion-MNIST test images in the shipped classifier's features. The solves' own FDs are the
floors. One JSON per run: ``benchmarks/results/pool-overfit/RUN.json`` (resumable: points already there are
kept). One thread; say what else ran beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "pool-overfit"


def pool_pairs(run: Path, num: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``num`` (noise, stored solve) pairs of ``run``'s pool with trajectories, and its file name."""
    from safetensors.torch import load_file

    files = sorted((run / "cache").glob("pool-*-traj*.safetensors"))
    if not files:
        raise SystemExit(f"{run}: no pool with stored trajectories in cache/ (a run with trajectory_fraction > 0)")
    traj = load_file(files[0])["trajectories"]
    return traj[:num, 0].clone(), traj[:num, -1].clone(), files[0].name


def fresh_pairs(teacher, cfg, num: int, cache: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``num`` noises of another seed and their solves by the pool's own code, solver, steps and precision."""
    from ttfm_distill.data.pool import build_pool

    fresh = type(cfg).from_dict({**cfg.to_dict(), "seed": cfg.seed + 1000, "pool_size": num})
    pool = build_pool(teacher, fresh, cache, "cpu", lambda msg: print(msg, flush=True))
    return pool.trajectories[:, 0].clone(), pool.trajectories[:, -1].clone(), Path(pool.report["path"]).name


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a run folder with checkpoints and a trajectory pool")
    p.add_argument("--weights", default="ema", help="ema, raw or ema,raw")
    p.add_argument("--num", type=int, default=1024)
    p.add_argument("--stride", type=int, default=0, help="only checkpoints whose step is a multiple (and the last)")
    args = p.parse_args()
    torch.set_num_threads(1)

    from safetensors.torch import load_file

    from ttfm_distill.config import RunConfig
    from ttfm_distill.runstate import LEGACY_KEYS, RunState
    from ttfm_distill.features import load_feature_classifier
    from ttfm_distill.fileio import write_json
    from ttfm_distill.metrics import flow_map_error, frechet_distance, gaussian_stats
    from ttfm_distill.sampling import flow_map
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    run = args.run.resolve()
    raw_cfg = json.loads((run / "config.json").read_text())
    state = RunState.read(run, raw_cfg)
    cfg = RunConfig.from_dict({k: v for k, v in raw_cfg.items() if k not in LEGACY_KEYS})
    teacher = load_teacher(cfg.teacher)
    teacher.fingerprint = state.get("teacher_fingerprint")  # the run's key: its pool's cache name
    classifier = load_feature_classifier()

    def fd(x: torch.Tensor) -> float:
        return frechet_distance(*gaussian_stats(classifier.features(x)), classifier.test_mu, classifier.test_sigma)

    sets = {"pool": pool_pairs(run, args.num),
            "fresh": fresh_pairs(teacher, cfg, args.num, run.parent / "_eval-cache")}
    path = OUT / f"{run.name}.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report.update({"run": run.name, "num": args.num, "pool_size": cfg.pool_size,
                   "trajectory_fraction": cfg.trajectory_fraction, "batch_size": cfg.batch_size,
                   "sets": {k: v[2] for k, v in sets.items()},
                   "solve_fd_test_images": {k: round(fd(v[1]), 3) for k, v in sets.items()},
                   "command": f"OMP_NUM_THREADS=1 python benchmarks/pool_overfit.py --run RUNS/{run.name} "
                              f"--weights {args.weights} --num {args.num}"})
    points = report.setdefault("points", {})
    print(f"{run.name}: the solves' own FD {report['solve_fd_test_images']}", flush=True)
    ckpts = sorted((c for c in (run / "checkpoints").glob("step-*") if (c / "trainer_state.json").exists()),
                   key=lambda c: int(c.name.split("-")[1]))
    for ckpt in ckpts:
        step = int(ckpt.name.split("-")[1])
        if args.stride and step % args.stride and step != cfg.max_steps:
            continue
        for weights in args.weights.split(","):
            key = f"{step}-{weights}"
            file = ckpt / ("ema.safetensors" if weights == "ema" else "student.safetensors")
            if key in points or not file.exists():
                continue
            t0 = time.perf_counter()
            student = build_student(teacher, cfg)
            student.load_state_dict(load_file(file), strict=True)
            student.eval()
            row = {"step": step, "weights": weights,
                   "revisits": round(step * cfg.batch_size * (cfg.trajectory_fraction or 0) / cfg.pool_size, 2)}
            with torch.no_grad():
                for name, (noise, solve, _) in sets.items():
                    ones = torch.ones(len(noise))
                    out = torch.cat([flow_map(student, x, 0 * ones[:len(x)], ones[:len(x)])
                                     for x in noise.split(256)])
                    row[name] = {"error": round(flow_map_error(out, solve), 5), "fd_test_images": round(fd(out), 3)}
            row["error_ratio_fresh_to_pool"] = round(row["fresh"]["error"] / row["pool"]["error"], 4)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            points[key] = row
            write_json(path, report)
            print(f"step {step} {weights}: error pool {row['pool']['error']:.4f} fresh {row['fresh']['error']:.4f} "
                  f"(x{row['error_ratio_fresh_to_pool']}), FD pool {row['pool']['fd_test_images']:.2f} "
                  f"fresh {row['fresh']['fd_test_images']:.2f}", flush=True)
    write_json(path, report)


if __name__ == "__main__":
    main()
