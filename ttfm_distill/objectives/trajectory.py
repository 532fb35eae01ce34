"""Trajectory supervision: pairs on the data-free pool's own teacher solves (docs/quality.md, "Trajectory rows
and the pool's Heun solver").

The pool integrates the teacher from known noises; keeping every state of each solve gives, for a pair
``(s, t)`` of its time grid, the exact (up to the pool's solver) average velocity
``(x_t - x_s) / (t - s)`` at no teacher cost during training.  A fraction of each batch
(``trajectory_fraction``) is such rows; :class:`TrajectorySupervised` adds their squared error,
weighted by ``trajectory_weight``, to any objective's loss on the other rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..convention import broadcast_time
from .base import Objective, ObjectiveOutput, TrainBatch, cat_conds, per_sample_mse, split_cond


@dataclass
class TrajectoryRows:
    """``m`` rows of stored solves: ``x_s`` at times ``s``, ``x_t`` at ``t > s``, conditioning ``cond``."""

    x_s: torch.Tensor
    x_t: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor
    cond: dict | None = None

    def __len__(self) -> int:
        return self.x_s.shape[0]

    def target(self) -> torch.Tensor:
        """The solve's average velocity over each pair."""
        return (self.x_t - self.x_s) / broadcast_time(self.t - self.s, self.x_s)

    def split(self, n: int) -> list["TrajectoryRows"]:
        size = len(self) // n
        if size * n != len(self):
            raise ValueError(f"{len(self)} trajectory rows do not split into {n} equal micro-batches")
        if n == 1:
            return [self]
        return [TrajectoryRows(*fields, cond) for *fields, cond in
                zip(self.x_s.split(size), self.x_t.split(size), self.s.split(size), self.t.split(size),
                    split_cond(self.cond, size, n))]


def trajectory_loss(student, rows: TrajectoryRows) -> torch.Tensor:
    """Per-row ``|u(x_s, s, t) - (x_t - x_s) / (t - s)|^2``: ``(m,)``."""
    return per_sample_mse(student(rows.x_s, rows.s, rows.t, rows.cond), rows.target())


class JoinedForward:
    """The student, with the trajectory ``rows`` joined to the first gradient-carrying call.

    An objective that declares ``one_gradient_forward`` calls the student with gradients once; that call gets
    the rows appended to its batch, so one forward and one backward serve both (a separate small batch costs
    nearly the per-layer overhead of a full one on a CPU). Calls without gradients pass through. ``rows_out``
    holds the rows' output, or ``None`` if no call joined them (then :func:`trajectory_loss` runs apart).
    """

    def __init__(self, student, rows: TrajectoryRows):
        self.student, self.rows, self.rows_out = student, rows, None

    def __call__(self, x, s, t, cond=None):
        rows = self.rows
        if self.rows_out is not None or not torch.is_grad_enabled() or not _joinable(cond, rows.cond):
            return self.student(x, s, t, cond)
        n = x.shape[0]
        out = self.student(torch.cat([x, rows.x_s.to(x.dtype)]), torch.cat([s, rows.s.to(s.dtype)]),
                           torch.cat([t, rows.t.to(t.dtype)]), cat_conds(cond, rows.cond))
        self.rows_out = out[n:]
        return out[:n]

    def __getattr__(self, name):
        return getattr(self.student, name)


def _joinable(cond: dict | None, rows_cond: dict | None) -> bool:
    """Whether two batches' conditioning concatenate: the same keys, tensors on both sides."""
    if not cond or not rows_cond:
        return not cond and not rows_cond
    return cond.keys() == rows_cond.keys() and all(
        torch.is_tensor(cond[k]) == torch.is_tensor(rows_cond[k]) for k in cond)


class TrajectorySupervised(Objective):
    """``objective`` on a batch's own rows plus ``weight`` times :func:`trajectory_loss` on its trajectory rows.

    The loss is the mean over all rows, so with ``weight = 1`` a trajectory row counts as much as any other.
    Where the objective declares ``one_gradient_forward``, the rows ride in its gradient-carrying student call
    (:class:`JoinedForward`); otherwise they get a forward of their own. Both give the same loss.
    """

    def __init__(self, objective: Objective, weight: float = 1.0):
        self.inner, self.weight = objective, float(weight)
        self.name = objective.name
        self.options = objective.options
        self.needs_ema = objective.needs_ema
        self.teacher_off_diagonal = objective.teacher_off_diagonal
        self.default_diagonal_fraction = objective.default_diagonal_fraction

    def config(self) -> dict:
        return self.inner.config()

    def __call__(self, student, teacher, batch: TrainBatch, ema=None) -> ObjectiveOutput:
        rows = batch.trajectory
        if rows is None or len(rows) == 0:
            return self.inner(student, teacher, batch, ema)
        joined = JoinedForward(student, rows) if self.inner.one_gradient_forward else None
        out = self.inner(joined or student, teacher, batch, ema)
        n, m = batch.x_s.shape[0], len(rows)
        if joined is not None and joined.rows_out is not None:
            traj = per_sample_mse(joined.rows_out, rows.target())
        else:
            traj = trajectory_loss(student, rows)
        loss = (out.loss * n + self.weight * traj.sum()) / (n + m)
        per_sample = torch.cat([out.per_sample, self.weight * traj.detach()])
        return ObjectiveOutput(loss, per_sample, {**out.metrics, "trajectory": traj.mean().item()})
