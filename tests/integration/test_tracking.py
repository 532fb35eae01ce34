"""Watching a run: the training log across kill -9 and resume, TensorBoard's event files, validation, the curves."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, cli, tiny_cfg


def log_rows(out, kind):
    from ttfm_distill.tracking import read_log

    return [r for r in read_log(out / "train_log.jsonl") if r["kind"] == kind]


@pytest.mark.parametrize("report_to", ["none", "tensorboard"])
def test_a_killed_and_resumed_run_logs_each_step_once(tiny_teacher_dir, tmp_path, report_to):
    """kill -9 two steps past a checkpoint, a log row and (with TensorBoard) an event record cut short:
    the resumed run's log and event files hold each step once, with the values of the log."""
    from ttfm_distill.checkpoints import list_checkpoints

    if report_to == "tensorboard":
        pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = ["run", "--teacher", tiny_teacher_dir, "--output", out, "--set", "checkpoint_every=4", "--set",
            "log_every=1", "--report-to", report_to, *TINY]
    with open(tmp_path / "stderr.txt", "w") as err:
        p = subprocess.Popen([sys.executable, "-m", "ttfm_distill", *map(str, args), "--max-steps", "100000"],
                             stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            deadline = time.time() + 300
            while time.time() < deadline:  # past the second checkpoint, two steps from the next one
                steps = [r["step"] for r in log_rows(out, "train")]
                if steps and steps[-1] > 8 and steps[-1] % 4 in (1, 2):
                    break
                time.sleep(0.02)
            os.kill(p.pid, signal.SIGKILL)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    done = int(list_checkpoints(out)[-1].name.split("-")[1])
    before = log_rows(out, "train")
    assert done >= 8 and before[-1]["step"] > done  # rows past the checkpoint that the resume must drop
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 9')  # and a row a kill cut short
    for events in (out / "trackers").rglob("events.out.tfevents.*"):  # and an event record cut short
        with open(events, "r+b") as f:
            f.truncate(events.stat().st_size - 7)
    end = done + 6
    r = cli(*args, "--max-steps", end)
    assert r.returncode == 0, r.stderr
    assert f"step {done}" in r.stderr and "resuming" in r.stderr
    train, valid = log_rows(out, "train"), log_rows(out, "validation")
    assert [row["step"] for row in train] == list(range(1, end + 1))  # each step once, none missing
    assert [row["step"] for row in valid] == [*range(4, end, 4), end]  # each checkpoint and the end, once
    assert all(row["samples"] == 8 * row["step"] for row in train + valid)
    if report_to == "tensorboard":
        import numpy as np
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ea = EventAccumulator(str(out / "trackers" / "ttfm-distill"), size_guidance={"scalars": 0})
        ea.Reload()
        for key in ("loss", "lr"):
            events = ea.Scalars(f"train/{key}")
            assert [e.step for e in events] == list(range(1, end + 1)), key  # the killed try's extra steps purged
            assert np.allclose([e.value for e in events], [row[key] for row in train], rtol=1e-6), key
    for row in train:
        assert row["loss"] > 0 and row["grad_norm"] > 0 and row["lr"] > 0 and row["skipped_steps"] == 0
        assert {"terminal", "initial"} <= set(row) and row["steps_per_second"] > 0
    seconds = [row["seconds"] for row in json.loads("[" + ",".join(
        (out / "train_log.jsonl").read_text().splitlines()) + "]")]
    assert seconds == sorted(seconds)  # the resumed session's clock goes on from the kept rows
    assert sorted(p.name for p in (out / "validation").iterdir()) == [f"step-{s:08d}.png" for s in
                                                                      [row["step"] for row in valid]]
    assert (out / "training-curves.png").stat().st_size > 10_000
    assert "validation (1/2/4 steps): error" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())  # the last validation scored the report's noises
    assert valid[-1]["flow_map_error"] == metrics["flow_map_error"]["student"]


def test_tensorboard_holds_the_logs_scalars_and_images_once_across_a_resume(tiny_teacher_dir, tmp_path):
    pytest.importorskip("tensorboard")
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ttfm_distill.trainer import run_distillation

    out = tmp_path / "run"
    run_distillation(tiny_cfg(tiny_teacher_dir, out, max_steps=6, report_to="tensorboard"), show_progress=False)
    assert [r["step"] for r in log_rows(out, "validation")] == [4, 6]
    shutil.rmtree(out / "checkpoints" / "step-00000006")  # as if killed before its last checkpoint
    run_distillation(tiny_cfg(tiny_teacher_dir, out, max_steps=8, report_to="tensorboard"), show_progress=False)
    train, valid = log_rows(out, "train"), log_rows(out, "validation")
    assert [r["step"] for r in train] == list(range(1, 9)) and [r["step"] for r in valid] == [4, 8]

    ea = EventAccumulator(str(out / "trackers" / "ttfm-distill"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    for key in ("loss", "grad_norm", "lr", "terminal"):
        events = ea.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in train], key  # steps 5 and 6 of the first try purged
        assert np.allclose([e.value for e in events], [r[key] for r in train], rtol=1e-6), key
    for n in ("1", "2", "4"):
        events = ea.Scalars(f"validation/flow_map_error_{n}step")
        assert [e.step for e in events] == [4, 8]
        assert np.allclose([e.value for e in events], [r["flow_map_error"][n] for r in valid], rtol=1e-6)
    images = ea.Images("validation/samples")
    assert [e.step for e in images] == [4, 8]
    import io

    logged = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    saved = np.asarray(Image.open(out / "validation" / "step-00000008.png").convert("RGB"))
    assert logged.shape == saved.shape and np.array_equal(logged, saved)


def test_validation_leaves_training_bit_for_bit(tiny_teacher_dir, tmp_path):
    from ttfm_distill.trainer import run_distillation

    for name, every in (("off", 0), ("each", 1)):
        run_distillation(tiny_cfg(tiny_teacher_dir, tmp_path / name, max_steps=4, validate_every=every,
                                  ema_decay=0.9, export_weights="raw", trajectory_fraction=0.125,
                                  loss_options={"long_jump_span": 0.5}),  # the EMA in training, the pool's rows
                         show_progress=False)
    assert [r["step"] for r in log_rows(tmp_path / "off", "validation")] == []
    assert [r["step"] for r in log_rows(tmp_path / "each", "validation")] == [1, 2, 3, 4]
    for name in ("student.safetensors", "ema.safetensors"):
        a, b = (load_file(tmp_path / run / "checkpoints" / "step-00000004" / name) for run in ("off", "each"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # the same log rows (but the clock): validation took nothing from the training draws
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "time", "steps_per_second")}  # noqa
                          for r in rows]
    assert strip(log_rows(tmp_path / "off", "train")) == strip(log_rows(tmp_path / "each", "train"))


def test_a_tracker_that_cannot_work_here_is_one_line_before_any_work(tmp_path, monkeypatch):
    from ttfm_distill.errors import ConfigError
    from ttfm_distill.tracking import _offline_problem, check_report_to, tracker_names

    assert tracker_names("none") == [] and tracker_names("tensorboard, tensorboard") == ["tensorboard"]
    from ttfm_distill.config import RunConfig, resume_mismatch

    watched = RunConfig(report_to="tensorboard", validate_every=0, validation_samples=16).to_dict()
    assert resume_mismatch(RunConfig().to_dict(), watched) == []  # what a run shows may change on resume
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert "offline" in _offline_problem("wandb") and "WANDB_MODE=offline" in _offline_problem("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert _offline_problem("wandb") is None and _offline_problem("tensorboard") is None
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        check_report_to("tensorbord")
    import importlib.util

    if importlib.util.find_spec("aim") is None:
        with pytest.raises(ConfigError, match="report_to aim: the aim package is not installed; pip install aim"):
            check_report_to("aim")
    r = cli("run", "--report-to", "nope", "--output", tmp_path / "x", "--dry-run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "unknown tracker 'nope'" in lines[0] and len(lines[0]) <= 200
    assert not (tmp_path / "x").exists()


def test_a_disk_that_fills_while_the_log_and_event_files_grow_is_one_line_and_resumes(tiny_teacher_dir, tmp_path):
    """The disk fills between checkpoints, while the training log and TensorBoard's event file take a row each
    step: one line and exit 1, no traceback; once there is room the same command resumes, and the log and the
    event file hold each step once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out, filler = mnt / "run", mnt / "filler"
        args = ["run", "--teacher", tiny_teacher_dir, "--output", out, "--set", "checkpoint_every=50", "--set",
                "log_every=1", "--report-to", "tensorboard", *TINY]
        with open(tmp_path / "stderr.txt", "w") as err:
            p = subprocess.Popen([sys.executable, "-m", "ttfm_distill", *map(str, args), "--max-steps", "100000"],
                                 stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            try:
                deadline = time.time() + 300
                while time.time() < deadline and not (out / "checkpoints" / "step-00000050").exists():
                    time.sleep(0.05)
                time.sleep(0.5)
                with open(filler, "wb", buffering=0) as f:  # take every byte left
                    try:
                        while True:
                            f.write(b"\0" * 4096)
                    except OSError:
                        pass
                p.wait(timeout=120)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        stderr = (tmp_path / "stderr.txt").read_text()
        errors = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
        assert p.returncode == 1 and len(errors) == 1 and "disk full" in errors[0], stderr[-2000:]
        assert "Traceback" not in stderr
        filler.unlink()
        end = 56
        r = cli(*args, "--max-steps", end)
        assert r.returncode == 0, r.stderr
        train = log_rows(out, "train")
        assert [row["step"] for row in train] == list(range(1, end + 1))
        ea = EventAccumulator(str(out / "trackers" / "ttfm-distill"), size_guidance={"scalars": 0})
        ea.Reload()
        assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, end + 1))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
