"""Teachers whose velocity field is known exactly (2-D and n-D toys).

Everything here uses the package convention (docs/method.md, Time convention): ``t = 0`` is
noise, ``t = 1`` is data, ``x_t = (1 - t) x0 + t x1`` with
``x0 ~ N(0, sigma0^2 I)``, and the teacher velocity is
``v(x, t) = E[x1 - x0 | x_t = x]``.

Numerics.  Every teacher computes internally in float64 and returns the dtype
of its input, so float32 callers get a correctly rounded float32 answer.  The
velocity is always formed as ``v = E[x1 | x_t] - E[x0 | x_t]`` with both
posterior means computed directly, never as ``(E[x1 | x_t] - x_t) / (1 - t)``,
which cancels catastrophically near ``t = 1``.  The teachers are meant to be
evaluated without gradients (they are the stop-gradient targets of the
losses).

* :class:`GaussianMixture` is exact and finite on the closed interval
  ``t in [0, 1]`` (component stds must be positive).
* :class:`Checkerboard` is exact on ``t in [0, 1 - min_one_minus_t]``; at
  ``t = 0`` it uses the analytic limit (posterior = prior), with no clamp.
  Near ``t = 1`` the true field is singular *outside* the support
  (``|v| ~ dist(x, support) / (1 - t)``), so times above
  ``1 - min_one_minus_t`` (default ``1e-4``) are evaluated at that time.
  Inside the support ``v(x, 1) = x`` and the clamp changes ``v`` by about
  ``1e-4 |x|``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.special import log_ndtr

from ..config import EXACT_TEACHERS
from ..convention import broadcast_time
from .base import Teacher
from ..errors import InputError, TTFMError

Range = tuple[tuple[float, float], ...]

_LN2 = math.log(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------
# Stable helpers for the standard normal on an interval [a, b].
# --------------------------------------------------------------------------


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(d))`` for ``d <= 0`` (Maechler's two-branch form)."""
    d = d.clamp(max=0.0)
    return torch.where(d > -_LN2, torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a <= b``, accurate in both tails.

    When both ends lie in the upper tail the reflection
    ``Phi(b) - Phi(a) = Phi(-a) - Phi(-b)`` keeps the arguments of ``log_ndtr``
    non-positive, so nothing rounds to ``1 - 1``.
    """
    flip = a > 0
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    log_hi = log_ndtr(hi)
    return log_hi + _log1mexp(log_ndtr(lo) - log_hi)


def _normal_log_pdf(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * z * z - _LOG_SQRT_2PI


def truncated_normal_stats(
    a: torch.Tensor, b: torch.Tensor, small: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics of a standard normal restricted to ``[a, b]`` (same shapes, ``a <= b``).

    Returns ``(log_mean_density, mean, rel_pos)``:

    * ``log_mean_density = log((Phi(b) - Phi(a)) / (b - a))``, the log of the
      average density on the interval; finite as ``b - a -> 0`` (it tends to
      ``log phi(a)``), which is what makes posterior weights well defined at
      ``t = 0``;
    * ``mean = E[z | a < z < b]``;
    * ``rel_pos = (mean - a) / (b - a)`` in ``[0, 1]``.

    For a short interval, ``(b - a) * (1 + |midpoint|) < small``, a Taylor
    expansion about the midpoint replaces the closed forms, whose
    differences cancel there (truncation error below ``1e-10``).
    """
    width = b - a
    mid = 0.5 * (a + b)
    short = width * (1.0 + mid.abs()) < small
    # The closed form is evaluated on a harmless interval where the series is
    # used, so the discarded branch never divides 0 by 0.
    b_ = torch.where(short, a + 1.0, b)
    w_ = b_ - a
    log_z = log_ndtr_diff(a, b_)
    log_pa, log_pb = _normal_log_pdf(a), _normal_log_pdf(b_)
    # (phi(a) - phi(b)) / Z, factoring out the larger density so that the
    # exponent of expm1 is <= 0 and the prefactor does not underflow to 0 * inf.
    a_big = log_pa >= log_pb
    log_big = torch.where(a_big, log_pa, log_pb)
    log_small = torch.where(a_big, log_pb, log_pa)
    sign = torch.where(a_big, 1.0, -1.0).to(a)
    mean_exact = sign * torch.exp(log_big - log_z) * -torch.expm1(log_small - log_big)
    rel_exact = ((mean_exact - a) / w_).clamp(0.0, 1.0)
    log_md_exact = log_z - torch.log(w_)
    # Series about the midpoint c: density ~ phi(c) exp(-c u - u^2 / 2).
    mean_series = mid - mid * width * width / 12.0
    rel_series = 0.5 - mid * width / 12.0
    log_md_series = _normal_log_pdf(mid) + width * width * (mid * mid - 1.0) / 24.0
    return (
        torch.where(short, log_md_series, log_md_exact),
        torch.where(short, mean_series, mean_exact),
        torch.where(short, rel_series, rel_exact),
    )


def _sample_device(generator: torch.Generator | None, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _time_column(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """``t`` as a float64 ``(B, 1)`` column for a ``(B, D)`` batch ``x``."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return broadcast_time(t, x).to(torch.float64)


# --------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------


class AnalyticTeacher(Teacher):
    """A data distribution with an exact velocity field (a :class:`~.base.Teacher`).

    Attributes: ``name``; ``data_shape`` (``(D,)``); ``sigma0`` (noise std);
    ``kind = "points"``; ``kl_range`` (``((xmin, xmax), (ymin, ymax), ...)``,
    the histogram range used by :func:`ttfm_distill.metrics.histogram_kl`).
    Calling the module is the same as :meth:`velocity`.  Samplers draw on
    ``device`` (default: the generator's device, else CPU), like the base
    class, so a CPU generator works whatever device the teacher sits on.
    """

    name: str = "analytic"
    data_shape: tuple[int, ...] = (2,)
    sigma0: float = 1.0
    kind: str = "points"
    kl_range: Range = ((-4.0, 4.0), (-4.0, 4.0))

    @property
    def device(self) -> torch.device:
        for buf in self.buffers():
            return buf.device
        return torch.device("cpu")

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        return self.velocity(x, t, cond)

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        """Exact ``E[x1 - x0 | x_t = x]``; ``x``: ``(B, D)``, ``t``: ``(B,)`` or scalar -> ``(B, D)``.

        ``cond`` is accepted for the :class:`~.base.Teacher` interface and ignored.
        """
        raise NotImplementedError

    def sample_data(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``n`` exact samples of ``x1``: ``(n, D)``."""
        raise NotImplementedError

    def sample_noise(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``n`` samples of ``x0 ~ N(0, sigma0^2 I)``: ``(n, D)``."""
        z = torch.randn((n, *self.data_shape), generator=generator, device=_sample_device(generator, device), dtype=dtype)
        return self.sigma0 * z

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of the data at ``x``: ``(n, D)`` -> ``(n,)`` (``-inf`` off the support)."""
        raise NotImplementedError

    def bin_masses(self, edges: Sequence[torch.Tensor], subdivisions: int = 8) -> torch.Tensor:
        """Data probability of each cell of a rectilinear grid.

        ``edges``: ``D`` increasing 1-D tensors (``n_d + 1`` edges each).
        Returns float64 ``(n_1, ..., n_D)``.  This default integrates
        :meth:`log_density` with a ``subdivisions^D`` midpoint rule per cell;
        subclasses override it with exact integrals.
        """
        fine, vols = [], []
        for e in edges:
            e = torch.as_tensor(e, dtype=torch.float64, device=self.device)
            frac = (torch.arange(subdivisions, dtype=torch.float64, device=e.device) + 0.5) / subdivisions
            width = (e[1:] - e[:-1])[:, None]  # (n, 1)
            fine.append((e[:-1, None] + frac * width).reshape(-1))
            vols.append((width / subdivisions).expand(-1, subdivisions))  # (n, sub)
        grid = torch.stack(torch.meshgrid(*fine, indexing="ij"), dim=-1)
        mass = torch.exp(self.log_density(grid.reshape(-1, len(edges))))
        shape = [m for v in vols for m in v.shape]  # (n_1, sub, n_2, sub, ...)
        mass = mass.reshape(shape)
        for dim, v in enumerate(vols):
            view = [1] * len(shape)
            view[2 * dim], view[2 * dim + 1] = v.shape
            mass = mass * v.reshape(view)
        return mass.sum(dim=tuple(range(1, 2 * len(edges), 2)))


def _product_masses(weights: torch.Tensor, per_dim: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_k weights[k] * outer_d per_dim[d][k]``; ``weights``: ``(K,)``, ``per_dim[d]``: ``(K, n_d)``."""
    out = weights
    for m in per_dim:
        out = out.unsqueeze(-1) * m.reshape(m.shape[0], *([1] * (out.ndim - 1)), m.shape[1])
    return out.sum(0)


# --------------------------------------------------------------------------
# Gaussian mixtures
# --------------------------------------------------------------------------


class GaussianMixture(AnalyticTeacher):
    """Mixture of isotropic Gaussians ``sum_k w_k N(mu_k, c_k^2 I)``.

    ``means``: ``(K, D)``; ``stds``: ``(K,)`` (all ``> 0``); ``weights``: ``(K,)``
    (normalised here).

    Given component ``k``, ``x_t ~ N(t mu_k, s_k(t)^2 I)`` with
    ``s_k(t)^2 = (1 - t)^2 sigma0^2 + t^2 c_k^2``, and by linear-Gaussian
    conditioning ``E[x1 - x0 | x_t, k] = mu_k + (t c_k^2 - (1 - t) sigma0^2) /
    s_k(t)^2 * (x_t - t mu_k)``.  The velocity averages these with the
    posterior responsibilities, computed with a softmax of log-weights.
    Finite on all of ``[0, 1]``: at ``t = 1`` it is ``x``, at ``t = 0`` it is
    ``E[x1] - x``.
    """

    name = "gaussian-mixture"

    def __init__(
        self,
        means: torch.Tensor | Sequence[Sequence[float]],
        stds: torch.Tensor | Sequence[float],
        weights: torch.Tensor | Sequence[float] | None = None,
        sigma0: float = 1.0,
        kl_range: Range | None = None,
    ) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise InputError(f"means must be (K, D), got shape {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1).expand(k).clone()
        if weights is None:
            weights = torch.ones(k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(k)
        if not bool((stds > 0).all()) or not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
            raise InputError("stds must be > 0 and weights >= 0 with a positive sum")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        self.sigma0 = float(sigma0)
        self.data_shape = (means.shape[1],)
        if kl_range is None:
            pad = 5.0 * float(stds.max())
            kl_range = tuple(
                (float(lo) - pad, float(hi) + pad)
                for lo, hi in zip(means.min(0).values, means.max(0).values)
            )
        self.kl_range = kl_range

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        """Exact velocity; ``x``: ``(B, D)``, ``t``: ``(B,)`` or scalar -> ``(B, D)`` in ``x.dtype``."""
        x64 = x.to(torch.float64)
        tc = _time_column(t, x)  # (B, 1)
        c2 = self.stds.to(x64) ** 2  # (K,)
        var = (1.0 - tc) ** 2 * self.sigma0**2 + tc**2 * c2  # (B, K)
        diff = x64[:, None, :] - tc[..., None] * self.means.to(x64)  # (B, K, D)
        d = x64.shape[1]
        log_r = (
            torch.log(self.weights.to(x64))
            - 0.5 * d * torch.log(var)
            - 0.5 * (diff * diff).sum(-1) / var
        )
        resp = torch.softmax(log_r, dim=-1)  # (B, K)
        coef = (tc * c2 - (1.0 - tc) * self.sigma0**2) / var  # (B, K)
        v_k = self.means.to(x64) + coef[..., None] * diff
        return (resp[..., None] * v_k).sum(1).to(x.dtype)

    def sample_data(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        dev = _sample_device(generator, device)
        means, stds = self.means.to(dev), self.stds.to(dev)
        comp = torch.multinomial(self.weights.to(dev), n, replacement=True, generator=generator)
        z = torch.randn((n, self.data_shape[0]), generator=generator, device=dev, dtype=torch.float64)
        return (means[comp] + stds[comp, None] * z).to(dtype)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.to(torch.float64)
        d = x64.shape[1]
        means, c2, weights = self.means.to(x64), self.stds.to(x64) ** 2, self.weights.to(x64)
        sq = ((x64[:, None, :] - means) ** 2).sum(-1)  # (n, K)
        log_p = torch.log(weights) - 0.5 * d * torch.log(2 * math.pi * c2) - 0.5 * sq / c2
        return torch.logsumexp(log_p, dim=-1)

    def bin_masses(self, edges: Sequence[torch.Tensor], subdivisions: int = 8) -> torch.Tensor:
        """Exact cell probabilities from the Gaussian CDFs (``subdivisions`` unused)."""
        per_dim = []
        for dim, e in enumerate(edges):
            e = torch.as_tensor(e, dtype=torch.float64, device=self.device)
            z = (e[None, :] - self.means[:, dim, None]) / self.stds[:, None]  # (K, n+1)
            per_dim.append(torch.exp(log_ndtr_diff(z[:, :-1], z[:, 1:])))
        return _product_masses(self.weights, per_dim)


class Gaussian(GaussianMixture):
    """A single Gaussian ``N(mean, std^2 I)``; its flow map is closed-form (:meth:`flow_map`)."""

    name = "gaussian"

    def __init__(
        self,
        mean: torch.Tensor | Sequence[float],
        std: float,
        sigma0: float = 1.0,
        kl_range: Range | None = None,
    ) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        super().__init__(mean, [float(std)], None, sigma0=sigma0, kl_range=kl_range)
        self.std = float(std)

    @property
    def mean(self) -> torch.Tensor:
        return self.means[0]

    def flow_map(
        self, x: torch.Tensor, s: torch.Tensor | float, t: torch.Tensor | float
    ) -> torch.Tensor:
        """Exact ``phi(x, s, t)``; see :func:`exact_gaussian_flow_map`."""
        return exact_gaussian_flow_map(x, s, t, self.mean, self.std, self.sigma0)


def exact_gaussian_flow_map(
    x: torch.Tensor,
    s: torch.Tensor | float,
    t: torch.Tensor | float,
    mean: torch.Tensor | Sequence[float] | float,
    std: float,
    sigma0: float = 1.0,
) -> torch.Tensor:
    """Closed-form flow map for Gaussian data ``N(mean, std^2 I)``.

    The marginals are ``N(t mean, sigma_t^2 I)`` with
    ``sigma_t^2 = (1 - t)^2 sigma0^2 + t^2 std^2``, and the ODE moves points
    affinely: ``phi(x, s, t) = t mean + sigma_t / sigma_s (x - s mean)``.

    ``x``: ``(B, D)``; ``s``, ``t``: ``(B,)`` or scalars; ``mean``: ``(D,)`` or
    scalar.  Returns ``(B, D)`` in ``x.dtype``.  Requires ``sigma_s > 0``
    (``std > 0`` or ``s < 1``).
    """
    x64 = x.to(torch.float64)
    sc, tc = _time_column(s, x), _time_column(t, x)
    mean = torch.as_tensor(mean, dtype=torch.float64, device=x.device)

    def sigma(u: torch.Tensor) -> torch.Tensor:
        return torch.sqrt((1.0 - u) ** 2 * sigma0**2 + u**2 * std**2)

    return (tc * mean + sigma(tc) / sigma(sc) * (x64 - sc * mean)).to(x.dtype)


def eight_gaussians(radius: float = 4.0, std: float = 0.3, sigma0: float = 1.0) -> GaussianMixture:
    """The 8-Gaussian ring: equal weights, means at angles ``k pi / 4`` on a circle.

    Defaults: ``radius = 4``, ``std = 0.3`` (the FFJORD/torchcfm ring,
    rescaled so the means sit at radius 4 with well separated modes).
    ``kl_range`` is ``[-5.5, 5.5]^2`` (means +- 5 std).
    """
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4.0)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture(means, [std] * 8, sigma0=sigma0)


def gaussian_2d(mean: Sequence[float] = (1.0, -0.5), std: float = 0.5, sigma0: float = 1.0) -> Gaussian:
    """A 2-D Gaussian target ``N((1, -0.5), 0.5^2 I)`` by default (nontrivial exact flow map)."""
    return Gaussian(mean, std, sigma0=sigma0)


# --------------------------------------------------------------------------
# Checkerboard
# --------------------------------------------------------------------------


def checkerboard_boxes(scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The squares of the checkerboard support: ``(lo, hi)``, each ``(8, 2)``.

    docs/method.md, The 2-D teachers: ``x1 ~ U[-2, 2]``,
    ``x2 ~ U[0, 1) - 2 Bernoulli(1/2) + (floor(x1) mod 2)``, both times ``scale``.
    With ``i = floor(x1)`` and ``j = floor(x2)`` the recipe gives
    ``j in {i mod 2, i mod 2 - 2}``, i.e. the unit cells ``(i, j)`` in
    ``{-2, -1, 0, 1}^2`` with ``i + j`` even: 8 squares, scaled to side
    ``scale`` in ``[-2 scale, 2 scale]^2``, each of probability 1/8.
    """
    cells = [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]
    lo = torch.tensor(cells, dtype=torch.float64) * scale
    return lo, lo + scale


class Checkerboard(AnalyticTeacher):
    """Uniform density on the 8 squares of :func:`checkerboard_boxes` (side 2, in ``[-4, 4]^2``).

    Exact velocity.  The posterior of ``x1`` given ``x_t = x`` is the uniform
    prior times ``N(x1; x / t, ((1 - t) sigma0 / t)^2 I)``.  Per square ``k``
    and dimension ``d`` write the interval ``[a, b]`` in the standardised
    variable ``z = (t x1 - x) / ((1 - t) sigma0)``:
    ``alpha = (t a - x) / ((1 - t) sigma0)``, ``beta = (t b - x) / ((1 - t) sigma0)``
    (finite at ``t = 0``).  Then

    * the square's posterior weight is proportional to
      ``prod_d (b - a) M(alpha, beta)``, ``M`` the average standard-normal
      density on ``[alpha, beta]`` (log-space, finite as ``t -> 0``);
    * ``E[x0 | x, k]_d = -sigma0 * E[z | alpha < z < beta]`` (no division by
      ``1 - t``);
    * ``E[x1 | x, k]_d = a + (b - a) * rel_pos(alpha, beta)`` (no division by ``t``).

    ``v = sum_k w_k (E[x1 | x, k] - E[x0 | x, k])``.  At ``t = 0`` this gives
    ``E[x1] - x = -x`` exactly; times above ``1 - min_one_minus_t`` are
    evaluated at that time (see the module docstring).
    """

    name = "checkerboard"
    kl_range: Range = ((-4.0, 4.0), (-4.0, 4.0))

    def __init__(self, sigma0: float = 1.0, scale: float = 2.0, min_one_minus_t: float = 1e-4) -> None:
        super().__init__()
        lo, hi = checkerboard_boxes(scale)
        self.register_buffer("box_lo", lo)
        self.register_buffer("box_hi", hi)
        self.sigma0 = float(sigma0)
        self.scale = float(scale)
        self.min_one_minus_t = float(min_one_minus_t)
        self.data_shape = (2,)
        self.kl_range = ((-2.0 * scale, 2.0 * scale), (-2.0 * scale, 2.0 * scale))

    def velocity(self, x: torch.Tensor, t: torch.Tensor | float, cond: dict | None = None) -> torch.Tensor:
        """Exact velocity; ``x``: ``(B, 2)``, ``t``: ``(B,)`` or scalar -> ``(B, 2)`` in ``x.dtype``."""
        x64 = x.to(torch.float64)[:, None, :]  # (B, 1, 2)
        tc = _time_column(t, x).clamp(0.0, 1.0 - self.min_one_minus_t)[..., None]  # (B, 1, 1)
        lo, hi = self.box_lo.to(x64), self.box_hi.to(x64)  # (K, 2)
        denom = (1.0 - tc) * self.sigma0
        alpha = (tc * lo - x64) / denom  # (B, K, 2)
        beta = (tc * hi - x64) / denom
        log_md, z_mean, rel = truncated_normal_stats(alpha, beta)
        log_w = (torch.log(hi - lo) + log_md).sum(-1)  # (B, K); uniform prior density
        w = torch.softmax(log_w, dim=-1)[..., None]
        e_x1 = (w * (lo + (hi - lo) * rel)).sum(1)
        e_x0 = (w * (-self.sigma0 * z_mean)).sum(1)
        return (e_x1 - e_x0).to(x.dtype)

    def sample_data(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Samples by the literal recipe of docs/method.md, The 2-D teachers: ``(n, 2)``."""
        dev = _sample_device(generator, device)
        x1 = torch.rand(n, generator=generator, device=dev, dtype=torch.float64) * 4.0 - 2.0
        flip = torch.randint(0, 2, (n,), generator=generator, device=dev).to(torch.float64)
        u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
        x2 = u - 2.0 * flip + torch.remainder(torch.floor(x1), 2.0)
        return (torch.stack([x1, x2], dim=1) * self.scale).to(dtype)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """``log(1 / total area)`` on the squares (``-log 32``), ``-inf`` elsewhere."""
        x64 = x.to(torch.float64)[:, None, :]
        inside = ((x64 >= self.box_lo.to(x64)) & (x64 < self.box_hi.to(x64))).all(-1).any(-1)
        total = float((self.box_hi - self.box_lo).prod(-1).sum())
        out = torch.full(inside.shape, -math.inf, dtype=torch.float64, device=x.device)
        return out.masked_fill(inside, -math.log(total))

    def bin_masses(self, edges: Sequence[torch.Tensor], subdivisions: int = 8) -> torch.Tensor:
        """Exact cell probabilities: overlap areas with the squares over the total area."""
        per_dim = []
        for dim, e in enumerate(edges):
            e = torch.as_tensor(e, dtype=torch.float64, device=self.device)
            lo, hi = self.box_lo[:, dim, None], self.box_hi[:, dim, None]
            overlap = (torch.minimum(hi, e[None, 1:]) - torch.maximum(lo, e[None, :-1])).clamp_min(0.0)
            per_dim.append(overlap / (hi - lo))  # fraction of the square's side, (K, n)
        vol = (self.box_hi - self.box_lo).prod(-1)
        return _product_masses(vol / vol.sum(), per_dim)


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

ANALYTIC_TEACHERS: dict[str, Callable[..., AnalyticTeacher]] = dict(zip(
    EXACT_TEACHERS, (Checkerboard, eight_gaussians, gaussian_2d)))  # config.EXACT_TEACHERS: the names the settings know


class UnknownAnalyticTeacher(TTFMError, KeyError, ValueError):
    """Raised for a name not in :data:`ANALYTIC_TEACHERS` (both a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0]) if self.args else ""


def get_analytic_teacher(name: str, **kwargs) -> AnalyticTeacher:
    """Build the analytic teacher registered as ``name`` (``kwargs`` go to its factory, e.g. ``sigma0``)."""
    try:
        factory = ANALYTIC_TEACHERS[name]
    except KeyError:
        raise UnknownAnalyticTeacher(
            f"unknown analytic teacher {name!r}; choose one of {sorted(ANALYTIC_TEACHERS)}"
        ) from None
    return factory(**kwargs)
