"""How close a run's data-free pool is to the teacher's fine solve: the rms distance between the pool's stored
endpoints and an fp32 RK4-32 solve from the same noises (and classes), beside an fp32 Heun-16 solve's distance.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/pool_accuracy.py --run RUN [--teacher FOLDER] [--num 256]

``RUN``: a run folder whose ``cache/`` holds a pool with kept trajectories (a run with trajectory rows); the
teacher defaults to the embedded one. One thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--teacher", default=None)
    p.add_argument("--num", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    from safetensors.torch import load_file

    from ttfm_distill.sampling import heun, rk4, uniform_time_grid
    from ttfm_distill.teachers.loading import load_teacher

    files = sorted((args.run / "cache").glob("pool-*traj*.safetensors"))
    if not files:
        raise SystemExit(f"no pool with kept trajectories in {args.run / 'cache'}")
    pool = load_file(str(files[0]))
    n = args.num
    x0, x1 = pool["trajectories"][:n, 0], pool["trajectories"][:n, -1]
    cond = {k.split(".", 1)[1]: v[:n] for k, v in pool.items() if k.startswith("cond.")} or None
    teacher = load_teacher(args.teacher)

    def velocity(x, t):
        return teacher.velocity(x, t, cond)

    with torch.no_grad():
        ref = rk4(velocity, x0, uniform_time_grid(32, teacher.shift))
        heun16 = heun(velocity, x0, uniform_time_grid(16, teacher.shift))

    def rms(a, b):
        return float(((a - b) ** 2).mean().sqrt())

    print(f"{files[0].name}: pool vs fp32 RK4-32 rms {rms(x1, ref):.4f}; fp32 Heun-16 vs RK4-32 {rms(heun16, ref):.4f}; "
          f"pool vs fp32 Heun-16 {rms(x1, heun16):.4f}; samples' rms {float(ref.pow(2).mean().sqrt()):.3f} ({n} noises)")


if __name__ == "__main__":
    main()
