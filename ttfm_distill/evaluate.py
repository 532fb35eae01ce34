"""Flow-map error of the student against the teacher's fine ODE solution (MATH.md section 5)."""

from __future__ import annotations

import torch

from .metrics import flow_map_error
from .objectives.base import flow_map
from .sampling import euler, fine_reference, sample_flow_map, uniform_time_grid


@torch.no_grad()
def student_sampler(student, cond=None):
    return lambda x, s, t: flow_map(student, x, s, t, cond)


def split_cond(cond: dict | None, batch_size: int, n: int, device) -> list[dict | None]:
    """``cond`` cut into the batches of ``range(n)`` (a list of ``None`` when there is none)."""
    starts = range(0, n, batch_size)
    if not cond:
        return [None for _ in starts]
    return [{k: v[i:i + batch_size].to(device) for k, v in cond.items()} for i in starts]


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
    cond = teacher.sample_cond(n, generator=g) if hasattr(teacher, "sample_cond") else None
    shift = float(getattr(teacher, "shift", 1.0))
    chunks = list(zip(x0.split(batch_size), split_cond(cond, batch_size, len(x0), device)))
    velocity = (lambda c: (lambda x, t: teacher.velocity(x, t, c)))
    ref = torch.cat([fine_reference(velocity(c), x, reference_steps, shift) for x, c in chunks])
    metrics = {"flow_map_error": {"student": {}, "teacher_euler": {}}}
    samples = {"reference": ref.cpu()}
    if cond:
        samples["cond"] = {k: v.cpu() for k, v in cond.items()}
    for n_steps in steps:
        grid = uniform_time_grid(n_steps, shift).to(device)
        xs = torch.cat([sample_flow_map(student_sampler(student, c), x, grid) for x, c in chunks])
        xe = torch.cat([euler(velocity(c), x, grid) for x, c in chunks])
        metrics["flow_map_error"]["student"][str(n_steps)] = flow_map_error(xs, ref)
        metrics["flow_map_error"]["teacher_euler"][str(n_steps)] = flow_map_error(xe, ref)
        samples[f"student {n_steps}"] = xs.cpu()
        samples[f"teacher euler {n_steps}"] = xe.cpu()
    return metrics, samples
