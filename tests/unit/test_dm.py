"""The distribution-matching term (objectives/dm.py, fake.py): its maths, its settings' effects, its state."""

import pytest
import torch

from ttfm_distill.config import ConfigError, RunConfig
from ttfm_distill.convention import data_estimate
from ttfm_distill.objectives.dm import (DistributionMatching, DmSettings, dm_direction, dm_loss, draw_times,
                                        fake_flow_matching_loss, rollout)


def gaussian_velocity(mean: float, std: float):
    """The exact velocity of the flow from N(0, I) noise to N(mean, std^2 I) data, package time."""

    def v(x, t, cond=None):
        tb = t.reshape(-1, *([1] * (x.ndim - 1)))
        var = tb**2 * std**2 + (1 - tb) ** 2
        x1 = mean + tb * std**2 / var * (x - tb * mean)  # E[x1 | x_t]
        return (x1 - x) / (1 - tb).clamp_min(1e-6)

    return v


def test_the_direction_moves_student_samples_towards_the_teacher_distribution():
    g = torch.Generator().manual_seed(0)
    teacher, fake = gaussian_velocity(2.0, 1.0), gaussian_velocity(-1.0, 1.0)  # the fake knows the student's law
    x_hat = -1.0 + torch.randn(512, 4, generator=g)  # the student's samples
    dm = DistributionMatching(DmSettings(weight=1.0))
    x = x_hat.clone().requires_grad_(True)
    loss, metrics = dm.student_loss(x, teacher, fake, None, None, g)
    loss.backward()
    assert (-x.grad).mean() > 0  # a descent step raises the samples' mean towards the teacher's 2.0
    assert metrics["dm_direction"] > 0
    # the same law on both sides: no direction at all
    x2 = x_hat.clone().requires_grad_(True)
    loss2, _ = dm.student_loss(x2, teacher, teacher, None, None, g)
    loss2.backward()
    assert torch.allclose(x2.grad, torch.zeros_like(x2.grad), atol=1e-7)


def test_the_loss_gradient_is_the_normalised_direction():
    g = torch.Generator().manual_seed(1)
    x_hat = torch.randn(6, 3, 2, 2, generator=g, requires_grad=True)
    x1_t, x1_f = torch.randn(6, 3, 2, 2, generator=g), torch.randn(6, 3, 2, 2, generator=g)
    d = dm_direction(x_hat, x1_t, x1_f)
    scale = (x_hat.detach() - x1_t).abs().flatten(1).mean(1)
    assert torch.allclose(d, (x1_f - x1_t) / scale[:, None, None, None])
    dm_loss(x_hat, d).sum().backward()
    assert torch.allclose(x_hat.grad, d / 12, atol=1e-7)  # 12 elements a sample
    bad = dm_direction(x_hat, x1_t, torch.full_like(x1_f, float("nan")))
    assert torch.isfinite(bad).all()


def test_the_fake_loss_divides_out_the_output_gain():
    v, target = torch.ones(2, 4), torch.zeros(2, 4)
    per = fake_flow_matching_loss(v, target, torch.tensor([1.0, 10.0], dtype=torch.float64))
    assert torch.allclose(per, torch.tensor([1.0, 0.01]))
    # a gain below 1 is not amplified
    assert torch.allclose(fake_flow_matching_loss(v, target, torch.tensor([0.5, 0.5])), torch.ones(2))


def test_time_draws_stay_in_range_for_both_modes():
    g = torch.Generator().manual_seed(2)
    for mode in ("uniform", "logit_normal"):
        t = draw_times(4000, 0.2, 0.7, mode, g)
        assert t.min() >= 0.2 and t.max() <= 0.7
    # logit-normal concentrates in the middle of the range
    mid = draw_times(4000, 0.0, 1.0, "logit_normal", g)
    uni = draw_times(4000, 0.0, 1.0, "uniform", g)
    assert ((mid - 0.5).abs() < 0.25).float().mean() > ((uni - 0.5).abs() < 0.25).float().mean() + 0.1


def test_a_rollout_of_n_steps_calls_the_student_n_times_on_the_uniform_grid():
    calls = []

    def student(x, s, t, cond=None):
        calls.append((float(s[0]), float(t[0])))
        return torch.ones_like(x)

    z = torch.zeros(3, 2)
    out = rollout(student, z, 4, None)
    assert calls == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert torch.allclose(out, torch.ones(3, 2))  # four jumps of a quarter at unit velocity


def test_data_estimate_is_the_end_point_of_the_velocity():
    x1, x0 = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.rand(5)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    assert torch.allclose(data_estimate(x_t, t, x1 - x0), x1, atol=1e-6)


def test_settings_are_checked_in_one_line():
    for bad in ({"dm_weight": -1.0}, {"dm_time_min": 0.9, "dm_time_max": 0.5}, {"dm_fake_time": "beta"},
                {"dm_rollout_steps": [0]}, {"dm_rollout_steps": []}, {"dm_fake_updates": 0},
                {"dm_weight": 0.5, "dm_gan_weight": 0.1, "lora_rank": 4}, {"init_from": "/nonexistent/run"}):
        with pytest.raises(ConfigError) as e:
            RunConfig(**bad).validate()
        assert "\n" not in str(e.value) and len(str(e.value)) <= 200


# ------------------------------------------------------------------------------------------- the run --------
def test_the_fake_network_starts_as_the_teacher_and_never_applies_guidance(tiny_teacher_dir):
    from ttfm_distill.fake import FakeVelocity
    from ttfm_distill.teachers.loading import load_teacher

    teacher = load_teacher(str(tiny_teacher_dir))
    fake = FakeVelocity.from_teacher(teacher)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(fake(x, t), teacher.velocity(x, t))
    assert all(p.requires_grad for p in fake.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())  # a copy: the teacher stays frozen


def test_a_lora_students_fake_is_adapters_on_the_shared_base_and_starts_as_the_teacher(tiny_teacher_dir):
    """The fake of a LoRA student holds no copy of the base: a second set of adapters, equal to the teacher at step
    0 (even after the student's adapters moved), trained alone, with the second time off."""
    from ttfm_distill.fake import FakeVelocity
    from ttfm_distill.lora import FakeAdapters, build_lora_student
    from ttfm_distill.teachers.loading import load_teacher

    teacher = load_teacher(str(tiny_teacher_dir))
    student, view = build_lora_student(teacher, RunConfig(lora_rank=4, seed=0))
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        for name, p in student.adapter_tensors().items():  # the student has moved away from the teacher
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        student.second_time.linear_2.bias.add_(0.1)  # (the fake must not add the second time)
        teacher_v = view.velocity(x, t)
        assert not torch.allclose(student(x, t, t), teacher_v, atol=1e-4)
    fake = FakeVelocity.from_teacher(view, student=student, seed=3)
    assert isinstance(fake.network, FakeAdapters)
    base = sum(p.numel() for n, p in student.network.named_parameters() if ".lora_" not in n)
    adapters = sum(p.numel() for p in student.adapter_tensors().values())
    assert sum(p.numel() for p in fake.parameters()) == adapters < base / 2  # no copy of the base
    with torch.no_grad():
        assert torch.allclose(fake(x, t), teacher_v, atol=1e-6)
    # its A matrices come from the seed alone, as peft draws them; its B matrices start at zero
    again = FakeVelocity.from_teacher(view, student=student, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(fake.parameters(), again.parameters()))
    assert all(torch.count_nonzero(w) == 0 for n, w in fake.network.tensors().items() if ".lora_B." in n)
    # training it moves its own tensors only: the student's adapters and the base get no gradient
    before = {n: p.detach().clone() for n, p in student.network.named_parameters()}
    (fake(x, t) - 1.0).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in fake.network.tensors().items()
               if ".lora_B." in n)
    assert all(p.grad is None for p in student.parameters())
    with torch.no_grad():
        for p in fake.parameters():
            p.sub_(0.1 * p.grad)
        assert not torch.allclose(fake(x, t), teacher_v, atol=1e-4)  # the fake moved,
        assert torch.allclose(view.velocity(x, t), teacher_v, atol=1e-6)  # the teacher did not,
    assert all(torch.equal(p, before[n]) for n, p in student.network.named_parameters())  # nor the student
    assert set(fake.state_dict()) == {"network.weights." + n.replace(".", "/") for n in student.adapter_tensors()}


def test_a_lora_fakes_gradients_survive_gradient_checkpointing(tiny_teacher_dir):
    """Backward recomputes a checkpointed block after the fake's call has returned: it must recompute it with the
    fake's adapters and without the second time, so the fake's gradients are those of the plain network."""
    from ttfm_distill.fake import FakeVelocity
    from ttfm_distill.lora import build_lora_student
    from ttfm_distill.teachers.loading import load_teacher

    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0.1, 0.5, 0.9])
    grads = []
    for checkpointing in (False, True):
        student, view = build_lora_student(load_teacher(str(tiny_teacher_dir)), RunConfig(lora_rank=4, seed=0))
        with torch.no_grad():
            for name, p in student.adapter_tensors().items():  # the student's adapters differ from the fake's
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
            student.second_time.linear_2.bias.add_(0.1)
        if checkpointing:
            student.enable_gradient_checkpointing()
        fake = FakeVelocity.from_teacher(view, student=student, seed=3)
        with torch.no_grad():
            for p in fake.parameters():  # a fake that has trained a little
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        student(x, t, t).pow(2).mean().backward()  # a student call between the fake's forward and its backward
        student.zero_grad(set_to_none=True)
        v = fake(x, t)
        student(x, 0 * t, t).sum()  # (another call in between, without backward)
        (v - 1.0).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in fake.named_parameters()})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_an_exact_teachers_fake_starts_as_the_teacher_and_trains_only_its_residual():
    """An exact teacher has no network to copy: the fake is its velocity plus a zero-started MLP (dm_exact_fake
    resolved to residual), so it equals the teacher at step 0; "mlp" is the fresh MLP of earlier folders."""
    from ttfm_distill.fake import ExactResidual, FakeVelocity
    from ttfm_distill.teachers.analytic import get_analytic_teacher

    teacher = get_analytic_teacher("checkerboard")
    x, t = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), torch.linspace(0.05, 0.95, 64)
    fake = FakeVelocity.from_teacher(teacher, 32, 2, exact="residual")
    assert isinstance(fake.network, ExactResidual)
    with torch.no_grad():
        assert torch.allclose(fake(x, t), teacher.velocity(x, t).float())
        fresh = FakeVelocity.from_teacher(teacher, 32, 2, exact="mlp")(x, t)
    assert (fresh - teacher.velocity(x, t)).abs().mean() > 0.1  # a random MLP is far from the teacher
    (fake(x, t) - 1.0).pow(2).mean().backward()  # the gradient reaches the residual's weights, and only them
    assert set(fake.state_dict()) == {f"network.mlp.{k}" for k in fake.network.mlp.state_dict()}
    assert fake.network.mlp.net[-1].weight.grad.abs().sum() > 0
    resolved = RunConfig(teacher="builtin:checkerboard", dm_weight=0.3).resolve_automatic("flow")
    assert resolved.dm_exact_fake == "residual"
    old = RunConfig(teacher="builtin:checkerboard", dm_weight=0.3).resolve_automatic("flow", saved={"dm_weight": 0.3})
    assert old.dm_exact_fake == "mlp"  # a folder from before the setting resumes with the fake it trained


def test_the_dm_stage_starts_where_the_runs_fitted_step_count_puts_it(tiny_teacher_dir):
    """A time budget fits the step count after the term is made: the stage must follow the count the run trains
    (run state), not the max_steps it was made with."""
    from accelerate import Accelerator

    from ttfm_distill.fake import DmTerm
    from ttfm_distill.runstate import RunState
    from ttfm_distill.teachers.loading import load_teacher

    cfg = RunConfig(max_steps=1000, lr=1e-4, dm_weight=0.3, dm_stage_steps=100)
    state = RunState(1000)
    term = DmTerm.for_run(cfg, state, load_teacher(str(tiny_teacher_dir)), "cpu", Accelerator(cpu=True))
    assert not term.runs_at(899) and term.runs_at(900)
    state.fitted_steps = 400  # what BudgetClock.fitted returns at the warm-up's end
    assert not term.runs_at(299) and term.runs_at(300) and term.runs_at(399)
    assert DmTerm.for_run(RunConfig(max_steps=10, lr=1e-4, dm_weight=0.3), RunState(10),
                          load_teacher(str(tiny_teacher_dir)), "cpu", Accelerator(cpu=True)).runs_at(0)


def test_the_lr_schedule_ends_where_a_dm_stage_starts_and_restarts_there():
    from ttfm_distill.config import RunConfig
    from ttfm_distill.schedules import lr_factor

    cfg = RunConfig(max_steps=1000, lr=4e-4, lr_schedule="cosine", lr_final_fraction=0.25, warmup_steps=50,
                    dm_weight=0.3, dm_stage_steps=200, dm_stage_lr=1e-4)
    plain = RunConfig(max_steps=800, lr=4e-4, lr_schedule="cosine", lr_final_fraction=0.25, warmup_steps=50)
    assert cfg.dm_stage_start(1000) == 800
    # before the stage: the schedule of an 800-step run, ending at its final fraction
    assert all(lr_factor(k, cfg, 1000) == lr_factor(k, plain, 800) for k in range(800))
    assert lr_factor(799, cfg, 1000) == pytest.approx(0.25)
    # the stage: its own warm-up from dm_stage_lr, then the same cosine over its 200 steps
    ratio = 1e-4 / 4e-4
    assert lr_factor(800, cfg, 1000) == pytest.approx(ratio / 50)
    assert lr_factor(849, cfg, 1000) == pytest.approx(ratio)
    assert lr_factor(999, cfg, 1000) == pytest.approx(ratio * 0.25)
    # a run shorter than the stage is all stage
    short = RunConfig(max_steps=100, lr=4e-4, dm_weight=0.3, dm_stage_steps=200)
    assert short.dm_stage_start(100) == 0 and RunConfig().dm_stage_start(3500) is None


def test_the_dm_stage_is_the_default_for_a_flow_image_teachers_long_itvm_run_alone():
    """Unset dm_weight and dm_stage_steps: a 400-step stage at weight 0.3 ends a flow image teacher's ITVM run of
    DM_STAGE_MIN_RUN (1400) steps or more (chosen on the zoo's two flow teachers); every other run has no term; a given value wins;
    a folder written before the settings were automatic resumes without the term."""
    from ttfm_distill.config import DM_STAGE_MIN_RUN, DM_STAGE_STEPS, DM_STAGE_WEIGHT

    def resolved(prediction_type="flow", saved=None, **kw):
        cfg = RunConfig(**kw).validate().resolve_automatic(prediction_type, saved)
        return cfg.validate().dm_weight, cfg.dm_stage_steps

    stage = (DM_STAGE_WEIGHT, DM_STAGE_STEPS)
    assert resolved() == stage == (0.3, 400)
    assert resolved(max_steps=DM_STAGE_MIN_RUN) == stage and DM_STAGE_MIN_RUN == 1400
    off = (0.0, 0)
    assert resolved(lora_rank=4) == stage  # a LoRA student's fake is adapters on the shared base
    for prediction_type, kw in [("epsilon", {}), ("v_prediction", {}), ("flow", {"max_steps": DM_STAGE_MIN_RUN - 1}),
                                ("flow", {"loss": "lsd"}),
                                ("flow", {"teacher": "builtin:checkerboard"}), ("flow", {"dm_stage_steps": 0})]:
        assert resolved(prediction_type, **kw) == off, (prediction_type, kw)
    # a given weight: the stage in a long run, the term from step 0 in a short one or from dm_start_step
    assert resolved(dm_weight=0.5) == (0.5, 400)
    assert resolved(dm_weight=0.5, max_steps=800) == (0.5, 0)
    assert resolved(dm_weight=0.3, dm_start_step=100) == (0.3, 0)
    assert resolved(dm_weight=0.0) == off
    # a stage asked for brings the term's weight, on any teacher (an epsilon one is warned about at the run's start)
    assert resolved("epsilon", dm_stage_steps=100) == (0.3, 100)
    assert resolved(lora_rank=4, dm_stage_steps=100) == (0.3, 100)  # asked for: a LoRA student's fake is adapters
    # resumed: what the folder ran with, and no term for a folder from before the settings existed
    assert resolved(saved={"dm_weight": 0.0, "dm_stage_steps": 0}) == off
    assert resolved(saved={}) == off
    assert resolved(saved={"dm_weight": 0.3, "dm_stage_steps": 400}) == stage


def test_the_sample_grid_title_names_the_stage_a_run_ended_with():
    from ttfm_distill.finish import recipe_line

    run = RunConfig().resolve_automatic("flow")
    assert recipe_line(run, 3500) == "itvm, 3500 steps, the last 400 with distribution matching"
    assert recipe_line(RunConfig().resolve_automatic("epsilon"), 3500) == "itvm, 3500 steps"
    assert recipe_line(RunConfig(dm_weight=0.3, max_steps=800).resolve_automatic("flow"), 800) == \
        "itvm + distribution matching, 800 steps"


def test_the_adversarial_maths():
    """Pooling of maps and tokens, the two non-saturating losses, and a gradient carried to the student."""
    import torch.nn.functional as F

    from ttfm_distill.objectives.adversarial import (DiscriminatorHead, discriminator_loss, generator_loss,
                                                     pool_features, through)

    maps = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.allclose(pool_features(maps), maps.mean(dim=(2, 3)))
    tokens = torch.arange(24.0).reshape(1, 4, 6)
    assert torch.allclose(pool_features(tokens), tokens.mean(dim=1))
    assert DiscriminatorHead(6)(tokens).shape == (1,)
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    assert torch.isclose(discriminator_loss(real, fake), F.softplus(-real).mean() + F.softplus(fake).mean())
    assert torch.isclose(generator_loss(fake), F.softplus(-fake).mean())
    # a confident discriminator: real high, fake low -> small discriminator loss, large generator loss
    assert discriminator_loss(torch.tensor([9.0]), torch.tensor([-9.0])) < 1e-3 < generator_loss(torch.tensor([-9.0]))
    x = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    through(x * 2, g).backward()
    assert torch.allclose(x.grad, 2 * g)


def test_the_discriminator_reads_the_middle_of_a_unet_and_of_a_transformer():
    from diffusers import DiTTransformer2DModel, UNet2DModel

    from ttfm_distill.fake import FeatureTap, feature_module

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1)
    assert feature_module(unet) is unet.mid_block
    tap = FeatureTap(feature_module(unet))
    unet(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert tap.take().shape == (2, 16, 4, 4)
    with pytest.raises(RuntimeError, match="did not run"):
        tap.take()
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)
    assert feature_module(dit) is dit.transformer_blocks[1]
