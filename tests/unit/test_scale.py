"""Training at scale on CPU: mixed precision, gradient accumulation, checkpointing, compile, sharded-state paths."""

import copy

import pytest
import torch

from tiny_models import TINY_CONFIGS
from ttfm_distill import scale
from ttfm_distill.config import ConfigError, RunConfig
from ttfm_distill.objectives import TrainBatch, make_objective
from ttfm_distill.objectives.timesampling import sample_time_pairs
from ttfm_distill.teachers.loading import load_teacher
from ttfm_distill.step import backward_micro_batches
from ttfm_distill.factory import build_student


# ------------------------------------------------------- mixed precision ----
def test_keep_in_fp32_under_autocast_and_after_deepcopy():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.SiLU(), torch.nn.Linear(16, 16))
    x = torch.randn(4, 16)
    exact = lin(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = lin(x)
    assert plain.dtype == torch.bfloat16  # autocast would run the embedder in 8 mantissa bits
    scale.keep_in_fp32(lin)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = lin(x)
    assert kept.dtype == torch.float32 and torch.equal(kept, exact)
    twin = copy.deepcopy(lin)  # the EMA is a deepcopy: its forward must use its own weights
    with torch.no_grad():
        twin[0].weight.add_(1.0)
    assert not torch.allclose(twin(x), lin(x))


# ------------------------------------------------------ frozen networks ----
@pytest.mark.parametrize("key", ["tiny-unet", "DiTTransformer2DModel", "FluxTransformer2DModel"])
def test_frozen_teacher_held_in_bf16_computes_as_fp32_weights_under_autocast(key, tiny_teacher_dir):
    """Held in bf16 (linear and convolution weights; norms, tables and the time embedders fp32): under the run's
    autocast exactly the fp32-held teacher's velocity (autocast makes those very casts), 2 bytes less for each
    weight cast; outside autocast an fp32 evaluation from the held weights."""
    from tiny_models import SAMPLE_SIZE, build

    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher

    def make():
        if key == "tiny-unet":
            return load_teacher(str(tiny_teacher_dir))
        return DiffusersFlowTeacher(build(key), source=key, sample_size=SAMPLE_SIZE.get(key))

    plain, held = make(), make()
    scale.keep_time_embedders_fp32(plain)
    scale.keep_time_embedders_fp32(held)
    before = scale.frozen_bytes(held.network)
    assert scale.hold_frozen(held.network, "bf16") > 0
    kept = {id(m) for k in held.network.modules() if getattr(k, "_ttfm_keep_fp32", False) for m in k.modules()}
    dtypes = {}
    for m in held.network.modules():
        if id(m) not in kept:
            dtypes.setdefault(type(m).__name__, set()).update(p.dtype for p in m.parameters(recurse=False))
    assert dtypes["Linear"] == {torch.bfloat16}
    assert all(d == {torch.float32} for name, d in dtypes.items() if "Norm" in name and d)
    embedders = held.adapter.time_embedders(held.network)
    assert all(p.dtype == torch.float32 for e in embedders for p in e.parameters())
    assert held.network.dtype == torch.float32  # what diffusers casts some inputs to (UNet2DModel: the time projection)
    assert torch.equal(next(held.network.parameters()), next(plain.network.parameters()))  # that layer never rounded
    halved = sum(p.numel() for m in held.network.modules() for p in m.parameters(recurse=False)
                 if p.dtype == torch.bfloat16)
    assert halved > 0 and scale.frozen_bytes(held.network) == before - 2 * halved

    g = torch.Generator().manual_seed(2)
    x = held.sample_noise(4, generator=g)
    t = torch.rand(4, generator=g)
    cond = held.sample_cond(4, generator=g)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v_plain, v_held = plain.velocity(x, t, cond), held.velocity(x, t, cond)
        assert torch.equal(v_held, v_plain)
        exact, outside = plain.velocity(x, t, cond), held.velocity(x, t, cond)  # no autocast: fp32 arithmetic
    assert outside.dtype == torch.float32
    err = lambda a: ((a.float() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert 0 < err(outside) < 0.02 and err(outside) < err(v_held)  # only the weights' rounding, less than autocast's


def test_frozen_helpers_refuse_trainable_modules_and_bad_precision():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"^hold_frozen: the module has trainable parameters; freeze it"):
        scale.hold_frozen(lin, "bf16")
    with pytest.raises(ValueError, match=r"^shard_frozen: the module has trainable parameters; freeze it"):
        scale.shard_frozen(lin)
    with pytest.raises(ValueError, match=r"^hold_frozen: mixed_precision must be no, bf16 or fp16, got 'fp8'"):
        scale.hold_frozen(lin.requires_grad_(False), "fp8")
    assert scale.hold_frozen(lin, "no") == 0 and lin.weight.dtype == torch.float32


def test_a_student_built_from_a_held_teacher_is_a_fresh_fp32_network(tiny_teacher_dir):
    """Export under FSDP rebuilds the student from the (held, sharded) teacher, then loads the gathered weights."""
    teacher = load_teacher(str(tiny_teacher_dir))
    plain = build_student(teacher, RunConfig())
    scale.hold_frozen(teacher.network, "bf16")
    twin = build_student(teacher, RunConfig())
    assert type(twin.network) is type(teacher.network)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in twin.parameters())
    twin.load_state_dict(plain.state_dict(), strict=True)  # the same keys and shapes as a student of the plain one
    assert not any("forward" in vars(m) for m in twin.modules())  # none of the held layers' forwards came along


# -------------------------------------------------- gradient accumulation ----
def _batch(teacher, n, seed):
    g = torch.Generator().manual_seed(seed)
    x1 = teacher.sample_noise(n, generator=g) * 0.5
    x0 = teacher.sample_noise(n, generator=g)
    s, t = sample_time_pairs(n, "mixed", 0.25, generator=g)
    from ttfm_distill.convention import interpolate

    return TrainBatch(interpolate(x0, x1, s), s, t, None, g)


def test_two_micro_batches_of_8_give_the_update_of_one_batch_of_16(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))
    accelerator = scale.make_accelerator("no", False, cpu=True)
    objective = make_objective("itvm")
    batch = _batch(teacher, 16, seed=3)

    def grads(n_micro, b=batch):
        student = build_student(teacher, RunConfig())
        with torch.no_grad():  # move off the teacher so every parameter sees a gradient
            student.second_time.linear_2.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
        loss, metrics, finite = backward_micro_batches(accelerator, student, objective, teacher, b, None, n_micro)
        assert finite and set(metrics) == {"terminal", "initial"}
        return loss.item(), torch.cat([p.grad.flatten() for p in student.parameters()])

    loss1, g1 = grads(1)
    loss2, g2 = grads(2)
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(g2, g1) < 1e-5  # float32 rounding of the batch sums only
    _, half = grads(1, batch.split(2)[0])  # not vacuous: one micro-batch alone is a different update
    assert rel(half, g1) > 0.1


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        RunConfig(batch_size=12, grad_accum_steps=5).validate()


# ------------------------------------------------ gradient checkpointing ----
def test_gradient_checkpointing_same_loss_and_gradients(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))
    batch = _batch(teacher, 8, seed=5)
    objective = make_objective("itvm")

    def run(checkpointing):
        student = build_student(teacher, RunConfig())
        with torch.no_grad():
            student.second_time.linear_2.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            scale.enable_gradient_checkpointing(student)
        calls = []
        student.network.down_blocks[0].resnets[0].register_forward_pre_hook(lambda *a: calls.append(1))
        loss = objective(student, teacher, batch, None).loss
        before = len(calls)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in student.parameters()], len(calls) - before

    loss_a, grads_a, recomputed_a = run(False)
    loss_b, grads_b, recomputed_b = run(True)
    assert recomputed_a == 0 and recomputed_b == 1  # the block really ran again in backward
    assert loss_a == loss_b
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads_a, grads_b))


@pytest.mark.parametrize("key", sorted(TINY_CONFIGS))
def test_gradient_checkpointing_every_family_same_loss_gradients_and_step(key):
    """Checkpointing on and off: the same ITVM loss, gradients and AdamW step, for a tiny model of each family.

    DiT embeds the time inside each checkpointed block, so backward re-runs its time embedders, and with them
    the second-time hook; the loss adds a second student call at other times before the one backward, so a
    recomputation that saw any second time but its own call's would change the gradients.
    """
    from tiny_models import SAMPLE_SIZE, build

    from ttfm_distill.convention import interpolate
    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher

    teacher = DiffusersFlowTeacher(build(key), source=key, sample_size=SAMPLE_SIZE.get(key))
    objective = make_objective("itvm")

    def run(checkpointing):
        student = build_student(teacher, RunConfig())
        with torch.no_grad():  # a second time that matters: its embedding's last layer off zero
            student.second_time.linear_2.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            scale.enable_gradient_checkpointing(student)
        g = torch.Generator().manual_seed(5)
        x1, x0 = teacher.sample_noise(4, generator=g) * 0.5, teacher.sample_noise(4, generator=g)
        s, t = sample_time_pairs(4, "mixed", 0.0, generator=g)
        batch = TrainBatch(interpolate(x0, x1, s), s, t, teacher.sample_cond(4, generator=g), g)
        loss = objective(student, teacher, batch, None).loss
        loss = loss + student(batch.x_s, s, s + (t - s) / 3, batch.cond).pow(2).mean()
        calls = []
        hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in student.network.modules()]
        loss.backward()
        for h in hooks:
            h.remove()
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        torch.optim.AdamW(student.parameters(), lr=1e-3).step()
        return loss.item(), grads, {n: p.detach().clone() for n, p in student.named_parameters()}, len(calls)

    loss_a, grads_a, after_a, recomputed_a = run(False)
    loss_b, grads_b, after_b, recomputed_b = run(True)
    assert recomputed_a == 0 and recomputed_b > 0  # blocks really ran again in backward
    assert loss_a == loss_b
    assert grads_a["second_time.linear_1.weight"].abs().sum() > 0  # the second time's embedding is trained too
    torch.testing.assert_close(grads_b, grads_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(after_b, after_a, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_refused_where_unsupported():
    from ttfm_distill.mlp import MlpFlowMap

    with pytest.raises(ConfigError, match="does not support it"):
        scale.enable_gradient_checkpointing(MlpFlowMap())


# ------------------------------------------------------- sharded state -----
def test_gathered_state_paths_round_trip_single_process(tiny_teacher_dir):
    """The FSDP branch of checkpointing (full model state, name-keyed full optimizer state) on one process.

    Accelerate 1.15 enables FSDP only on GPU-class devices (``state.py``: the FSDP type is set for
    MULTI_GPU and the like, never MULTI_CPU); real sharding on CPU processes is in ``test_fsdp.py``.
    """
    teacher = load_teacher(str(tiny_teacher_dir))
    accelerator = scale.make_accelerator("no", False, cpu=True)
    assert not scale.is_sharded(accelerator)
    student = build_student(teacher, RunConfig())
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    wrapped, optimizer = accelerator.prepare(student, optimizer)
    batch = _batch(teacher, 8, seed=7)
    objective = make_objective("itvm")

    def step():
        backward_micro_batches(accelerator, wrapped, objective, teacher, batch, None, 1)
        optimizer.step()
        optimizer.zero_grad()

    step()
    full = scale.full_model_state(accelerator, wrapped, student, sharded=True)
    assert full.keys() == student.state_dict().keys()
    assert all(torch.equal(full[k], v) for k, v in student.state_dict().items())
    opt = copy.deepcopy(scale.optimizer_state(accelerator, wrapped, optimizer, sharded=True))  # as if written to disk
    assert set(opt["state"]) == {n for n, _ in student.named_parameters()}  # keyed by name, not position
    model_copy = copy.deepcopy(student.state_dict())
    step()
    after = {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(model_copy)
    scale.load_optimizer_state(accelerator, wrapped, optimizer, opt, sharded=True)
    step()
    assert all(torch.equal(after[k], v) for k, v in student.state_dict().items())  # resumed exactly
