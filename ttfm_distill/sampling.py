"""Samplers: the student's flow-map sampler and the teacher's ODE solvers.

Samplers are plain functions; time grids are built separately
(``t_0 = 0 < ... < t_N = 1`` in the package convention, docs/method.md, Samplers).
"""

from __future__ import annotations

from typing import Callable

import torch

from .convention import broadcast_time, shift_time
from .errors import InputError

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FlowMapFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flow_map(model, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
    """``phi(x, s, t) = x + (t - s) * u(x, s, t)`` for any average-velocity model.

    Call through this (not a method) so a DDP-wrapped student goes through its wrapper.
    """
    return x + broadcast_time(t - s, x) * model(x, s, t, cond)


def student_sampler(student, cond: dict | None = None) -> FlowMapFn:
    """The flow map ``(x, s, t) -> phi(x, s, t)`` of a student, for :func:`sample_flow_map` (no gradients)."""

    @torch.no_grad()
    def phi(x, s, t):
        return flow_map(student, x, s, t, cond)

    return phi


def uniform_time_grid(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """``steps + 1`` times from 0 (noise) to 1 (data), optionally shifted like the teacher's scheduler."""
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    grid = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64)
    return shift_time(grid, shift).to(torch.float32)


#: the time grids a sampler can step on (``time_grid`` setting): ``uniform`` in package time (after the
#: teacher's shift), or ``timesteps``: uniform in the teacher scheduler's discrete timesteps (DDIM's "trailing"
#: spacing), which for a flow scheduler is the same uniform grid
TIME_GRIDS = ("uniform", "timesteps")


def resolve_time_grid(kind: str, io=None) -> str:
    """The grid a sampler of a teacher read through ``io`` steps on for the setting ``kind``: ``timesteps``
    only where the network has discrete timesteps (a diffusion network), else ``uniform`` (the same grid)."""
    if kind not in TIME_GRIDS:
        raise InputError(f"time_grid must be one of {', '.join(TIME_GRIDS)}, got {kind!r}")
    return kind if io is not None and io.discrete_timesteps else "uniform"


def time_grid(steps: int, shift: float = 1.0, kind: str = "uniform", io=None, device=None) -> torch.Tensor:
    """``steps + 1`` times from 0 (noise) to 1 (data) of the grid ``kind`` (one of :data:`TIME_GRIDS`).

    ``timesteps`` with a diffusion ``io`` (:class:`~ttfm_distill.convention.DiffusionIO`): the network
    timesteps ``k_j = K (1 - j / steps) - 1``, ``j < steps``, read as package times (so ``t_1..t_{N-1}`` sit
    where a trailing-spaced DDIM sampler evaluates the network), then the data end ``t = 1``; the first point
    is the noise end ``t = 0`` like every grid, which the network reads at its last timestep ``K - 1`` anyway.
    With a flow ``io`` (or none) the scheduler's timesteps are uniform in sigma: the uniform grid.
    """
    if kind not in TIME_GRIDS:
        raise InputError(f"time_grid must be one of {', '.join(TIME_GRIDS)}, got {kind!r}")
    if kind == "uniform" or io is None or not io.discrete_timesteps:
        return uniform_time_grid(steps, shift, device)
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    return io.timestep_grid(steps).to(device=device, dtype=torch.float32)


def _full(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return value.to(x.device, torch.float32).expand(x.shape[0])


@torch.no_grad()
def sample_flow_map(flow_map: FlowMapFn, x0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``x_{k+1} = phi(x_k, t_k, t_{k+1})``; one network evaluation per step."""
    x = x0
    for k in range(len(grid) - 1):
        x = flow_map(x, _full(x, grid[k]), _full(x, grid[k + 1]))
    return x


@torch.no_grad()
def euler(velocity: VelocityFn, x0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Explicit Euler on the teacher ODE; ``len(grid) - 1`` evaluations."""
    x = x0
    for k in range(len(grid) - 1):
        h = grid[k + 1] - grid[k]
        x = x + h * velocity(x, _full(x, grid[k]))
    return x


@torch.no_grad()
def heun(velocity: VelocityFn, x0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Heun's second-order method; ``2 * (len(grid) - 1)`` evaluations."""
    x = x0
    for k in range(len(grid) - 1):
        h = grid[k + 1] - grid[k]
        v1 = velocity(x, _full(x, grid[k]))
        x_pred = x + h * v1
        v2 = velocity(x_pred, _full(x, grid[k + 1]))
        x = x + 0.5 * h * (v1 + v2)
    return x


@torch.no_grad()
def rk4(velocity: VelocityFn, x0: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Classical Runge-Kutta 4; ``4 * (len(grid) - 1)`` evaluations. The fine reference solver."""
    x = x0
    for k in range(len(grid) - 1):
        t0, t1 = grid[k], grid[k + 1]
        h = t1 - t0
        tm = _full(x, t0 + 0.5 * h)
        k1 = velocity(x, _full(x, t0))
        k2 = velocity(x + 0.5 * h * k1, tm)
        k3 = velocity(x + 0.5 * h * k2, tm)
        k4 = velocity(x + h * k3, _full(x, t1))
        x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


#: the solvers a data-free pool can be built with (``pool_solver``)
POOL_SOLVERS = ("euler", "heun")


def solve_trajectory(velocity: VelocityFn, x0: torch.Tensor, grid: torch.Tensor, solver: str = "euler") -> torch.Tensor:
    """Every state of an Euler or Heun solve: ``(B, len(grid), *x0.shape[1:])``, ``[:, 0]`` is ``x0``.

    Step for step the same arithmetic as :func:`euler` / :func:`heun` on ``grid``, so ``[:, -1]``
    equals their result exactly.
    """
    if solver not in POOL_SOLVERS:
        raise InputError(f"solver must be one of {', '.join(POOL_SOLVERS)}, got {solver!r}")
    step = euler if solver == "euler" else heun
    states = [x0]
    for k in range(len(grid) - 1):
        states.append(step(velocity, states[-1], grid[k:k + 2]))
    return torch.stack(states, 1)


def heun_for_nfe(velocity: VelocityFn, x0: torch.Tensor, nfe: int, shift: float = 1.0) -> torch.Tensor:
    """Heun with at most ``nfe`` evaluations (``nfe // 2`` steps; Euler when ``nfe == 1``)."""
    if nfe < 2:
        return euler(velocity, x0, uniform_time_grid(1, shift))
    return heun(velocity, x0, uniform_time_grid(nfe // 2, shift))


def fine_reference(velocity: VelocityFn, x0: torch.Tensor, steps: int = 64, shift: float = 1.0,
                   batch_size: int | None = None) -> torch.Tensor:
    """The teacher's fine ODE solution from ``x0`` (RK4 on ``steps`` uniform steps)."""
    grid = uniform_time_grid(steps, shift)
    if batch_size is None:
        return rk4(velocity, x0, grid)
    return torch.cat([rk4(velocity, chunk, grid) for chunk in x0.split(batch_size)])
