"""Metrics: flow-map error, histogram KL, Frechet distance."""

from __future__ import annotations

import math

import pytest
import torch

from ttfm_distill.metrics import (
    flow_map_error,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_stats,
    histogram_counts,
    histogram_edges,
    histogram_kl,
    histogram_kl_between,
)
from ttfm_distill.teachers.analytic import get_analytic_teacher

F64 = torch.float64


def test_flow_map_error():
    g = torch.Generator().manual_seed(0)
    x_ref = torch.randn(256, 3, 4, generator=g)
    assert flow_map_error(x_ref, x_ref.clone()) == 0.0
    assert flow_map_error(1.1 * x_ref, x_ref) == pytest.approx(0.01, rel=1e-5)
    # constant shift c in every coordinate: error = 12 c^2 / E|x_ref|^2
    c = 0.3
    expected = 12 * c**2 / float(x_ref.double().pow(2).flatten(1).sum(1).mean())
    assert flow_map_error(x_ref + c, x_ref) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        flow_map_error(x_ref, x_ref[:, :2])


def test_histogram_counts_follow_numpy_edge_rule():
    edges = histogram_edges(2, ((0.0, 2.0), (0.0, 2.0)))
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.5], [2.0, 2.0], [2.0001, 1.0], [-1.0, 0.0], [float("nan"), 1.0]])
    counts, outside = histogram_counts(pts, edges)
    assert counts.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert outside == 3


# Data floors measured with 64k exact samples, 50x50 bins on the teacher's
# kl_range, seeds 0-4 (KL(p_data || p_hist), eps 1e-10, overflow cell):
#   checkerboard      [-4, 4]^2      : 0.0103 - 0.0113
#   gaussian-mixture  [-5.5, 5.5]^2  : 0.0177 - 0.0222  (radius 4, std 0.3)
#   gaussian          mean +- 5 std  : 0.0314 - 0.0345
FLOOR_BOUND = {"checkerboard": 0.02, "gaussian-mixture": 0.035, "gaussian": 0.05}


@pytest.mark.parametrize("name", ["checkerboard", "gaussian-mixture", "gaussian"])
def test_histogram_kl_data_floor_and_noise(name):
    teacher = get_analytic_teacher(name)
    edges = histogram_edges(50, teacher.kl_range)
    assert float(teacher.bin_masses(edges).sum()) == pytest.approx(1.0, abs=1e-5)
    g = torch.Generator().manual_seed(0)
    floor = histogram_kl(teacher.sample_data(64_000, generator=g), teacher)
    assert 0.0 < floor < FLOOR_BOUND[name]
    noise = histogram_kl(teacher.sample_noise(64_000, generator=g), teacher)
    assert noise > 1.0 and noise > 30 * floor
    # a shifted copy of the data is clearly worse than the data
    shifted = histogram_kl(teacher.sample_data(64_000, generator=g) + 0.5, teacher)
    assert shifted > 5 * floor


def test_histogram_kl_counts_out_of_range_mass():
    teacher = get_analytic_teacher("checkerboard")
    x = teacher.sample_data(64_000, generator=torch.Generator().manual_seed(0))
    base = histogram_kl(x, teacher)
    x[:6400] = 100.0  # 10% of the samples leave the grid
    # ~ -sum p log(0.9) = log(1/0.9) more than the floor
    assert histogram_kl(x, teacher) == pytest.approx(base + math.log(1 / 0.9), abs=0.01)


def test_histogram_kl_between():
    teacher = get_analytic_teacher("gaussian-mixture")
    g = torch.Generator().manual_seed(0)
    a, b = teacher.sample_data(20_000, generator=g), teacher.sample_data(20_000, generator=g)
    rng = teacher.kl_range
    assert histogram_kl_between(a, a, range=rng) == pytest.approx(0.0, abs=1e-6)
    same = histogram_kl_between(a, b, range=rng)
    assert 0.0 < same < 0.1
    assert histogram_kl_between(a, teacher.sample_noise(20_000, generator=g), range=rng) > 1.0
    assert histogram_kl_between(a, b) > 0.0  # default range: bounding box of a


def test_frechet_identical_is_zero():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 16, generator=g, dtype=F64)
    mu, sigma = gaussian_stats(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-9)


def test_frechet_closed_forms():
    d, s = 8, 0.7
    m1 = torch.linspace(-1, 1, d, dtype=F64)
    m2 = torch.linspace(0, 3, d, dtype=F64)
    eye = torch.eye(d, dtype=F64)
    assert frechet_distance(m1, s**2 * eye, m2, s**2 * eye) == pytest.approx(float((m1 - m2).pow(2).sum()), rel=1e-10)
    a, b = 0.5, 2.0
    zero = torch.zeros(d, dtype=F64)
    assert frechet_distance(zero, a**2 * eye, zero, b**2 * eye) == pytest.approx(d * (a - b) ** 2, rel=1e-10)
    # non-commuting covariances: W2^2 is symmetric and matches the 2-D closed form
    # for a rotated pair (same spectrum -> trace term via the formula below).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, generator=g, dtype=F64)
    y = torch.randn(4, 4, generator=g, dtype=F64)
    s1, s2 = x @ x.T + 0.1 * torch.eye(4, dtype=F64), y @ y.T + 0.1 * torch.eye(4, dtype=F64)
    mu = torch.zeros(4, dtype=F64)
    d12, d21 = frechet_distance(mu, s1, mu, s2), frechet_distance(mu, s2, mu, s1)
    assert d12 == pytest.approx(d21, rel=1e-9)
    # tr((S1 S2)^1/2) via the eigenvalues of S1 S2 (real, positive)
    ev = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
    assert d12 == pytest.approx(float(torch.trace(s1) + torch.trace(s2) - 2 * ev), rel=1e-8)


def test_frechet_from_features_estimates_the_gaussian_distance():
    g = torch.Generator().manual_seed(2)
    d = 4
    f1 = torch.randn(50_000, d, generator=g, dtype=F64)
    f2 = 1.5 * torch.randn(50_000, d, generator=g, dtype=F64) + 1.0
    expected = d * 1.0 + d * (1.0 - 1.5) ** 2
    assert frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=0.03)


def test_coverage_is_high_for_the_same_law_and_low_for_a_collapsed_one():
    from ttfm_distill.metrics import coverage

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(600, 8, generator=g, dtype=torch.float64)
    same = torch.randn(600, 8, generator=g, dtype=torch.float64)
    collapsed = 0.05 * torch.randn(600, 8, generator=g, dtype=torch.float64) + ref[0]
    assert coverage(same, ref) > 0.85
    assert coverage(collapsed, ref) < 0.1


def test_class_entropy_of_a_histogram():
    import math

    from ttfm_distill.metrics import class_entropy

    even = torch.eye(10).repeat(5, 1)  # every class five times
    assert abs(class_entropy(even, 10) - math.log(10)) < 1e-9
    one = torch.zeros(50, 10)
    one[:, 3] = 1
    assert class_entropy(one, 10) == 0.0


def test_a_student_that_lost_diversity_is_said_so_in_one_line():
    from ttfm_distill.evaluate import quality_warnings

    report = {"results": {"student": {"1": {"fd_test_images": 9.0, "coverage": 0.41},
                                      "2": {"fd_test_images": 8.0, "coverage": 0.9}},
                          "teacher_euler": {"1": {"fd_test_images": 900.0, "coverage": 0.05},
                                            "2": {"fd_test_images": 400.0, "coverage": 0.93}}}}
    lines = [line for line in quality_warnings(report) if "LESS DIVERSE" in line]
    assert len(lines) == 1 and "0.41 at 1 step(s)" in lines[0] and "2 step(s)" not in lines[0]
    report["results"]["student"]["1"]["coverage"] = 0.8
    assert not any("LESS DIVERSE" in line for line in quality_warnings(report))
