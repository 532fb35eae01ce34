"""Trajectory supervision: pairs on the data-free pool's own teacher solves (docs/quality.md, "Trajectories").

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
from .base import Objective, ObjectiveOutput, TrainBatch, per_sample_mse, split_cond


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


class TrajectorySupervised(Objective):
    """``objective`` on a batch's own rows plus ``weight`` times :func:`trajectory_loss` on its trajectory rows.

    The loss is the mean over all rows, so with ``weight = 1`` a trajectory row counts as much as any other.
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
        out = self.inner(student, teacher, batch, ema)
        rows = batch.trajectory
        if rows is None or len(rows) == 0:
            return out
        n, m = batch.x_s.shape[0], len(rows)
        traj = trajectory_loss(student, rows)
        loss = (out.loss * n + self.weight * traj.sum()) / (n + m)
        per_sample = torch.cat([out.per_sample, self.weight * traj.detach()])
        return ObjectiveOutput(loss, per_sample, {**out.metrics, "trajectory": traj.mean().item()})
