import pytest
import torch

from ttfm_distill.sampling import euler, heun, heun_for_nfe, rk4, sample_flow_map, uniform_time_grid


class Counter:
    def __init__(self):
        self.calls = 0

    def velocity(self, x, t):
        self.calls += 1
        return -x  # dx/dt = -x: exact solution x0 * exp(-t)

    def flow_map(self, x, s, t):
        self.calls += 1
        return x * torch.exp(-(t - s))[:, None]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_flow_map_sampler_uses_one_evaluation_per_step_and_is_exact_with_exact_map(n):
    c = Counter()
    x0 = torch.randn(5, 2)
    out = sample_flow_map(c.flow_map, x0, uniform_time_grid(n))
    assert c.calls == n
    assert torch.allclose(out, x0 * torch.exp(torch.tensor(-1.0)), atol=1e-6)


def test_grid_endpoints_and_validation():
    g = uniform_time_grid(4)
    assert g[0] == 0 and g[-1] == 1 and len(g) == 5
    gs = uniform_time_grid(4, shift=3.0)
    assert gs[0] == 0 and gs[-1] == 1 and torch.all(gs[1:] > gs[:-1])
    assert gs[1] < g[1]  # a shift > 1 spends more steps near noise (small t)
    with pytest.raises(ValueError):
        uniform_time_grid(0)


def test_solver_orders_and_nfe():
    x0 = torch.ones(1, 1, dtype=torch.float64)
    exact = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
    errs = {}
    for name, fn, evals in (("euler", euler, 1), ("heun", heun, 2), ("rk4", rk4, 4)):
        e = []
        for n in (4, 8):
            c = Counter()
            e.append((fn(c.velocity, x0, uniform_time_grid(n)) - exact).abs().item())
            assert c.calls == evals * n
        errs[name] = e[0] / e[1]
    assert 1.8 < errs["euler"] < 2.4 and 3.4 < errs["heun"] < 4.6 and 12 < errs["rk4"] < 20
    c = Counter()
    heun_for_nfe(c.velocity, x0, 4)
    assert c.calls == 4
