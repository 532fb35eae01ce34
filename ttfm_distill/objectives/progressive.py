"""PFMM / progressive flow-map matching (docs/method.md, Progressive), no derivative.

``|phi(x_s, s, t) - sg[phi_ema(phi_ema(x_s, s, r), r, t)]|^2`` with
``r ~ U(s, t)``, measured in ``phi`` (so long jumps weigh ``(t - s)^2``
more than in average-velocity form).  Diagonal pairs anchor the map to the
teacher: ``|u(x_s, s, s) - v(x_s, s)|^2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..convention import broadcast_time
from .base import Objective, ObjectiveOutput, TrainBatch, flow_map, masked_mean, per_sample_mse


class ProgressiveObjective(Objective):
    name = "progressive"
    needs_ema = True
    one_gradient_forward = True
    #: the semigroup target is the student's own: the teacher enters through the diagonal pairs alone
    teacher_off_diagonal = False

    @dataclass
    class Options:
        lambda_initial: float = 1.0

    def __call__(self, student, teacher, batch: TrainBatch, ema=None) -> ObjectiveOutput:
        x, s, t, cond = batch.x_s, batch.s, batch.t, batch.cond
        off = t > s
        target_model = ema if ema is not None else student
        with torch.no_grad():
            r = s + torch.rand(s.shape, generator=batch.generator).to(s) * (t - s)
            y = flow_map(target_model, x, s, r, cond)
            target = flow_map(target_model, y, r, t, cond)
            v_s = teacher.velocity(x, s, cond)
        u = student(x, s, t, cond)
        phi = x + broadcast_time(t - s, x) * u
        semigroup = per_sample_mse(phi, target)
        initial = per_sample_mse(u, v_s)
        per_sample = torch.where(off, semigroup, self.options.lambda_initial * initial)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {
            "semigroup": masked_mean(semigroup, off).item(), "initial": masked_mean(initial, ~off).item(),
        })
