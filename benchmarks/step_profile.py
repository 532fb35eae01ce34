"""Seconds per training step of `ttfm-distill run`'s recipe, and where they go.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40 -L long_jump_span=0.0
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 20 --profile     # torch profiler, top operators
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 80 --join-ab     # trajectory rows joined or apart
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40 --adamw fused  # AdamW's fused path (or foreach)
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --adamw-ab               # AdamW's step alone, 3 paths
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40 --floor       # the step against its floor
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --layout-ab              # channels_last against contiguous
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --steps 40 --floor --set dm_weight=0.3   # with the DM term

``--floor`` (issue 34's measure of overhead) records every network evaluation one training step makes (the
student, its EMA, the teacher's network and the fake network: their inputs, and whether a gradient flows), then
replays each alone on those inputs under the run's autocast, a forward and, where the step took a gradient
through it, a backward of the output's sum, ``--replays`` times in interleaved rounds; the **floor** is the sum of
the calls' median seconds, and the step's median seconds over its floor is the overhead ratio (goal <= 1.15).
Beside it: the floor over one student forward and backward at the batch (a plain flow-matching step's network
work), the ratio the issue asks for.

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
    p.add_argument("--floor", action="store_true",
                   help="the step's median seconds against its floor: its network evaluations replayed alone")
    p.add_argument("--replays", type=int, default=15, help="--floor: interleaved replay rounds")
    p.add_argument("--layout-ab", action="store_true",
                   help="one step's network evaluations replayed in the contiguous and the channels_last layout")
    p.add_argument("--join-ab", action="store_true",
                   help="alternate 10-step blocks with the trajectory rows joined and apart; median s/step of each")
    args = p.parse_args()
    torch.set_num_threads(1)

    from ttfm_distill.cli import parse_options as parse  # KEY=VALUE read exactly as `ttfm-distill run` reads it
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
        if args.floor:
            floor(run, args.steps, args.replays)
            run.lock.release()
            return
        if args.layout_ab:
            layout_ab(run, args.replays)
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
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda k: lr_factor(k, cfg, run.state.total_steps))


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


def networks(run) -> dict:
    """The networks a training step evaluates, by name: student, its EMA, the teacher's network, the fake one."""
    nets = {"student": run.student, "teacher": run.teacher.network}
    if run.ema is not None:
        nets["ema"] = run.ema
    if run.cfg.dm_weight > 0:
        nets["fake"] = run.dm.fake.network
    return nets


def record_calls(run, step: int) -> list:
    """Every top-level call of ``networks(run)`` during training step ``step``: (name, module, args, kwargs,
    gradient enabled, autocast on, in-step forward seconds). A call made inside another recorded call (a
    wrapper's own network) is not recorded twice."""
    calls, depth, started = [], [0], {}

    def pre(name, module):
        def hook(mod, args, kwargs):
            depth[0] += 1
            if depth[0] == 1:
                started[name] = (time.perf_counter(), args, kwargs, torch.is_grad_enabled(),
                                 torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))
        return hook

    def post(name, module):
        def hook(mod, args, kwargs, output):
            depth[0] -= 1
            if depth[0] == 0 and name in started:
                t0, a, kw, grad, autocast = started.pop(name)
                keep = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
                calls.append((name, module, tuple(keep(v) for v in a),
                              {k: (keep(v) if not isinstance(v, dict) else {kk: keep(vv) for kk, vv in v.items()})
                               for k, v in kw.items()}, grad, autocast, time.perf_counter() - t0))
        return hook

    handles = []
    for name, module in networks(run).items():
        handles.append(module.register_forward_pre_hook(pre(name, module), with_kwargs=True))
        handles.append(module.register_forward_hook(post(name, module), with_kwargs=True))
    try:
        run.train_step(step)
    finally:
        for h in handles:
            h.remove()
    return calls


def replay(run, call) -> float:
    """Seconds of one recorded call alone: its forward (and the backward of its output's sum where the step took
    a gradient through it) on its own inputs, under the run's autocast if the step had it."""
    import contextlib

    name, module, args, kwargs, grad, autocast, _ = call
    ctx = run.accelerator.autocast() if autocast else contextlib.nullcontext()
    t0 = time.perf_counter()
    with ctx, torch.set_grad_enabled(grad):
        out = module(*args, **kwargs)
        out = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)
    if grad:
        out.float().sum().backward()
    seconds = time.perf_counter() - t0
    module.zero_grad(set_to_none=True)
    return seconds


def floor(run, steps: int, replays: int) -> None:
    """The median step against the summed median seconds of its network evaluations replayed alone."""
    import statistics

    times = []
    k = 5
    for _ in range(steps):
        t0 = time.perf_counter()
        run.train_step(k)
        times.append(time.perf_counter() - t0)
        k += 1
    calls = record_calls(run, k)
    seconds = [[] for _ in calls]
    for _ in range(replays):
        for i, call in enumerate(calls):
            seconds[i].append(replay(run, call))
    medians = [statistics.median(v) for v in seconds]
    total = sum(medians)
    step = statistics.median(times)
    fm = [m for c, m in zip(calls, medians) if c[0] == "student" and c[4]
          and c[2][0].shape[0] == run.cfg.batch_size]
    print(f"network evaluations of one step ({len(calls)}):")
    for c, m in zip(calls, medians):
        shape = tuple(c[2][0].shape) if c[2] and isinstance(c[2][0], torch.Tensor) else "?"
        print(f"  {c[0]:8s} {'forward+backward' if c[4] else 'forward (no grad)':18s} input {shape}: "
              f"{1e3 * m:7.1f} ms alone ({1e3 * c[6]:.1f} ms forward in the step)")
    line = (f"step median {step:.4f} s over {steps} steps; floor {total:.4f} s (medians of {replays} replays); "
            f"step / floor = {step / total:.3f}")
    if fm:
        line += (f"; floor / one student forward+backward at batch {run.cfg.batch_size} "
                 f"(a flow-matching step's network work) = {total / fm[0]:.2f}")
    print(line + f" (1 thread; mixed_precision {run.cfg.mixed_precision})")


def layout_ab(run, replays: int) -> None:
    """One step's network evaluations replayed alone in torch's default (contiguous) memory layout and in
    channels_last (a copy of each network and its 4-D inputs converted), interleaved; the summed medians of each."""
    import copy
    import statistics

    calls = record_calls(run, 5)
    last = torch.channels_last
    to_last = lambda v: v.contiguous(memory_format=last) if isinstance(v, torch.Tensor) and v.ndim == 4 else v  # noqa: E731
    converted = {}
    for name, module, *_ in calls:
        if name not in converted:
            converted[name] = copy.deepcopy(module).to(memory_format=last)
    variants = {"contiguous": calls,
                "channels_last": [(n, converted[n], tuple(to_last(v) for v in a), {k: to_last(v) for k, v in kw.items()},
                                   g, ac, t) for n, _, a, kw, g, ac, t in calls]}
    seconds = {k: [[] for _ in calls] for k in variants}
    for _ in range(replays):
        for key, cs in variants.items():
            for i, call in enumerate(cs):
                seconds[key][i].append(replay(run, call))
    totals = {k: sum(statistics.median(v) for v in s) for k, s in seconds.items()}
    for key, total in totals.items():
        print(f"{key:14s} {total:.4f} s for the step's {len(calls)} network evaluations (summed medians of {replays})")
    print(f"channels_last / contiguous = {totals['channels_last'] / totals['contiguous']:.3f} "
          f"(1 thread; mixed_precision {run.cfg.mixed_precision})")


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
