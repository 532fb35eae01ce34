"""Seconds per training step of `ttfm-distill run`'s recipe, and where they go.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40 -L long_jump_span=0.0
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 20 --profile     # torch profiler, top operators
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 80 --join-ab     # trajectory rows joined or apart
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40 --adamw fused  # AdamW's fused path (or foreach)
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --adamw-ab               # AdamW's step alone, 3 paths

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
    p.add_argument("--adamw", choices=("default", "foreach", "fused"), default="default",
                   help="AdamW's implementation: torch's default for the device (on CPU the per-tensor loop), "
                        "foreach or fused")
    p.add_argument("--adamw-ab", action="store_true",
                   help="time AdamW's step alone on the run's student (default, foreach, fused; interleaved)")
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
            if step == "resume" and args.adamw != "default":
                use_adamw(run, args.adamw)
            getattr(run, step)()
        run.skipped, run.first_batch = 0, 0.0
        for k in range(5):
            run.train_step(k)
        if args.adamw_ab:
            adamw_ab(run, args.steps)
            run.lock.release()
            return
        if args.join_ab:
            join_ab(run, args.steps)
            run.lock.release()
            return
        t0 = time.perf_counter()
        times = []
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for k in range(5, 5 + args.steps):
                    run.train_step(k)
        else:
            for k in range(5, 5 + args.steps):
                t1 = time.perf_counter()
                run.train_step(k)
                times.append(time.perf_counter() - t1)
        seconds = (time.perf_counter() - t0) / args.steps
        run.lock.release()
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    import statistics

    median = f", median {statistics.median(times):.4f}" if times else ""
    print(f"{seconds:.3f} s/step over {args.steps} steps{median} (1 thread{', under the profiler' if args.profile else ''}); "
          f"mixed_precision {run.cfg.mixed_precision}, AdamW {args.adamw}; "
          f"loss options {run.cfg.loss_options}, batch {run.cfg.batch_size}, trajectory_fraction "
          f"{run.cfg.trajectory_fraction}")


def use_adamw(run, impl: str) -> None:
    """Replace the run's AdamW (before ``resume`` prepares it) by the same optimiser on its ``foreach`` or ``fused`` path."""
    from ttfm_distill.schedules import lr_factor

    cfg = run.cfg
    params = [p for p in run.student.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(params, lr=cfg.lr,
                                      weight_decay=cfg.weight_decay, **{impl: True})
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda k: lr_factor(k, cfg))


def adamw_ab(run, rounds: int) -> None:
    """Median seconds of one AdamW step on copies of the run's trained parameters (random gradients of their
    shapes), for torch's default path, foreach and fused, in interleaved rounds; each optimiser on its own copy."""
    import statistics

    params = [p for p in run.student.parameters() if p.requires_grad]
    impls = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    copies = {}
    for name, kw in impls.items():
        own = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for o, p in zip(own, params):
            o.grad = torch.randn_like(p) * 1e-3
        copies[name] = (own, torch.optim.AdamW(own, lr=run.cfg.lr, weight_decay=run.cfg.weight_decay, **kw))
    times = {name: [] for name in impls}
    for _ in range(max(rounds, 5)):
        for name, (_, opt) in copies.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    n = sum(p.numel() for p in params)
    print("AdamW step alone, " + ", ".join(f"{k} {1e3 * statistics.median(v):.3f} ms" for k, v in times.items())
          + f" (medians of {len(times['default'])} interleaved rounds, {n} parameters in {len(params)} tensors, 1 thread)")


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
