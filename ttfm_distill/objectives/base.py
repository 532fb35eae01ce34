"""What every objective takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..convention import broadcast_time
from ..sampling import flow_map  # noqa: F401 - the objectives' phi; it lives with the samplers


@dataclass
class TrainBatch:
    """One training batch.

    ``x_s``: ``(B, *shape)`` points of the interpolant at times ``s``;
    ``s``, ``t``: ``(B,)`` with ``0 <= s <= t <= 1`` (``s == t`` on the
    diagonal); ``cond``: conditioning inputs or ``None``; ``generator``:
    the seeded generator for any extra draws the objective makes.
    """

    x_s: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor
    cond: dict | None = None
    generator: torch.Generator | None = None
    #: extra rows supervised by stored teacher solves (objectives/trajectory.py), or ``None``
    trajectory: object | None = None

    def split(self, n: int) -> list["TrainBatch"]:
        """``n`` equal consecutive slices (gradient accumulation); they share the generator."""
        if n == 1:
            return [self]
        trajectories = self.trajectory.split(n) if self.trajectory is not None else [None] * n
        size = self.x_s.shape[0] // n
        if size * n != self.x_s.shape[0]:
            raise ValueError(f"a batch of {self.x_s.shape[0]} does not split into {n} equal micro-batches")
        conds = split_cond(self.cond, size, n)
        return [TrainBatch(x, s, t, c, self.generator, tr)
                for x, s, t, c, tr in zip(self.x_s.split(size), self.s.split(size), self.t.split(size), conds,
                                          trajectories)]


@dataclass
class ObjectiveOutput:
    """``loss``: scalar to minimise; ``per_sample``: ``(B,)`` detached; ``metrics``: floats to log."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    metrics: dict = field(default_factory=dict)


def split_cond(cond: dict | None, size: int, n: int) -> list[dict | None]:
    """``n`` consecutive slices of ``size`` rows of every tensor of ``cond`` (non-tensors shared)."""
    if not cond:
        return [cond] * n
    pieces = [v.split(size) if torch.is_tensor(v) else [v] * n for v in cond.values()]
    return [dict(zip(cond, vals)) for vals in zip(*pieces)]


def repeat_cond(cond: dict | None, k: int) -> dict | None:
    """Tile every tensor of ``cond`` ``k`` times along the batch (for concatenated evaluations)."""
    if not cond:
        return cond
    return {key: (torch.cat([v] * k) if torch.is_tensor(v) else v) for key, v in cond.items()}


def select_cond(cond: dict | None, rows: torch.Tensor) -> dict | None:
    """The ``rows`` (indices, or a ``(B,)`` bool mask) of every tensor of ``cond`` (batch-major)."""
    if not cond:
        return cond
    return {key: (v[rows] if torch.is_tensor(v) else v) for key, v in cond.items()}


def cat_conds(*conds: dict | None) -> dict | None:
    """Concatenate conditioning dicts along the batch (non-tensors taken from the first)."""
    if not conds or not conds[0]:
        return conds[0] if conds else None
    return {key: (torch.cat([c[key] for c in conds]) if torch.is_tensor(v) else v) for key, v in conds[0].items()}


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over all non-batch dimensions: ``(B,)``."""
    return (a - b).float().pow(2).flatten(1).mean(1)


def adaptive_weight(residual: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """MeanFlow's robust per-sample weight ``sg[1 / (residual + c)^p]`` (``p = 0``: all ones).

    With ``p = 1`` a sample's gradient is that of ``log(residual + c)``: large residuals, such as
    a target evaluated where the student's own output has wandered off the data, stop dominating.
    """
    if p == 0:
        return torch.ones_like(residual)
    return 1.0 / (residual.detach() + c).pow(p)


def check_adaptive_options(name: str, p: float, c: float) -> None:
    if p < 0 or c <= 0:
        raise ValueError(f"{name}: need adaptive_p >= 0 and adaptive_c > 0")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty, keeping the graph)."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def lerp_velocities(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(1 - w) * a + w * b`` with ``w`` ``(B,)`` broadcast over ``a``."""
    w = broadcast_time(w, a)
    return (1.0 - w) * a + w * b


def check_derivative_options(name: str, derivative: str, fd_step: float) -> None:
    """The time-derivative options shared by LFMD, LSD and MeanFlow."""
    if derivative not in ("jvp", "fd"):
        raise ValueError(f"{name}: derivative must be 'jvp' or 'fd'")
    if not 0 < fd_step < 0.5:
        raise ValueError(f"{name}: fd_step must be in (0, 0.5)")


class Objective:
    """Base class. Subclasses set ``name`` and an ``Options`` dataclass.

    ``needs_ema``: whether :meth:`__call__` uses the EMA student.
    """

    name: str = ""
    needs_ema: bool = False
    #: whether off-diagonal pairs see the teacher; if not, the teacher enters only
    #: through diagonal pairs and a run needs ``diagonal_fraction > 0``
    teacher_off_diagonal: bool = True
    #: whether :meth:`__call__` calls the student with gradients exactly once (outside any ``torch.func``
    #: transform): extra supervised rows may then ride in that call (objectives/trajectory.py, JoinedForward)
    one_gradient_forward: bool = False

    @dataclass
    class Options:
        pass

    #: the fraction of diagonal pairs (s == t) a run uses when ``diagonal_fraction`` is not set
    default_diagonal_fraction: float = 0.25

    def __init__(self, **options):
        from ..config import check_types
        from ..errors import ConfigError

        if not isinstance(options, dict):
            raise ConfigError(f"loss_options must be a table of KEY=VALUE, got {options!r}")
        known = {f.name for f in fields(self.Options)}
        unknown = set(options) - known
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)} for loss {self.name!r}; known: "
                              f"{', '.join(sorted(known))}")
        check_types(options, {f.name: f.type for f in fields(self.Options)}, f"{self.name} option")
        self.options = self.Options(**options)
        try:
            self.validate()
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"loss {self.name}: {e}") from None

    def validate(self) -> None:
        pass

    @property
    def uses_jvp(self) -> bool:
        """Whether a step takes a forward-mode ``torch.func.jvp`` (the planner does not count those)."""
        return False

    def __call__(self, student, teacher, batch: TrainBatch, ema=None) -> ObjectiveOutput:
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name, **{f.name: getattr(self.options, f.name) for f in fields(self.Options)}}


# ---------------------------------------------------------------- shared pieces --------------------------------------
def split_rows(off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the off-diagonal and diagonal rows."""
    return off.nonzero().squeeze(1), (~off).nonzero().squeeze(1)


def scatter_rows(n: int, idx_a: torch.Tensor, a: torch.Tensor, idx_b: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A ``(n,)`` tensor with ``a`` at rows ``idx_a`` and ``b`` at rows ``idx_b`` (differentiable)."""
    out = torch.zeros(n, dtype=a.dtype, device=a.device)
    return out.index_copy(0, idx_a, a).index_copy(0, idx_b, b.to(a.dtype))


def mean_or_zero(v: torch.Tensor) -> float:
    return v.mean().item() if v.numel() else 0.0


def time_derivative_jvp(student, x, s, t, cond=None):
    """``(phi(x, s, t), d/dt phi(x, s, t))`` by forward-mode AD."""
    return torch.func.jvp(lambda tt: flow_map(student, x, s, tt, cond), (t,), (torch.ones_like(t),))


def fd_window(s: torch.Tensor, t: torch.Tensor, h: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)``: the finite-difference window around ``t`` kept inside ``[s, 1]`` (backwards at s == t == 1)."""
    hi = torch.clamp(t + h, max=1.0)
    lo = torch.maximum(t - h, s)
    lo = torch.where(hi - lo <= 0, hi - h, lo)
    return lo, hi


def fd_from_window(x, s, t, lo, hi, u_hi, u_lo):
    """``(phi(x, s, t), d/dt phi(x, s, t))`` from the student's average velocities at ``hi`` and ``lo``.

    ``phi`` at ``t`` is interpolated between the two (second-order accurate); the one finite difference
    every objective uses.
    """
    p_hi = x + broadcast_time(hi - s, x) * u_hi
    p_lo = x + broadcast_time(lo - s, x) * u_lo
    w = broadcast_time((t - lo) / (hi - lo), x)
    return p_lo + w * (p_hi - p_lo), (p_hi - p_lo) / broadcast_time(hi - lo, x)


def time_derivative_fd(student, x, s, t, cond=None, h: float = 1e-3):
    """``(phi(x, s, t), d/dt phi(x, s, t))`` by a finite difference inside ``[s, 1]`` (one student call)."""
    lo, hi = fd_window(s, t, h)
    u_hi, u_lo = student(torch.cat([x, x]), torch.cat([s, s]), torch.cat([hi, lo]), repeat_cond(cond, 2)).chunk(2)
    return fd_from_window(x, s, t, lo, hi, u_hi, u_lo)
