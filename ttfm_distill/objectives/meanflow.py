"""MeanFlow-style average-velocity identity (Geng et al. 2025; docs/method.md, MeanFlow), distilled.

Identity in this package's convention
-------------------------------------
Time runs noise -> data, ``t >= s``, and ``u(x, s, t)`` is the average velocity
over ``[s, t]``: ``phi(x, s, t) = x + (t - s) * u(x, s, t)``.

Let ``x(s)`` solve the teacher ODE ``dx/ds = v(x, s)``.  The exact flow map
sends every point of that trajectory to the same endpoint at time ``t``:
``phi(x(s), s, t) = x(t)`` for all ``s <= t``, so its total derivative in
``s`` vanishes::

    0 = d/ds [x(s) + (t - s) * u(x(s), s, t)]
      = v(x(s), s) - u(x(s), s, t) + (t - s) * du/ds,

    du/ds = J_x u(x, s, t) . v(x, s) + d_s u(x, s, t)   (partial in s, t fixed)

hence ``u(x_s, s, t) = v(x_s, s) + (t - s) * du/ds`` -- a **plus** sign.
(Check against MeanFlow, which runs time the other way, data at 0: it
writes ``u'(z, r, t) = v'(z, t) - (t - r) d/dt u'`` with start ``t``, end
``r < t``.  With ``tau = 1 - tau'`` its start is our ``s`` and its end our
``t``, so ``t' - r' = t - s``, ``d/dt' = -d/ds``, and both velocities change
sign (``u' = -u``, ``v' = -v``); substituting gives
``-u = -v - (t - s) * (-d/ds)(-u)``, i.e. the identity above.)

Loss
----
``L = |u(x_s, s, t) - sg[u_tgt]|^2`` with
``u_tgt = v_teacher(x_s, s) + (t - s) * du/ds``, where ``v`` is the
**teacher** (distillation) and ``du/ds`` is the directional derivative of the
current student ``(x, s) -> u(x, s, t)`` along ``(v, 1)``, taken under
``no_grad``:

* ``derivative="jvp"`` (default, as MeanFlow): ``torch.func.jvp`` with
  tangents ``(v, 1)``;
* ``derivative="fd"``: central difference
  ``[u(x + a v, s + a, t) - u(x + b v, s + b, t)] / (a - b)`` with
  ``a = min(h, t - s)``, ``b = -min(h, s)`` (one-sided at the ends of
  ``[0, t]``, so the model is never queried with ``s > t``).

On the diagonal ``t == s`` the target is the teacher velocity (plain flow
matching), weighted by ``lambda_diagonal``; the derivative is only evaluated
on the off-diagonal rows.

Only one student call carries gradient (the prediction); the derivative
call(s) run under ``no_grad`` through the same (possibly DDP-wrapped) module,
which does not prepare DDP's reducer.

Adaptive weighting (MeanFlow): ``w = sg[1 / (l + c)^p]`` per sample, with
``l`` the per-sample *mean* squared error (MeanFlow uses the sum over
dimensions, so ``adaptive_c`` is on a per-dimension scale here).
``adaptive_p = 0`` (default) switches it off; MeanFlow used ``p = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..convention import broadcast_time
from .base import (Objective, ObjectiveOutput, TrainBatch, adaptive_weight, check_adaptive_options,
                   check_derivative_options, per_sample_mse)
from .base import cat_conds, select_cond
from .base import mean_or_zero, split_rows


def total_derivative_jvp(model, x, s, t, v, cond=None):
    """``(u(x, s, t), du/ds along (v, 1))`` by forward-mode AD (``t`` held fixed)."""
    return torch.func.jvp(lambda xx, ss: model(xx, ss, t, cond), (x, s), (v.to(x.dtype), torch.ones_like(s)))


def total_derivative_fd(model, x, s, t, v, cond=None, h: float = 1e-3):
    """``du/ds along (v, 1)`` by a finite difference inside ``[0, t]`` (one call of ``model``)."""
    a = torch.minimum(torch.full_like(s, h), t - s)
    b = -torch.minimum(torch.full_like(s, h), s)
    v = v.to(x.dtype)
    x_a, x_b = x + broadcast_time(a, x) * v, x + broadcast_time(b, x) * v
    both = model(torch.cat([x_a, x_b]), torch.cat([s + a, s + b]), torch.cat([t, t]), cat_conds(cond, cond))
    u_a, u_b = both.chunk(2)
    return (u_a - u_b) / broadcast_time(a - b, x)


class MeanFlowObjective(Objective):
    name = "meanflow"
    needs_ema = False

    @dataclass
    class Options:
        derivative: str = "jvp"
        fd_step: float = 1e-3
        lambda_diagonal: float = 1.0
        adaptive_p: float = 0.0
        adaptive_c: float = 1e-3

    @property
    def uses_jvp(self) -> bool:
        return self.options.derivative == "jvp"

    def validate(self):
        o = self.options
        check_derivative_options("meanflow", o.derivative, o.fd_step)
        check_adaptive_options("meanflow", o.adaptive_p, o.adaptive_c)
        if o.lambda_diagonal < 0:
            raise ValueError("meanflow: need lambda_diagonal >= 0")

    @torch.no_grad()
    def target(self, student, teacher, batch: TrainBatch) -> torch.Tensor:
        """``u_tgt = v(x_s, s) + (t - s) * du/ds`` for every pair: ``(B, *shape)``."""
        x, s, t, cond = batch.x_s, batch.s, batch.t, batch.cond
        v = teacher.velocity(x, s, cond).to(x.dtype)
        oi, _ = split_rows(t > s)
        if not oi.numel():
            return v
        x_o, s_o, t_o, v_o, c_o = x[oi], s[oi], t[oi], v[oi], select_cond(cond, oi)
        if self.options.derivative == "jvp":
            _, du = total_derivative_jvp(student, x_o, s_o, t_o, v_o, c_o)
        else:
            du = total_derivative_fd(student, x_o, s_o, t_o, v_o, c_o, self.options.fd_step)
        return v.index_copy(0, oi, v_o + broadcast_time(t_o - s_o, x_o) * du.to(x.dtype))

    def __call__(self, student, teacher, batch: TrainBatch, ema=None) -> ObjectiveOutput:
        o = self.options
        x, s, t, cond = batch.x_s, batch.s, batch.t, batch.cond
        off = t > s
        target = self.target(student, teacher, batch)
        u = student(x, s, t, cond)  # the one gradient-carrying call
        residual = per_sample_mse(u, target)
        weight = torch.where(off, torch.ones_like(residual), torch.full_like(residual, o.lambda_diagonal))
        weight = weight * adaptive_weight(residual, o.adaptive_p, o.adaptive_c)
        per_sample = weight * residual
        r = residual.detach()
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {
            "average_velocity": mean_or_zero(r[off]), "initial": mean_or_zero(r[~off]),
        })
