"""A second teacher unlike the embedded one (issue 14, part 4; docs/second-teacher.md): an epsilon DDPM UNet.

The DDIM-like time grid (uniform in the scheduler's timesteps) and the ``velocity`` student output.
"""

import json

import pytest


# ------------------------------------------------------------------ dry run --
@pytest.mark.parametrize("which", ["flow", "ddpm"])
def test_the_dry_run_prints_the_automatic_settings_the_run_writes(which, tiny_teacher_dir, ddpm_teacher_dir, tmp_path):
    from helpers import TINY, cli

    from ttfm_distill.config import AUTOMATIC

    teacher = tiny_teacher_dir if which == "flow" else ddpm_teacher_dir
    args = ["run", "--teacher", teacher, "--output", tmp_path / "r", "--max-steps", 2, *TINY]
    dry = cli(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    shown = json.loads(dry.stdout)
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    ran = json.loads((tmp_path / "r" / "config.json").read_text())
    for key in AUTOMATIC:
        assert shown[key] == ran[key] and ran[key] not in AUTOMATIC[key], key
    assert shown["loss_options"] == ran["loss_options"]
    # the two teachers resolve to the same recipe (docs/results.md), the precision apart: bf16 for the flow teacher
    # on a machine that computes it natively
    from ttfm_distill import machine

    assert (shown["lr"], shown["loss_options"]["long_jump_span"], shown["trajectory_fraction"]) == (2e-4, 0.0, 0.0)
    assert shown["mixed_precision"] == ("bf16" if which == "flow" and machine.native_bf16() else "no")
    again = cli(*args, "--dry-run")  # on the finished folder: what a resumed run keeps
    assert json.loads(again.stdout)["lr"] == ran["lr"]


def test_the_dry_run_of_a_hub_teacher_says_its_automatic_settings_wait_for_it(tmp_path):
    from helpers import cli

    from ttfm_distill.teachers.loading import teacher_prediction_type

    assert teacher_prediction_type("builtin:fashion16") == "flow" and teacher_prediction_type("some-org/model") is None
    r = cli("run", "--teacher", "some-org/model", "--output", tmp_path / "r", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["lr"] is None and "filled in once it is loaded" in r.stderr


def test_a_run_from_before_auto_meant_gated_resumes_with_the_output_it_trained_with(ddpm_teacher_dir, tmp_path):
    """A folder whose config says student_output=auto and whose checkpoints have no velocity head (written when
    auto meant native) resumes as native instead of failing to load its student; a new run of the same teacher
    gets the gated head."""
    from safetensors.torch import load_file

    from helpers import tiny_cfg
    from ttfm_distill.trainer import run_distillation

    out = tmp_path / "old"
    run_distillation(tiny_cfg(ddpm_teacher_dir, out, max_steps=4, student_output="native"), show_progress=False)
    config = json.loads((out / "config.json").read_text())
    config["student_output"] = "auto"  # what a folder of the earlier version holds
    (out / "config.json").write_text(json.dumps(config))
    again = run_distillation(tiny_cfg(ddpm_teacher_dir, out, max_steps=8), show_progress=False)
    assert again.resumed_from == 4 and again.steps == 8
    state = load_file(out / "checkpoints" / "step-00000008" / "student.safetensors")
    assert not any(k.startswith("velocity_head.") for k in state)
    assert json.loads((out / "metrics.json").read_text())["settings"]["student_output"] == "native"
    fresh = tmp_path / "new"
    run_distillation(tiny_cfg(ddpm_teacher_dir, fresh, max_steps=4), show_progress=False)
    assert json.loads((fresh / "metrics.json").read_text())["settings"]["student_output"] == "gated"
