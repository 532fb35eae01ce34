"""The distribution-matching term (objectives/dm.py, fake.py): its maths, its settings' effects, its state."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ttfm_distill.config import RunConfig
from ttfm_distill.checkpoints import list_checkpoints
from ttfm_distill.trainer import run_distillation


# ------------------------------------------------------------------------------------------- the run --------
def tiny_cfg(teacher_dir, out, **kw):
    base = dict(teacher=str(teacher_dir), output=str(out), batch_size=8, pool_size=32, pool_steps=4,
                eval_samples=8, reference_steps=4, checkpoint_every=4, log_every=1, dm_weight=0.5, dm_batch=4)
    base.update(kw)
    return RunConfig(**base)


def test_dm_state_is_checkpointed_and_resumes_bit_for_bit(tiny_teacher_dir, tmp_path):
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "a", max_steps=8), show_progress=False)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=4), show_progress=False)
    res = run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=8), show_progress=False)
    assert res.resumed_from == 4
    for name in ("student.safetensors", "ema.safetensors", "fake.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step-00000008" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step-00000008" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(tmp_path / "a" / "checkpoints" / "step-00000008" / "fake_optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "step-00000008" / "fake_optimizer.pt", weights_only=True)
    assert all(torch.equal(a["state"][k]["exp_avg"], b["state"][k]["exp_avg"]) for k in a["state"])
    # the fake network trained (so equal weights are not vacuous) and is not exported with the student
    from ttfm_distill.teachers.loading import load_teacher

    teacher = load_teacher(str(tiny_teacher_dir))
    fake = load_file(tmp_path / "a" / "checkpoints" / "step-00000008" / "fake.safetensors")
    start = {f"network.{k}": v for k, v in teacher.network.state_dict().items()}
    assert any(not torch.equal(fake[k], start[k]) for k in start)
    exported = [p.name for p in (tmp_path / "a" / "student").rglob("*")]
    assert not any("fake" in n for n in exported)
    history = res.metrics and (tmp_path / "b" / "checkpoints" / "step-00000008" / "trainer_state.json").read_text()
    assert "dm_loss" in history and "dm_fake_loss" in history


def _final_student(out):
    return load_file(out / "checkpoints" / "step-00000004" / "student.safetensors")


def test_each_setting_changes_the_run(tiny_teacher_dir, tmp_path):
    """dm_weight, dm_start_step, the time range, rollouts, the fake's lr and updates: each has an effect."""
    def run(name, **kw):
        run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / name, max_steps=4, **kw), show_progress=False)
        return tmp_path / name

    off = _final_student(run("off", dm_weight=0.0))
    on = _final_student(run("on"))
    assert any(not torch.equal(off[k], on[k]) for k in off)  # the term reaches the student
    late = _final_student(run("late", dm_start_step=100))
    assert all(torch.equal(off[k], late[k]) for k in off)  # not before dm_start_step: the student is ITVM's
    for name, kw in {"times": dict(dm_time_min=0.5, dm_time_max=0.6), "rollout": dict(dm_rollout_steps=[2])}.items():
        other = _final_student(run(name, **kw))
        assert any(not torch.equal(on[k], other[k]) for k in on), name
    fake = lambda out: load_file(out / "checkpoints" / "step-00000004" / "fake.safetensors")  # noqa: E731
    base = fake(tmp_path / "on")
    for name, kw in {"lr": dict(dm_fake_lr=1e-2), "updates": dict(dm_fake_updates=3),
                     "fake_time": dict(dm_fake_time="logit_normal")}.items():
        other = fake(run(name, **kw))
        assert any(not torch.equal(base[k], other[k]) for k in base), name
    # before dm_start_step the fake network still learns the student's samples
    start = fake(tmp_path / "late")
    from ttfm_distill.teachers.loading import load_teacher

    net = {f"network.{k}": v for k, v in load_teacher(str(tiny_teacher_dir)).network.state_dict().items()}
    assert any(not torch.equal(start[k], net[k]) for k in net)


def test_init_from_starts_the_student_from_an_earlier_run(tiny_teacher_dir, tmp_path):
    first = tmp_path / "first"
    run_distillation(tiny_cfg(tiny_teacher_dir, first, max_steps=4, dm_weight=0.0, export_weights="raw"),
                     show_progress=False)
    second = tmp_path / "second"
    cfg = tiny_cfg(tiny_teacher_dir, second, max_steps=1, init_from=str(first), lr=1e-12, warmup_steps=1)
    run_distillation(cfg, show_progress=False)
    before = load_file(first / "checkpoints" / "step-00000004" / "student.safetensors")
    after = load_file(second / "checkpoints" / "step-00000001" / "student.safetensors")
    # one step at a vanishing lr: the second run's student is the first's, not the teacher's
    key = next(k for k in before if k.startswith("second_time.linear_2.weight"))
    assert before[key].abs().sum() > 0
    assert torch.allclose(before[key], after[key], atol=1e-6)


@pytest.mark.slow
def test_sigterm_with_the_dm_term_checkpoints_its_state_and_resumes(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ttfm_distill", "run", "--teacher", str(tiny_teacher_dir), "--output", str(out),
            "--max-steps", "100000", "--batch-size", "4", "--set", "pool_size=16", "--set", "pool_steps=2",
            "--set", "checkpoint_every=100000", "--set", "dm_weight=0.5", "--set", "dm_batch=2", "-q"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "cache").exists():
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    ckpt = list_checkpoints(out)[-1]
    assert (ckpt / "fake.safetensors").exists() and (ckpt / "fake_optimizer.pt").exists()
