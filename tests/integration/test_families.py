"""Every supported diffusers family: loads from a folder, student == teacher at init, exports and reloads strictly."""

import json

import pytest
import torch

from helpers import save_family
from tiny_models import SAMPLE_SIZE


@pytest.mark.parametrize("key", ["DiTTransformer2DModel", "FluxTransformer2DModel", "Lumina2Transformer2DModel"])
def test_family_runs_and_samples(key, tmp_path):
    """The issue's acceptance on a tiny teacher: run for 2 steps, sample in 2 steps with the right shape."""
    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import load_student
    from ttfm_distill.generate import generate
    from ttfm_distill.trainer import run_distillation

    save_family(key, tmp_path / "teacher")
    cfg = RunConfig(teacher=str(tmp_path / "teacher"), output=str(tmp_path / "run"), max_steps=2, batch_size=4,
                    pool_size=8, pool_steps=2, eval_samples=4, reference_steps=2, sample_size=SAMPLE_SIZE.get(key))
    result = run_distillation(cfg, show_progress=False)
    assert (result.output / "samples.png").exists()
    student, meta = load_student(result.output)
    x = generate(student, steps=2, num=3, seed=0)
    assert x.shape == (3, 4, 8, 8) and torch.isfinite(x).all()


def test_guidance_range_is_a_student_input(tmp_path):
    """A guidance scale drawn per sample reaches teacher and student; the export samples at any scale."""
    import subprocess
    import sys

    from ttfm_distill.config import ConfigError, RunConfig
    from ttfm_distill.export import load_student
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student
    from ttfm_distill.trainer import run_distillation

    save_family("DiTTransformer2DModel", tmp_path / "dit")
    cfg = RunConfig(teacher=str(tmp_path / "dit"), output=str(tmp_path / "run"), guidance_range=[1.0, 5.0],
                    max_steps=2, batch_size=4, pool_size=8, pool_steps=2, eval_samples=4, reference_steps=2)
    assert cfg.default_guidance() == 3.0
    teacher = load_teacher(cfg.teacher, guidance_scale=cfg.default_guidance(), guided=True)
    student = build_student(teacher, cfg)
    x, s, t = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.6]), torch.tensor([0.9, 0.6])
    cond = {"class_labels": torch.tensor([2, 3]), "cfg_scale": torch.full((2,), 1.0)}
    with torch.no_grad():  # at init the student is the unguided teacher (scale 1); guidance is what it learns
        torch.testing.assert_close(student(x, s, t, cond), teacher.velocity(x, s, cond), atol=1e-5, rtol=0)
    with torch.no_grad():
        a = teacher.velocity(x, s, {"class_labels": torch.tensor([2, 3]), "cfg_scale": torch.full((2,), 1.0)})
        b = teacher.velocity(x, s, {"class_labels": torch.tensor([2, 3]), "cfg_scale": torch.full((2,), 4.0)})
        assert (a - b).abs().max() > 1e-5
        student.guidance_embed.linear_2.weight.normal_(0, 0.05)  # once trained, the scale reaches the output
        c1 = student(x, s, t, {"class_labels": torch.tensor([2, 3]), "cfg_scale": torch.full((2,), 1.0)})
        c4 = student(x, s, t, {"class_labels": torch.tensor([2, 3]), "cfg_scale": torch.full((2,), 4.0)})
        assert (c1 - c4).abs().max() > 1e-5

    run_distillation(cfg, show_progress=False)
    reloaded, meta = load_student(tmp_path / "run")
    assert meta.guidance_input["range"] == [1.0, 5.0] and reloaded.guidance_embed is not None
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", "sample", "--model", str(tmp_path / "run"), "--steps", "2",
                        "--num", "2", "--guidance-scale", "2.5", "--class-label", "4"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with pytest.raises(ConfigError, match="guidance_range"):
        RunConfig(guidance_range=[3, 1]).validate()
    # eval on a class-conditional, guidance-input student: shared labels, the teacher at the default scale
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", "eval", "--model", str(tmp_path / "run"), "--steps", "1,2",
                        "--num", "4", "--reference-steps", "2", "--output", str(tmp_path / "e.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    assert "class_labels" in report["conditioning"] and report["results"]["student"]["2"]["flow_map_error"] >= 0
