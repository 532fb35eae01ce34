"""LSD and MeanFlow objectives: exact-map residuals, jvp vs finite differences, stop-gradients, one grad call."""

import pytest
import torch
from conftest import ExactGaussianMap, make_pair_batch

from ttfm_distill.mlp import MlpFlowMap
from ttfm_distill.objectives import OBJECTIVES, make_objective

VARIANTS = [
    ("lsd", {"derivative": "jvp"}, 1e-12),
    ("lsd", {"derivative": "fd", "fd_step": 1e-4}, 1e-7),
    ("lsd", {"derivative": "jvp", "target_model": "ema"}, 1e-12),
    ("meanflow", {"derivative": "jvp"}, 1e-12),
    ("meanflow", {"derivative": "fd", "fd_step": 1e-4}, 1e-7),
    ("meanflow", {"derivative": "jvp", "adaptive_p": 1.0}, 1e-8),
]


def make_batch(n=256, **kw):
    return make_pair_batch(n, **kw)


class CountingModel(torch.nn.Module):
    """Records ``torch.is_grad_enabled()`` at every call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = []

    def forward(self, x, s, t, cond=None):
        self.calls.append(torch.is_grad_enabled())
        return self.inner(x, s, t, cond)


def test_registered():
    assert {"lsd", "meanflow"} <= set(OBJECTIVES)
    assert make_objective("lsd", target_model="ema").needs_ema and not make_objective("lsd").needs_ema
    with pytest.raises(ValueError, match="target_model"):
        make_objective("lsd", target_model="teacher")
    with pytest.raises(ValueError, match="derivative"):
        make_objective("meanflow", derivative="exact")


@pytest.mark.parametrize("name,opts,tol", VARIANTS)
def test_vanishes_on_exact_map_not_on_wrong_map(gaussian_case, name, opts, tol):
    teacher, exact = gaussian_case
    wrong = ExactGaussianMap(exact.mean + 0.5, exact.std * 1.5)  # the map of another Gaussian
    obj = make_objective(name, **opts)
    batch = make_batch()
    good = obj(exact, teacher, batch, exact)
    bad = obj(wrong, teacher, batch, wrong)
    assert good.loss.item() < tol and bad.loss.item() > 1e-3, (good.loss.item(), bad.loss.item())
    assert good.per_sample.shape == (256,) and not good.per_sample.requires_grad


def test_lsd_terms_separate_anchor_and_consistency(gaussian_case):
    """The map of another Gaussian is self-consistent (only the teacher anchor sees it); a map with the right
    diagonal but a wrong off-diagonal only fails the Lagrangian term; an EMA target is really used."""
    teacher, exact = gaussian_case
    other = ExactGaussianMap(exact.mean + 0.5, exact.std * 1.5)
    perturbed = ExactGaussianMap(exact.mean, exact.std, error=0.3)  # u + 0.3 sin(3x) (t - s)
    batch = make_batch()
    for derivative in ("jvp", "fd"):
        obj = make_objective("lsd", derivative=derivative, fd_step=1e-4)
        m_other = obj(other, teacher, batch).metrics
        m_pert = obj(perturbed, teacher, batch).metrics
        assert m_other["initial"] > 1e-2 and m_other["lagrangian"] < 1e-7, m_other
        assert m_pert["initial"] < 1e-12 and m_pert["lagrangian"] > 1e-2, m_pert
    obj = make_objective("lsd", derivative="jvp", target_model="ema")
    assert obj(exact, teacher, batch, other).metrics["lagrangian"] > 1e-2
    assert obj(exact, teacher, batch, exact).loss.item() < 1e-12
    for derivative in ("jvp", "fd"):  # MeanFlow sees the perturbation too
        metrics = make_objective("meanflow", derivative=derivative)(perturbed, teacher, batch).metrics
        assert metrics["average_velocity"] > 1e-3


def test_meanflow_identity_sign_on_exact_map(gaussian_case):
    """The exact average velocity satisfies u = v + (t - s) du/ds; the other sign does not."""
    teacher, exact = gaussian_case
    batch = make_batch(diag=0.0)
    obj = make_objective("meanflow")
    target = obj.target(exact, teacher, batch)
    u = exact(batch.x_s, batch.s, batch.t)
    assert torch.allclose(target, u, atol=1e-10)
    v = teacher.velocity(batch.x_s, batch.s)
    flipped = 2 * v - target  # v - (t - s) du/ds
    assert (flipped - u).pow(2).mean() > 1e-2


def test_meanflow_diagonal_target_is_teacher_velocity(gaussian_case):
    teacher, _ = gaussian_case
    torch.manual_seed(0)
    model = MlpFlowMap(dim=2, width=16, depth=2).double()
    batch = make_batch(n=64, diag=1.0)
    target = make_objective("meanflow").target(model, teacher, batch)
    assert torch.equal(target, teacher.velocity(batch.x_s, batch.s))


@pytest.mark.parametrize("name", ["lsd", "meanflow"])
def test_jvp_and_fd_agree_on_smooth_model(gaussian_case, name):
    """Same loss, per-sample values and gradient with both derivative estimators."""
    teacher, _ = gaussian_case
    torch.manual_seed(0)
    model = MlpFlowMap(dim=2, width=32, depth=2).double()
    batch = make_batch(n=64)
    out = {}
    for derivative in ("jvp", "fd"):
        model.zero_grad(set_to_none=True)
        res = make_objective(name, derivative=derivative, fd_step=1e-5)(model, teacher, batch, None)
        res.loss.backward()
        out[derivative] = (res.per_sample, torch.cat([p.grad.flatten() for p in model.parameters()]), res.metrics)
    (ps_j, g_j, m_j), (ps_f, g_f, m_f) = out["jvp"], out["fd"]
    assert ps_j.abs().max() > 1e-3  # a random net: a non-trivial residual
    assert torch.allclose(ps_j, ps_f, rtol=1e-4, atol=1e-8)
    assert torch.allclose(g_j, g_f, rtol=1e-3, atol=1e-6)
    for key in m_j:
        assert m_j[key] == pytest.approx(m_f[key], rel=1e-4)


def test_lsd_diagonal_rows_match_flow_matching(gaussian_case):
    """On an all-diagonal batch LSD is flow matching against the teacher, with either derivative."""
    teacher, _ = gaussian_case
    torch.manual_seed(0)
    model = MlpFlowMap(dim=2, width=16, depth=2).double()
    batch = make_batch(n=64, diag=1.0)
    fm = (model(batch.x_s, batch.s, batch.s) - teacher.velocity(batch.x_s, batch.s)).pow(2).mean(1).float()
    for derivative in ("jvp", "fd"):
        out = make_objective("lsd", derivative=derivative, lambda_diagonal=2.0)(model, teacher, batch, None)
        assert torch.allclose(out.per_sample, 2.0 * fm, rtol=1e-6)
        assert out.metrics["lagrangian"] == 0.0


ONE_CALL_VARIANTS = [
    ("lsd", {"derivative": "jvp"}),
    ("lsd", {"derivative": "fd"}),
    ("lsd", {"derivative": "fd", "target_model": "ema"}),
    ("meanflow", {"derivative": "jvp"}),
    ("meanflow", {"derivative": "fd", "adaptive_p": 0.5}),
]


@pytest.mark.parametrize("name,opts", ONE_CALL_VARIANTS)
@pytest.mark.parametrize("diag", [0.0, 0.25, 1.0])
def test_one_grad_call_and_stop_gradient(gaussian_case, name, opts, diag):
    teacher, _ = gaussian_case
    torch.manual_seed(0)
    student = CountingModel(MlpFlowMap(dim=2, width=16, depth=2).double())
    ema = CountingModel(MlpFlowMap(dim=2, width=16, depth=2).double())
    out = make_objective(name, **opts)(student, teacher, make_batch(n=64, diag=diag), ema)
    out.loss.backward()
    assert sum(student.calls) == 1, student.calls  # exactly one call carries gradient
    assert not any(ema.calls)
    if opts.get("target_model") == "ema" and diag < 1.0:
        assert ema.calls  # the EMA provided the target
    assert all(p.grad is None for p in ema.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert out.per_sample.shape == (64,) and not out.per_sample.requires_grad
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("name,opts", [("lfmd", {"derivative": "fd"}), ("lsd", {"derivative": "jvp"}),
                                       ("meanflow", {"derivative": "jvp"})])
def test_adaptive_weight_is_the_gradient_of_log_residual(gaussian_case, name, opts):
    """With ``adaptive_p = 1`` each sample's gradient is that of ``log(l + c)``; ``p = 0`` is the plain loss; the
    weighting really changes the gradient (a large-residual sample no longer dominates)."""
    teacher, _ = gaussian_case
    model = MlpFlowMap(2, 32, 2).double()
    batch = make_batch(64, seed=3)
    c = 1e-2

    def grads(**extra):
        model.zero_grad()
        make_objective(name, **opts, **extra)(model, teacher, batch, model).loss.backward()
        return torch.cat([p.grad.flatten().clone() for p in model.parameters()])

    plain, weighted = grads(), grads(adaptive_p=1.0, adaptive_c=c)
    out = make_objective(name, **opts)(model, teacher, batch, model)
    residual = out.per_sample  # p = 0: the per-sample loss is the residual (lambda_diagonal = 1)
    assert torch.allclose(plain, grads(adaptive_p=0.0))
    assert not torch.allclose(plain, weighted, rtol=1e-3)
    w = 1.0 / (residual + c)
    # the weighted loss's gradient is the mean of the per-sample gradients, each scaled by 1 / (l_i + c)
    per_sample_grads = []
    for i in range(len(residual)):
        model.zero_grad()
        o = make_objective(name, **opts)
        sub = type(batch)(batch.x_s[i:i + 1], batch.s[i:i + 1], batch.t[i:i + 1], None, batch.generator)
        o(model, teacher, sub, model).loss.backward()
        per_sample_grads.append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
    expected = (w[:, None] * torch.stack(per_sample_grads)).mean(0)
    err = (weighted - expected).abs().max() / expected.abs().max()
    assert err < 1e-6, err  # float64; batch-size-dependent summation order only


def test_itvm_adaptive_weight_rescales_each_pairs_gradient_by_its_normalised_weight(gaussian_case):
    """ITVM's ``adaptive_p``: each pair's gradient scaled by ``w_i / mean(w)`` with ``w_i = 1 / (l_i + c)^p``, so
    only the relative weights change; ``p = 0`` is the plain loss."""
    teacher, _ = gaussian_case
    model = MlpFlowMap(2, 32, 2).double()
    batch = make_batch(48, seed=5)
    c, p = 1e-2, 0.5

    def grads(b, **extra):
        model.zero_grad()
        make_objective("itvm", **extra)(model, teacher, b, model).loss.backward()
        return torch.cat([q.grad.flatten().clone() for q in model.parameters()])

    plain, weighted = grads(batch), grads(batch, adaptive_p=p, adaptive_c=c)
    assert torch.allclose(plain, grads(batch, adaptive_p=0.0))
    assert not torch.allclose(plain, weighted, rtol=1e-3)
    loss = make_objective("itvm")(model, teacher, batch, model).per_sample
    w = 1.0 / (loss + c) ** p
    w = w / w.mean()
    rows = [type(batch)(batch.x_s[i:i + 1], batch.s[i:i + 1], batch.t[i:i + 1], None, batch.generator)
            for i in range(len(loss))]
    expected = (w[:, None] * torch.stack([grads(r) for r in rows])).mean(0)
    assert (weighted - expected).abs().max() / expected.abs().max() < 1e-6
    with pytest.raises(ValueError, match="adaptive"):
        make_objective("itvm", adaptive_p=-1.0)
