"""Draw the ``(s, t)`` pairs of a training batch."""

from __future__ import annotations

import torch

from ..config import TIME_SAMPLINGS  # noqa: F401 - re-exported: the modes this module draws


def sample_time_pairs(n: int, mode: str = "uniform", diagonal_fraction: float = 0.25, max_level: int = 4,
                      generator: torch.Generator | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(s, t)``, each ``(n,)``, with ``0 <= s <= t <= 1``.

    * ``uniform``: ``(s, t)`` uniform on the triangle ``s <= t``;
    * ``dyadic``: a jump of length ``d = 2**-k``, ``k`` uniform in ``0..max_level``,
      starting on the grid ``s = j * d`` (the pairs an ``N = 2**k``-step uniform
      sampler uses);
    * ``mixed``: half of each.

    The first ``round(diagonal_fraction * n)`` pairs are put on the diagonal
    (``t = s``, ``s`` uniform in [0, 1)).
    """
    if mode not in TIME_SAMPLINGS:
        raise ValueError(f"time sampling must be one of {TIME_SAMPLINGS}, got {mode!r}")
    u = torch.rand(2, n, generator=generator)
    s, t = torch.minimum(u[0], u[1]), torch.maximum(u[0], u[1])
    if mode in ("dyadic", "mixed"):
        k = torch.randint(0, max_level + 1, (n,), generator=generator)
        d = 2.0 ** (-k.float())
        j = torch.floor(torch.rand(n, generator=generator) * (2.0 ** k.float()))
        ds, dt = j * d, (j + 1) * d
        pick = torch.ones(n, dtype=torch.bool) if mode == "dyadic" else torch.rand(n, generator=generator) < 0.5
        s, t = torch.where(pick, ds, s), torch.where(pick, dt, t)
    n_diag = int(round(diagonal_fraction * n))
    if n_diag:
        s[:n_diag] = torch.rand(n_diag, generator=generator)
        t[:n_diag] = s[:n_diag]
    return s.to(device), t.to(device)


def grid_pairs(s: torch.Tensor, t: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(i, j)``, ``0 <= i < j <= steps``, of the grid points nearest to the pairs ``s <= t``.

    ``s`` and ``t`` are fractions of a ``steps``-step grid (before any shift); a pair that rounds to one
    point becomes the step from it (or, at the end, the last step).
    """
    i = torch.round(s * steps).long().clamp(0, steps - 1)
    j = torch.maximum(torch.round(t * steps).long(), i + 1).clamp(max=steps)
    return i, j
