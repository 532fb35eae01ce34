"""Load an exported student anywhere and sample with it, with diffusers' pipeline API or with the bare loop.

    python examples/load_student.py ttfm-output/student --steps 2

The export is a diffusers pipeline folder (docs/pipeline.md): ``TTFMPipeline``
samples it in ``--steps`` network evaluations.  The student alone is its
``flow_map/`` component; the loop below is the whole few-step sampler:
``x <- x + (t_next - t) * u(x, t, t_next)`` on the teacher-shifted grid.
"""

import argparse

import torch

from ttfm_distill import TTFMPipeline
from ttfm_distill.export import load_student
from ttfm_distill.sampling import uniform_time_grid

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--steps", type=int, default=2)
p.add_argument("--num", type=int, default=8)
args = p.parse_args()

pipe = TTFMPipeline.from_pretrained(args.folder)
images = pipe(num_inference_steps=args.steps, num_images_per_prompt=args.num,
              generator=torch.Generator().manual_seed(0), output_type="latent").images

student, config = load_student(args.folder)  # the same student, by hand
x = config.sigma0 * torch.randn(args.num, *config.data_shape, generator=torch.Generator().manual_seed(0))
grid = uniform_time_grid(args.steps, config.shift)
with torch.no_grad():
    for s, t in zip(grid[:-1], grid[1:]):
        s_, t_ = s.expand(args.num), t.expand(args.num)
        x = x + (t - s) * student(x, s_, t_)  # u is the average velocity over [s, t]
print(f"{args.steps}-step samples: shape {tuple(x.shape)}, range [{x.min():.2f}, {x.max():.2f}]; "
      f"pipeline vs loop: max difference {(images - x).abs().max():.2e}")
print("time convention:", config.time_convention, "| parametrisation:", config.parametrisation)
