"""A second teacher unlike the embedded one (issue 14, part 4; docs/second-teacher.md): an epsilon DDPM UNet.

The DDIM-like time grid (uniform in the scheduler's timesteps) and the ``velocity`` student output.
"""

import json

import pytest
import torch

from ttfm_distill import convention as C
from ttfm_distill.config import ConfigError, RunConfig
from ttfm_distill.sampling import euler, resolve_time_grid, time_grid, uniform_time_grid


def _acp():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="linear").alphas_cumprod


def _pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, generator=g) * 0.9
    return torch.randn(n, 1, 8, 8, generator=g), s, s + (1 - s) * torch.rand(n, generator=g)


# -------------------------------------------------------------- time grid --
def test_timestep_times_invert_the_network_timestep():
    io = C.DiffusionIO(_acp(), "epsilon")
    k = torch.tensor([0.0, 1.5, 250.0, 637.25, 999.0], dtype=torch.float64)
    t = io.t_of_timestep(k)
    assert bool((t[1:] < t[:-1]).all())  # a larger timestep is noisier: earlier package time
    torch.testing.assert_close(io.timestep(t), k, atol=1e-6, rtol=0)
    assert abs(float(t[-1]) - io.t_min) < 1e-9 and abs(float(t[0]) - io.t_max) < 1e-9


def test_timesteps_grid_is_ddim_trailing_spacing_and_uniform_for_flow_teachers():
    io = C.DiffusionIO(_acp(), "epsilon")
    grid = time_grid(4, kind="timesteps", io=io)
    assert grid[0] == 0 and grid[-1] == 1 and bool((grid[1:] > grid[:-1]).all())
    torch.testing.assert_close(grid[1:-1].double(), io.t_of_timestep(torch.tensor([749.0, 499.0, 249.0])).float()
                               .double(), atol=1e-6, rtol=0)
    flow = C.NetworkIO(C.TimestepUnits())
    assert torch.equal(time_grid(4, 3.0, "timesteps", flow), uniform_time_grid(4, 3.0))
    assert resolve_time_grid("timesteps", io) == "timesteps" and resolve_time_grid("timesteps", flow) == "uniform"
    with pytest.raises(ValueError, match="time_grid"):
        time_grid(4, kind="karras")


def test_euler_on_the_timesteps_grid_is_diffusers_ddim():
    """From the same point at DDIM's first timestep, Euler on the linear path at the grid's times is DDIM (eta 0,
    trailing spacing): the convention and the grid agree with diffusers' own sampler.  Without the clip: where
    the clamp acts, DDIM re-mixes the clamped data estimate with the network's noise estimate, which no
    velocity field does (docs/second-teacher.md)."""
    from conftest import tiny_unet
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    net = tiny_unet().eval()
    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True)
    steps = 4
    sched.set_timesteps(steps)
    io = C.DiffusionIO(sched.alphas_cumprod, "epsilon")
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_t.clone()
    with torch.no_grad():
        for k in sched.timesteps:
            x = sched.step(net(x, k).sample, k, x, eta=0.0).prev_sample
        grid = time_grid(steps, kind="timesteps", io=io).double()
        grid[0] = io.t_of_timestep(torch.tensor(float(sched.timesteps[0])))  # start where DDIM starts
        alpha, sigma = io.alpha_sigma(grid[:1])
        lin = x_t / float(alpha + sigma)

        def velocity(y, t):
            x_in, k = io.network_input(y, t)
            return io.velocity(net(x_in, k).sample, y, t)

        ours = euler(velocity, lin, grid.float())
    torch.testing.assert_close(ours, x, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------- student output --
def test_velocity_output_equals_the_teacher_at_init_for_every_pair(ddpm_teacher_dir):
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    teacher = load_teacher(str(ddpm_teacher_dir))
    assert teacher.io.prediction_type == "epsilon" and teacher.io.clip_sample == 1.0
    student = build_student(teacher, RunConfig(teacher=str(ddpm_teacher_dir), student_output="velocity"))
    assert student.student_output == "velocity" and student.velocity_head is not None
    x, s, t = _pairs()
    x = 2 * x
    v = teacher.velocity(x, s)
    assert v.abs().mean() > 0.1
    assert torch.equal(student(x, s, s), v)
    assert torch.equal(student(x, s, t), v)  # the second time's embedding starts at zero


def test_velocity_output_caps_the_conversion_gradient_and_adds_a_gain_one_head(ddpm_teacher_dir):
    from ttfm_distill.student import VELOCITY_GAIN_CAP
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    teacher = load_teacher(str(ddpm_teacher_dir))
    grads = {}
    s = torch.full((4,), 0.02)  # near noise: the epsilon conversion's gain is large
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for kind in ("native", "velocity"):
        student = build_student(teacher, RunConfig(student_output=kind))
        student(x, s, s + 0.5).sum().backward()
        grads[kind] = student.network.conv_out.bias.grad.clone()
    gain = float(teacher.io.output_gain(s[:1]))
    assert gain > 20
    torch.testing.assert_close(grads["velocity"], grads["native"] * VELOCITY_GAIN_CAP / gain, rtol=1e-4, atol=1e-6)
    # the head is a plain velocity: its bias moves every pixel of u by one unit
    student = build_student(teacher, RunConfig(student_output="velocity"))
    with torch.no_grad():
        before = student(x, s, s + 0.5)
        student.velocity_head.bias.fill_(0.25)
        torch.testing.assert_close(student(x, s, s + 0.5), before + 0.25)


def test_the_gated_head_acts_only_where_the_conversion_is_ill_conditioned_and_round_trips(ddpm_teacher_dir, tmp_path):
    """student_output=gated: the velocity head weighted by 1 - min(1, cap / gain(s)): its full value at the noise
    end, nothing from s = 1/2 on (an epsilon teacher's gain is 1/s), the teacher at init, and saved and reloaded
    with its head."""
    from ttfm_distill.export import export_student, load_student, run_record
    from ttfm_distill.factory import build_student
    from ttfm_distill.objectives import make_objective
    from ttfm_distill.student import VELOCITY_GAIN_CAP
    from ttfm_distill.teachers.loading import load_teacher

    teacher = load_teacher(str(ddpm_teacher_dir))
    cfg = RunConfig(teacher=str(ddpm_teacher_dir), student_output="gated")
    student = build_student(teacher, cfg)
    assert student.student_output == "gated" and student.velocity_head is not None
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.0, 0.1, 0.5, 0.8])
    with torch.no_grad():
        base = student(x, s, s + 0.1)
        torch.testing.assert_close(base, teacher.velocity(x, s))  # the teacher at init
        student.velocity_head.bias.fill_(0.25)
        moved = (student(x, s, s + 0.1) - base).mean(dim=(1, 2, 3))
    gate = 1 - (VELOCITY_GAIN_CAP / teacher.io.output_gain(s)).clamp(max=1.0)
    torch.testing.assert_close(moved, (0.25 * gate).float(), atol=1e-5, rtol=1e-4)
    assert moved[0] > 0.24 and moved[1] > 0.1 and moved[2] == 0 and moved[3] == 0
    out = tmp_path / "gated"
    export_student(student, out, run_record(cfg, teacher, make_objective("itvm")))
    back, _ = load_student(out)
    assert back.student_output == "gated"
    with torch.no_grad():
        torch.testing.assert_close(back(x, s, s + 0.1), student(x, s, s + 0.1))


def test_velocity_student_round_trip_and_missing_head_is_one_line(ddpm_teacher_dir, tmp_path):
    from ttfm_distill.export import (
        StudentLoadError,
        export_student,
        load_student,
        run_record,
    )
    from ttfm_distill.objectives import make_objective
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    teacher = load_teacher(str(ddpm_teacher_dir))
    cfg = RunConfig(teacher=str(ddpm_teacher_dir), student_output="velocity", time_grid="timesteps")
    student = build_student(teacher, cfg)
    with torch.no_grad():
        student.velocity_head.weight.normal_(0, 0.1)
        student.second_time.linear_2.weight.normal_(0, 0.1)
    student.eval()
    export_student(student, tmp_path / "s", run_record(cfg, teacher, make_objective(cfg.loss)), teacher=teacher)
    again, config = load_student(tmp_path / "s")
    assert config.student_output == "velocity" and config.time_grid == "timesteps"
    x, s, t = _pairs()
    with torch.no_grad():
        assert torch.equal(again(x, s, t), student(x, s, t))
        assert not torch.equal(again(x, s, t), teacher.velocity(x, s))
    # the exported pipeline (and so ``ttfm-distill sample``) steps on the student's timesteps grid
    from ttfm_distill.objectives.base import flow_map
    from ttfm_distill.pipeline import TTFMPipeline
    from ttfm_distill.sampling import sample_flow_map

    pipe = TTFMPipeline.from_pretrained(tmp_path / "s")
    out = pipe(num_inference_steps=3, num_images_per_prompt=2, generator=torch.Generator().manual_seed(7),
               output_type="raw").images
    x0 = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    grid = time_grid(3, kind="timesteps", io=teacher.io)
    ours = sample_flow_map(lambda y, a, b: flow_map(student, y, a, b), x0, grid)
    torch.testing.assert_close(out, ours, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, sample_flow_map(lambda y, a, b: flow_map(student, y, a, b), x0,
                                                    uniform_time_grid(3)), atol=1e-3)
    (tmp_path / "s" / "flow_map" / "velocity_head.safetensors").unlink()
    with pytest.raises(StudentLoadError, match="velocity_head"):
        load_student(tmp_path / "s")


def test_auto_is_gated_for_epsilon_teachers_native_otherwise_and_old_configs_read_as_native(ddpm_teacher_dir):
    from ttfm_distill.student import StudentConfig, resolve_student_output
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    teacher = load_teacher(str(ddpm_teacher_dir))
    assert resolve_student_output("native", teacher.io) == "native"
    assert resolve_student_output("auto", C.NetworkIO(C.TimestepUnits())) == "native"
    # gated for epsilon teachers: chosen on the zoo's two epsilon DDPMs (docs/results.md)
    assert resolve_student_output("auto", teacher.io) == "gated"
    assert resolve_student_output("velocity", teacher.io) == "velocity"
    assert resolve_student_output("auto", C.DiffusionIO(_acp(), "v_prediction")) == "native"
    assert build_student(teacher, RunConfig()).student_output == "gated"
    assert resolve_student_output("auto", teacher.io, torch.nn.Linear(2, 2)) == "native"  # no conv_out: no head
    student = build_student(teacher, RunConfig(student_output="native"))
    assert student.velocity_head is None
    old = StudentConfig.from_dict({"format": "ttfm-distill-student", "data_shape": [1, 8, 8]})
    assert old.student_output == "native" and old.time_grid == "uniform"


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="student_output must be one of"):
        RunConfig(student_output="data").validate()
    with pytest.raises(ConfigError, match="time_grid must be one of"):
        RunConfig(time_grid="karras").validate()
    with pytest.raises(ConfigError, match="LoRA"):
        RunConfig(student_output="velocity", lora_rank=4).validate()
    assert RunConfig().validate().time_grid == "uniform"


# --------------------------------------------------------------- warnings --
def test_a_runs_metrics_warn_of_student_samples_out_of_range():
    """``run`` (metrics.json) now says it too, as ``eval`` did: the velocity student's 1-step samples overshoot."""
    from ttfm_distill.evaluate import quality_warnings
    from ttfm_distill.report import MEASURES

    assert "out_of_range" in MEASURES
    metrics = {"fd_test_images": {"student": {"1": 137.7, "2": 39.7}, "teacher_euler": {"1": 750.9, "2": 190.8}},
               "out_of_range": {"student": {"1": 0.598, "2": 0.0}, "teacher_euler": {"1": 0.0, "2": 0.001}}}
    lines = quality_warnings(metrics)
    assert lines == ["student samples out of range (a pixel beyond +-1.5) at 1 step(s): 59.8%"]


@pytest.fixture(scope="module")
def script_layout_ddpm_dir(tmp_path_factory):
    """A tiny epsilon UNet in the layout of diffusers' own train_unconditional.py: attention at the lowest
    resolution, two layers a block, and as many norm groups as the first block has channels."""
    from diffusers import DDPMScheduler, UNet2DModel

    root = tmp_path_factory.mktemp("ddpm-script")
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                layers_per_block=2, norm_num_groups=8, attention_head_dim=4).save_pretrained(root / "unet")
    DDPMScheduler(beta_schedule="linear", clip_sample=True).save_pretrained(root / "scheduler")
    return root


# ------------------------------------------------------------------ dry run --
def test_the_velocity_head_reads_features_whose_scale_follows_the_time(script_layout_ddpm_dir):
    """Regression (the diffusers-script DDPM of the teacher zoo): with one channel per norm group the features
    entering ``conv_out`` are normalised per channel at every time, so a head reading them cannot tell a jump
    from noise from one near the data, and its one correction broke the 2- and 4-step students. The head reads
    the output norm's input, whose per-channel scale changes with the time."""
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    teacher = load_teacher(str(script_layout_ddpm_dir))
    student = build_student(teacher, RunConfig(teacher=str(script_layout_ddpm_dir), student_output="velocity"))
    assert student.velocity_head_input == "pre_norm"
    net = student.network
    seen = {}
    student.velocity_head.register_forward_pre_hook(lambda m, a: seen.__setitem__("head", a[0].detach()))
    net.conv_norm_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", a[0].detach()))
    net.conv_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("post", a[0].detach()))
    torch.manual_seed(1)
    x = torch.randn(1, 1, 8, 8).expand(2, 1, 8, 8).contiguous()
    with torch.no_grad():
        student(x, torch.tensor([0.02, 0.9]), torch.tensor([0.5, 0.95]))
    assert torch.equal(seen["head"], seen["pre"])
    assert not torch.allclose(seen["pre"], seen["post"])  # so the equality above is not vacuous
    # behind one group per channel every channel of the normalised features has the same spatial spread (before
    # the activation), whatever the time: what the head used to read
    normed = torch.nn.functional.group_norm(seen["pre"], net.conv_norm_out.num_groups)
    spread = normed.std(dim=(2, 3))
    assert torch.allclose(spread, spread[0, 0].expand_as(spread), atol=1e-3)


def test_a_velocity_student_written_before_keeps_its_head_input(script_layout_ddpm_dir, tmp_path):
    from ttfm_distill.student import TwoTimeFlowMap
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    teacher = load_teacher(str(script_layout_ddpm_dir))
    student = build_student(teacher, RunConfig(teacher=str(script_layout_ddpm_dir), student_output="velocity"))
    student.save_pretrained(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "ttfm_config.json").read_text())["velocity_head_input"] == "pre_norm"
    assert TwoTimeFlowMap.from_pretrained(tmp_path / "new").velocity_head_input == "pre_norm"
    old = json.loads((tmp_path / "new" / "ttfm_config.json").read_text())
    del old["velocity_head_input"]  # a folder from before the field
    (tmp_path / "new" / "ttfm_config.json").write_text(json.dumps(old))
    assert TwoTimeFlowMap.from_pretrained(tmp_path / "new").velocity_head_input == "conv_out"
