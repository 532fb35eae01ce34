"""ITVM: initial/terminal velocity matching (docs/method.md, ITVM).

Default reading ("composed", ``intermediate="initial"``; chosen by the
measurements in docs/benchmarks.md): the target for the jump ``s -> t`` goes
through an intermediate time ``r``; one segment of length ``tau`` is taken
with the **teacher** and the other with the **target model** ``u_tgt`` (no
derivative anywhere).  ``target_model``: ``"student"`` (default, the current
weights under stop-gradient), ``"ema"`` (an EMA copy; the current weights when
no EMA is kept) or ``"teacher"`` (a multi-step teacher solve).  Written as
average velocities the target is a convex combination:

* ``intermediate="terminal"`` (``r = t - tau``):
  ``u_target = (r - s)/(t - s) * u_tgt(x_s, s, r) + tau/(t - s) * v_seg(y, r -> t)``
  with ``y = phi_tgt(x_s, s, r)``;
* ``intermediate="initial"`` (``r = s + tau``):
  ``u_target = tau/(t - s) * v_seg(x_s, s -> r) + (t - r)/(t - s) * u_tgt(y, r, t)``
  with ``y = x_s + tau * v_seg(x_s, s -> r)``;
* ``intermediate="uniform"`` (``r ~ U(s, t)``): both segments with the target model.

``v_seg`` is one Euler (or Heun) step of the teacher over the segment.
Jumps shorter than ``tau`` get the teacher step alone.  Diagonal pairs
(``s == t``) and, with ``initial_on_all``, every pair evaluated at
``(s, s)``, give the initial-velocity term ``|u(x_s, s, s) - v(x_s, s)|^2``.

Second reading (``reading="ema_only"``):
``|(phi(x_s, s, t) - y) / (t - r) - sg[u_tgt(sg[y], r, t)]|^2`` with
``y = phi(x_s, s, r)``; the gradient through ``y`` is optional.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..convention import broadcast_time
from .base import (Objective, ObjectiveOutput, TrainBatch, adaptive_weight, check_adaptive_options, flow_map,
                   lerp_velocities, masked_mean, per_sample_mse, repeat_cond, select_cond)

INTERMEDIATES = ("terminal", "initial", "uniform")
TARGET_MODELS = ("ema", "student", "teacher")


def teacher_segment_velocity(teacher, y, r, h, cond, solver: str) -> torch.Tensor:
    """Average teacher velocity over ``[r, r + h]`` from ``y``: one Euler or Heun step."""
    v1 = teacher.velocity(y, r, cond)
    if solver == "euler":
        return v1
    v2 = teacher.velocity(y + broadcast_time(h, y) * v1, r + h, cond)
    return 0.5 * (v1 + v2)


def teacher_solve_velocity(teacher, x, s, t, cond, steps: int, solver: str) -> torch.Tensor:
    """Average teacher velocity over ``[s, t]``: ``steps`` Euler/Heun steps from ``x``."""
    y, h = x, (t - s) / steps
    for k in range(steps):
        y = y + broadcast_time(h, y) * teacher_segment_velocity(teacher, y, s + k * h, h, cond, solver)
    span = broadcast_time(t - s, x)
    return torch.where(span > 0, (y - x) / span.clamp_min(1e-12), teacher.velocity(x, s, cond))


def normalised_adaptive_weight(loss: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """MeanFlow's adaptive weight of each sample's ``loss`` (no gradient), divided by its batch mean."""
    w = adaptive_weight(loss, p, c)
    return w / w.mean()


class ItvmObjective(Objective):
    name = "itvm"
    needs_ema = True
    one_gradient_forward = True

    @dataclass
    class Options:
        reading: str = "composed"
        intermediate: str = "initial"
        # defaults picked by the image sweep (docs/benchmarks.md, "Which reading of ITVM is the default")
        tau: float = 0.1
        tau_mode: str = "absolute"
        teacher_solver: str = "heun"
        #: Euler/Heun steps the teacher segment of length tau is taken in (a longer tau at the same accuracy)
        teacher_substeps: int = 1
        target_model: str = "student"
        teacher_target_steps: int = 8
        lambda_initial: float = 1.0
        lambda_terminal: float = 1.0
        initial_on_all: bool = False
        grad_through_intermediate: bool = False
        #: weight each off-diagonal pair's residual by (t - s) ** span_power: 2 measures it in phi (the jump's
        #: end point), as progressive distillation does, so long jumps count more; 0 (default) leaves it alone
        span_power: float = 0.0
        #: pairs with t - s >= long_jump_span take progressive distillation's target instead: two jumps of the
        #: EMA (the current weights where none is kept) through r ~ U(s, t), no teacher; their residual is
        #: weighted like the other pairs' (span_power). 0 (default) keeps the ITVM target on every pair
        long_jump_span: float = 0.0
        #: MeanFlow's per-sample weight sg[1 / (loss + adaptive_c)^adaptive_p] on each pair's loss, rescaled to
        #: mean 1 over the batch (only the relative weights change; the step size stays Adam's). 0: off (default)
        adaptive_p: float = 0.0
        adaptive_c: float = 1e-3

    def validate(self):
        o = self.options
        checks = [
            (o.reading in ("composed", "ema_only"), "reading must be 'composed' or 'ema_only'"),
            (o.intermediate in INTERMEDIATES, f"intermediate must be one of {INTERMEDIATES}"),
            (o.tau_mode in ("absolute", "relative"), "tau_mode must be 'absolute' or 'relative'"),
            (0 < o.tau <= 1, "tau must be in (0, 1]"),
            (o.teacher_solver in ("euler", "heun"), "teacher_solver must be 'euler' or 'heun'"),
            (o.target_model in TARGET_MODELS, f"target_model must be one of {TARGET_MODELS}"),
            (o.teacher_target_steps >= 1, "teacher_target_steps must be >= 1"),
            (o.teacher_substeps >= 1, "teacher_substeps must be >= 1"),
            (o.lambda_initial >= 0 and o.lambda_terminal >= 0, "lambdas must be >= 0"),
            (o.span_power >= 0, "span_power must be >= 0"),
            (0 <= o.long_jump_span <= 1, "long_jump_span must be in [0, 1] (0: off)"),
            (o.long_jump_span == 0 or o.reading == "composed", "long_jump_span needs reading='composed'"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"itvm: {msg}")
        check_adaptive_options("itvm", o.adaptive_p, o.adaptive_c)
        self.needs_ema = o.target_model == "ema" or o.long_jump_span > 0
        # with r uniform and a student target, every off-diagonal target is the student's own
        self.teacher_off_diagonal = (o.reading == "composed" and (o.intermediate != "uniform" or o.target_model == "teacher")
                                     or o.reading == "ema_only" or o.initial_on_all)
        # measured default: no diagonal pairs; a reading whose teacher enters only through the diagonal needs some
        self.default_diagonal_fraction = 0.0 if self.teacher_off_diagonal else 0.25

    # -- pieces ---------------------------------------------------------------
    def _tau(self, s, t):
        o = self.options
        tau = o.tau * (t - s) if o.tau_mode == "relative" else torch.full_like(s, o.tau)
        return torch.minimum(tau, t - s)

    def _teacher_segment(self, teacher, y, r, h, cond):
        """Average teacher velocity over ``[r, r + h]`` from ``y`` in ``teacher_substeps`` steps."""
        o = self.options
        if o.teacher_substeps == 1:
            return teacher_segment_velocity(teacher, y, r, h, cond, o.teacher_solver)
        return teacher_solve_velocity(teacher, y, r, r + h, cond, o.teacher_substeps, o.teacher_solver)

    def _long_segment(self, student, ema, teacher, x, a, b, cond):
        """Average velocity over ``[a, b]`` from the target model (no grad)."""
        o = self.options
        if o.target_model == "teacher":
            return teacher_solve_velocity(teacher, x, a, b, cond, o.teacher_target_steps, o.teacher_solver)
        model = ema if o.target_model == "ema" else student
        return model(x, a, b, cond)

    @torch.no_grad()
    def target(self, student, teacher, batch: TrainBatch, ema=None) -> torch.Tensor:
        """``u_target`` for every pair of the batch: ``(B, *shape)``.

        Diagonal pairs (``s == t``) need only the teacher's velocity; the
        composed target is computed on the off-diagonal pairs alone, so a
        diagonal fraction ``d`` saves ``d`` of the target's extra evaluations.
        """
        x, s, t, cond = batch.x_s, batch.s, batch.t, batch.cond
        off = t > s
        # r for "uniform" is drawn for the whole batch, so the random stream does not depend on the split
        frac = (torch.rand(s.shape, generator=batch.generator).to(s) if self.options.intermediate == "uniform"
                else None)
        long = self.long_jumps(s, t)
        if long is not None:
            long_frac = torch.rand(s.shape, generator=batch.generator).to(s)  # likewise, for the whole batch
            out = self._base_target(student, teacher, batch, ema, frac, off & ~long)
            if bool(long.any()):
                out[long] = self._long_jump_target(student, ema, x[long], s[long], t[long], select_cond(cond, long),
                                                   long_frac[long]).to(out.dtype)  # bf16 under autocast
            return out
        return self._base_target(student, teacher, batch, ema, frac, off)

    def long_jumps(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
        """The pairs that take the progressive target (``None`` when ``long_jump_span`` is off)."""
        span = self.options.long_jump_span
        return None if span <= 0 else (t - s >= span) & (t > s)

    def _long_jump_target(self, student, ema, x, s, t, cond, frac) -> torch.Tensor:
        """Progressive distillation's target as an average velocity: two target-model jumps through r."""
        model = ema if ema is not None else student
        r = s + frac * (t - s)
        end = flow_map(model, flow_map(model, x, s, r, cond), r, t, cond)
        return (end - x) / broadcast_time(t - s, x)

    def _base_target(self, student, teacher, batch: TrainBatch, ema, frac, off) -> torch.Tensor:
        """The ITVM target: the teacher's velocity on diagonal pairs, the composed one on ``off`` pairs (rows in
        neither, the long jumps, are left for the caller to fill)."""
        x, s, t, cond = batch.x_s, batch.s, batch.t, batch.cond
        if bool(off.all()):
            return self._off_diagonal_target(student, teacher, ema, x, s, t, cond, frac)
        out = torch.empty_like(x)
        diag = ~(t > s)
        if bool(diag.any()):
            out[diag] = teacher.velocity(x[diag], s[diag], select_cond(cond, diag)).to(out.dtype)
        if bool(off.any()):
            out[off] = self._off_diagonal_target(student, teacher, ema, x[off], s[off], t[off], select_cond(cond, off),
                                                 None if frac is None else frac[off]).to(out.dtype)
        return out

    def _off_diagonal_target(self, student, teacher, ema, x, s, t, cond, frac) -> torch.Tensor:
        """The composed target of pairs with ``s < t``."""
        o = self.options
        span = t - s
        if o.intermediate == "uniform":
            r = s + frac * span
            u1 = self._long_segment(student, ema, teacher, x, s, r, cond)
            y = x + broadcast_time(r - s, x) * u1
            u2 = self._long_segment(student, ema, teacher, y, r, t, cond)
            return lerp_velocities((t - r) / span, u1, u2)
        tau = self._tau(s, t)
        w = tau / span
        if o.intermediate == "terminal":
            r = t - tau
            u_long = self._long_segment(student, ema, teacher, x, s, r, cond)
            y = x + broadcast_time(r - s, x) * u_long
            v_seg = self._teacher_segment(teacher, y, r, tau, cond)
            return lerp_velocities(w, u_long, v_seg)
        # initial: teacher step first, then the long segment
        r = s + tau
        v_seg = self._teacher_segment(teacher, x, s, tau, cond)
        y = x + broadcast_time(tau, x) * v_seg
        u_long = self._long_segment(student, ema, teacher, y, r, t, cond)
        return lerp_velocities(1.0 - w, v_seg, u_long)

    def __call__(self, student, teacher, batch: TrainBatch, ema=None) -> ObjectiveOutput:
        if self.options.reading == "ema_only":
            return self._ema_only(student, teacher, batch, ema)
        o = self.options
        x, s, t, cond = batch.x_s, batch.s, batch.t, batch.cond
        off = t > s
        target = self.target(student, teacher, batch, ema)
        if o.initial_on_all:
            # one forward for (s, t) and (s, s) together
            n = x.shape[0]
            cond2 = repeat_cond(cond, 2)
            u_all = student(torch.cat([x, x]), torch.cat([s, s]), torch.cat([t, s]), cond2)
            u, u_diag = u_all[:n], u_all[n:]
            with torch.no_grad():
                v_s = teacher.velocity(x, s, cond)
            init = per_sample_mse(u_diag, v_s)
        else:
            u = student(x, s, t, cond)
            init = None
        residual = per_sample_mse(u, target)
        term_loss = masked_mean(residual, off)
        diag_loss = masked_mean(residual, ~off)
        terminal = residual * (t - s) ** o.span_power if o.span_power else residual
        per_sample = torch.where(off, o.lambda_terminal * terminal, o.lambda_initial * residual)
        if init is not None:
            per_sample = per_sample + o.lambda_initial * init * off
            init_loss = (diag_loss * (~off).sum() + (init * off).sum()) / x.shape[0]
        else:
            init_loss = diag_loss
        if o.adaptive_p:
            per_sample = normalised_adaptive_weight(per_sample, o.adaptive_p, o.adaptive_c) * per_sample
        loss = per_sample.mean()
        return ObjectiveOutput(loss, per_sample.detach(), {
            "terminal": term_loss.item(), "initial": init_loss.item(),
        })

    def _ema_only(self, student, teacher, batch, ema):
        o = self.options
        x, s, t, cond = batch.x_s, batch.s, batch.t, batch.cond
        off = t > s
        tau = self._tau(s, t)
        r = torch.where(off, t - tau, s)
        n = x.shape[0]
        # one forward through the (possibly DDP-wrapped) student: (s, t), (s, r), (s, s)
        u_all = student(torch.cat([x, x, x]), torch.cat([s, s, s]), torch.cat([t, r, s]), repeat_cond(cond, 3))
        u_t, u_r, u_diag = u_all[:n], u_all[n:2 * n], u_all[2 * n:]
        phi_t = x + broadcast_time(t - s, x) * u_t
        y = x + broadcast_time(r - s, x) * u_r
        if not o.grad_through_intermediate:
            y = y.detach()
        with torch.no_grad():
            target_model = ema if (o.target_model == "ema" and ema is not None) else student
            u_target = target_model(y.detach(), r, t, cond)
            v_s = teacher.velocity(x, s, cond)
        gap = torch.where(off, t - r, torch.ones_like(t))
        u_seg = (phi_t - y) / broadcast_time(gap, x)
        term = per_sample_mse(u_seg, u_target)
        init = per_sample_mse(u_diag, v_s)
        per_sample = o.lambda_terminal * term * off + o.lambda_initial * init
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {
            "terminal": masked_mean(term, off).item(), "initial": init.mean().item(),
        })

