"""Few-step quality (issue 14): the scheduler's clip_sample, plain warnings, and a test that training helps."""

from types import SimpleNamespace

import pytest
import torch

from ttfm_distill import convention as C
from ttfm_distill import machine


def here() -> bool:
    """This machine's native bf16, as a run reads it (a test may patch it)."""
    return machine.native_bf16()


def auto_defaults(run_config, prediction_type="flow"):
    """``RunConfig.automatic_defaults`` on this machine."""
    from ttfm_distill.config import RunConfig

    return RunConfig.automatic_defaults(run_config, prediction_type, here())


def filled(cfg, prediction_type, saved=None):
    """``cfg`` with its automatic settings resolved for ``prediction_type`` on this machine."""
    return cfg.resolve_automatic(prediction_type, saved, here())


def _acp():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="linear").alphas_cumprod


# ------------------------------------------------------------ clip_sample --
def test_clip_sample_clamps_the_data_estimate_and_keeps_the_noise_estimate():
    g = torch.Generator().manual_seed(0)
    x = 3 * torch.randn(16, 1, 4, 4, generator=g)
    t = torch.rand(16, generator=g) * 0.8 + 0.1
    eps = torch.randn(16, 1, 4, 4, generator=g)
    plain, clipped = C.DiffusionIO(_acp(), "epsilon"), C.DiffusionIO(_acp(), "epsilon", clip_sample=1.0)
    alpha, sigma = plain.alpha_sigma(t)
    a, s = C.broadcast_time(alpha.float(), x), C.broadcast_time(sigma.float(), x)
    data_hat = (x * (a + s) - s * eps) / a
    assert data_hat.abs().max() > 2  # the case that matters: estimates beyond the data range
    torch.testing.assert_close(plain.velocity(eps, x, t), data_hat - eps)
    torch.testing.assert_close(clipped.velocity(eps, x, t), data_hat.clamp(-1, 1) - eps)
    inside = data_hat.abs() < 1  # inside the range nothing changes
    assert torch.equal(clipped.velocity(eps, x, t)[inside], plain.velocity(eps, x, t)[inside])
    assert clipped.describe()["clip_sample"] == 1.0 and plain.describe()["clip_sample"] is None
    with pytest.raises(ValueError, match="clip_sample"):
        C.DiffusionIO(_acp(), "epsilon", clip_sample=0.0)


def test_clipped_euler_solve_of_a_bad_epsilon_net_stays_in_range():
    """An epsilon net that predicts zero noise: its data estimate x / alpha explodes near the noise end."""
    from ttfm_distill.sampling import euler, uniform_time_grid

    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    grid = uniform_time_grid(16)
    ends = {}
    for clip in (None, 1.0):
        io = C.DiffusionIO(_acp(), "epsilon", clip_sample=clip)
        ends[clip] = euler(lambda x, t: io.velocity(torch.zeros_like(x), x, t), x0, grid)
    assert ends[None].abs().max() > 100  # unclipped: blown up
    assert (ends[1.0].abs() <= x0.abs() + 1 + 1e-5).all()  # each step moves at most h * 1 (the clamp)


def test_teacher_takes_clip_sample_from_its_scheduler():
    from ttfm_distill.teachers.schedulers import network_io

    adapter = SimpleNamespace(default_scheduler={"_class_name": "DDPMScheduler", "beta_schedule": "linear",
                                                 "prediction_type": "epsilon"})
    base = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "prediction_type": "epsilon"}
    assert network_io(adapter, None, {**base, "clip_sample": True, "clip_sample_range": 2.0}).clip_sample == 2.0
    assert network_io(adapter, None, {**base, "clip_sample": False}).clip_sample is None
    assert network_io(adapter, None, base).clip_sample == 1.0  # diffusers' own default for DDPM: on
    assert network_io(adapter, None, None).clip_sample is None  # a family default schedule never clips


# --------------------------------------------------------------- warnings --
def test_worse_than_teacher_is_one_line_naming_the_steps():
    from ttfm_distill.evaluate import quality_warnings

    def rows(**fd):
        return {str(n): {"fd_test_images": v, "flow_map_error": 0.1} for n, v in fd.items()}

    report = {"results": {"student": {"1": {"fd_test_images": 690.0, "flow_map_error": 10.8},
                                      "2": {"fd_test_images": 630.0, "flow_map_error": 2.0},
                                      "4": {"fd_test_images": 9.0, "flow_map_error": 0.01}},
                          "teacher_euler": {"1": {"fd_test_images": 775.0}, "2": {"fd_test_images": 600.0},
                                            "4": {"fd_test_images": 80.0}},
                          "teacher_heun": {"1": None, "2": {"fd_test_images": 640.0}, "4": {"fd_test_images": 290.0}}}}
    lines = quality_warnings(report)
    worse = [line for line in lines if "WORSE" in line]
    assert len(worse) == 1 and "at 2 step(s)" in worse[0] and "630 vs euler 600" in worse[0]
    assert any("above 1 at 1 step(s) (10.8), 2 step(s) (2)" in line for line in lines)
    report["results"]["student"]["2"]["fd_test_images"] = 500.0
    report["results"]["student"]["1"]["flow_map_error"] = 0.5
    report["results"]["student"]["2"]["flow_map_error"] = 0.2
    assert quality_warnings(report) == []
    del rows


def test_run_metrics_and_pool_warnings():
    from ttfm_distill.evaluate import quality_warnings

    metrics = {"flow_map_error": {"student": {"1": 10.8, "2": 0.05}, "teacher_euler": {"1": 21.5, "2": 0.04}},
               "data": {"samples": 100, "out_of_range": {"rows": 38, "fraction": 0.38, "max_abs": 26.6, "bound": 1.5}}}
    lines = quality_warnings(metrics)
    assert len(lines) == 3
    assert "WORSE" in lines[0] and "at 2 step(s)" in lines[0]
    assert "try: more steps" in lines[0] and "student_output=" in lines[0]  # and what to do about it
    assert "above 1 at 1 step(s)" in lines[1]
    assert "38 of 100" in lines[2] and "26.6" in lines[2]


def test_pool_reports_samples_out_of_range(tmp_path):
    from ttfm_distill.data.pool import build_pool
    from ttfm_distill.teachers.base import Teacher

    class Exploding(Teacher):  # a pixel teacher whose ODE leaves [-1, 1] for half of the noises
        kind, name, data_shape, shift = "image", "exploding", (1, 4, 4), 1.0

        def sample_noise(self, n, generator=None, device=None):
            return torch.randn(n, *self.data_shape, generator=generator)

        def velocity(self, x, t, cond=None):
            return torch.where(x.flatten(1)[:, :1].reshape(-1, 1, 1, 1) > 0, 10 * x, -x)

    from ttfm_distill.config import RunConfig

    cfg = RunConfig(pool_size=64, pool_steps=4, seed=0, pool_solver="euler", trajectory_fraction=0.0)
    logged = []
    pool = build_pool(Exploding(), cfg, tmp_path, "cpu", logged.append)
    o = pool.report["out_of_range"]
    assert 20 < o["rows"] < 44 and o["max_abs"] > 100 and o["bound"] == 1.5
    assert any("pool samples are out of range" in line for line in logged)


# ------------------------------------------------------------- EMA warm-up --
def test_ema_warmup_schedule():
    from ttfm_distill.schedules import ema_decay_at

    assert ema_decay_at(0, 0.999, True) == 0.1 and ema_decay_at(90, 0.999, True) == 0.91
    assert ema_decay_at(100_000, 0.999, True) == 0.999 and ema_decay_at(0, 0.999, False) == 0.999
    # the offset: (1 + k) / (offset + k), so a smaller offset decays more slowly from the start (a longer average)
    assert ema_decay_at(0, 0.999, True, 5.0) == 0.2 and ema_decay_at(95, 0.999, True, 5.0) == 0.96
    assert ema_decay_at(90, 0.999, True, 10.0) == ema_decay_at(90, 0.999, True)
    assert ema_decay_at(95, 0.999, False, 5.0) == 0.999  # no warm-up: no offset


def test_automatic_ema_offset_kept_on_resume():
    """Unset ema_warmup_offset: 10 for every teacher (20 helped the embedded flow teacher alone); a given value and a
    resumed run's (20 where a flow run of an earlier version filled it in) are kept, a folder from before ran 10; the
    trainer's EMA decay follows the resolved value."""
    from ttfm_distill.config import RunConfig, resume_mismatch
    from ttfm_distill.pipeline_card import run_command
    from ttfm_distill.schedules import ema_decay_at

    assert RunConfig().ema_warmup_offset is None and RunConfig().validate().ema_warmup_offset is None
    flow = filled(RunConfig(), "flow")
    assert flow.ema_warmup_offset == 10.0 and filled(RunConfig(), "epsilon").ema_warmup_offset == 10.0
    assert filled(RunConfig(teacher="builtin:checkerboard"), "flow").ema_warmup_offset == 10.0
    assert filled(RunConfig(ema_warmup_offset=5), "flow").ema_warmup_offset == 5
    assert filled(RunConfig(), "flow", {"seed": 0}).ema_warmup_offset == 10.0  # a folder from before
    assert filled(RunConfig(), "flow", {"ema_warmup_offset": 20.0}).ema_warmup_offset == 20.0
    assert resume_mismatch({"ema_warmup_offset": 20.0}, RunConfig().to_dict()) == []
    assert resume_mismatch({"ema_warmup_offset": 10.0}, RunConfig(ema_warmup_offset=20.0).to_dict()) == \
        ["ema_warmup_offset"]
    assert ema_decay_at(99, 0.999, True, flow.ema_offset_value()) == 100 / 109
    assert ema_decay_at(99, 0.999, True, filled(RunConfig(), "flow", {"ema_warmup_offset": 20.0}).ema_offset_value()) \
        == 100 / 119
    assert run_command(flow.to_dict()) == "ttfm-distill run"
    assert "ema_warmup_offset" in run_command(filled(RunConfig(ema_warmup_offset=20.0), "flow").to_dict())


# ------------------------------------------------------------ lr schedule --
def test_lr_schedule_cosine_and_constant():
    from ttfm_distill.config import ConfigError, RunConfig
    from ttfm_distill.schedules import lr_factor

    plain = RunConfig(max_steps=1000, warmup_steps=50, lr_schedule="constant").validate()
    assert [lr_factor(k, plain, 1000) for k in (0, 24, 49, 500, 999)] == [1 / 50, 25 / 50, 1.0, 1.0, 1.0]  # as before
    cos = RunConfig(max_steps=1000, warmup_steps=50, lr_schedule="cosine", lr_final_fraction=0.1).validate()
    f = [lr_factor(k, cos, 1000) for k in range(1000)]
    assert f[:50] == [lr_factor(k, plain, 1000) for k in range(50)]  # the same warm-up
    assert all(a >= b for a, b in zip(f[49:], f[50:]))  # then only down
    assert abs(f[999] - 0.1) < 1e-9 and abs(f[524] - 0.55) < 0.01  # half-way: the middle of [0.1, 1]
    with pytest.raises(ConfigError, match="lr_schedule"):
        RunConfig(lr_schedule="linear").validate()
    # unset ("auto"): cosine once the teacher is loaded (flow or diffusion), constant for an exact 2-D teacher, kept
    # on resume; a folder from before it existed ran constant
    from ttfm_distill.config import resume_mismatch
    from ttfm_distill.pipeline_card import run_command

    assert RunConfig().lr_schedule == "auto" and RunConfig().lr_schedule_name() == "cosine"
    assert filled(RunConfig(teacher="builtin:checkerboard"), "flow").lr_schedule == "constant"
    assert filled(RunConfig(), "epsilon").lr_schedule == "cosine"
    assert filled(RunConfig(), "v_prediction").lr_schedule == "cosine"
    assert filled(RunConfig(), "flow").lr_schedule == "cosine"
    assert filled(RunConfig(lr_schedule="constant"), "epsilon").lr_schedule == "constant"  # given: kept
    assert filled(RunConfig(), "flow", {"lr_schedule": "constant"}).lr_schedule == "constant"  # resumed
    assert filled(RunConfig(), "epsilon", {"lr_schedule": "constant"}).lr_schedule == "constant"
    assert filled(RunConfig(), "epsilon", {"seed": 0}).lr_schedule == "constant"  # a folder from before
    assert resume_mismatch({"lr_schedule": "cosine"}, RunConfig().to_dict()) == []
    assert resume_mismatch({"lr_schedule": "cosine"}, RunConfig(lr_schedule="constant").to_dict()) == ["lr_schedule"]
    ddpm = filled(RunConfig(teacher="some/ddpm"), "epsilon")
    assert ddpm.lr_schedule == "cosine" and run_command(ddpm.to_dict(), "epsilon") == "ttfm-distill run --teacher some/ddpm"
    auto = filled(RunConfig(max_steps=1000, warmup_steps=50), "epsilon")
    assert [lr_factor(k, auto, 1000) for k in range(1000)] == [lr_factor(k, RunConfig(
        max_steps=1000, warmup_steps=50, lr_schedule="cosine", lr_final_fraction=0.0), 1000) for k in range(1000)]
    with pytest.raises(ConfigError, match="lr_final_fraction"):
        RunConfig(lr_final_fraction=2.0).validate()


def test_automatic_lr_final_fraction_kept_on_resume():
    """Unset lr_final_fraction: the cosine ends at 0 for every teacher (a quarter helped the embedded flow teacher
    alone); given values and resumed runs keep theirs, and a folder from before it existed ran to 0. The schedule
    follows the resolved value."""
    from ttfm_distill.config import RunConfig, resume_mismatch
    from ttfm_distill.pipeline_card import run_command
    from ttfm_distill.schedules import lr_factor

    assert RunConfig().lr_final_fraction is None and RunConfig().validate().lr_final_fraction is None
    assert filled(RunConfig(), "flow").lr_final_fraction == 0.0
    assert filled(RunConfig(), "flow", {"lr_final_fraction": 0.25}).lr_final_fraction == 0.25  # resumed: kept
    assert filled(RunConfig(), "epsilon").lr_final_fraction == 0.0
    assert filled(RunConfig(teacher="builtin:checkerboard"), "flow").lr_final_fraction == 0.0
    assert filled(RunConfig(lr_final_fraction=0.5), "flow").lr_final_fraction == 0.5
    assert filled(RunConfig(), "flow", {"lr_final_fraction": 0.0}).lr_final_fraction == 0.0
    assert filled(RunConfig(), "flow", {"seed": 0}).lr_final_fraction == 0.0  # a folder from before
    assert resume_mismatch({"lr_final_fraction": 0.25}, RunConfig().to_dict()) == []
    assert resume_mismatch({"lr_final_fraction": 0.0}, RunConfig(lr_final_fraction=0.25).to_dict()) == \
        ["lr_final_fraction"]
    flow = filled(RunConfig(max_steps=1000, warmup_steps=50, lr_final_fraction=0.25), "flow")
    ddpm = filled(RunConfig(max_steps=1000, warmup_steps=50), "epsilon")
    assert abs(lr_factor(999, flow, 1000) - 0.25) < 1e-9 and abs(lr_factor(999, ddpm, 1000)) < 1e-9
    assert lr_factor(10, flow, 1000) == lr_factor(10, ddpm, 1000)  # the same warm-up
    assert run_command(ddpm.to_dict(), "epsilon") == "ttfm-distill run --max-steps 1000"
    assert "lr_final_fraction" in run_command(flow.to_dict())


def test_automatic_defaults_resolve_each_setting_against_the_runs_other_settings(monkeypatch):
    """What a command that leaves one automatic setting alone would run with, given the run's others: the card
    leaves a setting out exactly when it equals this."""
    from ttfm_distill import machine
    from ttfm_distill.config import AUTOMATIC, RunConfig

    monkeypatch.setattr(machine, "native_bf16", lambda device_type=None: True)
    settings, options = RunConfig.automatic_defaults(RunConfig().to_dict(), bf16_native=here())
    assert set(settings) == set(AUTOMATIC)
    assert settings == {"trajectory_fraction": 0.0, "pool_solver": "euler", "lr_schedule": "cosine", "lr": 2e-4,
                        "mixed_precision": "bf16", "lr_final_fraction": 0.0, "pool_precision": "bf16",
                        "ema_warmup_offset": 10.0, "dm_exact_fake": "residual", "dm_weight": 0.3, "dm_stage_steps": 400}
    assert options == {"long_jump_span": 0.0}
    # the pool's solver follows the run's own trajectory_fraction: rows, a Heun pool
    settings, _ = auto_defaults({"trajectory_fraction": 0.125})
    assert settings["pool_solver"] == "heun" and settings["trajectory_fraction"] == 0.0
    # real data: no rows; a diffusion teacher: a cosine lr and no long jumps; the EMA-only reading: no long jumps
    assert auto_defaults({"data": "fashion-mnist"})[0]["trajectory_fraction"] == 0.0
    settings, options = auto_defaults({"teacher": "some/ddpm"}, "epsilon")
    assert settings["lr_schedule"] == "cosine" and settings["lr"] == 2e-4 and options == {"long_jump_span": 0.0}
    assert settings["mixed_precision"] == "no" and settings["lr_final_fraction"] == 0.0
    assert settings["pool_precision"] == "no" and settings["ema_warmup_offset"] == 10.0
    assert settings["dm_weight"] == 0.0 and settings["dm_stage_steps"] == 0  # no DM stage for an epsilon teacher
    # the pool's precision follows the run's own autocast
    assert auto_defaults({"mixed_precision": "no"})[0]["pool_precision"] == "no"
    assert auto_defaults({"loss_options": {"reading": "ema_only"}})[1] == {"long_jump_span": 0.0}
    # an option the run set does not hide the default: the card compares against it
    assert auto_defaults({"loss_options": {"long_jump_span": 0.25}})[1] == {"long_jump_span": 0.0}
    assert auto_defaults({"loss": "lsd"})[1] == {}


def test_automatic_lr_kept_on_resume_and_left_out_of_the_card():
    """Unset lr: 2e-4 for every teacher (4e-4 helped the embedded flow teacher alone); a given lr is kept; a resumed
    run keeps what it ran with (4e-4 where a flow run of an earlier version filled it in)."""
    from ttfm_distill.config import ConfigError, RunConfig, resume_mismatch
    from ttfm_distill.pipeline_card import run_command

    assert RunConfig().lr is None and RunConfig().validate().lr is None
    assert filled(RunConfig(), "flow").lr == 2e-4
    assert filled(RunConfig(), "epsilon").lr == 2e-4
    assert filled(RunConfig(teacher="builtin:checkerboard"), "flow").lr == 2e-4
    assert filled(RunConfig(lr=1e-3), "flow").lr == 1e-3
    assert filled(RunConfig(), "flow", {"lr": 4e-4}).lr == 4e-4  # a folder of an earlier default
    assert resume_mismatch({"lr": 4e-4}, RunConfig().to_dict()) == []
    assert resume_mismatch({"lr": 2e-4}, RunConfig(lr=4e-4).to_dict()) == ["lr"]
    with pytest.raises(ConfigError, match="lr"):
        RunConfig(lr=0.0).validate()
    # the card: the automatic value is not spelled out; an earlier default's 4e-4 constant is
    assert run_command(filled(RunConfig(), "flow").to_dict()) == "ttfm-distill run"
    assert run_command(filled(RunConfig(lr=4e-4, lr_schedule="constant"), "flow").to_dict()) == \
        "ttfm-distill run --set lr=0.0004 --set lr_schedule=constant"


def test_automatic_precision_by_teacher_and_hardware_kept_on_resume(monkeypatch, tiny_teacher_dir, tmp_path):
    """mixed_precision "auto": bf16 for a flow teacher where the hardware has native bf16, fp32 for a diffusion
    teacher, the exact 2-D teachers and hardware without it; a given value and a resumed run's are kept."""
    from ttfm_distill import machine
    from ttfm_distill.config import RunConfig, resume_mismatch
    from ttfm_distill.pipeline_card import run_command
    from ttfm_distill.teachers.loading import TeacherLoadError
    from ttfm_distill.preflight import resolve_run, resolve_settings

    assert RunConfig().mixed_precision == "auto" and RunConfig().validate().mixed_precision == "auto"
    for native in (True, False):
        monkeypatch.setattr(machine, "native_bf16", lambda device_type=None, native=native: native)
        assert filled(RunConfig(), "flow").mixed_precision == ("bf16" if native else "no")
        assert filled(RunConfig(), "epsilon").mixed_precision == "no"
        assert filled(RunConfig(teacher="builtin:checkerboard"), "flow").mixed_precision == "no"
        assert filled(RunConfig(mixed_precision="no"), "flow").mixed_precision == "no"  # given: kept
        assert filled(RunConfig(mixed_precision="bf16"), "epsilon").mixed_precision == "bf16"
        assert filled(RunConfig(), "flow", {"seed": 0}).mixed_precision == "no"  # a folder from before
        assert filled(RunConfig(), "flow", {"mixed_precision": "bf16"}).mixed_precision == "bf16"
        # before any weights load: from the teacher folder's configs (resolve_run), or the resumed folder's config
        run = resolve_run(RunConfig(teacher=str(tiny_teacher_dir), output=str(tmp_path / "new")))
        assert run.prediction_type == "flow" and run.cfg.mixed_precision == ("bf16" if native else "no")
        cfg, _ = resolve_settings(RunConfig(teacher=str(tiny_teacher_dir)), "flow", {"mixed_precision": "no"}, native)
        assert cfg.mixed_precision == "no"
        with pytest.raises(TeacherLoadError, match="neither a folder nor a hub id"):  # refused before any work
            resolve_run(RunConfig(teacher=str(tmp_path / "org" / "missing"), output=str(tmp_path / "new")))
        assert not (tmp_path / "new").exists()
        # the card leaves the automatic value out and spells out the other
        other = "no" if native else "bf16"
        assert run_command(filled(RunConfig(), "flow").to_dict()) == "ttfm-distill run"
        assert run_command(filled(RunConfig(mixed_precision=other), "flow").to_dict()) == \
            f"ttfm-distill run --set mixed_precision={other}"
    assert resume_mismatch({"mixed_precision": "bf16"}, RunConfig().to_dict()) == []
    assert resume_mismatch({"mixed_precision": "bf16"}, RunConfig(mixed_precision="no").to_dict()) == \
        ["mixed_precision"]


def test_the_pool_solves_in_bf16_when_the_run_trains_in_bf16_and_keeps_its_fp32_name_otherwise(monkeypatch, tmp_path):
    """pool_precision "auto": bf16 exactly when the run's autocast is bf16; a given value and a resumed run's are
    kept, a folder from before ran fp32. A bf16 pool has a file of its own (an fp32 pool keeps its earlier name),
    runs the teacher under autocast with its time embedders in fp32, keeps fp32 states, and moves the embedded
    teacher's samples by far less than their own size."""
    from ttfm_distill import machine
    from ttfm_distill.config import ConfigError, RunConfig, resume_mismatch
    from ttfm_distill.data.pool import build_pool, pool_file_name
    from ttfm_distill.teachers.loading import load_teacher

    monkeypatch.setattr(machine, "native_bf16", lambda device_type=None: True)
    assert RunConfig().pool_precision == "auto" and filled(RunConfig(), "flow").pool_precision == "bf16"
    assert filled(RunConfig(), "epsilon").pool_precision == "no"
    assert filled(RunConfig(teacher="builtin:checkerboard"), "flow").pool_precision == "no"
    assert filled(RunConfig(mixed_precision="no"), "flow").pool_precision == "no"
    assert filled(RunConfig(pool_precision="no"), "flow").pool_precision == "no"  # given: kept
    assert filled(RunConfig(), "flow", {"seed": 0}).pool_precision == "no"  # a folder from before
    assert resume_mismatch({"pool_precision": "bf16"}, RunConfig().to_dict()) == []
    assert resume_mismatch({"pool_precision": "no"}, RunConfig(pool_precision="bf16").to_dict()) == ["pool_precision"]
    with pytest.raises(ConfigError, match="pool_precision"):
        RunConfig(pool_precision="fp16").validate()

    base = dict(pool_size=16, pool_steps=4, seed=3, trajectory_fraction=0.125, pool_solver="heun")
    fp32, bf16 = RunConfig(pool_precision="no", **base), RunConfig(pool_precision="bf16", **base)
    assert pool_file_name(fp32) == "pool-n16-heun4-traj2-seed3.safetensors"  # the name fp32 pools always had
    assert pool_file_name(bf16) == "pool-n16-heun4-traj2-bf16-seed3.safetensors"
    pools = {}
    for name, cfg in (("fp32", fp32), ("bf16", bf16)):
        teacher = load_teacher("builtin:fashion16")
        pools[name] = build_pool(teacher, cfg, tmp_path / name, "cpu", lambda m: None)
        assert (tmp_path / name / pool_file_name(cfg)).exists()
        assert pools[name].report["precision"] == name
    embedders = teacher.adapter.time_embedders(teacher.network)
    assert embedders and all(getattr(e, "_ttfm_keep_fp32", False) for e in embedders)  # the bf16 pool's teacher
    a, b = pools["fp32"].samples, pools["bf16"].samples
    assert a.dtype == b.dtype == torch.float32 and pools["bf16"].trajectories.dtype == torch.float32
    assert torch.equal(pools["fp32"].trajectories[:, 0], pools["bf16"].trajectories[:, 0])  # the same noise
    rms = (a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()
    assert 0 < rms < 0.05, rms  # bf16 did act, and moved the samples by a few percent at most


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not machine.native_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert machine.native_bf16("cpu")
