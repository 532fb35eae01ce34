"""Bad input through the real entry point: one line on stderr, a non-zero exit, nothing half-written."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, cli, one_line_error


@pytest.fixture(scope="module")
def student_run(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "run"
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--max-steps", 4, "--set", "checkpoint_every=2",
            *TINY)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("args, needles", [
    (["run", "--max-steps", "abc"], ["--max-steps", "integer", "ttfm-distill run --help"]),
    (["run", "--lr", "fast"], ["--lr"]),
    (["run", "--no-such-flag"], ["--no-such-flag"]),
    (["sample", "--steps", "two"], ["--steps"]),
    (["run", "--max-steps", "0", "--dry-run"], ["max_steps"]),
    (["run", "--ema-decay", "1.5", "--dry-run"], ["ema_decay"]),
    (["run", "-L", "tau", "--dry-run"], ["KEY=VALUE"]),
    (["run", "-L", "intermediate=middle", "--dry-run"], ["intermediate"]),
    (["run", "-L", "intermediate=uniform", "--set", "diagonal_fraction=0", "--dry-run"], ["diagonal_fraction", "teacher"]),
    (["run", "--loss", "lsd", "--set", "diagonal_fraction=0", "--dry-run"], ["diagonal_fraction"]),
    (["sample", "--num", "-3"], ["--num"]),
    (["sample", "--steps", "2", "--output", "grid.jpg"], []),
    (["frobnicate"], ["No such command"]),
])
def test_bad_flags(args, needles, tmp_path):
    one_line_error(cli(*args, cwd=tmp_path), 2, *needles)


def test_config_file_unknown_key_suggests(tmp_path):
    (tmp_path / "c.toml").write_text("max_step = 10\nlearning_rate = 1e-3\n")
    one_line_error(cli("run", "--config", tmp_path / "c.toml", "--dry-run"), 2, "max_step", "max_steps")
    (tmp_path / "bad.toml").write_text("max_steps = [")
    one_line_error(cli("run", "--config", tmp_path / "bad.toml", "--dry-run"), 2, "bad.toml")


def test_teacher_folders_that_are_not_denoisers(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("inspect", "--teacher", empty), 2, "holds no denoiser")
    enc = tmp_path / "text_encoder"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModel"], "hidden_size": 8}))
    one_line_error(cli("run", "--teacher", enc, "--dry-run"), 2, "CLIPTextModel", "not a denoiser")
    one_line_error(cli("inspect", "--teacher", enc), 2, "not a denoiser", "inspect --help")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text("[1, 2]")
    one_line_error(cli("inspect", "--teacher", odd), 2, "not a model config")
    (odd / "config.json").write_text("{not json")
    one_line_error(cli("inspect", "--teacher", odd), 2, "cannot read")
    one_line_error(cli("inspect", "--teacher", tmp_path / "misspeled"), 2, "neither a folder nor a hub id")


def test_model_folder_without_config(tiny_teacher_dir, tmp_path):
    t = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, t)
    (t / "unet" / "config.json").unlink()
    one_line_error(cli("inspect", "--teacher", t), 2, "holds no denoiser")


@pytest.mark.parametrize("scheduler, expect", [
    ({"_class_name": "NotAScheduler"}, "unknown scheduler 'NotAScheduler'"),
    ({"_class_name": "DDPMScheduler", "prediction_type": "flow"}, "prediction_type 'flow'"),
    ({"_class_name": "KDPM2DiscreteScheduler", "beta_schedule": "no-such-schedule"}, "cannot build scheduler"),
])
def test_scheduler_that_is_neither_flow_nor_diffusion(tiny_teacher_dir, tmp_path, scheduler, expect):
    t = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, t)
    (t / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    one_line_error(cli("run", "--teacher", t, "--dry-run"), 2, "not a flow-matching or diffusion teacher", expect)


def test_diffusion_scheduler_is_read_through_its_ode(tiny_teacher_dir, tmp_path):
    t = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, t)
    (t / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "prediction_type": "v_prediction"}))
    r = cli("inspect", "--teacher", t)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["prediction_type"] == "v_prediction" and info["scheduler"] == "DDPMScheduler" and info["shift"] == 1.0


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_teacher_weights(tiny_teacher_dir, tmp_path, damage):
    t = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, t)
    w = t / "unet" / "diffusion_pytorch_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 64)
    out = tmp_path / "out"
    one_line_error(cli("run", "--teacher", t, "--output", out, "--max-steps", 2, *TINY), 2, "cannot load UNet2DModel")
    assert not out.exists() or not any(out.iterdir())


def test_pickle_weights_only_behind_flag(tiny_teacher_dir, tmp_path):
    from diffusers import UNet2DModel

    t = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, t)
    UNet2DModel.from_pretrained(t / "unet").save_pretrained(t / "unet", safe_serialization=False)
    (t / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert (t / "unet" / "diffusion_pytorch_model.bin").exists()
    one_line_error(cli("inspect", "--teacher", t), 2, "pickle", "--allow-pickle")
    r = cli("inspect", "--teacher", t, "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert "warning: loading pickle weights" in r.stderr and json.loads(r.stdout)["class_name"] == "UNet2DModel"


def test_output_folder_problems(tiny_teacher_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("precious")
    one_line_error(cli("run", "--teacher", tiny_teacher_dir, "--output", busy, "--max-steps", 2, *TINY), 2,
                   "did not write", "thesis.tex")
    assert (busy / "thesis.tex").read_text() == "precious" and len(list(busy.iterdir())) == 1
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(cli("run", "--teacher", tiny_teacher_dir, "--output", blocker / "run", "--max-steps", 2, *TINY),
                   2, "cannot write to output folder")
    one_line_error(cli("run", "--teacher", tiny_teacher_dir, "--output", blocker, "--max-steps", 2, *TINY),
                   2, "is a file")


def test_different_run_in_same_folder_is_refused(student_run, tiny_teacher_dir):
    before = (student_run / "student" / "flow_map" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    one_line_error(cli("run", "--teacher", tiny_teacher_dir, "--output", student_run, "--max-steps", 4, "--lr", "1e-3",
                       *TINY), 2, "different run", "lr")
    assert (student_run / "student" / "flow_map" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_sample_on_damaged_students(student_run, tmp_path):
    bad = tmp_path / "s"
    shutil.copytree(student_run / "student", bad)
    (bad / "flow_map" / "second_time.safetensors").write_bytes(b"\x01" * 40)
    one_line_error(cli("sample", "--model", bad, "--num", 2, "--output", tmp_path / "x.png"), 2)
    assert not (tmp_path / "x.png").exists()
    shutil.rmtree(bad)
    shutil.copytree(student_run / "student", bad)
    (bad / "flow_map" / "ttfm_config.json").write_text("{")
    one_line_error(cli("sample", "--model", bad, "--num", 2), 2, "not valid JSON")
    shutil.rmtree(bad)
    shutil.copytree(student_run / "student", bad)
    w = load_file(bad / "flow_map" / "second_time.safetensors")
    from safetensors.torch import save_file

    save_file({k: torch.zeros(3) for k in w}, str(bad / "flow_map" / "second_time.safetensors"))  # wrong shapes
    one_line_error(cli("sample", "--model", bad, "--num", 2), 2)


def test_killed_checkpoint_write_leaves_previous_intact(student_run, tiny_teacher_dir, tmp_path):
    """SIGKILL during a checkpoint write leaves only a hidden temporary folder: resume ignores it."""
    run = tmp_path / "run"
    shutil.copytree(student_run, run)
    assert [p.name for p in sorted((run / "checkpoints").glob("step-*"))] == ["step-00000002", "step-00000004"]
    half = run / "checkpoints" / ".step-00000005.k1ll3d.tmp"  # what atomic_dir leaves when killed
    half.mkdir()
    (half / "student.safetensors").write_bytes(b"\x00" * 10)
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", run, "--max-steps", 6, *TINY)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and "step 4" in r.stderr
    assert not half.exists()  # stale temporaries are swept at start


def test_damaged_newest_checkpoint_falls_back(student_run, tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(student_run, run)
    w = run / "checkpoints" / "step-00000004" / "student.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", run, "--max-steps", 6, *TINY)
    assert r.returncode == 0, r.stderr
    assert "damaged" in r.stderr and "step 2" in r.stderr
    state = json.loads((run / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["step"] == 6
