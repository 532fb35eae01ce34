"""`ttfm-distill plan`: counts equal the real models', FLOPs equal a real step's, memory terms add up."""

import json

import pytest

from helpers import cli, one_line_error


def test_plan_command_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    r = cli("plan", "--teacher", "tiny-sd3", "--gpus", "2", "--gpu-memory", "50MB", "--json", out)
    assert r.returncode == 0, r.stderr
    for needle in ("Parameters", "Memory per GPU", "recommendation", "MFU", "teacher (frozen)"):
        assert needle in r.stdout, needle
    data = json.loads(out.read_text())
    assert data["counts"]["class_name"] == "SD3Transformer2DModel"
    assert data["gpus"] == 2 and data["layouts"]


def test_plan_reads_a_diffusers_folder(tiny_teacher_dir):
    r = cli("plan", "--teacher", tiny_teacher_dir, "--lora-rank", "0")
    assert r.returncode == 0, r.stderr
    assert "UNet2DModel" in r.stdout


@pytest.mark.parametrize("args, needles", [
    (["--teacher", "no-such-model"], ["no-such-model", "built-in"]),
    (["--teacher", "tiny-sd3", "--gpu-memory", "lots"], ["--gpu-memory"]),
    (["--teacher", "tiny-sd3", "--gpu", "V100"], ["--gpu", "H100"]),
    (["--teacher", "tiny-sd3", "--mfu", "2"], ["--mfu"]),
    (["--teacher", "tiny-sd3", "--loss", "lfmd", "-L", "derivative=jvp"], ["jvp", "derivative=fd"]),
    (["--teacher", "tiny-sd3", "-L", "tau=5"], ["tau"]),
    (["--teacher", "tiny-sd3", "--resolution", "7"], ["--resolution", "multiple of 2"]),
    (["--teacher", "tiny-sd3", "--gpus", "0"], ["--gpus"]),
    (["--teacher", "tiny-sd3", "--dm", "--dm-fake-updates", "0"], ["--dm-fake-updates", ">= 1"]),
])
def test_plan_bad_input_is_one_line(args, needles):
    line = one_line_error(cli("plan", *args), 2, *needles)
    assert len(line) <= 200


def test_plan_bad_config_file_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    line = one_line_error(cli("plan", "--teacher", tmp_path / "config.json"), 2, "AutoencoderKL")
    assert len(line) <= 200


# ------------------------------------------- the frozen teacher, sharded (2 processes, gloo) ----
def test_frozen_teacher_sharded_gives_the_same_velocity(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(Path(__file__).resolve().parent.parent / "shard_teacher_worker.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"teacher-rank-{i}.json").read_text()) for i in range(2)]
    full = ranks[0]["full"]
    assert ranks[0]["local"] + ranks[1]["local"] == full  # slices, together the whole teacher
    assert all(0.4 * full < r["local"] < 0.6 * full for r in ranks)
    assert all(r["max_diff"] < 1e-6 and r["repeat_diff"] < 1e-6 for r in ranks), ranks
    assert ranks[0]["units"] == 2  # one SD3 block + the root


def test_the_gpu_check_runs_its_tiny_mode_on_cpu(tmp_path):
    """benchmarks/gpu_check.py's CPU dry run (what a lent GPU runs at full size): full and LoRA students timed
    with ITVM and flow matching on the trainer's batch path, the plan's memory against the measured peak, and
    the end-to-end runs with and without the distribution-matching term."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "gpu-check.json"
    r = subprocess.run([sys.executable, str(repo / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--steps", "1", "--run-steps", "2", "--output", str(out)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    for kind in ("full", "lora"):
        section = report["sections"][kind]
        assert section["trained_parameters"] > 0 and section["peak_bytes_measured"] > 0
        assert all(section["step_seconds_median"][mode] > 0 for mode in ("itvm", "flow_matching"))
        assert 0.5 < section["peak_planned_over_measured"] < 2.0  # the plan's memory model against the measure
    assert report["sections"]["lora"]["trained_parameters"] < report["sections"]["full"]["trained_parameters"]
    for run in ("end_to_end", "end_to_end_dm"):
        assert report[run]["returncode"] == 0, report[run]["stderr_tail"]
    assert "dm_weight" in report["end_to_end_dm"]["command"]
