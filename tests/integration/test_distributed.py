"""Real data parallel on CPU: two processes under `accelerate launch` (gloo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, free_port


def launch_two(run_args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``ttfm-distill run RUN_ARGS`` in two CPU processes under ``accelerate launch`` (gloo)."""
    launcher = Path(sys.executable).parent / "accelerate"
    if not launcher.exists():
        pytest.skip("accelerate's launcher is not installed beside this Python")
    # the flags that really start two CPU processes (docs/environment.md): --cpu alone silently runs one
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "ttfm_distill", "run", *run_args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"})


@pytest.mark.slow
def test_two_processes_stay_in_sync_on_different_data(tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    r = launch_two(["--teacher", str(tiny_teacher_dir), "--output", str(out), "--max-steps", "6", "--set",
                    "checkpoint_every=3", *TINY], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    dist = json.loads((out / "metrics.json").read_text())["distributed"]
    assert dist["processes"] == 2
    a, b = dist["param_checksums"]
    assert a == b and dist["ranks_in_sync"]  # gradients were all-reduced
    x, y = dist["first_batch_checksums"]
    assert x != y  # each rank drew its own batch from (seed, rank, step)
    assert r.stdout.count("done:") == 1  # only rank 0 reports
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    leftovers = [p.name for p in out.rglob("*") if p.name.startswith(".") and p.name != ".ttfm-distill.lock"]
    assert leftovers == []
    assert (out / ".ttfm-distill.lock").read_text() == ""  # held by rank 0 only, released cleanly at the end
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]  # rank 0 wrote once
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("validation", 3), ("train", 6), ("validation", 6)]
    assert all(r["samples"] == r["step"] * 8 * 2 for r in rows)  # both ranks' samples
    assert r.stderr.count("step 3 validation") == 1


@pytest.mark.slow
def test_two_processes_fit_one_step_count_to_a_time_budget(tmp_path):
    """Each rank times its own steps; every rank must train rank 0's count, or the all-reduce of the rank that
    trains longer waits for ever (the timeout below) and the checksums differ."""
    out = tmp_path / "run"
    r = launch_two(["--teacher", "builtin:gaussian-mixture", "--output", str(out), "--max-steps", "100000",
                    "--time-budget", "2s", "--set", "warmup_steps=10", "--set", "mlp_width=32", "--set",
                    "eval_samples=64", "--set", "reference_steps=2", "-q"], tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    n = json.loads((out / "run_state.json").read_text())["fitted_steps"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 10 <= n < 100_000 and metrics["training"]["steps"] == n
    assert metrics["distributed"]["ranks_in_sync"]
    assert (out / "checkpoints" / f"step-{n:08d}").exists()
