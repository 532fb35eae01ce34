"""Real faults: SIGKILL at random moments of checkpoint/export writes, and a really full disk."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from ttfm_distill.fileio import atomic_dir, save_tensors
    from ttfm_distill.checkpoints import save_checkpoint
    out = Path(sys.argv[1])
    i = 0
    print("ready", flush=True)
    while True:
        i += 1
        big = torch.full((1_500_000,), float(i))  # 6 MB: long enough to be killed inside the write
        with atomic_dir(out / "student") as tmp:
            save_tensors(tmp / "weights.safetensors", {"w": big})
            (tmp / "meta.json").write_text('{"i": %d}' % i)
        print(i, flush=True)
""")


def _check_student(folder):
    from safetensors.torch import load_file

    from ttfm_distill.fileio import recover_dir

    recover_dir(folder)  # restores a folder a kill left moved aside, if any (what loading and writing do)
    i = json.loads((folder / "meta.json").read_text())["i"]
    w = load_file(folder / "weights.safetensors")["w"]
    assert w.numel() == 1_500_000 and bool((w == float(i)).all()), "weights and metadata from different writes"
    return i


@pytest.mark.parametrize("trial", range(6))
def test_sigkill_during_export_write_leaves_a_whole_previous_or_new_folder(tmp_path, trial):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == "1"  # one complete write exists
    time.sleep(0.013 * (trial + 1) * 7 % 0.25)  # kill at different moments of later writes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _check_student(tmp_path / "student") >= 1
    # the next writer sweeps nothing it should not, and succeeds
    from ttfm_distill.fileio import atomic_dir

    with atomic_dir(tmp_path / "student") as tmp:
        (tmp / "meta.json").write_text('{"i": 0}')
    assert json.loads((tmp_path / "student" / "meta.json").read_text()) == {"i": 0}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KB tmpfs; needs root (CI has it), skipped elsewhere."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_keeps_the_previous_file_and_leaves_no_temporaries(tiny_disk):
    from ttfm_distill.fileio import save_tensors

    save_tensors(tiny_disk / "w.safetensors", {"w": torch.ones(1000)})
    before = (tiny_disk / "w.safetensors").read_bytes()
    with pytest.raises(OSError) as e:
        save_tensors(tiny_disk / "w.safetensors", {"w": torch.ones(200_000)})  # 800 KB > 256 KB
    assert e.value.errno == 28
    assert (tiny_disk / "w.safetensors").read_bytes() == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["w.safetensors"]


def test_full_disk_run_is_one_line_and_exit_1(tiny_teacher_dir, tiny_disk):
    out = tiny_disk / "run"
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", "run", "--teacher", str(tiny_teacher_dir), "--output",
                        str(out), "--max-steps", "3", "--batch-size", "4", "--set", "pool_size=4000", "--set",
                        "pool_steps=2", "--quiet"], capture_output=True, text=True)
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and len(lines) == 1 and "disk full" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_full_disk_in_torch_save_is_enospc(tiny_disk):
    """torch.save reports a full disk as an obscure RuntimeError; checkpoints turn it into ENOSPC."""
    from ttfm_distill.fileio import save_torch

    with pytest.raises(OSError) as e:
        save_torch(tiny_disk / "optimizer.pt", {"state": torch.ones(200_000)})
    assert e.value.errno == 28 and list(tiny_disk.iterdir()) == []


CHECKPOINTER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from ttfm_distill.checkpoints import save_checkpoint
    class Sched:
        def state_dict(self):
            return {"k": 1}
    out = Path(sys.argv[1])
    print("ready", flush=True)
    for step in range(1, 10_000):
        state = {"w": torch.full((1_500_000,), float(step))}
        save_checkpoint(out, step, state, None, {"state": {}, "param_groups": []}, Sched(), 2, [{"step": step}])
        print(step, flush=True)
""")


@pytest.mark.parametrize("trial", range(4))
def test_sigkill_during_checkpoint_writes_keeps_readable_checkpoints(tmp_path, trial):
    from safetensors.torch import load_file

    from ttfm_distill.checkpoints import list_checkpoints

    proc = subprocess.Popen([sys.executable, "-c", CHECKPOINTER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert proc.stdout.readline().strip() == "1"
    time.sleep(0.05 + 0.07 * trial)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = list_checkpoints(tmp_path)
    assert ckpts, "the completed checkpoint must survive"
    for ckpt in ckpts:  # every checkpoint a resume could pick is whole
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
        assert ckpt.name == f"step-{step:08d}"
        assert bool((load_file(ckpt / "student.safetensors")["w"] == float(step)).all())
        torch.load(ckpt / "optimizer.pt", weights_only=True)


def test_a_disk_that_fills_mid_run_with_the_dm_state_resumes_to_the_same_student(tiny_teacher_dir, tmp_path):
    """The distribution-matching term's fake network and its optimiser make each checkpoint larger: a disk that
    fills while one is written stops the run with one line (exit 1) and no temporaries, the checkpoint before
    stays whole, and once there is room the same command resumes from it, the training log has each step once,
    and the student is the one an uninterrupted run makes."""
    from safetensors.torch import load_file

    from ttfm_distill.tracking import read_log

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        def run(out):
            return subprocess.run(
                [sys.executable, "-m", "ttfm_distill", "run", "--teacher", str(tiny_teacher_dir), "--output", str(out),
                 "--max-steps", "4", "--batch-size", "4", "--set", "pool_size=8", "--set", "pool_steps=2",
                 "--set", "checkpoint_every=2", "--set", "dm_weight=0.3", "--set", "eval_samples=4",
                 "--set", "reference_steps=2", "--set", "mixed_precision=no", "--quiet"],
                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

        out = mnt / "run"
        first = run(out)  # a checkpoint is ~1.4 MB here: the second does not fit in 2 MB
        errors = [line for line in first.stderr.strip().splitlines() if line.startswith("error:")]
        assert first.returncode == 1 and len(errors) == 1 and "disk full" in errors[0], first.stderr
        assert "Traceback" not in first.stderr and not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        kept = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert kept == ["step-00000002"]
        assert (out / "checkpoints" / "step-00000002" / "fake.safetensors").exists()
        subprocess.run(["mount", "-o", "remount,size=32m", str(mnt)], check=True)
        second = run(out)
        assert second.returncode == 0, second.stderr
        assert "resuming from" in second.stderr and "step 2" in second.stderr
        steps = [r["step"] for r in read_log(out / "train_log.jsonl") if r["kind"] == "train"]
        assert steps == sorted(set(steps)) and steps[-1] == 4
        whole = run(tmp_path / "whole")
        assert whole.returncode == 0, whole.stderr
        a = load_file(out / "checkpoints" / "step-00000004" / "student.safetensors")
        b = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "student.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        fa = load_file(out / "checkpoints" / "step-00000004" / "fake.safetensors")
        fb = load_file(tmp_path / "whole" / "checkpoints" / "step-00000004" / "fake.safetensors")
        assert all(torch.equal(fa[k], fb[k]) for k in fa)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
