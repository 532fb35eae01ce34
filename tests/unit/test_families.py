"""Every supported diffusers family: loads from a folder, student == teacher at init, exports and reloads strictly."""

import pytest
import torch

from helpers import cond_for, save_family
from tiny_models import SAMPLE_SIZE, TINY_CONFIGS, build, class_name

FAMILIES = sorted(TINY_CONFIGS)


@pytest.mark.parametrize("key", FAMILIES)
def test_family_loads_starts_as_teacher_and_round_trips(key, tmp_path):
    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import export_student, load_student
    from ttfm_distill.student import StudentConfig
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    save_family(key, tmp_path / "teacher")
    teacher = load_teacher(str(tmp_path / "teacher"), sample_size=SAMPLE_SIZE.get(key))
    assert teacher.describe()["class_name"] == class_name(key)
    assert teacher.data_shape == (4, 8, 8)
    student = build_student(teacher, RunConfig(teacher=str(tmp_path / "teacher")))
    torch.manual_seed(1)
    n = 4
    x = torch.randn(n, *teacher.data_shape)
    s = torch.tensor([0.0, 0.2, 0.5, 0.9])
    t = torch.tensor([0.0, 0.7, 1.0, 0.95])
    cond = cond_for(teacher, n)
    with torch.no_grad():
        v = teacher.velocity(x, s, cond)
        u = student(x, s, t, cond)
    assert v.shape == x.shape and torch.isfinite(v).all() and v.abs().mean() > 1e-3
    torch.testing.assert_close(u, v, rtol=0, atol=1e-6)  # identity at init for every (s, t)

    # the second time reaches the output once its embedding is trained
    with torch.no_grad():
        student.second_time.linear_2.weight.normal_(0, 0.05)
        u2 = student(x, s, t, cond)
    assert (u2 - v).abs().max() > 1e-4

    meta = StudentConfig(teacher=teacher.describe(), data_shape=list(teacher.data_shape), sigma0=1.0,
                         shift=teacher.shift, scheduler_config=teacher.scheduler_config, kind="image")
    export_student(student, tmp_path / "student", meta)
    reloaded, config = load_student(tmp_path / "student")
    assert config.backbone["class_name"] == class_name(key)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, s, t, cond), u2, rtol=0, atol=1e-6)


def test_pipeline_folder_scheduler_shift_and_subfolder(tmp_path):
    from ttfm_distill.teachers.loading import load_teacher

    root = tmp_path / "sd3"
    save_family("SD3Transformer2DModel", root, pipeline=True,
                scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000})
    teacher = load_teacher(str(root))
    assert teacher.shift == 3.0 and teacher.subfolder == "transformer"
    info = teacher.describe()
    assert info["prediction_type"] == "flow" and info["timestep_scale"] == 1000.0
    assert set(info["conditioning_inputs"]) == {"encoder_hidden_states", "pooled_projections"}
    assert load_teacher(str(root), subfolder="transformer").describe()["class_name"] == "SD3Transformer2DModel"


def test_units_follow_the_family(tmp_path):
    """Flux and AuraFlow take sigma in [0, 1]; Lumina2 counts time the other way; Sana scales by timestep_scale."""
    from ttfm_distill.teachers.loading import load_teacher

    expect = {"FluxTransformer2DModel": (1.0, False), "AuraFlowTransformer2DModel": (1.0, False),
              "Lumina2Transformer2DModel": (1.0, True), "SD3Transformer2DModel": (1000.0, False)}
    for key, (scale, rev) in expect.items():
        save_family(key, tmp_path / key)
        info = load_teacher(str(tmp_path / key), sample_size=SAMPLE_SIZE.get(key)).describe()
        assert (info["timestep_scale"], info["reversed_time"]) == (scale, rev), key


def test_flux_packing_round_trips():
    from ttfm_distill.teachers.families import FluxAdapter

    x = torch.randn(2, 4, 6, 8)
    tokens = FluxAdapter.pack(x)
    assert tokens.shape == (2, 12, 16)
    torch.testing.assert_close(FluxAdapter.unpack(tokens, 4, 6, 8), x)
    ids = FluxAdapter.image_ids(6, 8, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[:, 1].max() == 2 and ids[:, 2].max() == 3


def test_flux_guidance_input_is_kept():
    """A guidance-distilled teacher keeps its own guidance input; the second time does not reuse it."""
    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher

    teacher = DiffusersFlowTeacher(build("FluxTransformer2DModel"), "flux", sample_size=8)
    assert "guidance" in teacher.describe()["conditioning_inputs"]
    x = torch.randn(2, *teacher.data_shape)
    t = torch.full((2,), 0.4)
    with torch.no_grad():
        torch.nn.init.normal_(teacher.network.time_text_embed.guidance_embedder.linear_2.weight, std=0.5)
        a = teacher.velocity(x, t, {"guidance": torch.full((2,), 1.0)})
        b = teacher.velocity(x, t, {"guidance": torch.full((2,), 7.0)})
    assert (a - b).abs().max() > 1e-4


def test_diffusion_teacher_without_scheduler_uses_ddpm(tmp_path):
    from ttfm_distill.teachers.loading import load_teacher

    save_family("DiTTransformer2DModel", tmp_path / "dit")
    info = load_teacher(str(tmp_path / "dit")).describe()
    assert info["prediction_type"] == "epsilon" and info["conditioning"] == "class" and info["num_classes"] == 10
    assert 0 < info["t_min"] < 0.01 and 0.99 < info["t_max"] < 1


def test_unsupported_class_names_the_supported_ones(tmp_path):
    from diffusers import UNet1DModel

    from ttfm_distill.teachers.families import UnsupportedTeacher
    from ttfm_distill.teachers.loading import load_teacher

    UNet1DModel(block_out_channels=(8, 8, 8), sample_size=16).save_pretrained(tmp_path / "u1d")
    with pytest.raises(UnsupportedTeacher, match="UNet1DModel.*inspect --help"):  # the list: inspect --help
        load_teacher(str(tmp_path / "u1d"))


def test_dynamic_shift_matches_diffusers_flux_schedule():
    """Flux's resolution-dependent shift becomes the static shift diffusers' scheduler applies at that size."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from ttfm_distill.convention import dynamic_shift, shift_time
    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher

    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True, "base_shift": 0.5,
           "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096, "shift": 3.0}
    sched = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    tokens = 64 * 64  # a 1024 px Flux image: 128x128 latents packed 2x2
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    sigmas = np.linspace(1.0, 1 / 8, 8)
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    ours = 1 - shift_time(1 - torch.tensor(sigmas, dtype=torch.float64), dynamic_shift(tokens, cfg))
    torch.testing.assert_close(ours.float(), sched.sigmas[:-1].float(), atol=1e-5, rtol=0)
    teacher = DiffusersFlowTeacher(build("FluxTransformer2DModel"), "flux", cfg, sample_size=128)
    assert teacher.shift == pytest.approx(dynamic_shift(tokens, cfg)) and teacher.describe()["dynamic_shift"]


def test_student_samples_with_diffusers_flow_map_scheduler(tmp_path):
    """An exported student drives diffusers' FlowMapEulerDiscreteScheduler and gives our own N-step samples."""
    from diffusers import FlowMapEulerDiscreteScheduler

    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import export_student, load_student
    from ttfm_distill.generate import generate
    from ttfm_distill.student import StudentConfig
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    root = tmp_path / "sd3"
    save_family("SD3Transformer2DModel", root, pipeline=True,
                scheduler={"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    teacher = load_teacher(str(root))
    student = build_student(teacher, RunConfig())
    with torch.no_grad():
        student.second_time.linear_2.weight.normal_(0, 0.05)
    meta = StudentConfig(teacher=teacher.describe(), data_shape=list(teacher.data_shape), sigma0=1.0, shift=3.0,
                         scheduler_config=teacher.scheduler_config)
    export_student(student, tmp_path / "student", meta)
    student, meta = load_student(tmp_path / "student")
    ours = generate(student, steps=3, num=2, seed=5)

    sched = FlowMapEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(3)
    x = torch.randn((2, *meta.data_shape), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for i, ts in enumerate(sched.timesteps):
            r = sched.timesteps[i + 1] if i + 1 < len(sched.timesteps) else 0.0
            x = sched.step(student.diffusers_flow_map(x, ts, r), ts, x, r_timestep=r).prev_sample
    torch.testing.assert_close(x.float(), ours, atol=1e-4, rtol=1e-4)


def test_latent_grids_without_a_vae_show_three_channels(tmp_path):
    """Bare latent teachers (no vae/) still get a samples.png: the first three channels, scaled."""
    from PIL import Image

    from ttfm_distill.plots import save_image_grid, viewable

    x = torch.randn(4, 8, 6, 6) * 5
    v = viewable(x)
    assert v.shape == (4, 3, 6, 6) and v.min() == -1 and v.max() == 1
    torch.testing.assert_close(viewable(x[:, :3].clamp(-1, 1)), x[:, :3].clamp(-1, 1))
    save_image_grid(x, tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "RGB"


def test_class_guidance_uses_the_null_class_and_refuses_without_one():
    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher

    net = build("DiTTransformer2DModel")
    plain = DiffusersFlowTeacher(net, "dit")
    guided = DiffusersFlowTeacher(net, "dit", guidance_scale=4.0)
    x, t = torch.randn(2, *plain.data_shape), torch.tensor([0.3, 0.8])
    labels = {"class_labels": torch.tensor([1, 7])}
    null = {"class_labels": torch.tensor([10, 10])}  # DiT keeps one extra embedding row for the dropped label
    with torch.no_grad():
        v_c, v_n = plain.velocity(x, t, labels), plain.velocity(x, t, null)
        torch.testing.assert_close(guided.velocity(x, t, labels), v_n + 4.0 * (v_c - v_n), atol=1e-5, rtol=1e-4)
    assert (v_c - v_n).abs().max() > 1e-5
    unet = DiffusersFlowTeacher(build("UNet2DConditionModel"), "unet")  # text, but no encoders in a bare folder
    with pytest.raises(ValueError, match="text encoders"):
        DiffusersFlowTeacher(unet.network, "unet", guidance_scale=2.0)
