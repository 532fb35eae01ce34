"""LFMD: Lagrangian flow map distillation (Boffi et al.; docs/method.md, LFMD).

``L = |d/dt phi(x_s, s, t) - sg[v(phi(x_s, s, t), t)]|^2``.

``derivative="jvp"``: exact, forward-mode ``torch.func.jvp`` in ``t``,
backpropagated through (needs forward-AD support in every op: no fused
attention, see docs/environment.md, JVP through attention).  ``derivative="fd"``: central finite
difference with step ``fd_step`` (one-sided at the ends of ``[s, 1]``).

``adaptive_p > 0`` weights each sample by ``sg[1 / (l + adaptive_c)^p]``
(MeanFlow's robust weighting; off by default): the teacher is evaluated at
the student's own output, and off the data near ``t = 1`` a sharp teacher's
velocity is huge, so without it a few samples can blow the loss up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (Objective, ObjectiveOutput, TrainBatch, adaptive_weight, check_adaptive_options,
                   check_derivative_options, masked_mean, per_sample_mse)
from .base import time_derivative_fd, time_derivative_jvp  # noqa: F401 - shared with LSD and MeanFlow


class LfmdObjective(Objective):
    name = "lfmd"

    @dataclass
    class Options:
        derivative: str = "fd"
        fd_step: float = 1e-3
        adaptive_p: float = 0.0
        adaptive_c: float = 1e-3

    @property
    def uses_jvp(self) -> bool:
        return self.options.derivative == "jvp"

    def validate(self):
        check_derivative_options("lfmd", self.options.derivative, self.options.fd_step)
        check_adaptive_options("lfmd", self.options.adaptive_p, self.options.adaptive_c)

    def __call__(self, student, teacher, batch: TrainBatch, ema=None) -> ObjectiveOutput:
        x, s, t, cond = batch.x_s, batch.s, batch.t, batch.cond
        if self.options.derivative == "jvp":
            phi, dphi = time_derivative_jvp(student, x, s, t, cond)
        else:
            phi, dphi = time_derivative_fd(student, x, s, t, cond, self.options.fd_step)
        with torch.no_grad():
            target = teacher.velocity(phi.detach(), t, cond)
        residual = per_sample_mse(dphi, target)
        per_sample = adaptive_weight(residual, self.options.adaptive_p, self.options.adaptive_c) * residual
        off = t > s
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {
            "lagrangian": masked_mean(residual, off).item(),
            "initial": masked_mean(residual, ~off).item(),
        })
