"""The teacher interface every objective and sampler sees."""

from __future__ import annotations

import torch
from torch import nn


class Teacher(nn.Module):
    """A frozen velocity field in the package convention (MATH.md section 1).

    ``velocity(x, t, cond)``: ``x`` ``(B, *data_shape)``, ``t`` ``(B,)`` in
    [0, 1] with 0 = noise; returns ``E[x1 - x0 | x_t = x]`` of shape ``x``.
    """

    name: str = "teacher"
    data_shape: tuple[int, ...] = ()
    sigma0: float = 1.0
    #: ``sigma`` shift of the teacher's scheduler (1.0 = none); the sampling grid follows it
    shift: float = 1.0
    #: "image" (sample grids) or "points" (2-D scatter)
    kind: str = "image"

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample_noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return self.sigma0 * torch.randn((n, *self.data_shape), generator=generator, device=device)

    def describe(self) -> dict:
        return {"name": self.name, "data_shape": list(self.data_shape), "shift": self.shift}
