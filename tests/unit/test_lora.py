"""LoRA students: one copy of the base weights, the teacher on the base, exports that reload."""

import sys

import pytest
import torch

pytest.importorskip("peft")

from helpers import lora_inputs as _inputs, lora_student as _lora  # noqa: E402
from ttfm_distill.config import ConfigError, RunConfig  # noqa: E402
from ttfm_distill.lora import build_lora_student, require_peft  # noqa: E402
from ttfm_distill.teachers.loading import load_teacher  # noqa: E402


def test_only_adapters_and_second_time_train_and_the_base_is_shared(tiny_teacher_dir):
    student, teacher = _lora(tiny_teacher_dir)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert any(".lora_A." in n for n in trainable) and any(n.startswith("second_time.") for n in trainable)
    assert all(".lora_" in n or n.startswith("second_time.") for n in trainable)
    assert teacher.network is student.network  # one copy of the base weights
    assert student.lora_targets == ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]  # mid-block attention + resnets


def test_student_equals_teacher_at_init(tiny_teacher_dir):
    student, teacher = _lora(tiny_teacher_dir)
    x, s, t = _inputs()
    with torch.no_grad():
        assert torch.equal(student(x, s, t), teacher.velocity(x, s))


def test_teacher_path_uses_the_base_weights(tiny_teacher_dir):
    plain = load_teacher(str(tiny_teacher_dir))
    student, teacher = _lora(tiny_teacher_dir)
    x, s, t = _inputs(seed=1)
    with torch.no_grad():
        before_student = student(x, s, t)
        for name, p in student.named_parameters():
            if p.requires_grad:  # move every adapter and the second-time embedding off zero
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
        v = teacher.velocity(x, t)
        assert torch.equal(v, plain.velocity(x, t))  # adapters off, no second time
        assert not torch.allclose(student(x, s, t), before_student, atol=1e-3)  # the adapters do act
        assert torch.equal(teacher.velocity(x, t), v)  # and the student call left the base untouched


def test_clear_errors(monkeypatch, tiny_teacher_dir):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ConfigError, match=r"pip install 'ttfm-distill\[lora\]'"):
        require_peft()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="LoRA students need a diffusers teacher"):
        build_lora_student(load_teacher("builtin:gaussian"), RunConfig(lora_rank=4))
    with pytest.raises(ConfigError, match="do not fit"):
        _lora(tiny_teacher_dir, lora_targets="no_such_layer")
