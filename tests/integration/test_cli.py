"""The real entry point, end to end, on a tiny budget."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import TINY, cli


@pytest.fixture(scope="module")
def finished_run(tiny_teacher_dir, tmp_path_factory):
    """`run` with no --output in a fresh folder, as a user would type it."""
    cwd = tmp_path_factory.mktemp("cwd")
    r = cli("run", "--teacher", tiny_teacher_dir, "--max-steps", 12, "--set", "checkpoint_every=5", *TINY, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return cwd, cwd / "ttfm-output", r


def test_run_writes_everything_promised(finished_run):
    cwd, out, r = finished_run
    for name in ("config.json", "metrics.json", "samples.png", "student/model_index.json",
                 "student/scheduler/scheduler_config.json", "student/flow_map/ttfm_config.json",
                 "student/flow_map/unet/diffusion_pytorch_model.safetensors", "student/flow_map/second_time.safetensors"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    fme = metrics["flow_map_error"]
    assert set(fme) >= {"student", "teacher_euler"}
    for who in ("student", "teacher_euler"):
        assert set(fme[who]) == {"1", "2", "4"} and all(v >= 0 for v in fme[who].values())
    # teacher Euler converges to the reference as steps grow
    assert fme["teacher_euler"]["4"] < fme["teacher_euler"]["1"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_steps"] == 12 and cfg["loss"] == "itvm"
    meta = json.loads((out / "student" / "flow_map" / "ttfm_config.json").read_text())
    assert meta["teacher"]["class_name"] == "UNet2DModel" and meta["loss"]["name"] == "itvm"
    assert Image.open(out / "samples.png").size[0] > 100


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sample_default_folder_any_step_count(finished_run, steps):
    cwd, out, _ = finished_run
    r = cli("sample", "--steps", steps, "--num", 9, "--seed", 3, "--save-raw", f"raw{steps}.npy", cwd=cwd)
    assert r.returncode == 0, r.stderr
    png = out / f"samples-{steps}step.png"
    assert png.exists()
    raw = np.load(cwd / f"raw{steps}.npy")
    assert raw.shape == (9, 1, 8, 8) and np.isfinite(raw).all()


def test_sample_is_reproducible_and_steps_matter(finished_run, tmp_path):
    cwd, out, _ = finished_run
    for name, steps in (("a", 2), ("b", 2), ("c", 3)):
        r = cli("sample", "--model", out, "--steps", steps, "--num", 4, "--output", tmp_path / f"{name}.png",
                "--save-raw", tmp_path / f"{name}.npy")
        assert r.returncode == 0, r.stderr
    a, b, c = (np.load(tmp_path / f"{n}.npy") for n in "abc")
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_a_different_teacher_in_the_same_folder_is_refused(finished_run, tiny_teacher_dir, tmp_path):
    import shutil

    cwd, out, _ = finished_run
    other = tmp_path / "other-teacher"  # a real, loadable teacher at another path: only the refusal stops it
    shutil.copytree(tiny_teacher_dir, other)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = cli("run", "--teacher", other, "--max-steps", 12, "--set", "checkpoint_every=5", *TINY, cwd=cwd)
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert "holds a different run" in r.stderr and "teacher" in r.stderr, r.stderr
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_extends_a_run(tiny_teacher_dir, tmp_path):
    args = ["run", "--teacher", tiny_teacher_dir, "--output", tmp_path / "r", "--set", "checkpoint_every=4", *TINY]
    assert cli(*args, "--max-steps", 6).returncode == 0
    r = cli(*args, "--max-steps", 10)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "step 6" in r.stderr
    ckpts = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert ckpts[-1] == "step-00000010"


def test_analytic_teacher_run(tmp_path):
    r = cli("run", "--teacher", "builtin:gaussian-mixture", "--output", tmp_path / "g", "--max-steps", 20,
            "--set", "eval_samples=256", "--set", "reference_steps=8", "-q")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert "kl" in m and m["kl"]["reference"] < m["kl"]["teacher_euler"]["1"]
    valid = [json.loads(line) for line in (tmp_path / "g" / "train_log.jsonl").read_text().splitlines()][-1]
    assert valid["kind"] == "validation" and valid["step"] == 20 and set(valid["kl"]) == {"1", "2", "4"}


@pytest.mark.parametrize("args, needle", [
    (["run", "--teacher", "/no/such/folder"], "neither a folder nor a hub id"),
    (["run", "--teacher", "builtin:nope"], "unknown built-in teacher"),
    (["run", "--loss", "nope"], "unknown loss"),
    (["run", "-L", "tau=-1"], "tau"),
    (["run", "--set", "bach_size=3"], "did you mean 'batch_size'"),
    (["run", "--batch-size", "-4"], "batch_size"),
    (["run", "--lr", "0"], "lr"),
    (["run", "--validate-every", "-1"], "validate_every must be >= 0"),
    (["run", "--report-to", "tensorboard,nope"], "unknown tracker 'nope'"),
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--model", "/tmp"], "not an exported student"),
])
def test_bad_input_one_line_error(args, needle, tmp_path):
    r = cli(*args, "--dry-run" if args[0] == "run" else "--num", *([] if args[0] == "run" else ["2"]), cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and not r.stdout and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_not_a_denoiser_and_offline_hub_id(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    r = cli("run", "--teacher", tmp_path / "vae", "--dry-run")  # checked without loading weights
    assert r.returncode == 2 and "AutoencoderKL" in r.stderr
    r = cli("inspect", "--teacher", tmp_path / "vae")
    assert r.returncode == 2 and "not a supported denoiser" in r.stderr and "inspect --help" in r.stderr
    assert len(r.stderr.strip()) <= 200 + len(str(tmp_path))  # the path once, not the class list
    from ttfm_distill.teachers.families import ADAPTERS

    listed = " ".join(cli("inspect", "--help").stdout.split())
    assert all(name in listed for name in ADAPTERS), listed
    r = cli("inspect", "--teacher", "some-org/some-model")
    assert r.returncode == 2 and "cannot fetch hub teacher" in r.stderr and "offline" in r.stderr
