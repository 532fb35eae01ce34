"""Trajectory supervision (trajectory_fraction) and the pool's solver (pool_solver)."""

import pytest
import torch

from helpers import FakeTeacher
from ttfm_distill.config import ConfigError, RunConfig
from ttfm_distill.data.pool import build_pool, kept_states, trajectory_states
from ttfm_distill.objectives import TrainBatch, make_objective
from ttfm_distill.objectives.timesampling import grid_pairs, sample_time_pairs
from ttfm_distill.objectives.trajectory import TrajectoryRows, TrajectorySupervised, trajectory_loss
from ttfm_distill.preflight import resolve_settings, trajectory_rows
from ttfm_distill.sampling import euler, heun, solve_trajectory, uniform_time_grid


def _field(x, t):
    return torch.sin(3 * x) - t.view(-1, *[1] * (x.dim() - 1)) * x


@pytest.mark.parametrize("solver, whole", [("euler", euler), ("heun", heun)])
def test_solve_trajectory_keeps_every_state_and_ends_where_the_solver_ends(solver, whole):
    x0 = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    grid = uniform_time_grid(6, shift=3.0)
    states = solve_trajectory(_field, x0, grid, solver)
    assert states.shape == (5, 7, 2, 3)
    assert torch.equal(states[:, 0], x0) and torch.equal(states[:, -1], whole(_field, x0, grid))
    assert torch.equal(states[:, 3], whole(_field, x0, grid[:4]))  # an intermediate state is the solve so far


def test_grid_pairs_are_ordered_on_the_grid_and_keep_dyadic_pairs_exact():
    g = torch.Generator().manual_seed(1)
    s, t = sample_time_pairs(4000, "mixed", 0.0, 4, generator=g)
    i, j = grid_pairs(s, t, 16)
    assert bool((i >= 0).all() and (i < j).all() and (j <= 16).all())
    dyadic = torch.isclose(s * 16, torch.round(s * 16)) & torch.isclose(t * 16, torch.round(t * 16))
    assert dyadic.sum() > 1000 and torch.equal(i[dyadic], torch.round(s[dyadic] * 16).long())
    assert torch.equal(j[dyadic], torch.round(t[dyadic] * 16).long())
    i, j = grid_pairs(torch.tensor([0.5, 0.999]), torch.tensor([0.5, 1.0]), 4)  # collapsed pairs: the next step
    assert i.tolist() == [2, 3] and j.tolist() == [3, 4]


class _Constant(torch.nn.Module):
    """u(x, s, t) = c * (t - s + 1): a student whose loss is known in closed form."""

    def __init__(self, c):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(float(c)))

    def forward(self, x, s, t, cond=None):
        return self.c * (t - s + 1).view(-1, 1) * torch.ones_like(x)


class _Inner:
    """An objective double with every attribute ``objectives.base.Objective`` declares."""
    name, options, needs_ema, teacher_off_diagonal, default_diagonal_fraction = "inner", None, False, True, 0.0
    one_gradient_forward = False

    def __call__(self, student, teacher, batch, ema=None):
        from ttfm_distill.objectives.base import ObjectiveOutput

        per = torch.full((batch.x_s.shape[0],), 2.0) * student.c
        return ObjectiveOutput(per.mean(), per.detach(), {"terminal": 2.0})

    def config(self):
        return {"name": "inner"}


def test_trajectory_loss_and_its_weight_in_the_batch_mean():
    x_s = torch.zeros(3, 2)
    x_t = torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.5, 0.5]])
    s, t = torch.tensor([0.0, 0.0, 0.5]), torch.tensor([1.0, 0.5, 1.0])
    rows = TrajectoryRows(x_s, x_t, s, t)
    torch.testing.assert_close(rows.target(), torch.tensor([[1.0, 1.0], [4.0, 4.0], [1.0, 1.0]]))
    student = _Constant(1.0)  # u = 2, 1.5, 1.5 on those rows
    torch.testing.assert_close(trajectory_loss(student, rows), torch.tensor([1.0, 6.25, 0.25]))
    batch = TrainBatch(torch.zeros(5, 2), torch.zeros(5), torch.ones(5), trajectory=rows)
    out = TrajectorySupervised(_Inner(), weight=0.5)(student, None, batch)
    # 5 objective rows at 2.0, 3 trajectory rows at 0.5 * (1 + 6.25 + 0.25): the mean over 8 rows
    assert out.loss.item() == pytest.approx((5 * 2.0 + 0.5 * 7.5) / 8)
    assert out.per_sample.shape == (8,) and out.metrics["trajectory"] == pytest.approx(2.5)
    plain = TrajectorySupervised(_Inner())(student, None, TrainBatch(torch.zeros(5, 2), torch.zeros(5), torch.ones(5)))
    assert plain.loss.item() == pytest.approx(2.0) and "trajectory" not in plain.metrics


class _Net(torch.nn.Module):
    """A small student whose output depends on every input: u = W [x, s, t, label] (counts its calls)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(5, 2)
        self.grad_calls = []

    def forward(self, x, s, t, cond=None):
        if torch.is_grad_enabled():
            self.grad_calls.append(x.shape[0])
        label = cond["class_labels"].float() if cond else torch.zeros_like(s)
        return self.lin(torch.cat([x, s[:, None], t[:, None], label[:, None]], dim=1))


class _Field:
    def velocity(self, x, t, cond=None):
        return torch.sin(2 * x) - t[:, None]


@pytest.mark.parametrize("loss, options", [("itvm", {}), ("itvm", {"long_jump_span": 0.5}),
                                           ("itvm", {"reading": "ema_only"}), ("progressive", {})])
@pytest.mark.parametrize("labels", [False, True])
def test_trajectory_rows_ride_in_the_objectives_one_gradient_forward_with_the_same_loss_and_gradients(
        loss, options, labels):
    g = torch.Generator().manual_seed(3)
    n, m = 6, 3
    cond = {"class_labels": torch.arange(n) % 2} if labels else None
    rows_cond = {"class_labels": torch.arange(m) % 2} if labels else None
    rows = TrajectoryRows(torch.randn(m, 2, generator=g), torch.randn(m, 2, generator=g), torch.zeros(m),
                          torch.ones(m), rows_cond)
    s = torch.tensor([0.0, 0.1, 0.2, 0.0, 0.5, 0.3])
    t = torch.tensor([1.0, 0.4, 0.9, 0.6, 1.0, 0.3])
    x = torch.randn(n, 2, generator=g)
    objective = TrajectorySupervised(make_objective(loss, **options), weight=2.0)
    results = []
    for join in (True, False):
        torch.manual_seed(0)
        student, ema = _Net(), _Net()
        objective.inner.one_gradient_forward = join
        out = objective(student, _Field(), TrainBatch(x, s, t, cond, torch.Generator().manual_seed(5), rows), ema)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in student.parameters()], student.grad_calls))
    (joined, g_joined, calls_joined), (apart, g_apart, calls_apart) = results
    assert calls_joined == [n * (3 if options.get("reading") == "ema_only" else 1) + m]  # one forward for all rows
    assert len(calls_apart) == 2 and calls_apart[-1] == m
    torch.testing.assert_close(joined.loss, apart.loss)
    torch.testing.assert_close(joined.per_sample, apart.per_sample)
    assert joined.metrics == pytest.approx(apart.metrics)
    for a, b in zip(g_joined, g_apart):
        torch.testing.assert_close(a, b)


def test_trajectory_rows_split_with_their_micro_batches():
    rows = TrajectoryRows(torch.arange(4.0).view(4, 1), torch.arange(4.0).view(4, 1) + 1, torch.zeros(4),
                          torch.ones(4), {"class_labels": torch.arange(4)})
    batch = TrainBatch(torch.zeros(8, 1), torch.zeros(8), torch.ones(8), {"class_labels": torch.arange(8)},
                       trajectory=rows)
    a, b = batch.split(2)
    assert a.trajectory.x_s.view(-1).tolist() == [0, 1] and b.trajectory.cond["class_labels"].tolist() == [2, 3]
    with pytest.raises(ValueError, match="equal micro-batches"):
        TrajectoryRows(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3), torch.ones(3)).split(2)


def test_pool_keeps_trajectories_in_a_file_of_its_own_with_the_same_samples(tmp_path):
    cfg = RunConfig(pool_size=40, pool_steps=4, seed=2, trajectory_fraction=0.0)
    plain = build_pool(FakeTeacher((1, 4, 4)), cfg, tmp_path, "cpu", lambda m: None)
    # pairs drawn like the objective's (unset): every state of each solve is kept
    traj_cfg = RunConfig(pool_size=40, pool_steps=4, seed=2, trajectory_fraction=0.25, pool_solver="euler",
                         trajectory_time_sampling=None, trajectory_dyadic_levels=None)
    kept = build_pool(FakeTeacher((1, 4, 4)), traj_cfg, tmp_path, "cpu", lambda m: None)
    assert plain.trajectories is None and kept.trajectories.shape == (40, 5, 1, 4, 4)
    assert torch.equal(kept.samples, plain.samples) and torch.equal(kept.trajectories[:, -1], kept.samples)
    torch.testing.assert_close(kept.times, uniform_time_grid(4))
    assert len(list(tmp_path.glob("pool-*.safetensors"))) == 2 and kept.report["trajectories"]["states"] == 5
    # each stored state is one Euler step of the teacher from the one before
    v = FakeTeacher((1, 4, 4)).velocity(kept.trajectories[:, 1], torch.full((40,), 0.25))
    torch.testing.assert_close(kept.trajectories[:, 2], kept.trajectories[:, 1] + 0.25 * v)
    heun_cfg = RunConfig(pool_size=40, pool_steps=4, seed=2, pool_solver="heun", trajectory_fraction=0.0)
    h = build_pool(FakeTeacher((1, 4, 4)), heun_cfg, tmp_path, "cpu", lambda m: None)
    assert "heun" in h.report["solver"] and not torch.allclose(h.samples, plain.samples)


def test_a_pool_keeps_only_the_states_its_pairs_can_use(tmp_path):
    assert kept_states(16, "dyadic", 0) == [0, 16] and kept_states(16, "dyadic", 2) == [0, 4, 8, 12, 16]
    assert kept_states(16, "mixed", 0) == list(range(17)) and kept_states(12, "dyadic", 3) == list(range(13))
    cfg = RunConfig(pool_size=40, pool_steps=4, seed=2, trajectory_fraction=0.125, trajectory_time_sampling="dyadic",
                    trajectory_dyadic_levels=0)
    assert trajectory_states(cfg) == [0, 4] and trajectory_states(RunConfig(trajectory_fraction=0.0)) == []
    assert trajectory_states(RunConfig(pool_steps=4, trajectory_fraction=0.125)) == [0, 4]  # the 1-step jump alone
    assert trajectory_states(RunConfig(pool_steps=4)) == []  # unset: no rows, nothing kept
    pool = build_pool(FakeTeacher((1, 4, 4)), cfg, tmp_path, "cpu", lambda m: None)
    assert pool.trajectories.shape == (40, 2, 1, 4, 4) and pool.times.tolist() == [0.0, 1.0]
    assert torch.equal(pool.trajectories[:, 1], pool.samples) and "-traj2-" in pool.report["path"]
    x_s, x_t, s, t, _ = pool.trajectory_rows(torch.tensor([3, 5]), *grid_pairs(torch.zeros(2), torch.ones(2), 1))
    assert s.tolist() == [0.0, 0.0] and t.tolist() == [1.0, 1.0] and torch.equal(x_t, pool.samples[[3, 5]])


def test_trajectory_settings_are_checked():
    assert trajectory_rows(RunConfig(batch_size=32, trajectory_fraction=0.25)) == 8
    assert trajectory_rows(RunConfig(batch_size=32, trajectory_fraction=0.01)) == 1  # at least one row
    assert trajectory_rows(RunConfig(batch_size=32, trajectory_fraction=0.3, grad_accum_steps=4)) == 8
    assert trajectory_rows(RunConfig(trajectory_fraction=0.0)) == 0
    with pytest.raises(ConfigError, match="leaves no rows"):
        resolve_settings(RunConfig(batch_size=4, trajectory_fraction=0.9))
    with pytest.raises(ConfigError, match="needs the data-free pool"):
        RunConfig(trajectory_fraction=0.25, data="/some/images").validate()
    with pytest.raises(ConfigError, match="trajectory_fraction must be in"):
        RunConfig(trajectory_fraction=1.0).validate()
    with pytest.raises(ConfigError, match="trajectory_time_sampling"):
        RunConfig(trajectory_time_sampling="sampler").validate()
    with pytest.raises(ConfigError, match="pool_solver"):
        RunConfig(pool_solver="rk4").validate()
    cfg, objective = resolve_settings(RunConfig(trajectory_fraction=0.25, trajectory_weight=2.0))
    assert isinstance(objective, TrajectorySupervised) and objective.weight == 2.0 and objective.name == "itvm"
