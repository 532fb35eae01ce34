"""A two-timed MLP for 2-D (vector) teachers, which have no network to copy.

``u(x, s, t)`` from ``x``, ``s`` and ``t - s`` through Fourier features and a
SiLU MLP; the same average-velocity parametrisation as the image student.
Analytic teachers have no weights, so this student starts from random
weights rather than from the teacher.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class MlpFlowMap(nn.Module):
    """``forward(x (B, D), s (B,), t (B,), cond=None) -> u (B, D)``."""

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 4, time_features: int = 16):
        super().__init__()
        self.config = {"dim": dim, "width": width, "depth": depth, "time_features": time_features}
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), time_features // 2)), persistent=False)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * time_features, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def _features(self, v: torch.Tensor) -> torch.Tensor:
        a = v.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        h = torch.cat([x, self._features(s), self._features(t - s)], dim=-1)
        return self.net(h)
