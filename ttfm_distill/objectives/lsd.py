"""LSD: Lagrangian self-distillation (Boffi, Albergo, Vanden-Eijnden 2025; docs/method.md, LSD).

Adapted to distillation: the diagonal is anchored to the teacher and the
off-diagonal is trained against the model's *own* diagonal.

* diagonal pairs (``s == t``), flow matching against the teacher:
  ``L_I = |u(x_s, s, s) - sg[v_teacher(x_s, s)]|^2``;
* off-diagonal pairs (``t > s``), the Lagrangian residual with the model's
  tangent as the velocity field:
  ``L_L = |d/dt phi(x_s, s, t) - sg[u_tgt(sg[phi(x_s, s, t)], t, t)]|^2``.

``u_tgt`` is the current student under ``no_grad`` (``target_model="student"``,
the default: LSD found the current weights well suited) or the EMA copy
(``target_model="ema"``; falls back to the student when no EMA is passed).

Exactly one gradient-carrying call of ``student`` per step (DDP):

* ``derivative="jvp"``: one ``torch.func.jvp`` in ``t`` of ``phi`` over the
  whole batch.  On a diagonal row ``t == s`` so the tangent is
  ``u(x, s, s) + (t - s) * du/dt = u(x, s, s)`` exactly: the same call gives
  the diagonal prediction (and its gradient) with no extra rows.
* ``derivative="fd"``: one call over the concatenation of
  ``(s, t + h)`` and ``(s, t - h)`` rows of the off-diagonal pairs (clamped
  into ``[s, 1]``, as in :func:`.lfmd.time_derivative_fd`) and ``(s, s)``
  rows of the diagonal pairs (``2 * n_off + n_diag`` rows in all).

The targets (teacher on the diagonal rows, ``u_tgt`` on the off-diagonal
rows) are evaluated only on the rows that need them, under ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (Objective, ObjectiveOutput, TrainBatch, adaptive_weight, cat_conds, check_adaptive_options,
                   check_derivative_options, per_sample_mse, select_cond)
from .base import fd_from_window, fd_window, mean_or_zero, scatter_rows, split_rows, time_derivative_jvp

TARGET_MODELS = ("student", "ema")


class LsdObjective(Objective):
    name = "lsd"
    needs_ema = False
    teacher_off_diagonal = False
    #: the LSD paper trains on 75% diagonal pairs
    default_diagonal_fraction = 0.75

    @dataclass
    class Options:
        derivative: str = "fd"
        fd_step: float = 1e-3
        target_model: str = "student"
        lambda_diagonal: float = 1.0
        adaptive_p: float = 0.0
        adaptive_c: float = 1e-3

    @property
    def uses_jvp(self) -> bool:
        return self.options.derivative == "jvp"

    def validate(self):
        o = self.options
        check_derivative_options("lsd", o.derivative, o.fd_step)
        check_adaptive_options("lsd", o.adaptive_p, o.adaptive_c)
        if o.target_model not in TARGET_MODELS:
            raise ValueError(f"lsd: target_model must be one of {TARGET_MODELS}")
        if o.lambda_diagonal < 0:
            raise ValueError("lsd: lambda_diagonal must be >= 0")
        self.needs_ema = o.target_model == "ema"

    def _predict_fd(self, student, x, s, t, cond, oi, di):
        """``(phi_off, dphi_off, u_diag)`` from one student call."""
        h = self.options.fd_step
        x_o, s_o, t_o = x[oi], s[oi], t[oi]
        x_d, s_d = x[di], s[di]
        lo, hi = fd_window(s_o, t_o, h)  # t > s on these rows, so hi > lo
        c_o, c_d = select_cond(cond, oi), select_cond(cond, di)
        u_all = student(torch.cat([x_o, x_o, x_d]), torch.cat([s_o, s_o, s_d]), torch.cat([hi, lo, s_d]),
                        cat_conds(c_o, c_o, c_d))
        n_o = x_o.shape[0]
        u_hi, u_lo, u_d = u_all[:n_o], u_all[n_o:2 * n_o], u_all[2 * n_o:]
        phi, dphi = fd_from_window(x_o, s_o, t_o, lo, hi, u_hi, u_lo)
        return phi, dphi, u_d

    def __call__(self, student, teacher, batch: TrainBatch, ema=None) -> ObjectiveOutput:
        o = self.options
        x, s, t, cond = batch.x_s, batch.s, batch.t, batch.cond
        off = t > s
        oi, di = split_rows(off)
        if o.derivative == "jvp":
            phi_all, dphi_all = time_derivative_jvp(student, x, s, t, cond)
            # diagonal rows: t == s, so the tangent is u(x, s, s) exactly
            phi, dphi, u_d = phi_all[oi], dphi_all[oi], dphi_all[di]
        else:
            phi, dphi, u_d = self._predict_fd(student, x, s, t, cond, oi, di)
        with torch.no_grad():
            target_model = ema if (o.target_model == "ema" and ema is not None) else student
            t_o = t[oi]
            u_tgt = target_model(phi.detach(), t_o, t_o, select_cond(cond, oi)) if oi.numel() else dphi.detach()
            v_d = teacher.velocity(x[di], s[di], select_cond(cond, di)) if di.numel() else u_d.detach()
        lagrangian = per_sample_mse(dphi, u_tgt)
        initial = per_sample_mse(u_d, v_d)
        w_l = adaptive_weight(lagrangian, o.adaptive_p, o.adaptive_c)
        w_i = adaptive_weight(initial, o.adaptive_p, o.adaptive_c)
        per_sample = scatter_rows(x.shape[0], oi, w_l * lagrangian, di, o.lambda_diagonal * w_i * initial)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {
            "lagrangian": mean_or_zero(lagrangian.detach()), "initial": mean_or_zero(initial.detach()),
        })
