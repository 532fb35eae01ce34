"""The distribution-matching term (objectives/dm.py, fake.py): its maths, its settings' effects, its state."""

import json
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


# ------------------------------------------------------------------------------------- the DM stage --------
def _ckpt(out, step, name="student.safetensors"):
    return load_file(out / "checkpoints" / f"step-{step:08d}" / name)


def test_dm_stage_starts_from_the_ema_with_fresh_moments_and_a_fresh_fake(tiny_teacher_dir, tmp_path):
    """dm_stage_steps=3 of 6: no term before step 3; at step 3 the student takes the EMA's weights (a vanishing
    stage lr keeps it there), the optimiser's moments restart and the fake network is still the teacher's copy."""
    out = tmp_path / "stage"
    cfg = tiny_cfg(tiny_teacher_dir, out, max_steps=6, checkpoint_every=1, keep_checkpoints=10, dm_stage_steps=3,
                   dm_stage_lr=1e-12, warmup_steps=1)
    run_distillation(cfg, show_progress=False)
    rows = [r for r in (out / "train_log.jsonl").read_text().splitlines() if '"kind": "train"' in r]
    with_term = [json.loads(r)["step"] for r in rows if "dm_loss" in r]
    assert with_term == [4, 5, 6]  # (a row is numbered by the steps done: steps 3, 4 and 5)
    from ttfm_distill.teachers.loading import load_teacher

    teacher = {f"network.{k}": v for k, v in load_teacher(str(tiny_teacher_dir)).network.state_dict().items()}
    fake3 = _ckpt(out, 3, "fake.safetensors")
    assert all(torch.equal(fake3[k], teacher[k]) for k in teacher)  # untouched before the stage
    fake6 = _ckpt(out, 6, "fake.safetensors")
    assert any(not torch.equal(fake6[k], teacher[k]) for k in teacher)  # trained in it
    raw3, ema3, raw4 = _ckpt(out, 3), _ckpt(out, 3, "ema.safetensors"), _ckpt(out, 4)
    moved = [k for k in raw3 if not torch.allclose(raw3[k], ema3[k], atol=1e-6)]
    assert moved  # the raw student and its EMA differ at step 3, so the check below is not vacuous
    assert all(torch.allclose(raw4[k], ema3[k], atol=1e-6) for k in moved)
    opt = torch.load(out / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)["optimizer"]
    assert {float(s["step"]) for s in opt["state"].values()} == {1.0}  # one step since the moments restarted


def test_dm_stage_resumes_bit_for_bit_across_its_start(tiny_teacher_dir, tmp_path):
    """A run killed after its step-3 checkpoint (the stage's first step still to do) resumes to the same weights."""
    import shutil

    a = tmp_path / "a"
    run_distillation(tiny_cfg(tiny_teacher_dir, a, max_steps=6, checkpoint_every=3, keep_checkpoints=5,
                              dm_stage_steps=3), show_progress=False)
    b = tmp_path / "b"
    shutil.copytree(a, b)  # b as a kill just after the step-3 checkpoint would have left it
    for name in ("student", "metrics.json", "checkpoints/step-00000006"):
        path = b / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    res = run_distillation(tiny_cfg(tiny_teacher_dir, b, max_steps=6, checkpoint_every=3, keep_checkpoints=5,
                                    dm_stage_steps=3), show_progress=False)
    assert res.resumed_from == 3
    for name in ("student.safetensors", "ema.safetensors", "fake.safetensors"):
        x, y = _ckpt(a, 6, name), _ckpt(b, 6, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_a_lora_students_stage_takes_its_ema_trains_fake_adapters_and_resumes_bit_for_bit(tiny_teacher_dir, tmp_path):
    """With a LoRA student the fake network is a second set of adapters on the shared base (no copy of it): in
    the checkpoint, untouched before the stage and trained in it; the stage starts the student from its EMA's
    adapters; a run killed after the step-3 checkpoint resumes to the same weights."""
    import shutil

    kw = dict(max_steps=6, checkpoint_every=3, keep_checkpoints=5, dm_stage_steps=3, lora_rank=4,
              dm_stage_lr=1e-12, warmup_steps=1)
    a = tmp_path / "a"
    run_distillation(tiny_cfg(tiny_teacher_dir, a, **kw), show_progress=False)
    student3, ema3, student6 = _ckpt(a, 3), _ckpt(a, 3, "ema.safetensors"), _ckpt(a, 6)
    from ttfm_distill.teachers.loading import load_teacher

    base = sum(p.numel() for p in load_teacher(str(tiny_teacher_dir)).network.parameters())
    adapters = {k: v for k, v in student3.items() if ".lora_" in k}
    fake3, fake6 = _ckpt(a, 3, "fake.safetensors"), _ckpt(a, 6, "fake.safetensors")
    assert sum(v.numel() for v in fake3.values()) == sum(v.numel() for v in adapters.values()) < base
    named = {k.removeprefix("network.weights.").replace("/", "."): v for k, v in fake3.items()}
    assert {f"network.{k}" for k in named} == set(adapters)  # the student's adapter names
    assert all(v.abs().sum() == 0 for k, v in named.items() if ".lora_B." in k)  # the teacher's
    assert any(not torch.equal(fake3[k], fake6[k]) for k in fake3)  # trained in the stage
    moved = [k for k in adapters if not torch.allclose(student3[k], ema3[k], atol=1e-6)]
    assert moved and all(torch.allclose(student6[k], ema3[k], atol=1e-6) for k in moved)  # (stage lr ~ 0)
    assert not any("fake" in p.name for p in (a / "student").rglob("*"))
    b = tmp_path / "b"
    shutil.copytree(a, b)  # b as a kill just after the step-3 checkpoint would have left it
    for name in ("student", "metrics.json", "checkpoints/step-00000006"):
        path = b / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    res = run_distillation(tiny_cfg(tiny_teacher_dir, b, **kw), show_progress=False)
    assert res.resumed_from == 3
    for name in ("student.safetensors", "ema.safetensors", "fake.safetensors", "fake_optimizer.pt"):
        if name.endswith(".pt"):
            x = torch.load(a / "checkpoints/step-00000006" / name, weights_only=True)["state"]
            y = torch.load(b / "checkpoints/step-00000006" / name, weights_only=True)["state"]
            assert x and all(torch.equal(x[k]["exp_avg"], y[k]["exp_avg"]) for k in x)
            continue
        x, y = _ckpt(a, 6, name), _ckpt(b, 6, name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_a_lora_student_with_the_term_runs_in_bf16(tiny_teacher_dir, tmp_path):
    """Under bf16 autocast the LoRA fake's adapters stay fp32, the shared time embedders fp32, the losses finite."""
    out = tmp_path / "bf16"
    run_distillation(tiny_cfg(tiny_teacher_dir, out, max_steps=4, lora_rank=4, mixed_precision="bf16"),
                     show_progress=False)
    fake = _ckpt(out, 4, "fake.safetensors")
    assert fake and all(v.dtype == torch.float32 for v in fake.values())
    assert any(v.abs().sum() > 0 for k, v in fake.items() if "lora_B" in k)  # it trained from B = 0
    rows = [json.loads(r) for r in (out / "train_log.jsonl").read_text().splitlines() if '"dm_loss"' in r]
    assert rows and all(torch.isfinite(torch.tensor([r["loss"], r["dm_loss"], r["dm_fake_loss"]])).all() for r in rows)


def test_dm_stage_settings_are_checked():
    from ttfm_distill.errors import ConfigError

    with pytest.raises(ConfigError, match="dm_weight"):
        RunConfig(dm_stage_steps=10, dm_weight=0.0).validate()
    with pytest.raises(ConfigError, match="dm_start_step"):
        RunConfig(dm_stage_steps=10, dm_weight=0.3, dm_start_step=5).validate()
    with pytest.raises(ConfigError, match="dm_stage_lr"):
        RunConfig(dm_stage_steps=10, dm_weight=0.3, dm_stage_lr=0.0).validate()


# ------------------------------------------------------------------------------ the adversarial term --------
def test_the_adversarial_term_trains_a_head_moves_the_student_and_resumes_bit_for_bit(tiny_teacher_dir, tmp_path):
    """dm_gan_weight: a discriminator head on the fake network's middle features, in the fake network's checkpoint
    and optimiser, trained against the batch's data rows; it changes the student; a resume repeats it exactly."""
    gan = dict(dm_gan_weight=0.5, dm_gan_fake_weight=1.0)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "a", max_steps=8, **gan), show_progress=False)
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=4, **gan), show_progress=False)
    res = run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "b", max_steps=8, **gan), show_progress=False)
    assert res.resumed_from == 4
    for name in ("student.safetensors", "ema.safetensors", "fake.safetensors"):
        a = load_file(tmp_path / "a" / "checkpoints" / "step-00000008" / name)
        b = load_file(tmp_path / "b" / "checkpoints" / "step-00000008" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    fake4 = load_file(tmp_path / "b" / "checkpoints" / "step-00000004" / "fake.safetensors")
    fake8 = load_file(tmp_path / "a" / "checkpoints" / "step-00000008" / "fake.safetensors")
    head = [k for k in fake8 if k.startswith("head.")]
    assert head and any(not torch.equal(fake4[k], fake8[k]) for k in head)  # the head is state, and it learns
    rows = [json.loads(r) for r in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r.get("kind") == "train" and "gan_d_loss" in r]
    assert logged and all(k in logged[-1] for k in ("gan_g_loss", "gan_real_logit", "gan_fake_logit"))
    # the same run without the term trains another student, and its fake network has no head
    run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / "c", max_steps=8), show_progress=False)
    s_gan = load_file(tmp_path / "a" / "checkpoints" / "step-00000008" / "student.safetensors")
    s_off = load_file(tmp_path / "c" / "checkpoints" / "step-00000008" / "student.safetensors")
    assert any(not torch.equal(s_gan[k], s_off[k]) for k in s_gan)
    assert not any(k.startswith("head.") for k in load_file(tmp_path / "c" / "checkpoints" / "step-00000008" /
                                                            "fake.safetensors"))


def test_the_adversarial_term_is_refused_where_it_cannot_run():
    from ttfm_distill.errors import ConfigError
    from ttfm_distill.preflight import check_parallelism

    with pytest.raises(ConfigError, match="dm_weight"):
        RunConfig(dm_gan_weight=0.1, dm_weight=0.0).validate()
    with pytest.raises(ConfigError, match="2-D"):
        RunConfig(teacher="builtin:checkerboard", dm_gan_weight=0.1, dm_weight=0.3).validate()
    with pytest.raises(ConfigError, match=">= 0"):
        RunConfig(dm_gan_weight=-1.0).validate()
    cfg = RunConfig(dm_gan_weight=0.1, dm_weight=0.3).validate()
    check_parallelism(cfg, sharded=False, processes=1)
    check_parallelism(cfg, sharded=False, processes=2)  # data parallel: tests/integration/test_fsdp.py
    with pytest.raises(ConfigError, match="FSDP"):
        check_parallelism(cfg, sharded=True, processes=2)
