"""benchmarks/zoo.py's figures: the ratios to the teacher's 50-step Euler, the goals, the table (no model runs)."""

import importlib.util
import json
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parents[2] / "benchmarks" / "zoo.py"


@pytest.fixture(scope="module")
def zoo():
    spec = importlib.util.spec_from_file_location("zoo_benchmark", ZOO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def eval_report(student: dict, euler50: float) -> dict:
    row = lambda fd: {"fd_test_images": fd, "fd_teacher_fine": fd / 2, "flow_map_error": 0.1}  # noqa: E731
    return {"results": {"student": {str(n): row(v) for n, v in student.items()},
                        "teacher_euler": {"8": row(40.0), "50": row(euler50)},
                        "teacher_heun": {"8": row(50.0), "50": row(euler50 + 1)}}}


def test_summary_ratios_and_goals(zoo):
    s = zoo.summary(eval_report({1: 60.0, 2: 29.0, 4: 26.0, 8: 19.0}, 20.0))
    assert s["teacher_euler_50_fd"] == 20.0
    assert s["ratios"] == {1: 3.0, 2: 1.45, 4: 1.3, 8: 0.95}
    assert s["goals_met"] == {1: True, 2: True, 4: False}  # at most 3x / 1.5x / 1.2x
    assert s["student_fd_teacher_fine"][1] == 30.0
    missing = zoo.summary({"results": {"student": {"1": None}, "teacher_euler": {}}})
    assert missing["ratios"][1] is None and missing["goals_met"][1] is None


def test_table_has_every_teacher_a_row(zoo, tmp_path):
    args = zoo.parse(["--max-steps", "20"])
    assert args.variant == "steps20"
    with pytest.raises(SystemExit):
        zoo.parse(["--set", "lr=1e-4"])  # a setting changed needs a variant name of its own
    teacher = {"results": {"teacher_euler": {"50": {"fd_test_images": 20.0, "flow_map_error": 0.001}},
                           "scheduler_ddim": {"50": {"fd_test_images": 18.5, "flow_map_error": 0.002}}}}
    (tmp_path / "teacher-vpred.json").write_text(json.dumps(teacher))
    (tmp_path / "teacher-dit.json").write_text(json.dumps(teacher))
    report = eval_report({1: 60.0, 2: 29.0, 4: 26.0, 8: 19.0}, 20.0)
    for variant in ("default", "dm"):
        row = {"teacher": "vpred", "variant": variant, "run": {"config": {"max_steps": 3000}, "wall_seconds": 100.0},
               "eval": {"report": {**report, "settings": {"num": 1024, "seed": 7}}, "wall_seconds": 12.0},
               "summary": json.loads(json.dumps(zoo.summary(report)))}  # as read back from the row file
        (tmp_path / f"vpred{'' if variant == 'default' else '--' + variant}.json").write_text(json.dumps(row))
    text = zoo.write_table(tmp_path).read_text()
    lines = [line for line in text.splitlines() if line.startswith("| vpred | default")]
    assert lines == ["| vpred | default | 3000 | 60.0 | 29.0 | 26.0 | 19.0 | 20.0 | **3.00x** | **1.45x** | 1.30x "
                     "| scheduler_ddim 18.5 |",
                     # the second table: flow-map error (the teacher's Euler at the same NFE), FD to the fine solve
                     "| vpred | default | 0.100 (-) | 0.100 (-) | 0.100 (-) | 0.100 (0.100) | 30.0 | 14.5 | 13.0 | 9.5 "
                     "| 100 / 12 |"]
    assert "| vpred | dm |" in text and "| dit | (not distilled yet) |" in text
    assert "| dit | scheduler_ddim | " in text


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_scheduler_ddim_is_euler_on_the_timesteps_grid(zoo, prediction):
    """The zoo's 'scheduler_ddim' row is diffusers' DDIM on the teacher's own config: without the clip it is the
    tool's Euler on the DDIM-like grid (docs/second-teacher.md), for epsilon and v-prediction alike."""
    import torch
    from diffusers import UNet2DModel

    from ttfm_distill.sampling import euler, time_grid
    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher

    torch.manual_seed(0)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4)
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.2)
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
           "prediction_type": prediction, "clip_sample": False}
    teacher = DiffusersFlowTeacher(net, "tiny", cfg)
    ddim, ancestral = zoo.scheduler_samplers(teacher, seed=7)
    assert (ddim.name, ancestral.name) == ("scheduler_ddim", "scheduler_ddpm_ancestral")
    x0 = torch.randn(3, 1, 8, 8)
    io = teacher.io
    with torch.no_grad():
        grid = time_grid(4, 1.0, "timesteps", io).double()
        grid[0] = io.t_of_timestep(torch.tensor(999.0))  # DDIM starts from the noise as the state at its timestep 999
        alpha, sigma = io.alpha_sigma(grid[:1])
        ours = euler(lambda y, t: teacher.velocity(y, t), x0 / float(alpha + sigma), grid.float())
        torch.testing.assert_close(ddim.run(x0, 4), ours, atol=2e-4, rtol=1e-4)
        a, b = ancestral.run(x0, 4), ancestral.run(x0, 8)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_scheduler_flow_sampler_is_flowmatch_euler(zoo, tmp_path):
    """A flow teacher's 'scheduler_flowmatch_euler' row: diffusers' FlowMatchEuler with the teacher's shift."""
    import torch
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from ttfm_distill.sampling import euler
    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher

    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    teacher = DiffusersFlowTeacher(net, "dit", {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 2.0})
    (flow,) = zoo.scheduler_samplers(teacher, seed=7)
    x0, cond = torch.randn(2, 1, 8, 8), {"class_labels": torch.tensor([1, 10])}
    sched = FlowMatchEulerDiscreteScheduler(shift=2.0)
    sched.set_timesteps(3)
    sigmas = sched.sigmas  # 1, 0.668, 0.004, 0: the shift acts on a grid that ends at the shifted sigma_min
    assert sigmas[-2] < 0.01
    with torch.no_grad():
        ours = euler(lambda y, t: teacher.velocity(y, t, cond), x0, 1 - sigmas)
        torch.testing.assert_close(flow.run(x0, 3, cond), ours, atol=1e-5, rtol=1e-4)
