"""Each objective on a closed-form flow map: the exact map has (near) zero loss, a wrong one does not."""

import pytest
import torch

from conftest import make_pair_batch as make_batch

from ttfm_distill.objectives import OBJECTIVES, TrainBatch, make_objective
from ttfm_distill.objectives.timesampling import sample_time_pairs
from ttfm_distill.objectives.lfmd import time_derivative_fd, time_derivative_jvp


def loss_of(obj, student, teacher, batch, ema=None):
    return obj(student, teacher, batch, ema if ema is not None else student).loss.item()


@pytest.mark.parametrize("intermediate", ["terminal", "initial", "uniform"])
def test_itvm_residual_vanishes_on_exact_map(gaussian_case, intermediate):
    teacher, exact = gaussian_case
    from conftest import ExactGaussianMap

    wrong = ExactGaussianMap(exact.mean + 0.5, exact.std * 1.5)  # the map of another Gaussian
    batch = make_batch()
    obj = make_objective("itvm", intermediate=intermediate, tau=0.02, teacher_solver="heun")
    good, bad = loss_of(obj, exact, teacher, batch), loss_of(obj, wrong, teacher, batch)
    assert good < 1e-6 and bad > 1e-3, (good, bad)


def test_itvm_teacher_step_error_shrinks_with_tau(gaussian_case):
    """With an Euler teacher segment the exact map's residual is the Euler defect, O(tau^2) in u."""
    teacher, exact = gaussian_case
    batch = make_batch(diag=0.0)
    losses = [loss_of(make_objective("itvm", tau=tau, teacher_solver="euler"), exact, teacher, batch)
              for tau in (0.08, 0.04, 0.02)]
    assert losses[0] > losses[1] > losses[2] > 0
    assert losses[1] / losses[2] > 3.0  # squared residual: at least ~4x per halving once tau is small


def test_itvm_teacher_substeps_shrink_the_segment_error_at_a_long_tau(gaussian_case):
    """At tau 0.2, k Euler substeps of the teacher segment cut the exact map's defect (O(tau^2 / k) in u)."""
    teacher, exact = gaussian_case
    batch = make_batch(diag=0.0)
    losses = [loss_of(make_objective("itvm", tau=0.2, teacher_solver="euler", teacher_substeps=k), exact, teacher,
                      batch) for k in (1, 2, 4)]
    assert losses[0] / losses[1] > 3.0 and losses[1] / losses[2] > 3.0, losses
    one = make_objective("itvm", tau=0.2, teacher_solver="euler")
    assert loss_of(one, exact, teacher, batch) == losses[0]  # substeps=1 is the default arithmetic
    with pytest.raises(Exception, match="teacher_substeps"):
        make_objective("itvm", teacher_substeps=0)


def test_itvm_span_power_weighs_each_off_diagonal_residual_by_its_span(gaussian_case):
    """span_power p multiplies each off-diagonal pair's residual by (t - s) ** p and leaves diagonal pairs alone."""
    teacher, exact = gaussian_case
    from conftest import ExactGaussianMap

    wrong = ExactGaussianMap(exact.mean + 0.5, exact.std * 1.5)
    batch = make_batch(diag=0.25)
    plain = make_objective("itvm", tau=0.05)(wrong, teacher, batch, wrong).per_sample
    weighted = make_objective("itvm", tau=0.05, span_power=2.0)(wrong, teacher, batch, wrong).per_sample
    off = batch.t > batch.s
    assert bool(off.any()) and bool((~off).any())
    torch.testing.assert_close(weighted[off], plain[off] * (batch.t - batch.s)[off] ** 2)
    assert torch.equal(weighted[~off], plain[~off]) and bool((weighted[off] < plain[off]).all())
    with pytest.raises(Exception, match="span_power"):
        make_objective("itvm", span_power=-1.0)


def test_itvm_long_jumps_take_the_progressive_target_from_the_ema(gaussian_case):
    """With long_jump_span L, pairs with t - s >= L get two EMA jumps through r ~ U(s, t), the rest ITVM's target."""
    teacher, exact = gaussian_case
    from conftest import ExactGaussianMap
    from ttfm_distill.objectives.base import flow_map

    wrong = ExactGaussianMap(exact.mean + 0.5, exact.std * 1.5)
    other = ExactGaussianMap(exact.mean - 0.3, exact.std * 0.8)  # the "EMA": a third map
    batch = make_batch(diag=0.25, seed=3)
    obj = make_objective("itvm", tau=0.05, long_jump_span=0.5)
    assert obj.needs_ema
    target = obj.target(wrong, teacher, batch, ema=other)
    long = (batch.t - batch.s >= 0.5) & (batch.t > batch.s)
    assert 0 < int(long.sum()) < len(long)
    # replay the draws: target() drew r after make_batch's own draws from the same generator
    g = torch.Generator().manual_seed(3)
    sample_time_pairs(len(batch.s), "uniform", 0.25, generator=g)
    torch.randn(len(batch.s), 2, generator=g, dtype=torch.float64)
    frac = torch.rand(batch.s.shape, generator=g).double()
    s, t, x = batch.s[long], batch.t[long], batch.x_s[long]
    r = s + frac[long] * (t - s)
    end = flow_map(other, flow_map(other, x, s, r, None), r, t, None)
    torch.testing.assert_close(target[long], (end - x) / (t - s)[:, None])
    short = ~long
    plain = make_objective("itvm", tau=0.05).target(wrong, teacher, make_batch(diag=0.25, seed=3), ema=other)
    torch.testing.assert_close(target[short], plain[short])
    # on the exact map the long-jump target is exact too (the flow map is a semigroup)
    assert loss_of(make_objective("itvm", tau=0.02, teacher_solver="heun", long_jump_span=0.5), exact, teacher,
                   make_batch(diag=0.25, seed=3), ema=exact) < 1e-6
    with pytest.raises(Exception, match="long_jump_span"):
        make_objective("itvm", long_jump_span=1.5)


def test_a_run_leaves_the_long_jumps_off_and_keeps_what_a_resumed_run_ran_with():
    """long_jump_span left unset: 0 for every teacher (AUTO_LONG_JUMP_SPAN, which helped the embedded flow teacher,
    lost on the zoo's DiT teacher); a resumed folder keeps its value (0.5 where a flow run of an earlier version
    filled it in), one from before the option was automatic 0."""

    from ttfm_distill.config import AUTO_LONG_JUMP_SPAN, RunConfig, resume_mismatch
    from ttfm_distill.pipeline_card import run_command
    from ttfm_distill.preflight import resolve_settings

    flow, epsilon = "flow", "epsilon"

    def resolved(prediction_type, saved=None, **kw):
        cfg, objective = resolve_settings(RunConfig(**kw))
        assert objective.options.long_jump_span == kw.get("loss_options", {}).get("long_jump_span", 0)  # not known
        cfg, objective = resolve_settings(RunConfig(**kw), prediction_type, saved)
        inner = getattr(objective, "objective", objective)  # past the trajectory rows' wrapper
        assert inner.options.long_jump_span == cfg.loss_options["long_jump_span"]  # the objective that trains
        return cfg.loss_options

    assert AUTO_LONG_JUMP_SPAN == 0.5
    assert resolved(flow) == {"long_jump_span": 0.0}
    assert resolved(epsilon) == {"long_jump_span": 0.0}
    assert resolved(flow, teacher="builtin:checkerboard") == {"long_jump_span": 0.0}  # an exact 2-D teacher
    assert resolved(flow, data="/some/images") == {"long_jump_span": 0.0}
    assert resolved(flow, loss_options={"reading": "ema_only"}) == {"reading": "ema_only", "long_jump_span": 0.0}
    assert resolved(flow, loss_options={"long_jump_span": 0.75}) == {"long_jump_span": 0.75}  # given: kept
    assert resolved(flow, {"loss_options": {"long_jump_span": 0.5}}) == {"long_jump_span": 0.5}  # resumed: kept
    assert resolved(epsilon, {"loss_options": {"long_jump_span": 0.5}}) == {"long_jump_span": 0.5}
    assert resolved(flow, {"loss_options": {}}) == {"long_jump_span": 0.0}  # a folder from before: ran without
    assert resolve_settings(RunConfig(loss="lsd"), "flow")[0].loss_options == {}
    # resuming: an unset automatic option matches what the run filled in; a given one must match it
    now = RunConfig().to_dict()
    assert resume_mismatch({"loss_options": {"long_jump_span": 0.5}}, now) == []
    assert resume_mismatch({"loss_options": {}}, now) == []
    assert resume_mismatch({"loss_options": {}}, RunConfig(loss_options={"long_jump_span": 0.0}).to_dict()) == []
    assert resume_mismatch({"loss_options": {}}, RunConfig(loss_options={"long_jump_span": 0.5}).to_dict()) == [
        "loss_options"]
    assert resume_mismatch({"loss_options": {"tau": 0.2}}, now) == ["loss_options"]  # a given option dropped
    # the model card's command leaves out what the run filled in by itself
    assert run_command({"loss_options": {"long_jump_span": 0.5}}) == "ttfm-distill run -L long_jump_span=0.5"
    assert run_command({"loss_options": {"long_jump_span": 0.0}}) == "ttfm-distill run"
    assert run_command({"loss_options": {"long_jump_span": 0.0}}, "epsilon") == "ttfm-distill run"
    assert run_command({"teacher": "builtin:checkerboard", "loss_options": {"long_jump_span": 0.0}}) == \
        "ttfm-distill run --teacher builtin:checkerboard"


def test_itvm_ema_only_reading_and_teacher_target_vanish_on_exact_map(gaussian_case):
    teacher, exact = gaussian_case
    batch = make_batch()
    assert loss_of(make_objective("itvm", reading="ema_only", tau=0.05), exact, teacher, batch) < 1e-10
    obj = make_objective("itvm", target_model="teacher", teacher_target_steps=16, teacher_solver="heun", tau=0.05)
    assert loss_of(obj, exact, teacher, batch) < 1e-5


def test_itvm_short_jumps_are_teacher_euler_steps(gaussian_case):
    """For t - s <= tau the composed target is exactly the teacher's velocity at (x_s, s)."""
    teacher, _ = gaussian_case
    n = 64
    g = torch.Generator().manual_seed(1)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.9
    t = s + 0.01
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    obj = make_objective("itvm", tau=0.05, teacher_solver="euler")
    from conftest import ExactGaussianMap

    some_model = ExactGaussianMap(torch.zeros(2, dtype=torch.float64), 2.0)
    target = obj.target(some_model, teacher, TrainBatch(x, s, t, None, g), ema=some_model)
    assert torch.allclose(target, teacher.velocity(x, s), atol=1e-12)


def test_lfmd_and_progressive_vanish_on_exact_map(gaussian_case):
    teacher, exact = gaussian_case
    from conftest import ExactGaussianMap

    wrong = ExactGaussianMap(exact.mean + 0.5, exact.std * 1.5)  # the map of another Gaussian
    batch = make_batch()
    for name, opts, tol in (("lfmd", {"derivative": "jvp"}, 1e-10), ("lfmd", {"derivative": "fd", "fd_step": 1e-4}, 1e-6),
                            ("progressive", {}, 1e-10)):
        obj = make_objective(name, **opts)
        good, bad = loss_of(obj, exact, teacher, batch), loss_of(obj, wrong, teacher, batch)
        assert good < tol and bad > 1e-3, (name, opts, good, bad)


def test_jvp_and_finite_difference_derivatives_agree_on_smooth_model():
    from ttfm_distill.mlp import MlpFlowMap

    torch.manual_seed(0)
    model = MlpFlowMap(dim=2, width=32, depth=2).double()
    batch = make_batch(n=64, diag=0.0)
    phi_j, d_j = time_derivative_jvp(model, batch.x_s, batch.s, batch.t)
    phi_f, d_f = time_derivative_fd(model, batch.x_s, batch.s, batch.t, h=1e-5)
    assert torch.allclose(phi_j, phi_f, atol=1e-7)
    assert torch.allclose(d_j, d_f, atol=1e-5, rtol=1e-4)


def test_stop_gradients_only_the_student_prediction_gets_gradients(gaussian_case):
    """The targets (EMA, teacher) must receive no gradient; the student must."""
    teacher, _ = gaussian_case
    from ttfm_distill.mlp import MlpFlowMap

    torch.manual_seed(0)
    student = MlpFlowMap(dim=2, width=16, depth=2).double()
    ema = MlpFlowMap(dim=2, width=16, depth=2).double()
    for name in sorted(OBJECTIVES):
        student.zero_grad(set_to_none=True)
        ema.zero_grad(set_to_none=True)
        out = OBJECTIVES[name]()(student, teacher, make_batch(n=64), ema)
        out.loss.backward()
        assert all(p.grad is None for p in ema.parameters()), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), name
        assert out.per_sample.shape == (64,) and not out.per_sample.requires_grad


def test_itvm_intermediate_point_gradient_option():
    """ema_only with grad_through_intermediate=False must not differentiate through y = phi(x, s, r)."""
    from ttfm_distill.mlp import MlpFlowMap

    torch.manual_seed(0)
    teacher_model = MlpFlowMap(dim=2, width=8, depth=1).double()

    class T:
        def velocity(self, x, t, cond=None):
            return teacher_model(x, t, t).detach()

    student = MlpFlowMap(dim=2, width=16, depth=2).double()
    grads = {}
    for flag in (False, True):
        student.zero_grad()
        obj = make_objective("itvm", reading="ema_only", grad_through_intermediate=flag, lambda_initial=0.0)
        obj(student, T(), make_batch(n=64, diag=0.0), student).loss.backward()
        grads[flag] = torch.cat([p.grad.flatten() for p in student.parameters()])
    assert not torch.allclose(grads[False], grads[True])


def test_unknown_loss_and_option_errors_name_the_choices():
    with pytest.raises(ValueError, match="itvm"):
        make_objective("nope")
    with pytest.raises(ValueError, match="unknown option"):
        make_objective("itvm", taux=0.1)
    with pytest.raises(ValueError, match="intermediate"):
        make_objective("itvm", intermediate="middle")


def test_time_pairs_are_ordered_and_dyadic():
    g = torch.Generator().manual_seed(0)
    s, t = sample_time_pairs(4000, "dyadic", 0.25, max_level=3, generator=g)
    assert torch.all(s <= t) and torch.all(s >= 0) and torch.all(t <= 1)
    assert (s == t).sum() == 1000
    off = s < t
    d = (t - s)[off]
    assert set(torch.unique(d).tolist()) <= {1.0, 0.5, 0.25, 0.125}
    assert torch.allclose(torch.remainder(s[off] / d, 1.0), torch.zeros_like(d))


@pytest.mark.parametrize("intermediate", ["terminal", "initial", "uniform"])
def test_itvm_diagonal_pairs_cost_one_teacher_evaluation(gaussian_case, intermediate):
    """Diagonal pairs get the teacher's velocity and nothing else; off-diagonal targets do not depend on them."""
    teacher, exact = gaussian_case
    from conftest import ExactGaussianMap

    student = ExactGaussianMap(exact.mean + 0.3, exact.std * 1.2)  # not exact: targets depend on the student

    class Counting:
        def __init__(self, inner):
            self.inner, self.rows = inner, 0

        def velocity(self, x, t, cond=None):
            self.rows += x.shape[0]
            return self.inner.velocity(x, t, cond)

        def __call__(self, x, s, t, cond=None):
            self.rows += x.shape[0]
            return self.inner(x, s, t, cond)

    obj = make_objective("itvm", intermediate=intermediate, tau=0.05)
    batch = make_batch(n=64, diag=0.5)
    diag = batch.t == batch.s
    n_diag, n_off = int(diag.sum()), int((~diag).sum())
    assert n_diag > 0 and n_off > 0
    t_count, s_count = Counting(teacher), Counting(student)
    full = obj.target(s_count, t_count, batch, s_count)
    per_off = {"terminal": 2, "initial": 2, "uniform": 0}[intermediate]  # Heun segment: two teacher calls
    assert t_count.rows == n_diag + per_off * n_off
    assert s_count.rows == {"uniform": 2, "terminal": 1, "initial": 1}[intermediate] * n_off
    torch.testing.assert_close(full[diag], teacher.velocity(batch.x_s[diag], batch.s[diag]))
    if intermediate != "uniform":  # (uniform draws r for the whole batch, so a sub-batch draws other r)
        sub = TrainBatch(batch.x_s[~diag], batch.s[~diag], batch.t[~diag], None, batch.generator)
        torch.testing.assert_close(full[~diag], obj.target(student, teacher, sub, student))


def test_long_jumps_without_a_warmed_up_ema_are_warned_about():
    """Long jumps with no EMA or an EMA without warm-up were measured harmful (2-D: KL 2.64 against 0.33 at 1
    step): the run says so in one line each; the defaults and runs without long jumps say nothing."""
    from ttfm_distill.config import RunConfig
    from ttfm_distill.preflight import settings_warnings

    on = {"long_jump_span": 0.5}
    assert settings_warnings(RunConfig(loss_options=on)) == []
    assert settings_warnings(RunConfig(loss_options={"long_jump_span": 0.0}, ema_warmup=False)) == []
    assert settings_warnings(RunConfig(loss="lsd", ema_warmup=False)) == []
    cold = settings_warnings(RunConfig(loss_options=on, ema_warmup=False))
    none = settings_warnings(RunConfig(loss_options=on, ema_decay=0.0))
    assert len(cold) == 1 and "ema_warmup" in cold[0] and len(cold[0]) <= 200
    assert len(none) == 1 and "ema_decay=0" in none[0] and len(none[0]) <= 200
    assert settings_warnings(RunConfig(loss_options=on, ema_warmup=False, ema_decay=0.9)) == []  # a fast EMA: fine


def test_the_dm_term_on_an_epsilon_teacher_is_warned_about():
    """The term collapsed an epsilon DDPM's 1-step student (docs/results.md): one line for epsilon teachers only."""
    from ttfm_distill.config import RunConfig
    from ttfm_distill.preflight import settings_warnings

    cfg = RunConfig(dm_weight=0.3)
    lines = settings_warnings(cfg, "epsilon")
    assert len(lines) == 1 and "epsilon" in lines[0] and len(lines[0]) <= 200
    assert settings_warnings(cfg, "flow") == [] and settings_warnings(cfg, "v_prediction") == []
    assert settings_warnings(RunConfig(), "epsilon") == []
