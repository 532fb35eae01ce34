"""The one path that builds a training batch (the trainer's, the benchmarks', the tests'): data, noise, time pairs,
per-sample guidance scales and the trajectory rows on the pool's stored solves, every draw from one generator,
in a fixed order, so a batch is a function of (seed, rank, step) and a resumed run draws what it would have drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .convention import interpolate
from .objectives.base import TrainBatch
from .objectives.timesampling import grid_pairs, sample_time_pairs


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator for every draw of (seed, rank, step)."""
    key = (int(seed) * 1_000_003 + int(rank)) * 1_000_000_007 + int(step)
    return torch.Generator().manual_seed(key % (2**63 - 1))


def cond_to(cond: dict | None, device) -> dict | None:
    """The conditioning's tensors on ``device`` (``None`` for none)."""
    if not cond:
        return None
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cond.items()}


@dataclass(frozen=True)
class BatchPath:
    """How a run's batches are drawn.

    ``data``: a data source (``sample(n, generator) -> (x1, cond)``; a data-free pool also gives
    ``trajectories`` and ``trajectory_rows``). ``trajectory_rows``: how many of a batch's rows ride on the pool's
    stored solves (``preflight.trajectory_rows``), their pairs drawn with ``trajectory_pairs``
    (``(time_sampling, dyadic_levels)``). ``guidance_range``: one guidance scale per sample, uniform in it; the
    trajectory rows are at ``default_guidance``, the scale the pool was solved at.
    """

    teacher: object
    data: object
    time_sampling: str = "mixed"
    diagonal_fraction: float = 0.0
    dyadic_levels: int = 4
    guidance_range: tuple[float, float] | None = None
    default_guidance: float = 1.0
    trajectory_rows: int = 0
    trajectory_pairs: tuple[str, int] = ("uniform", 0)
    device: torch.device | str = "cpu"

    @classmethod
    def from_run(cls, cfg, teacher, data, device="cpu") -> "BatchPath":
        """The path of a resolved run ``cfg`` (a ``config.RunConfig``)."""
        from .preflight import trajectory_rows

        return cls(teacher, data, cfg.time_sampling, float(cfg.diagonal_fraction), int(cfg.dyadic_levels),
                   tuple(cfg.guidance_range) if cfg.guidance_range is not None else None, cfg.default_guidance(),
                   trajectory_rows(cfg), cfg.trajectory_pairs(), device)

    def draw(self, batch_size: int, generator: torch.Generator) -> tuple[TrainBatch, torch.Tensor]:
        """``(batch, its data rows x1)`` of ``batch_size`` rows in all (the trajectory rows included)."""
        g, m = generator, self.trajectory_rows
        n = batch_size - m
        x1, cond = self.data.sample(n, g)
        x0 = self.teacher.sample_noise(n, generator=g)
        s, t = sample_time_pairs(n, self.time_sampling, self.diagonal_fraction, self.dyadic_levels, generator=g)
        if self.guidance_range is not None:  # one guidance scale per sample, seen by teacher and student
            lo, hi = self.guidance_range
            cond = {**(cond or {}), "cfg_scale": lo + (hi - lo) * torch.rand(n, generator=g)}
        d = self.device
        batch = TrainBatch(interpolate(x0, x1, s).to(d), s.to(d), t.to(d), cond_to(cond, d), g,
                           self._trajectory(m, g) if m else None)
        return batch, x1

    def __call__(self, batch_size: int, generator: torch.Generator) -> TrainBatch:
        return self.draw(batch_size, generator)[0]

    def _trajectory(self, m: int, g: torch.Generator):
        """``m`` rows on the pool's stored solves: grid pairs drawn like the objective's pairs (no diagonal)."""
        from .objectives.trajectory import TrajectoryRows

        rows = torch.randint(0, self.data.trajectories.shape[0], (m,), generator=g)
        mode, levels = self.trajectory_pairs
        su, tu = sample_time_pairs(m, mode, 0.0, levels, generator=g)
        i, j = grid_pairs(su, tu, self.data.trajectories.shape[1] - 1)
        x_s, x_t, s, t, cond = self.data.trajectory_rows(rows, i, j)
        if self.guidance_range is not None:  # the pool was solved at the default scale: so are its targets
            cond = {**(cond or {}), "cfg_scale": torch.full((m,), self.default_guidance)}
        d = self.device
        return TrajectoryRows(x_s.to(d), x_t.to(d), s.to(d), t.to(d), cond_to(cond, d))
