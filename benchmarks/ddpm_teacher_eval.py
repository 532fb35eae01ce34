"""Measure a teacher's own samplers: Euler at several NFE, on each time grid, with its clip_sample on and off.

The scores are ``ttfm_distill.evaluate.Evaluation``'s (the same as ``ttfm-distill eval``): FD to the
Fashion-MNIST test images in the shipped classifier's features, the flow-map error and FD against the
teacher's RK4 solve, from ``--num`` noises of ``--seed``.  With ``--ddim`` diffusers' own ``DDIMScheduler``
(trailing spacing, the teacher's betas and clip) is run on the same noises, as a check that Euler on the
``timesteps`` grid is the DDIM sampler.  One JSON row per (clip, grid, sampler, NFE) in ``--output``.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/ddpm_teacher_eval.py --teacher /work/ddpm-runs/teacher \\
        --output benchmarks/results/ddpm-teacher-eval.json --ddim 16,50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--steps", default="1,2,4,8,16,50")
    p.add_argument("--grids", default="uniform,timesteps")
    p.add_argument("--clips", default="on,off")
    p.add_argument("--heun", default="", help="Heun NFEs (even), e.g. 4,8,16")
    p.add_argument("--ddim", default="", help="diffusers DDIM step counts, e.g. 16,50")
    p.add_argument("--num", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def ddim_sampler(teacher, steps: int):
    """diffusers' DDIM (trailing spacing, eta 0) from package noise; returns package data (t = 1)."""
    from diffusers import DDIMScheduler

    cfg = dict(teacher.scheduler_config)
    cfg.pop("_class_name", None)
    sched = DDIMScheduler.from_config({**cfg, "timestep_spacing": "trailing", "set_alpha_to_one": True})
    sched.set_timesteps(steps)

    @torch.no_grad()
    def run(x0, n, cond=None):
        x = x0.clone()  # package t = 0 is pure noise; DDIM starts from noise at its first timestep
        for k in sched.timesteps:
            eps = teacher.network(x, k.expand(x.shape[0]).to(x.device)).sample
            x = sched.step(eps, k, x, eta=0.0).prev_sample
        return x

    return run


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    from ttfm_distill.cli import parse_steps
    from ttfm_distill.evaluate import Evaluation, Sampler
    from ttfm_distill.sampling import euler, heun, time_grid
    from ttfm_distill.teachers.loading import load_teacher

    teacher = load_teacher(args.teacher)
    io = teacher.io
    steps = parse_steps(args.steps)
    rows = []
    out = Path(args.output)
    clip_range = getattr(io, "clip_sample", None)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"teacher": args.teacher, "io": io.describe(), "num": args.num, "seed": args.seed,
                                   "reference": f"rk4 {args.reference_steps} uniform steps, clip as in the row",
                                   "threads": args.threads, "rows": rows}, indent=2) + "\n")

    for clip in args.clips.split(","):
        io.clip_sample = clip_range if clip == "on" else None
        start = time.perf_counter()
        ev = Evaluation(teacher, num=args.num, seed=args.seed, reference_steps=args.reference_steps, batch_size=256)
        ref_row = {"clip": clip, "grid": "uniform", "sampler": f"rk4_{args.reference_steps}",
                   "nfe": 4 * args.reference_steps, **ev.score(ev.reference, against_reference=False),
                   "seconds": round(time.perf_counter() - start, 1)}
        rows.append(ref_row)
        print(json.dumps(ref_row), flush=True)
        for grid in args.grids.split(","):
            def eul(x, n, cond=None, grid=grid):
                return euler(lambda y, t: teacher.velocity(y, t), x, time_grid(n, teacher.shift, grid, io))

            def hn(x, n, cond=None, grid=grid):
                return heun(lambda y, t: teacher.velocity(y, t), x, time_grid(n // 2, teacher.shift, grid, io))

            samplers = [(Sampler("euler", eul), steps)]
            if args.heun:
                samplers.append((Sampler("heun", hn, accepts=lambda n: n >= 2 and n % 2 == 0),
                                 parse_steps(args.heun, "--heun")))
            for sampler, nfes in samplers:
                for n, row in ev.run(sampler, nfes).items():
                    if row is None:
                        continue
                    rows.append({"clip": clip, "grid": grid, "sampler": sampler.name, **row})
                    print(json.dumps(rows[-1]), flush=True)
                    save()
        if args.ddim and clip == "on":
            for n in parse_steps(args.ddim, "--ddim"):
                for row in ev.run(Sampler("ddim", ddim_sampler(teacher, n)), (n,)).values():
                    rows.append({"clip": clip, "grid": "diffusers DDIMScheduler trailing", "sampler": "ddim", **row})
                    print(json.dumps(rows[-1]), flush=True)
        save()
    io.clip_sample = clip_range


if __name__ == "__main__":
    main()
