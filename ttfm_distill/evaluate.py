"""Flow-map error of the student against the teacher's fine ODE solution (MATH.md section 5)."""

from __future__ import annotations

import torch

from .metrics import flow_map_error
from .objectives.base import flow_map
from .sampling import euler, fine_reference, sample_flow_map, uniform_time_grid


@torch.no_grad()
def student_sampler(student, cond=None):
    return lambda x, s, t: flow_map(student, x, s, t, cond)


@torch.no_grad()
def compare_with_teacher(student, teacher, steps=(1, 2, 4), n: int = 128, reference_steps: int = 32,
                         seed: int = 1234, batch_size: int = 128, device="cpu") -> tuple[dict, dict]:
    """Student N-step and teacher Euler N-step samples from the same noise against the fine solution.

    Returns ``(metrics, samples)``: ``metrics = {"flow_map_error": {"student": {"N": e},
    "teacher_euler": {"N": e}}}``; ``samples`` maps a label to ``(n, *shape)`` tensors
    (``"reference"``, ``"student N"``, ``"teacher euler N"``).
    """
    g = torch.Generator().manual_seed(seed)
    x0 = teacher.sample_noise(n, generator=g).to(device)
    shift = float(getattr(teacher, "shift", 1.0))
    chunks = x0.split(batch_size)
    ref = torch.cat([fine_reference(teacher.velocity, c, reference_steps, shift) for c in chunks])
    sampler = student_sampler(student)
    metrics = {"flow_map_error": {"student": {}, "teacher_euler": {}}}
    samples = {"reference": ref.cpu()}
    for n_steps in steps:
        grid = uniform_time_grid(n_steps, shift).to(device)
        xs = torch.cat([sample_flow_map(sampler, c, grid) for c in chunks])
        xe = torch.cat([euler(teacher.velocity, c, grid) for c in chunks])
        metrics["flow_map_error"]["student"][str(n_steps)] = flow_map_error(xs, ref)
        metrics["flow_map_error"]["teacher_euler"][str(n_steps)] = flow_map_error(xe, ref)
        samples[f"student {n_steps}"] = xs.cpu()
        samples[f"teacher euler {n_steps}"] = xe.cpu()
    return metrics, samples
