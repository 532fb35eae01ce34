"""`ttfm-distill eval`: every metric against a case with a known answer, and the command end to end."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_unet

from ttfm_distill.evaluate import evaluate_student


# ------------------------------------------------------------ end to end ---
def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory):
    """A few random IDX images in the Fashion-MNIST layout, so the test does not need the Debian package."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 30)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 16x16 tiny teacher (the classifier's image size) distilled for 2 steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ttfm_distill.config import RunConfig
    from ttfm_distill.trainer import run_distillation

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    net = tiny_unet(sample_size=16)
    net.save_pretrained(root / "teacher" / "unet")
    FlowMatchEulerDiscreteScheduler().save_pretrained(root / "teacher" / "scheduler")
    cfg = RunConfig(teacher=str(root / "teacher"), output=str(root / "run"), max_steps=2, batch_size=4, pool_size=8,
                    pool_steps=2, eval_samples=4, reference_steps=2)
    run_distillation(cfg, show_progress=False)
    return root / "run"


def cli(*args, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ttfm_distill", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=600)


def test_cli_eval_writes_report_and_plot(tiny_run, inception_file, fake_fashion, tmp_path):
    out = tmp_path / "report.json"
    r = cli("eval", "--model", tiny_run, "--steps", "1,2", "--teacher-steps", "1,2,4", "--num", 12,
            "--reference-steps", 4, "--output", out, "--inception", inception_file, "--batch-size", 8,
            env={"TTFM_FASHION_MNIST_DIR": str(fake_fashion)})
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"student", "teacher_euler", "teacher_heun"}
    assert set(report["results"]["student"]) == {"1", "2"}
    assert set(report["results"]["teacher_euler"]) == {"1", "2", "4"}
    assert report["results"]["teacher_heun"]["1"] is None
    row = report["results"]["student"]["2"]
    for key in ("flow_map_error", "fd_test_images", "fd_teacher_fine", "fid_test_images", "fid_teacher_fine",
                "ms_per_sample", "samples_per_second"):
        assert isinstance(row[key], float) and row[key] >= 0, key
    assert report["not_computed"] == {"kl": report["not_computed"]["kl"]}  # everything else was computed
    assert 0.85 < report["classifier"]["test_accuracy"] <= 1
    assert set(report["floors"]) == {"teacher_fine", "real_train_images"}
    assert report["settings"]["num"] == 12 and report["teacher"].endswith("teacher")
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "flow_map_error" in r.stdout


def test_eval_without_inception_says_why(tiny_run):
    from ttfm_distill.evaluate import load_student_and_teacher

    _, student, _, teacher = load_student_and_teacher(str(tiny_run))
    report = evaluate_student(student, teacher, steps=(1,), num=4, reference_steps=2)
    assert "inception" in report["not_computed"]["fid_test_images"]
    assert "fid_test_images" not in report["results"]["student"]["1"]
    assert report["results"]["student"]["1"]["fd_teacher_fine"] >= 0


@pytest.mark.parametrize("case", ["not_student", "bad_inception"])
def test_cli_eval_bad_input_is_one_line(case, tiny_run, tmp_path):
    if case == "not_student":
        (tmp_path / "something.txt").write_text("hello")
        args = ["--model", tmp_path]
        needle = "not an exported student"
    else:
        bad = tmp_path / "inception.pkl"
        bad.write_bytes(b"not torchscript")
        args = ["--model", tiny_run, "--inception", bad]
        needle = "not a TorchScript Inception"
    r = cli("eval", *args, "--output", tmp_path / "x.json")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert not (tmp_path / "x.json").exists()


def test_a_16x16_run_validates_with_fd_and_eval_redraws_its_curves(tiny_run, tmp_path):
    """The classifier's image size: each validation has FD at 1/2/4 steps; the card shows the curves; `eval --model
    RUN` draws them again from the training log."""
    rows = [json.loads(line) for line in (tiny_run / "train_log.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r["kind"] == "validation"]
    assert [r["step"] for r in valid] == [2]  # the end (no checkpoint before it)
    for key in ("flow_map_error", "fd_test_images", "fd_teacher_fine"):
        assert set(valid[0][key]) == {"1", "2", "4"} and all(v >= 0 for v in valid[0][key].values()), key
        assert set(valid[0]["teacher_euler"][key]) == {"1", "2", "4"}
    assert valid[0]["validation_samples"] == 4 and (tiny_run / valid[0]["image"]).is_file()  # the report's noises
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("flow_map_error", "fd_test_images"):  # so the last validation is the report's own reading
        assert valid[0][key] == metrics[key]["student"] and valid[0]["teacher_euler"][key] == metrics[key]["teacher_euler"]
    card = (tiny_run / "student" / "README.md").read_text()
    assert "![training curves](training-curves.png)" in card
    assert (tiny_run / "student" / "training-curves.png").read_bytes() == (tiny_run / "training-curves.png").read_bytes()
    (tiny_run / "training-curves.png").unlink()
    r = cli("eval", "--model", tiny_run, "--steps", "1", "--num", 4, "--reference-steps", 2,
            "--output", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert (tiny_run / "training-curves.png").stat().st_size > 10_000 and "training-curves.png" in r.stdout
