"""The user's files are never deleted, one run per folder, every bad setting named: through the real entry point.

Every destructive command here is pointed at decoy folders made inside pytest's ``tmp_path``.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import TINY, cli, one_line_error


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _decoy(root, name, files):
    folder = root / name
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


# ---------------------------------------------------------------- --overwrite ------------------------------------
def test_overwrite_refuses_home_current_folder_and_parents(tmp_path, tiny_teacher_dir):
    home = _decoy(tmp_path, "home", {".ssh/id_rsa": "KEY", "notes.txt": "mine"})
    work = _decoy(tmp_path, "home/work", {"thesis.tex": "chapter 1"})
    (work / "sub").mkdir()
    env = {"HOME": str(home)}
    before = _tree(tmp_path)
    for cwd, output in [(tmp_path, home), (work, "."), (work / "sub", ".."), (work / "sub", work), (work, "/"),
                        (work, "~")]:
        r = cli("run", "--teacher", tiny_teacher_dir, "--output", output, "--overwrite", "--max-steps", 2, *TINY,
                cwd=cwd, env=env)
        line = one_line_error(r, 2, "refusing --overwrite")
        assert len(line) <= 200
    assert _tree(tmp_path) == before
    assert (home / ".ssh" / "id_rsa").read_text() == "KEY"


def test_overwrite_refuses_a_folder_holding_anything_a_run_did_not_write(tmp_path, tiny_teacher_dir):
    thesis = _decoy(tmp_path, "thesis", {"thesis.tex": "chapter 1", "figures/a.png": "png"})
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", thesis, "--overwrite", "--max-steps", 2, *TINY)
    line = one_line_error(r, 2, "did not write")
    assert "'figures'" in line or "'thesis.tex'" in line
    assert (thesis / "thesis.tex").read_text() == "chapter 1" and (thesis / "figures" / "a.png").exists()
    # a config.json that is not a run's does not make a folder a run
    (thesis / "thesis.tex").unlink()
    (thesis / "figures" / "a.png").unlink()
    (thesis / "figures").rmdir()
    (thesis / "config.json").write_text(json.dumps({"model": "mine"}))
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", thesis, "--overwrite", "--max-steps", 2, *TINY)
    one_line_error(r, 2, "not a ttfm-distill run config")
    assert json.loads((thesis / "config.json").read_text()) == {"model": "mine"}


def test_overwrite_of_a_run_folder_deletes_only_the_run_and_starts_over(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    args = ["run", "--teacher", tiny_teacher_dir, "--output", out, "--set", "checkpoint_every=2", *TINY]
    # this round's state too: the fake network in the checkpoints, validation rows and images, the curves
    assert cli(*args, "--max-steps", 4, "--set", "dm_weight=0.3", "--validate-every", 2).returncode == 0
    assert (out / "checkpoints" / "step-00000004" / "fake.safetensors").exists()
    assert (out / "validation").is_dir() and (out / "train_log.jsonl").exists()
    (out / "mine.txt").write_text("keep me")
    one_line_error(cli(*args, "--max-steps", 2, "--overwrite"), 2, "mine.txt")
    assert (out / "checkpoints" / "step-00000004").is_dir() and (out / "mine.txt").exists()
    (out / "mine.txt").unlink()
    r = cli(*args, "--max-steps", 2, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "resuming" not in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2
    assert not (out / "checkpoints" / "step-00000002" / "fake.safetensors").exists()  # dm_weight 0 now
    assert not (out / "validation").exists() or not any("00000004" in p.name for p in (out / "validation").iterdir())


# ---------------------------------------------------------------- one run per folder -----------------------------
def test_second_run_in_a_busy_folder_is_refused_and_the_first_finishes(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ttfm_distill", "run", "--teacher", str(tiny_teacher_dir), "--output", str(out),
            "--max-steps", "400", "--set", "checkpoint_every=100", *TINY]
    first = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "config.json").exists()
        r = cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--max-steps", 400, "--set",
                "checkpoint_every=100", *TINY)
        line = one_line_error(r, 1, "in use by another ttfm-distill process", f"pid {first.pid}")
        assert len(line) <= 200
        one_line_error(cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--overwrite", "--max-steps", 2,
                           *TINY), 1, "in use")
    finally:
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert (out / "student").is_dir() and (out / "metrics.json").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "ttfm_distill", "run", "--teacher", str(tiny_teacher_dir), "--output", str(out),
            "--max-steps", "100000", "--set", "checkpoint_every=5", *TINY]
    first = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step-*")) and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert f"pid {first.pid}" in (out / ".ttfm-distill.lock").read_text()  # the dead process's record is left
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--max-steps", 100000, "--set",
            "checkpoint_every=5", *TINY, "--dry-run")
    assert r.returncode == 0, r.stderr  # a dry run only reads
    # resuming with a reachable budget: the lock of the dead process is taken over with a warning
    done = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_steps"] == 100000
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--max-steps", done + 2, "--set",
            "checkpoint_every=5", *TINY)
    assert r.returncode == 0, r.stderr
    assert "taking over the lock" in r.stderr and "resuming" in r.stderr


def test_sigterm_exits_143_with_a_checkpoint_and_sigint_130(tmp_path, tiny_teacher_dir):
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out = tmp_path / f"run{code}"
        p = subprocess.Popen([sys.executable, "-m", "ttfm_distill", "run", "--teacher", str(tiny_teacher_dir),
                              "--output", str(out), "--max-steps", "100000", "--set", "checkpoint_every=100000",
                              *TINY], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"},
                             # a shell without job control starts background jobs with SIGINT ignored, and
                             # Python keeps an ignored SIGINT ignored: give the child the default disposition
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.time() + 120
            while not (out / "config.json").exists() and time.time() < deadline:
                time.sleep(0.2)
            time.sleep(1.5)
            p.send_signal(sig)
            _, err = p.communicate(timeout=120)
        finally:
            if p.poll() is None:  # never leave a 100000-step run behind
                p.kill()
                p.wait()
        assert p.returncode == code, err
        assert err.strip().splitlines()[-1].startswith("error: interrupted") and "Traceback" not in err
        assert list((out / "checkpoints").glob("step-*"))


# ---------------------------------------------------------------- kept state -------------------------------------
def test_temporaries_of_a_killed_export_are_swept_and_a_moved_student_is_restored(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    args = ["run", "--teacher", tiny_teacher_dir, "--output", out, "--set", "checkpoint_every=2", *TINY]
    assert cli(*args, "--max-steps", 2).returncode == 0
    (out / ".student.abc123.tmp").mkdir()
    (out / ".student.abc123.tmp" / "model.safetensors").write_text("half")
    (out / ".metrics.json.x1.tmp").write_text("{")
    (out / "checkpoints" / ".step-00000004.y.tmp").mkdir()
    (out / "cache" / ".pool.z.tmp").write_text("")
    os.replace(out / "student", out / ".student.old")  # a kill between atomic_dir's two renames
    r = cli(*args, "--max-steps", 4)
    assert r.returncode == 0, r.stderr
    left = [p for d in (out, out / "checkpoints", out / "cache") for p in d.iterdir() if p.name.endswith(".tmp")]
    assert left == [] and not (out / ".student.old").exists() and (out / "student").is_dir()


def test_max_steps_below_the_steps_done_changes_nothing(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    args = ["run", "--teacher", tiny_teacher_dir, "--output", out, "--set", "checkpoint_every=2", *TINY]
    assert cli(*args, "--max-steps", 4).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".ttfm-distill.lock"}
    one_line_error(cli(*args, "--max-steps", 2), 2, "already at step 4", "--max-steps 4")
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".ttfm-distill.lock"}
    assert after == before


def test_a_refused_run_leaves_no_config_so_the_fixed_command_runs(tmp_path, tiny_teacher_dir):
    out = tmp_path / "run"
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--data", tmp_path / "no-such-images", *TINY)
    assert r.returncode != 0
    assert not (out / "config.json").exists()
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--max-steps", 2, *TINY)
    assert r.returncode == 0, r.stderr


def _nan_teacher(src, dst):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "unet" / "diffusion_pytorch_model.safetensors"
    w = load_file(f)
    key = next(k for k in w if k.endswith("conv_out.weight"))
    w[key] = w[key].clone()
    w[key][0, 0, 0, 0] = float("nan")
    save_file(w, str(f))


def test_a_nan_teacher_is_blamed_before_any_work_and_nothing_is_cached(tmp_path, tiny_teacher_dir):
    bad = tmp_path / "bad-teacher"
    _nan_teacher(tiny_teacher_dir, bad)
    out = tmp_path / "run"
    one_line_error(cli("run", "--teacher", bad, "--output", out, "--max-steps", 2, *TINY), 2, "NaN", "teacher")
    assert not (out / "cache").exists() and not (out / "config.json").exists()


def test_a_replaced_teacher_never_resumes_and_never_reuses_the_pool(tmp_path, tiny_teacher_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    out = tmp_path / "run"
    args = ["run", "--teacher", teacher, "--output", out, "--set", "checkpoint_every=2", *TINY]
    assert cli(*args, "--max-steps", 2).returncode == 0
    pools = sorted(p.name for p in (out / "cache").glob("pool-*"))
    f = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    w = load_file(f)
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in w.items()}, str(f))  # same size, new weights
    one_line_error(cli(*args, "--max-steps", 4), 1, "teacher's weights changed")
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2
    r = cli(*args, "--max-steps", 2, "--overwrite")
    assert r.returncode == 0, r.stderr
    new = sorted(p.name for p in (out / "cache").glob("pool-*"))
    assert new and new != pools  # a fresh pool for the new weights


def test_a_folder_of_an_earlier_version_keeps_its_run_state_from_config_json(tmp_path, tiny_teacher_dir):
    """Before run_state.json, config.json held the teacher's key among the settings: such a folder still refuses a
    replaced teacher and resumes with the same one."""
    import shutil

    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    out = tmp_path / "run"
    args = ["run", "--teacher", teacher, "--output", out, "--set", "checkpoint_every=2", *TINY]
    assert cli(*args, "--max-steps", 2).returncode == 0
    state = json.loads((out / "run_state.json").read_text())
    assert state["teacher_fingerprint"] and state["fitted_steps"] is None
    assert "teacher_fingerprint" not in json.loads((out / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, **state}))  # the earlier layout
    (out / "run_state.json").unlink()
    f = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    w = load_file(f)
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in w.items()}, str(f))
    one_line_error(cli(*args, "--max-steps", 4), 1, "teacher's weights changed")
    save_file(w, str(f))
    r = cli(*args, "--max-steps", 4)
    assert r.returncode == 0, r.stderr
    assert (out / "checkpoints" / "step-00000004").exists()
    assert json.loads((out / "run_state.json").read_text())["teacher_fingerprint"] == state["teacher_fingerprint"]


# ---------------------------------------------------------------- bad settings -----------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--lr", "inf"], ["lr", "finite"]),
    (["--set", "lr=1e400"], ["lr", "finite"]),
    (["-L", "tau=nan"], ["tau", "finite"]),
    (["--set", "grad_clip=nan"], ["grad_clip"]),
    (["--set", "max_steps=2.5"], ["max_steps", "integer", "2.5"]),
    (["--set", 'max_steps="10"'], ["max_steps", "integer"]),
    (["--set", "batch_size=abc"], ["batch_size", "integer"]),
    (["--set", "batch_size=1.5"], ["batch_size", "integer"]),
    (["--set", "loss_options=5"], ["loss_options"]),
    (["--set", "seed=1.5"], ["seed", "integer"]),
    (["--set", "allow_pickle=1"], ["allow_pickle", "true or false"]),
    (["--loss", "nope"], ["unknown loss", "itvm"]),
    (["-L", "tau=0.1", "--loss", "lsd"], ["tau", "lsd"]),
    # the distribution-matching term's settings, its warm start, and the run's watching (this round's state)
    (["--set", "dm_weight=-1"], ["dm_weight", ">= 0"]),
    (["--set", "dm_weight=nan"], ["dm_weight", "finite"]),
    (["--set", "dm_fake_lr=-1"], ["dm_fake_lr", "> 0"]),
    (["--set", "dm_fake_updates=0"], ["dm_fake_updates", ">= 1"]),
    (["--set", "dm_fake_time=sideways"], ["dm_fake_time", "sideways", "logit_normal"]),
    (["--set", "dm_time_min=0.99"], ["dm_time_min", "dm_time_max", "0.99"]),
    (["--set", "dm_rollout_steps=[0]"], ["dm_rollout_steps", "[0]"]),
    (["--set", "dm_gan_weight=0.1", "--set", "lora_rank=4"], ["dm_gan_weight", "LoRA", "lora_rank=0"]),
    (["--set", "dm_gan_weight=0.1", "--set", "dm_weight=0"], ["dm_gan_weight", "dm_weight"]),
    (["--set", "dm_gan_weight=-1"], ["dm_gan_weight", ">= 0"]),
    (["--set", "dm_stage_steps=100", "--set", "dm_start_step=5"], ["dm_stage_steps", "dm_start_step"]),
    (["--set", "init_from=/nonexistent/run"], ["init_from", "/nonexistent/run", "does not exist"]),
    (["--validate-every", "-1"], ["validate_every", "-1"]),
    (["--report-to", "nope"], ["report_to", "nope", "tensorboard"]),
])
def test_every_bad_setting_is_named(args, needles, tmp_path):
    line = one_line_error(cli("run", "--dry-run", *args, cwd=tmp_path), 2, *needles)
    assert len(line) <= 200
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name, text, needles", [
    ("a.json", '{"lr": "fast"}', ["lr", "fast"]),
    ("b.json", "[1, 2]", ["table of settings", "list"]),
    ("c.toml", 'max_steps = "ten"', ["max_steps", "ten"]),
    ("d.json", '{"loss_options": [1]}', ["loss_options"]),
])
def test_bad_config_files_are_named(name, text, needles, tmp_path):
    (tmp_path / name).write_text(text)
    one_line_error(cli("run", "--dry-run", "--config", tmp_path / name, cwd=tmp_path), 2, *needles)


def test_a_batch_that_cannot_fit_is_refused_before_any_allocation(tmp_path, tiny_teacher_dir):
    t0 = time.time()
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", tmp_path / "r", "--batch-size", 1000000000, "-q")
    one_line_error(r, 2, "batch_size 1000000000", "lower --batch-size")
    assert time.time() - t0 < 60 and not (tmp_path / "r").exists()


# ---------------------------------------------------------------- works as typed ---------------------------------
@pytest.mark.parametrize("loss, options, diagonal", [
    ("itvm", [], 0.0), ("lsd", [], 0.75), ("lfmd", [], 0.25), ("progressive", [], 0.25), ("meanflow", [], 0.25),
    ("itvm", ["-L", "intermediate=uniform"], 0.25),
])
def test_every_objective_has_its_own_defaults(loss, options, diagonal, tmp_path):
    r = cli("run", "--dry-run", "--loss", loss, *options, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["diagonal_fraction"] == diagonal
    r = cli("run", "--dry-run", "--loss", loss, *options, "--set", "diagonal_fraction=0.5", cwd=tmp_path)
    assert json.loads(r.stdout)["diagonal_fraction"] == 0.5


def test_lsd_runs_with_no_other_option(tmp_path, tiny_teacher_dir):
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", tmp_path / "r", "--loss", "lsd", "--max-steps", 2,
            *TINY)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["diagonal_fraction"] == 0.75


def test_an_unsupported_time_embedding_is_refused_before_the_pool(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    teacher = tmp_path / "fourier"
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                time_embedding_type="fourier").save_pretrained(teacher / "unet")
    FlowMatchEulerDiscreteScheduler().save_pretrained(teacher / "scheduler")
    out = tmp_path / "run"
    one_line_error(cli("run", "--teacher", teacher, "--output", out, "--max-steps", 2, *TINY), 2, "fourier",
                   "positional")
    assert not out.exists()


def test_a_teacher_config_claiming_a_huge_sample_size_is_refused_before_allocating(tmp_path, tiny_teacher_dir):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    config = teacher / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "sample_size": 1000000}))
    t0 = time.time()
    one_line_error(cli("run", "--teacher", teacher, "--output", tmp_path / "r", *TINY), 2, "sample_size",
                   "1x1000000x1000000")
    assert time.time() - t0 < 60 and not (tmp_path / "r").exists()
