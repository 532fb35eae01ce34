"""The interfaces callers trust: every teacher declares its capabilities, every student kind the student protocol,
and the package reads them instead of probing (issue 32, items 2 and 3)."""

import re
from pathlib import Path

import pytest
import torch

from ttfm_distill.config import RunConfig
from ttfm_distill.student import STUDENT_CLASSES, FlowMapStudent, StudentLoadError, student_class
from ttfm_distill.teachers.analytic import AnalyticTeacher, get_analytic_teacher
from ttfm_distill.teachers.base import Teacher
from ttfm_distill.teachers.loading import load_teacher

PACKAGE = Path(__file__).resolve().parents[2] / "ttfm_distill"


def test_an_exact_teacher_declares_no_network_and_a_flow_velocity():
    teacher = get_analytic_teacher("checkerboard")
    assert isinstance(teacher, AnalyticTeacher) and isinstance(teacher, Teacher)
    assert teacher.network is None and teacher.codec is None and teacher.prompts is None and teacher.io is None
    assert not teacher.has_network and teacher.prediction_type == "flow" and teacher.time_embedders() == []
    assert teacher.sample_cond(4) is None and teacher.image_shape == (2,) and not teacher.is_latent


def test_a_diffusers_teacher_declares_its_network_its_reading_and_its_time_embedders(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir))
    assert teacher.has_network and dict(teacher.named_children())["network"] is teacher.network  # registered
    assert teacher.prediction_type == "flow" and teacher.io is not None and not teacher.io.discrete_timesteps
    embedders = teacher.time_embedders()
    assert embedders and all(any(m is e for m in teacher.network.modules()) for e in embedders)
    assert teacher.fingerprint is None  # filled in once, by data.cache.teacher_fingerprint
    from ttfm_distill.data.cache import teacher_fingerprint

    key = teacher_fingerprint(teacher)
    assert teacher.fingerprint == key and teacher_fingerprint(teacher) == key


def test_the_lora_teacher_view_is_a_teacher_sharing_the_modules_without_owning_the_student(tiny_teacher_dir):
    pytest.importorskip("peft")
    from ttfm_distill.lora import BaseWeightsTeacher, build_lora_student

    teacher = load_teacher(str(tiny_teacher_dir))
    student, view = build_lora_student(teacher, RunConfig(teacher=str(tiny_teacher_dir), lora_rank=2))
    assert isinstance(view, BaseWeightsTeacher) and isinstance(view, Teacher)
    assert view.network is teacher.network is student.network and view.io is teacher.io
    assert (view.shift, view.data_shape, view.kind, view.source) == (teacher.shift, teacher.data_shape, teacher.kind,
                                                                       teacher.source)
    # the view's modules are the teacher's; the student's own tensors (second time) are not among them
    view_params = {id(p) for p in view.parameters()}
    assert not any(id(p) in view_params for p in student.second_time.parameters())
    x, t = torch.randn(3, *teacher.data_shape), torch.full((3,), 0.4)
    with torch.no_grad():
        for p in [p for p in student.parameters() if p.requires_grad]:
            p.add_(0.1)  # adapters and second time moved: the view must still be the teacher
        with student.base_weights():
            base = teacher.velocity(x, t)
        torch.testing.assert_close(view.velocity(x, t), base)
        assert not torch.allclose(student(x, t, t), base)


def test_every_student_kind_is_registered_by_its_class_and_implements_the_protocol(tiny_teacher_dir):
    from ttfm_distill.mlp import MlpFlowMap
    from ttfm_distill.student import TwoTimeFlowMap

    assert student_class("TwoTimeFlowMap") is TwoTimeFlowMap and student_class("MlpFlowMap") is MlpFlowMap
    assert student_class("LoraFlowMap").__name__ == "LoraFlowMap"
    assert all(issubclass(cls, FlowMapStudent) for cls in STUDENT_CLASSES.values())
    with pytest.raises(StudentLoadError, match="unknown student class"):
        student_class("NoSuchFlowMap")
    mlp = MlpFlowMap(dim=2, width=8, depth=1)
    assert mlp.io is None and mlp.student_output == "native" and mlp.time_embedders() == []
    # the whole-network defaults: the EMA is a frozen copy that follows the student
    ema = mlp.make_ema()
    assert all(not p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(1.0)
    before = [p.clone() for p in ema.parameters()]
    ema.follow(mlp, 0.75)
    for b, e, m in zip(before, ema.parameters(), mlp.parameters()):
        torch.testing.assert_close(e, 0.75 * b + 0.25 * m)
    state = mlp.trainable_state_dict()
    assert set(state) == set(mlp.state_dict())
    fresh = MlpFlowMap(dim=2, width=8, depth=1)
    fresh.load_trainable_state_dict(state)
    for a, b in zip(fresh.parameters(), mlp.parameters()):
        torch.testing.assert_close(a, b)
    # a diffusers-backed student keeps its added embeddings with the family's time embedders
    from ttfm_distill.factory import build_student

    teacher = load_teacher(str(tiny_teacher_dir))
    student = build_student(teacher, RunConfig(teacher=str(tiny_teacher_dir)))
    kept = student.time_embedders()
    assert any(m is student.second_time for m in kept) and len(kept) == len(teacher.time_embedders()) + 1


PROBE = re.compile(r"(getattr|hasattr)\((self\.)?(teacher|student|model|ema|fake)\b\s*,")


def test_the_package_reads_declared_attributes_instead_of_probing_its_teachers_and_students():
    """No ``getattr(teacher, ..., default)`` / ``hasattr(student, ...)``: what a teacher or student can do is
    declared on its base class (a plain ``getattr(teacher, name)`` over declared names is not a probe)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            m = PROBE.search(line)
            if m and not (m.group(1) == "getattr" and re.search(r"getattr\([\w.]+, name\)", line)):
                found.append(f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_one_batch_path_draws_data_noise_pairs_and_guidance_from_one_generator_in_that_order():
    from ttfm_distill.batch import BatchPath, step_generator
    from ttfm_distill.convention import interpolate
    from ttfm_distill.data.build import ExactData
    from ttfm_distill.objectives.timesampling import sample_time_pairs

    teacher = get_analytic_teacher("checkerboard")
    cfg = RunConfig(teacher="builtin:checkerboard", time_sampling="mixed", diagonal_fraction=0.25,
                    guidance_range=None)
    path = BatchPath.from_run(cfg, teacher, ExactData(teacher))
    batch, x1 = path.draw(16, step_generator(3, 1, 7))
    g = step_generator(3, 1, 7)
    want_x1 = teacher.sample_data(16, generator=g)
    x0 = teacher.sample_noise(16, generator=g)
    s, t = sample_time_pairs(16, "mixed", 0.25, cfg.dyadic_levels, generator=g)
    torch.testing.assert_close(x1, want_x1)
    torch.testing.assert_close(batch.x_s, interpolate(x0, want_x1, s))
    assert torch.equal(batch.s, s) and torch.equal(batch.t, t) and batch.cond is None and batch.trajectory is None
    assert not torch.equal(path(16, step_generator(3, 0, 7)).x_s, batch.x_s)  # another rank, another batch
    guided = BatchPath(teacher, ExactData(teacher), "mixed", 0.25, guidance_range=(1.0, 3.0))
    scales = guided(64, step_generator(3, 1, 7)).cond["cfg_scale"]
    assert scales.shape == (64,) and 1.0 <= scales.min() and scales.max() <= 3.0 and scales.std() > 0.3


def test_benchmarks_use_the_package_s_public_functions_only():
    """No benchmark imports a private (underscored) name of the package (issue 32, item 4)."""
    benchmarks = PACKAGE.parent / "benchmarks"
    private = re.compile(r"from ttfm_distill[\w.]* import ([^\n]*)")
    found = []
    for path in sorted(benchmarks.glob("*.py")):
        for names in private.findall(path.read_text()):
            found += [f"{path.name}: {n.strip()}" for n in names.strip("()").split(",") if n.strip().startswith("_")]
    assert found == []


def test_config_imports_only_the_errors_module():
    """config.py (the schema, validation, load/dump and the resume rules) imports no other module of the package,
    at the top or inside a function: the facts it needs are passed in (issue 32, item 1)."""
    text = (PACKAGE / "config.py").read_text()
    assert re.findall(r"^\s*from \.(\w+)", text, flags=re.M) == ["errors"]
    assert "import ttfm_distill" not in text
