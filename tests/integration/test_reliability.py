"""Damaged resume files, incomplete teachers and students, and refusals that leave nothing behind.

Through the real entry point on folders made inside pytest's ``tmp_path``; every file damaged or deleted here
is a copy made by the test.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import TINY, cli, edit_weights as _edit_weights, one_line_error

POOL = ["--set", "pool_size=300"]  # two pool chunks (256 rows each): a resumable build has a finished chunk
RUN = ["--set", "checkpoint_every=1", "--set", "ema_decay=0.9", *TINY, *POOL]  # POOL after TINY: it wins


def _flat(text):
    """``text`` without whitespace: rich wraps long log lines at any space."""
    return "".join(text.split())


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def pool_run(tiny_teacher_dir, tmp_path_factory):
    """A finished 2-step run: a two-chunk pool in ``cache/``, checkpoints at steps 1 and 2 (with an EMA)."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", out, "--max-steps", 2, *RUN)
    assert r.returncode == 0, r.stderr
    assert (out / "checkpoints" / "step-00000002" / "ema.safetensors").exists()
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _pool_file(run):
    (pool,) = (run / "cache").glob("pool-*.safetensors")
    return pool


def _interrupted_pool(run):
    """Turn the finished pool into what a kill during its build leaves: the first chunk done, the entry not yet made."""
    from ttfm_distill.data.pool import POOL_CHUNK

    pool = _pool_file(run)
    parts = pool.with_name(pool.name + ".parts")
    parts.mkdir()
    save_file({k: v[:POOL_CHUNK].contiguous() for k, v in load_file(pool).items()},
              str(parts / "chunk-000000.safetensors"))
    (parts / "seconds").write_text("1.5")
    pool.unlink()
    return parts


# ---------------------------------------------------------------- damaged resume files ---------------------------
@pytest.mark.parametrize("damage", ["pool seconds", "pool chunk", "pool entry", "lock"] + [
    f"checkpoint {name}" for name in ("student.safetensors", "ema.safetensors", "optimizer.pt", "trainer_state.json")])
def test_an_emptied_resume_file_is_recomputed(pool_run, tiny_teacher_dir, tmp_path, damage):
    """Each file a rerun reads to resume, emptied (what a kill between truncation and write leaves): the rerun
    recomputes it, or falls back to the checkpoint before, and ends as the undamaged run would."""
    run = _copy(pool_run, tmp_path)
    expected = {k: v.clone() for k, v in load_file(_pool_file(run)).items()}  # not a view of the file damaged below
    if damage.startswith("pool") and damage != "pool entry":
        parts = _interrupted_pool(run)
        (parts / ("seconds" if damage == "pool seconds" else "chunk-000000.safetensors")).write_bytes(b"")
    elif damage == "pool entry":
        _pool_file(run).write_bytes(b"")
    elif damage == "lock":
        (run / ".ttfm-distill.lock").write_bytes(b"")
    else:
        (run / "checkpoints" / "step-00000002" / damage.split()[1]).write_bytes(b"")
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", run, "--max-steps", 3, *RUN)
    assert r.returncode == 0, r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    pool = load_file(_pool_file(run))
    assert pool.keys() == expected.keys() and all(torch.equal(pool[k], expected[k]) for k in pool)
    assert not list((run / "cache").glob("*.parts"))
    log = _flat(r.stderr)
    if damage == "pool seconds":
        assert "256of300rowswerealreadydone" in log
    if damage == "pool chunk":
        assert "alreadydone" not in log  # the emptied chunk is rebuilt, not counted as done
    if damage == "pool entry":
        assert "damagedorstale;rebuilding" in log
    if damage.startswith("checkpoint"):
        assert "damaged" in log and "step-00000001(step1)" in log
    else:
        assert "step-00000002(step2)" in log
    assert json.loads((run / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())["step"] == 3


def test_emptied_checkpoints_and_config_are_named_in_one_line(pool_run, tiny_teacher_dir, tmp_path):
    run = _copy(pool_run, tmp_path)
    for ckpt in (run / "checkpoints").iterdir():
        (ckpt / "trainer_state.json").write_bytes(b"")
    # as a run with a time budget leaves it: a new max_steps drops the fitted count from the run state, which the
    # refusal below must put back
    state = json.loads((run / "run_state.json").read_text())
    (run / "run_state.json").write_text(json.dumps({**state, "fitted_steps": 2}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".ttfm-distill.lock"}
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", run, "--max-steps", 3, *RUN)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # after a warning for each damaged checkpoint
    assert last.startswith("error: no checkpoint in") and "could be read; pass --overwrite" in last
    # refused after the pool and config.json were seen to: the folder keeps exactly what it had (max_steps 2)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".ttfm-distill.lock"} == before
    (run / "config.json").write_bytes(b"")
    one_line_error(cli("run", "--teacher", tiny_teacher_dir, "--output", run, "--max-steps", 3, *RUN), 2,
                   "config.json", "not a ttfm-distill run config")


# ---------------------------------------------------------------- incomplete teachers and students ----------------
@pytest.mark.parametrize("drop, add, needles", [
    ("conv_out.weight", None, ["lack tensor 'conv_out.weight'", "random values"]),
    (None, "extra.weight", ["hold tensor 'extra.weight'", "no place for it"]),
])
def test_a_teacher_missing_or_with_an_unexpected_tensor_is_refused_at_load(tiny_teacher_dir, tmp_path, drop, add,
                                                                           needles):
    bad = _edit_weights(tiny_teacher_dir, tmp_path / "teacher", "unet/diffusion_pytorch_model.safetensors", drop, add)
    out = tmp_path / "run"
    line = one_line_error(cli("run", "--teacher", bad, "--output", out, "--max-steps", 2, *TINY), 2, *needles)
    assert str(bad / "unet") in line or len(line) > 180  # the folder, unless the line was cut at its end
    assert not out.exists()
    one_line_error(cli("inspect", "--teacher", bad), 2, *needles)


def test_a_student_missing_a_tensor_is_refused_by_sample_and_eval(pool_run, tiny_teacher_dir, tmp_path):
    bad = _edit_weights(pool_run / "student", tmp_path / "student",
                        "flow_map/unet/diffusion_pytorch_model.safetensors", drop="conv_out.weight")
    one_line_error(cli("sample", "--model", bad, "--num", 2, "--output", tmp_path / "x.png"), 2,
                   "lack tensor 'conv_out.weight'", "export it again")
    assert not (tmp_path / "x.png").exists()
    one_line_error(cli("eval", "--model", bad, "--teacher", tiny_teacher_dir, "--output", tmp_path / "eval.json"), 2,
                   "lack tensor 'conv_out.weight'")
    assert not (tmp_path / "eval.json").exists()


def test_a_lora_adapter_folder_missing_a_tensor_is_refused(tiny_teacher_dir, tmp_path):
    from ttfm_distill.config import RunConfig
    from ttfm_distill.trainer import run_distillation

    run_distillation(RunConfig(teacher=str(tiny_teacher_dir), output=str(tmp_path / "a"), max_steps=2, batch_size=8,
                               pool_size=32, pool_steps=4, eval_samples=8, reference_steps=4, lora_rank=4,
                               lora_export="adapters"), show_progress=False)
    good = tmp_path / "a" / "student"
    assert cli("sample", "--model", good, "--num", 2, "--output", tmp_path / "ok.png").returncode == 0
    weights = load_file(good / "adapter" / "adapter_model.safetensors")
    name = sorted(k for k in weights if ".lora_A" in k)[0]
    bad = _edit_weights(good, tmp_path / "bad", "adapter/adapter_model.safetensors", drop=name)
    one_line_error(cli("sample", "--model", bad, "--num", 2, "--output", tmp_path / "x.png"), 2,
                   "adapter weights lack tensor", name.split(".lora_A")[0], "export it again")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- refusals leave the folder as found ---------------
#: refused in setup_data, after the output folder is locked (and, with --overwrite, the previous run set aside)
REFUSED_AFTER_CLAIM = ["--teacher", "builtin:checkerboard", "--set", "trajectory_fraction=0.25", "--max-steps", 2]


def test_a_refusal_after_the_claim_leaves_no_new_folder(tmp_path):
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "new" / "deeper" / "run"
    one_line_error(cli("run", "--output", out, *REFUSED_AFTER_CLAIM, "-q"), 2, "trajectory_fraction")
    assert _tree(tmp_path / "work") == []  # neither the folder, its lock, nor the parents made for it


def test_a_refusal_leaves_an_existing_run_exactly_as_it_was_even_with_overwrite(pool_run, tiny_teacher_dir,
                                                                                 tmp_path):
    run = _copy(pool_run, tmp_path)
    (run / ".ttfm-distill.lock").write_text("pid 1 run\n")  # as a run killed with -9 leaves it
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".ttfm-distill.lock"}
    tree = _tree(run)
    # without --overwrite, other settings are a different run, refused before the claim; an existing run refused
    # after it: the emptied checkpoints above
    r = cli("run", "--output", run, *REFUSED_AFTER_CLAIM, "-q", "--overwrite")
    assert r.returncode == 2 and "trajectory_fraction" in r.stderr.strip().splitlines()[-1], r.stderr
    assert _tree(run) == tree
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".ttfm-distill.lock"} == before
    # the same --overwrite with usable data deletes the previous run (once training starts) and nothing else
    r = cli("run", "--teacher", tiny_teacher_dir, "--output", run, "--max-steps", 1, *RUN, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    assert not (run / ".overwritten.tmp").exists() and "resuming" not in r.stderr


# ---------------------------------------------------------------- custom-code pipelines ---------------------------
def test_a_custom_code_pipeline_is_refused_with_the_reason_and_its_denoiser_loads_alone(tmp_path):
    pytest.importorskip("transformers")
    from tiny_models import tiny_sd3_pipeline

    root = tiny_sd3_pipeline(tmp_path / "evil")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps({**index, "_class_name": ["evil_pipeline", "EvilPipeline"]}))
    marker = tmp_path / "the-custom-code-ran"
    (root / "evil_pipeline.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    out = tmp_path / "run"
    for args in (["run", "--output", out, "--max-steps", 2, *TINY], ["run", "--output", out, "--dry-run"],
                 ["inspect"]):
        line = one_line_error(cli(args[0], "--teacher", root, *args[1:]), 2, "custom code (evil_pipeline.EvilPipeline)",
                              "never runs", "--subfolder transformer")
        assert len(line) <= 200
    assert not out.exists() and not marker.exists()
    # the fix the line gives: the denoiser alone (and the VAE, a diffusers class); the text encoders are left out
    r = cli("inspect", "--teacher", root, "--subfolder", "transformer")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["class_name"] == "SD3Transformer2DModel" and "text encoders are not loaded" in r.stderr
    assert not marker.exists()


def test_sigterm_while_the_pool_is_written_resumes_it(tiny_teacher_dir, tmp_path):
    """The issue's battery: SIGTERM while the pool's chunks are written, then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["run", "--teacher", str(tiny_teacher_dir), "--output", str(out), "--max-steps", "1", *map(str, TINY),
            "--set", "pool_size=2048", "--set", "pool_steps=8"]
    proc = subprocess.Popen([sys.executable, "-m", "ttfm_distill", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "cache").glob("*.parts/chunk-000000.safetensors")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143 and "Traceback" not in err, err
    parts = list((out / "cache").glob("*.parts"))
    assert parts and (parts[0] / "chunk-000000.safetensors").exists()  # killed mid-pool: finished chunks are kept
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "resumingdata-freepool" in _flat(r.stderr) and not list((out / "cache").glob("*.parts"))
