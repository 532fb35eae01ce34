"""Seconds per training step of `ttfm-distill run`'s recipe, and where they go.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40 -L long_jump_span=0.0
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 20 --profile     # torch profiler, top operators

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


if __name__ == "__main__":
    main()
