"""Sample a teacher with its own Euler sampler and save a grid (the teacher figure of docs/benchmarks.md).

    python examples/teacher_grid.py --teacher builtin:fashion16 --steps 50 --num 64 --output docs/images/teacher-euler50.png
"""

from __future__ import annotations

import argparse

import torch

from ttfm_distill.plots import save_image_grid
from ttfm_distill.sampling import euler, uniform_time_grid
from ttfm_distill.teachers.loading import load_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="builtin:fashion16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="teacher-euler50.png")
    a = ap.parse_args()
    teacher = load_teacher(a.teacher)
    x0 = teacher.sample_noise(a.num, generator=torch.Generator().manual_seed(a.seed))
    with torch.no_grad():
        x = euler(lambda x, t: teacher.velocity(x, t), x0, uniform_time_grid(a.steps, teacher.shift))
    save_image_grid(x, a.output)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
