"""Exact analytic teachers: velocities against Monte Carlo and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from ttfm_distill.teachers.analytic import (
    ANALYTIC_TEACHERS,
    AnalyticTeacher,
    Checkerboard,
    Gaussian,
    GaussianMixture,
    checkerboard_boxes,
    eight_gaussians,
    exact_gaussian_flow_map,
    get_analytic_teacher,
    log_ndtr_diff,
    truncated_normal_stats,
)
from ttfm_distill.teachers.base import Teacher

F64 = torch.float64


def mc_velocity(teacher: AnalyticTeacher, x: torch.Tensor, t: float, n: int, seed: int = 0):
    """Self-normalised importance estimate of E[x1 - x0 | x_t = x] and its standard error.

    Weights over exact data samples: w_i ~ N(x; t x1_i, (1 - t)^2 sigma0^2 I).
    Since x0 = (x - t x1) / (1 - t), v = (E[x1 | x] - x) / (1 - t).
    """
    x1 = teacher.sample_data(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    est, err = [], []
    for xi in x:
        log_w = -((xi - t * x1) ** 2).sum(-1) / (2 * (1 - t) ** 2 * teacher.sigma0**2)
        w = torch.softmax(log_w, 0)
        m1 = (w[:, None] * x1).sum(0)
        se = torch.sqrt((w[:, None] ** 2 * (x1 - m1) ** 2).sum(0))
        est.append((m1 - xi) / (1 - t))
        err.append(se / (1 - t))
    return torch.stack(est), torch.stack(err)


POINTS = torch.tensor([[0.3, -1.0], [2.5, 1.2], [-1.0, 3.0], [1.0, 1.0], [-2.0, 0.1]], dtype=F64)


@pytest.mark.parametrize("name", ["checkerboard", "gaussian-mixture"])
@pytest.mark.parametrize("t", [0.25, 0.5, 0.75])
def test_velocity_matches_monte_carlo(name, t):
    teacher = get_analytic_teacher(name)
    # typical points of p_t: draws of the interpolant
    g = torch.Generator().manual_seed(int(100 * t))
    x = (1 - t) * teacher.sample_noise(6, generator=g, dtype=F64) + t * teacher.sample_data(6, generator=g, dtype=F64)
    v = teacher.velocity(x, torch.full((len(x),), t, dtype=F64))
    v_mc, se = mc_velocity(teacher, x, t, n=200_000)
    assert torch.all(se < 0.05)  # enough effective samples for the check to mean something
    # 5 standard errors (plus a little for the SE's own noise).
    assert torch.all((v - v_mc).abs() <= 5 * se + 2e-3), (v, v_mc, se)


def test_checkerboard_velocity_matches_quadrature():
    """Tighter check: midpoint quadrature of the posterior over each square (h = 2/250)."""
    teacher = Checkerboard()
    n = 250
    f = (torch.arange(n, dtype=F64) + 0.5) / n * 2.0
    u = torch.stack(torch.meshgrid(f, f, indexing="ij"), -1).reshape(-1, 2)
    pts = (teacher.box_lo[:, None, :] + u[None]).reshape(-1, 2)
    for t in (0.1, 0.5, 0.8):
        log_w = -((POINTS[:, None, :] - t * pts) ** 2).sum(-1) / (2 * (1 - t) ** 2)
        w = torch.softmax(log_w, dim=1)
        m1 = w @ pts
        v_ref = (m1 - POINTS) / (1 - t)
        v = teacher.velocity(POINTS, torch.full((len(POINTS),), t, dtype=F64))
        assert torch.allclose(v, v_ref, atol=2e-3), (t, v, v_ref)


def test_checkerboard_boxes_match_the_sampling_recipe():
    lo, hi = checkerboard_boxes()
    assert lo.shape == (8, 2) and torch.all(hi - lo == 2.0)
    teacher = Checkerboard()
    x = teacher.sample_data(40_000, generator=torch.Generator().manual_seed(1), dtype=F64)
    inside = (x[:, None] >= lo) & (x[:, None] < hi)
    box = inside.all(-1)
    assert torch.all(box.sum(1) == 1)  # every sample in exactly one square
    frac = box.double().mean(0)
    assert torch.allclose(frac, torch.full((8,), 1 / 8, dtype=F64), atol=0.01)
    assert torch.all(torch.isfinite(teacher.log_density(x)))
    assert torch.allclose(teacher.log_density(x), torch.full((len(x),), -math.log(32.0), dtype=F64))
    assert teacher.log_density(torch.tensor([[1.0, -1.0]])).item() == -math.inf
    # data mean is 0, so v(x, 0) = -x
    assert x.mean(0).abs().max() < 0.05


@pytest.mark.parametrize("teacher", [Checkerboard(), eight_gaussians(), Gaussian([1.0, -0.5], 0.5)], ids=lambda t: t.name)
def test_endpoints_and_dtypes(teacher):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([teacher.sample_data(64, generator=g), 6 * torch.randn(64, 2, generator=g)])
    mean = teacher.sample_data(100_000, generator=g, dtype=F64).mean(0)
    exact_mean = teacher.means.mean(0) if isinstance(teacher, GaussianMixture) else torch.zeros(2, dtype=F64)
    assert torch.allclose(mean, exact_mean, atol=0.03)
    # t = 0: the posterior is the prior, v = E[x1] - x.
    v0 = teacher.velocity(x.double(), torch.zeros(len(x), dtype=F64))
    assert torch.allclose(v0, exact_mean - x.double(), atol=1e-9)
    # finite on the closed interval, float32 in -> float32 out, agrees with float64
    for t in (0.0, 1e-12, 1e-6, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-6, 1.0):
        tt = torch.full((len(x),), t)
        v32 = teacher.velocity(x, tt)
        v64 = teacher.velocity(x.double(), tt.double())
        assert v32.dtype == torch.float32 and v32.shape == x.shape
        assert torch.all(torch.isfinite(v32)) and torch.all(torch.isfinite(v64))
        assert torch.allclose(v32.double(), v64, rtol=1e-5, atol=1e-5)
    # scalar time is accepted
    assert torch.equal(teacher(x, 0.3), teacher.velocity(x, torch.full((len(x),), 0.3)))


def test_velocity_near_t1_inside_support_is_x():
    """Inside the support the posterior of x1 collapses to x: v(x, 1) = x."""
    for teacher in (Checkerboard(), eight_gaussians()):
        x = teacher.sample_data(256, generator=torch.Generator().manual_seed(3), dtype=F64)
        if isinstance(teacher, Checkerboard):  # stay away from square edges
            frac = torch.remainder(x, 2.0)
            x = x[((frac > 0.05) & (frac < 1.95)).all(-1)]
        v = teacher.velocity(x, torch.ones(len(x), dtype=F64))
        assert torch.allclose(v, x, atol=2e-3 * (1 + x.abs().max().item()))


def test_mixture_matches_single_gaussian_closed_form():
    mean, std, sigma0 = torch.tensor([1.0, -2.0], dtype=F64), 0.7, 1.3
    teacher = Gaussian(mean, std, sigma0=sigma0)
    x = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    t = torch.rand(32, dtype=F64, generator=torch.Generator().manual_seed(1))
    tc = t[:, None]
    var = (1 - tc) ** 2 * sigma0**2 + tc**2 * std**2
    v_ref = mean + (tc * std**2 - (1 - tc) * sigma0**2) / var * (x - tc * mean)
    assert torch.allclose(teacher.velocity(x, t), v_ref, atol=1e-12)
    # a mixture of two identical components is the same field
    twin = GaussianMixture(torch.stack([mean, mean]), [std, std], [0.3, 0.7], sigma0=sigma0)
    assert torch.allclose(twin.velocity(x, t), v_ref, atol=1e-12)


def test_mixture_log_density_and_bin_masses():
    teacher = eight_gaussians()
    # log-density integrates to 1 (midpoint rule on a fine grid)
    h = 0.02
    axis = torch.arange(-5.5, 5.5, h, dtype=F64) + h / 2
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    assert abs(float(torch.exp(teacher.log_density(grid)).sum() * h * h) - 1.0) < 1e-4
    edges = [torch.linspace(-5.5, 5.5, 21, dtype=F64)] * 2
    exact = teacher.bin_masses(edges)
    midpoint = AnalyticTeacher.bin_masses(teacher, edges, subdivisions=32)  # O(h^2) error ~ 5e-6
    assert torch.allclose(exact, midpoint, atol=2e-5)
    assert float(exact.sum()) == pytest.approx(1.0, abs=1e-6)


def _fd_dt(fn, t, h=1e-5):
    return (fn(t + h) - fn(t - h)) / (2 * h)


def test_exact_gaussian_flow_map():
    mean, std, sigma0 = torch.tensor([2.0, -1.0], dtype=F64), 0.4, 1.0
    teacher = Gaussian(mean, std, sigma0=sigma0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, dtype=F64, generator=g)
    s = torch.rand(64, dtype=F64, generator=g) * 0.9
    t = s + (1 - s) * torch.rand(64, dtype=F64, generator=g) * 0.9
    r = s + (t - s) * torch.rand(64, dtype=F64, generator=g)
    phi = lambda a, b, c: exact_gaussian_flow_map(a, b, c, mean, std, sigma0)  # noqa: E731

    assert torch.allclose(phi(x, s, s), x, atol=1e-14)
    # Lagrangian equation d/dt phi = v(phi, t)
    dphi = _fd_dt(lambda u: phi(x, s, u), t)
    assert torch.allclose(dphi, teacher.velocity(phi(x, s, t), t), atol=1e-7)
    # semigroup
    assert torch.allclose(phi(phi(x, s, r), r, t), phi(x, s, t), atol=1e-12)
    # pushes N(0, sigma0^2) at s = 0 to the data at t = 1
    z = teacher.sample_noise(200_000, generator=g, dtype=F64)
    y = phi(z, 0.0, 1.0)
    assert torch.allclose(y.mean(0), mean, atol=0.01)
    assert torch.allclose(y.std(0), torch.full((2,), std, dtype=F64), atol=0.01)
    # the method agrees; float32 is preserved
    assert torch.equal(teacher.flow_map(x, s, t), phi(x, s, t))
    assert teacher.flow_map(x.float(), s.float(), t.float()).dtype == torch.float32


def test_truncated_normal_helpers_are_stable():
    a = torch.tensor([-1e4, 1e3, -1e4, -30.0, 30.0, -1.0, 0.5, 0.5], dtype=F64)
    b = torch.tensor([1e4, 1.2e3, -9e3, -29.0, 31.0, 2.0, 0.5 + 1e-7, 0.5], dtype=F64)
    log_md, mean, rel = truncated_normal_stats(a, b)
    assert torch.all(torch.isfinite(log_md)) and torch.all(torch.isfinite(mean)) and torch.all(torch.isfinite(rel))
    assert torch.all((mean >= a) & (mean <= b))
    assert abs(mean[0].item()) < 1e-12
    assert abs(mean[1].item() - 1000.001) < 1e-5  # Mills ratio ~ a + 1/a
    # lower tail, ~ b - 1/|b|; log-space differences of ~4e7 limit this to ~1e-8 relative
    assert abs(mean[2].item() + 9000.0001111) < 1e-3
    # degenerate interval: density and position limits
    assert abs(log_md[7].item() - (-0.125 - 0.5 * math.log(2 * math.pi))) < 1e-12
    assert abs(rel[7].item() - 0.5) < 1e-12
    # log(Phi(b) - Phi(a)) against direct evaluation where that is accurate
    aa, bb = torch.tensor([-1.0, -3.0]), torch.tensor([2.0, 0.5])
    direct = torch.log(torch.special.ndtr(bb.double()) - torch.special.ndtr(aa.double()))
    assert torch.allclose(log_ndtr_diff(aa.double(), bb.double()), direct, atol=1e-12)
    # both tails, symmetric
    assert torch.allclose(log_ndtr_diff(torch.tensor([20.0], dtype=F64), torch.tensor([21.0], dtype=F64)),
                          log_ndtr_diff(torch.tensor([-21.0], dtype=F64), torch.tensor([-20.0], dtype=F64)))


def test_registry():
    assert set(ANALYTIC_TEACHERS) == {"checkerboard", "gaussian-mixture", "gaussian"}
    for name in ANALYTIC_TEACHERS:
        teacher = get_analytic_teacher(name)
        assert isinstance(teacher, AnalyticTeacher) and teacher.name == name
        assert teacher.data_shape == (2,) and len(teacher.kl_range) == 2
        assert teacher.sample_noise(5).shape == (5, 2)
    assert get_analytic_teacher("checkerboard", sigma0=2.0).sigma0 == 2.0
    # fits the package Teacher interface
    teacher = get_analytic_teacher("gaussian-mixture")
    assert isinstance(teacher, Teacher) and teacher.kind == "points"
    x = torch.randn(4, 2)
    assert torch.equal(teacher.velocity(x, torch.full((4,), 0.5), None), teacher.velocity(x, torch.full((4,), 0.5)))
    with pytest.raises(ValueError, match="checkerboard"):
        get_analytic_teacher("nope")
    with pytest.raises(KeyError):
        get_analytic_teacher("nope")
