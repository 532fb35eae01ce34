"""Seconds per training step of `ttfm-distill run`'s recipe, and where they go.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40 -L long_jump_span=0.0
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 20 --profile     # torch profiler, top operators
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 80 --join-ab     # trajectory rows joined or apart

``--join-ab`` alternates blocks of 10 steps with the trajectory rows in the objective's gradient forward
(the default, objectives/trajectory.py ``JoinedForward``) and in a forward of their own, and prints the
median seconds per step of each: the two share whatever else runs on the machine.

The run's own named steps (``trainer.Distillation``) set up a default run in a
temporary folder (its data-free pool is built there, or copied from
``--pool-from RUN_FOLDER``'s cache when that folder holds the same pool), then
``train_step`` runs ``--steps`` times after 5 warm-up steps. One thread
(``torch.set_num_threads(1)``); say what else shared the machine with each figure.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("-L", dest="loss_options", action="append", default=[], metavar="KEY=VALUE",
                   help="an objective option, as `ttfm-distill run -L`")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a run setting, as `ttfm-distill run --set`")
    p.add_argument("--pool-from", default=None, help="a run folder whose cache/ holds the pool to reuse")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators by self CPU time")
    p.add_argument("--join-ab", action="store_true",
                   help="alternate 10-step blocks with the trajectory rows joined and apart; median s/step of each")
    args = p.parse_args()
    torch.set_num_threads(1)

    from ttfm_distill.cli import _parse_options as parse  # KEY=VALUE read exactly as `ttfm-distill run` reads it
    from ttfm_distill.config import RunConfig
    from ttfm_distill.trainer import Distillation

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        if args.pool_from:
            shutil.copytree(Path(args.pool_from) / "cache", out / "cache")  # unused files are ignored by the run
        cfg = RunConfig.from_dict({**parse(args.settings, "--set"), "output": str(out),
                                   "loss_options": parse(args.loss_options, "-L")})
        run = Distillation(cfg, show_progress=False)
        for step in ("preflight", "setup_accelerator", "setup_teacher", "claim_output", "setup_data", "write_config",
                     "setup_student", "setup_optimizer", "resume"):
            getattr(run, step)()
        run.skipped, run.first_batch = 0, 0.0
        for k in range(5):
            run.train_step(k)
        if args.join_ab:
            join_ab(run, args.steps)
            run.lock.release()
            return
        t0 = time.perf_counter()
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for k in range(5, 5 + args.steps):
                    run.train_step(k)
        else:
            for k in range(5, 5 + args.steps):
                run.train_step(k)
        seconds = (time.perf_counter() - t0) / args.steps
        run.lock.release()
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(f"{seconds:.3f} s/step over {args.steps} steps (1 thread{', under the profiler' if args.profile else ''}); "
          f"loss options {run.cfg.loss_options}, batch {run.cfg.batch_size}, trajectory_fraction "
          f"{run.cfg.trajectory_fraction}")


def join_ab(run, steps: int, block: int = 10) -> None:
    """Median seconds per step with the trajectory rows joined to the gradient forward and apart, in alternating
    blocks of ``block`` steps (the same steps' batches are not repeated: every step is the run's next)."""
    import statistics

    inner = getattr(run.objective, "inner", None)
    if inner is None:
        raise SystemExit("this run has no trajectory rows (trajectory_fraction 0): nothing to join")
    times = {True: [], False: []}
    k = 5
    for b in range(max(2, steps // block)):
        join = b % 2 == 0
        inner.one_gradient_forward = join
        for _ in range(block):
            t0 = time.perf_counter()
            run.train_step(k)
            times[join].append(time.perf_counter() - t0)
            k += 1
    inner.one_gradient_forward = type(inner).one_gradient_forward
    joined, apart = statistics.median(times[True]), statistics.median(times[False])
    print(f"joined {joined:.4f} s/step, apart {apart:.4f} s/step (medians of {len(times[True])} steps each, "
          f"1 thread): apart / joined = {apart / joined:.3f}")


if __name__ == "__main__":
    main()
