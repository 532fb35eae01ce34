import copy

import pytest
import torch

from ttfm_distill.config import RunConfig
from ttfm_distill.export import StudentLoadError, export_student, load_student
from ttfm_distill.student import StudentConfig
from ttfm_distill.objectives.base import flow_map
from ttfm_distill.teachers.loading import load_teacher
from ttfm_distill.factory import build_student


def pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, generator=g)
    return torch.randn(n, 1, 8, 8, generator=g), s, s + (1 - s) * torch.rand(n, generator=g)


@pytest.mark.parametrize("second", ["delta", "t"])
def test_student_equals_teacher_at_init_for_every_pair(tiny_teacher_dir, second):
    teacher = load_teacher(str(tiny_teacher_dir))
    student = build_student(teacher, RunConfig(second_time_input=second))
    x, s, t = pairs()
    v = teacher.velocity(x, s)
    assert v.abs().mean() > 0.1  # a real velocity, not zeros
    assert torch.equal(student(x, s, t), v)
    assert torch.allclose(flow_map(student, x, s, s), x)


def test_second_time_changes_output_once_trained(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))
    student = build_student(teacher, RunConfig())
    with torch.no_grad():
        student.second_time.linear_2.weight.normal_(0, 0.5)
    x, s, t = pairs()
    t2 = torch.clamp(t + 0.2, max=1.0)
    assert not torch.allclose(student(x, s, t), student(x, s, t2))
    # the teacher's own network is a separate copy, untouched
    assert torch.allclose(teacher.velocity(x, s), load_teacher(str(tiny_teacher_dir)).velocity(x, s))


def test_calling_wrapped_network_directly_is_an_error(tiny_teacher_dir):
    student = build_student(load_teacher(str(tiny_teacher_dir)), RunConfig())
    with pytest.raises(RuntimeError, match="second time"):
        student.network(torch.randn(1, 1, 8, 8), torch.tensor([500.0]))


def test_export_round_trip_is_strict_and_identical(tiny_teacher_dir, tmp_path):
    teacher = load_teacher(str(tiny_teacher_dir))
    student = build_student(teacher, RunConfig())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    export_student(student, tmp_path / "student", StudentConfig(data_shape=[1, 8, 8], kind="image", shift=1.0))
    loaded, cfg = load_student(tmp_path / "student")
    x, s, t = pairs()
    assert torch.equal(loaded(x, s, t), student.eval()(x, s, t))
    assert cfg.time_convention and cfg.parametrisation.startswith("average_velocity")
    assert cfg.backbone["class_name"] == "UNet2DModel"
    assert set(cfg.package_versions) >= {"torch", "diffusers"}
    # strict: a missing tensor is an error, not a silent partial load
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "student" / "flow_map" / "second_time.safetensors")
    sd.pop("linear_2.bias")
    save_file(sd, tmp_path / "student" / "flow_map" / "second_time.safetensors")
    with pytest.raises(StudentLoadError, match="linear_2.bias"):
        load_student(tmp_path / "student")


def test_truncated_weights_give_a_clear_error(tiny_teacher_dir, tmp_path):
    student = build_student(load_teacher(str(tiny_teacher_dir)), RunConfig())
    export_student(student, tmp_path / "s", StudentConfig(data_shape=[1, 8, 8]))
    w = tmp_path / "s" / "flow_map" / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(StudentLoadError, match="cannot load"):
        load_student(tmp_path / "s")


def test_export_replaces_atomically_and_ema_copy_is_independent(tiny_teacher_dir, tmp_path):
    student = build_student(load_teacher(str(tiny_teacher_dir)), RunConfig())
    ema = copy.deepcopy(student)
    with torch.no_grad():
        student.second_time.linear_2.bias.fill_(1.0)
    x, s, t = pairs()
    assert not torch.equal(ema(x, s, t), student(x, s, t))
    export_student(ema, tmp_path / "out", StudentConfig(data_shape=[1, 8, 8]))
    export_student(student, tmp_path / "out", StudentConfig(data_shape=[1, 8, 8]))  # replaces the old export whole
    loaded, _ = load_student(tmp_path / "out")
    assert torch.equal(loaded(x, s, t), student(x, s, t))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_mlp_student_round_trip(tmp_path):
    from ttfm_distill.mlp import MlpFlowMap

    m = MlpFlowMap(dim=2, width=16, depth=2)
    export_student(m, tmp_path / "m", StudentConfig(data_shape=[2], kind="points"))
    loaded, _ = load_student(tmp_path / "m")
    x, s = torch.randn(4, 2), torch.rand(4)
    assert torch.equal(loaded(x, s, s + 0.1), m(x, s, s + 0.1))
