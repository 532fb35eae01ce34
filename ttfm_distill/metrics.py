"""Sample-quality metrics (docs/method.md, Metrics).

* :func:`flow_map_error`: relative squared error against the teacher's fine ODE solution.
* :func:`histogram_kl`: 2-D KL between the exact target and a histogram of samples.
* :func:`frechet_distance` / :func:`frechet_distance_from_features`: Frechet
  distance between Gaussian fits of feature sets.

All reductions run in float64 and return Python floats.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Range = Sequence[Sequence[float]]

#: Mass added to every cell of a model histogram before the log (then renormalised).
KL_EPS = 1e-10


def flow_map_error(x: torch.Tensor, x_ref: torch.Tensor) -> float:
    """``E|x - x_ref|^2 / E|x_ref|^2`` over a batch.

    ``x``, ``x_ref``: ``(B, *shape)``, the same noise pushed through the
    student and through the reference solver.  Squares are summed over the
    non-batch dimensions and averaged over the batch.
    """
    if x.shape != x_ref.shape:
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs {tuple(x_ref.shape)}")
    x64, r64 = x.detach().to(torch.float64), x_ref.detach().to(torch.float64)
    num = (x64 - r64).pow(2).flatten(1).sum(1).mean()
    den = r64.pow(2).flatten(1).sum(1).mean()
    return float(num / den)


def histogram_edges(bins: int, range: Range, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """``bins + 1`` float64 edges per dimension of ``range`` (``((lo, hi), ...)``)."""
    return [torch.linspace(float(lo), float(hi), bins + 1, dtype=torch.float64, device=device) for lo, hi in range]


def histogram_counts(samples: torch.Tensor, edges: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Counts of ``samples`` (``(N, D)``) on the grid, and how many fell outside it.

    Cells are ``[e_i, e_{i+1})`` except the last, which also holds its right
    edge (numpy's rule).  Non-finite samples count as outside.  Returns
    ``(counts (n_1, ..., n_D) float64, n_outside)``.
    """
    x = samples.detach().to(torch.float64).reshape(samples.shape[0], -1)
    if x.shape[1] != len(edges):
        raise ValueError(f"samples have {x.shape[1]} dims but {len(edges)} edge vectors were given")
    sizes = [len(e) - 1 for e in edges]
    inside = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    flat = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for d, e in enumerate(edges):
        e = e.to(x.device)
        col = x[:, d].contiguous()
        inside &= (col >= e[0]) & (col <= e[-1])
        idx = (torch.bucketize(col, e, right=True) - 1).clamp(0, sizes[d] - 1)
        flat = flat * sizes[d] + idx
    counts = torch.bincount(flat[inside], minlength=math.prod(sizes)).to(torch.float64)
    return counts.reshape(sizes), int((~inside).sum())


def _kl_with_overflow(p_cells: torch.Tensor, q_counts: torch.Tensor, q_outside: int, eps: float) -> float:
    """``KL(p || q)`` over the grid cells plus one overflow cell (everything outside the grid).

    ``p_cells``: probabilities on the grid (the overflow cell gets
    ``1 - sum``); ``q``: sample counts, normalised by the total count, plus
    ``eps`` per cell, renormalised.
    """
    p = torch.cat([p_cells.reshape(-1), (1.0 - p_cells.sum()).clamp_min(0.0).reshape(1)])
    q = torch.cat([q_counts.reshape(-1), torch.tensor([float(q_outside)], dtype=torch.float64, device=q_counts.device)])
    q = q / q.sum()
    q = (q + eps) / (1.0 + eps * q.numel())
    keep = p > 0
    return float((p[keep] * (torch.log(p[keep]) - torch.log(q[keep]))).sum())


def histogram_kl(
    samples: torch.Tensor,
    teacher,
    bins: int = 50,
    range: Range | None = None,
    eps: float = KL_EPS,
) -> float:
    """``KL(p_data || p_model)`` between the exact target and a histogram of ``samples``.

    ``samples``: ``(N, 2)`` (any ``D`` works; the grid has ``bins^D`` cells).
    ``teacher``: an analytic teacher (``ttfm_distill.teachers.analytic``)
    providing exact cell masses (``bin_masses``) and a default ``kl_range``.

    Grid: ``bins`` equal cells per axis on ``range`` (default
    ``teacher.kl_range``; ``[-4, 4]^2`` for the checkerboard, ``[-5.5, 5.5]^2``
    for the 8-Gaussian ring), plus one overflow cell for everything outside,
    so both sides are proper distributions over a partition of the plane.
    ``p_data`` is the exact target probability of each cell (exact integral
    of the density: overlap areas for the checkerboard, Gaussian CDFs for
    mixtures).  ``p_model`` is counts / N plus ``eps`` per cell, renormalised.

    Direction: data-to-model (mode-covering): a model that misses target mass
    is penalised heavily, mass in empty target cells only through the
    normalisation.  The floor for exact data samples is about
    ``(#occupied cells - 1) / (2 N)``, roughly 0.01 for 64k checkerboard
    samples on the default grid.
    """
    if range is None:
        range = teacher.kl_range
    edges = histogram_edges(bins, range)
    counts, outside = histogram_counts(samples, edges)
    p = teacher.bin_masses(edges).to(device=counts.device, dtype=torch.float64)
    return _kl_with_overflow(p, counts, outside, eps)


def histogram_kl_between(
    samples_a: torch.Tensor,
    samples_b: torch.Tensor,
    bins: int = 50,
    range: Range | None = None,
    eps: float = KL_EPS,
) -> float:
    """``KL(hist_a || hist_b)`` for two sample sets ``(N_a, D)``, ``(N_b, D)``.

    ``samples_a`` plays the data role (unsmoothed, ``0 log 0 = 0``),
    ``samples_b`` the model (``eps`` per cell, renormalised).  Same grid and
    overflow cell as :func:`histogram_kl`; ``range`` defaults to the bounding
    box of ``samples_a``.
    """
    if range is None:
        a = samples_a.detach().to(torch.float64)
        range = list(zip(a.min(0).values.tolist(), a.max(0).values.tolist()))
    edges = histogram_edges(bins, range)
    counts_a, out_a = histogram_counts(samples_a, edges)
    counts_b, out_b = histogram_counts(samples_b, edges)
    n_a = counts_a.sum() + out_a
    p = counts_a / n_a
    # The overflow probability of a is 1 - p.sum() = out_a / n_a, as _kl_with_overflow assumes.
    return _kl_with_overflow(p, counts_b, out_b, eps)


def _sqrtm_psd(mat: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative eigenvalues clipped)."""
    evals, evecs = torch.linalg.eigh(0.5 * (mat + mat.T))
    return (evecs * evals.clamp_min(0.0).sqrt()) @ evecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein squared) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``mu``: ``(F,)``; ``sigma``: ``(F, F)`` symmetric PSD (tensors or arrays).
    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``, with
    both square roots from ``eigh`` of symmetric matrices (no complex
    ``sqrtm``, no scipy).
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    s1, s2 = s1.reshape(mu1.numel(), mu1.numel()), s2.reshape(mu2.numel(), mu2.numel())
    root1 = _sqrtm_psd(s1)
    middle = root1 @ s2 @ root1
    evals = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp_min(0.0)
    value = (mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * evals.sqrt().sum()
    return max(float(value), 0.0)


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of ``features`` ``(N, F)`` (float64)."""
    f = torch.as_tensor(features).detach().to(torch.float64).reshape(features.shape[0], -1)
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / max(f.shape[0] - 1, 1)


def frechet_distance_from_features(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """:func:`frechet_distance` between Gaussian fits of ``f1`` ``(N1, F)`` and ``f2`` ``(N2, F)``."""
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))


#: a pixel sample is out of range when some |value| exceeds this (data in [-1, 1]; a little overshoot is normal)
PIXEL_RANGE = 1.5


def out_of_range(x: torch.Tensor, bound: float = PIXEL_RANGE) -> dict:
    """Rows of ``x`` (pixel samples, data in [-1, 1]) with a non-finite value or some ``|value| > bound``."""
    flat = x.detach().reshape(x.shape[0], -1).float()
    bad = (~torch.isfinite(flat)).any(1) | (flat.abs() > bound).any(1)
    finite = flat[torch.isfinite(flat)]
    return {"rows": int(bad.sum()), "fraction": float(bad.float().mean()) if len(flat) else 0.0,
            "max_abs": float(finite.abs().max()) if finite.numel() else float("nan"), "bound": bound}


def knn_radii(features: torch.Tensor, k: int = 5) -> torch.Tensor:
    """``(N,)``: each row's distance to its ``k``-th nearest other row (``k`` capped at ``N - 1``)."""
    d = torch.cdist(features, features)
    k = max(1, min(k, features.shape[0] - 1))
    if features.shape[0] < 2:
        return torch.zeros(features.shape[0], dtype=features.dtype)
    return d.kthvalue(k + 1, dim=1).values  # the 0 to itself comes first


def coverage(samples: torch.Tensor, reference: torch.Tensor, k: int = 5, radii: torch.Tensor | None = None) -> float:
    """Coverage (Naeem et al. 2020): the fraction of ``reference`` points with at least one of ``samples`` inside
    their ``k``-nearest-neighbour ball among the reference. A collapsed sampler covers few of the reference's
    modes; a sample of the reference's own law covers most of it (about 0.95-0.97 at k = 5)."""
    radii = knn_radii(reference, k) if radii is None else radii
    nearest = torch.cdist(reference, samples).min(dim=1).values
    return float((nearest <= radii).double().mean())


def class_entropy(logits: torch.Tensor, num_classes: int) -> float:
    """The entropy (nats) of the histogram of predicted classes: ``log(num_classes)`` when every class is
    equally frequent, 0 when every sample falls in one class."""
    counts = torch.bincount(logits.argmax(1), minlength=num_classes).double()
    p = counts / counts.sum()
    return float(-(p[p > 0] * p[p > 0].log()).sum())
