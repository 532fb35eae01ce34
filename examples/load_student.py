"""Load an exported student anywhere and sample with it, with or without ttfm-distill's sampler.

    python examples/load_student.py ttfm-output/student --steps 2

The student folder holds the backbone in diffusers format (``unet/``), the
added second-time embedding (``second_time.safetensors``) and
``ttfm_config.json``.  ``load_student`` rebuilds it strictly; the loop below
is the whole few-step sampler (docs/method.md, Samplers): ``x <- x + (t_next - t) * u(x, t, t_next)``.
"""

import argparse

import torch

from ttfm_distill.export import load_student
from ttfm_distill.sampling import uniform_time_grid

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--steps", type=int, default=2)
p.add_argument("--num", type=int, default=8)
args = p.parse_args()

student, config = load_student(args.folder)
x = torch.randn(args.num, *config["data_shape"], generator=torch.Generator().manual_seed(0))
grid = uniform_time_grid(args.steps, config.get("shift", 1.0))
with torch.no_grad():
    for s, t in zip(grid[:-1], grid[1:]):
        s_, t_ = s.expand(args.num), t.expand(args.num)
        x = x + (t - s) * student(x, s_, t_)  # u is the average velocity over [s, t]
print(f"{args.steps}-step samples: shape {tuple(x.shape)}, range [{x.min():.2f}, {x.max():.2f}]")
print("time convention:", config["time_convention"], "| parametrisation:", config["parametrisation"])
