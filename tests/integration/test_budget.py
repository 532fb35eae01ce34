"""--time-budget: the step count fitted from the first steps' speed, fixed once, resumed to.

No ``torch.set_num_threads`` here: it would outlive these tests in the pytest process, and a later test that
compares an in-process result with a CLI subprocess's bit for bit (test_lora's sample check) then fails.
"""

import json

import pytest
import torch

from helpers import budget_cfg as _cfg
from ttfm_distill.errors import ConfigError


def _weights(out, step):
    from safetensors.torch import load_file

    return load_file(out / "checkpoints" / f"step-{step:08d}" / "student.safetensors")


def test_a_fitted_run_equals_a_run_of_that_many_steps_bit_for_bit(tmp_path):
    """The fit happens before the cosine reads the total: the same training as --max-steps N, tensor for tensor.
    A fit one step later would have given step 10 the lr of the 100,000-step schedule."""
    from ttfm_distill.trainer import run_distillation

    budget = run_distillation(_cfg(tmp_path / "budget", max_steps=100_000, time_budget=0.4), show_progress=False)
    saved = json.loads((tmp_path / "budget" / "config.json").read_text())
    n = json.loads((tmp_path / "budget" / "run_state.json").read_text())["fitted_steps"]  # run state, not a setting
    assert 10 <= n < 100_000 and budget.steps == n and saved["time_budget"] == 0.4 and "fitted_steps" not in saved
    assert json.loads((tmp_path / "budget" / "metrics.json").read_text())["training"]["time_budget"] == {
        "seconds": 0.4, "max_steps": 100_000, "fitted_steps": n}
    run_distillation(_cfg(tmp_path / "plain", max_steps=n), show_progress=False)
    a, b = _weights(tmp_path / "budget", n), _weights(tmp_path / "plain", n)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the model card's command repeats the steps, not the budget (a budget may fit another count elsewhere)
    card = (tmp_path / "budget" / "student" / "README.md").read_text()
    assert f"--max-steps {n}" in card and "time_budget" not in card


def test_a_resume_keeps_the_fitted_count_and_a_new_max_steps_replaces_it(tmp_path):
    from ttfm_distill.preflight import check_run_folder
    from ttfm_distill.runstate import RunState
    from ttfm_distill.trainer import run_distillation

    out = tmp_path / "run"
    run_distillation(_cfg(out, max_steps=100_000, time_budget=0.3), show_progress=False)
    n = json.loads((out / "run_state.json").read_text())["fitted_steps"]
    # the same command again: not refused, nothing more trained, the count kept
    again = run_distillation(_cfg(out, max_steps=100_000, time_budget=0.3), show_progress=False)
    assert again.steps == n and again.resumed_from == n
    # another max_steps: the command's count (the budget was spent on the first fit)
    more = run_distillation(_cfg(out, max_steps=n + 7, time_budget=0.3), show_progress=False)
    assert more.steps == n + 7 and (out / "checkpoints" / f"step-{n + 7:08d}").exists()
    # the rule itself, on a folder of an earlier version (the run state among the settings in config.json) and on
    # one with run_state.json
    legacy = {"teacher": "x", "loss": "itvm", "max_steps": 500, "fitted_steps": 123, "teacher_fingerprint": "ab"}
    assert RunState.resumed(500, tmp_path, legacy) == RunState(500, 123, "ab")
    assert RunState.resumed(600, tmp_path, legacy).total_steps == 600
    (tmp_path / "run_state.json").write_text('{"fitted_steps": 77, "teacher_fingerprint": "cd"}')
    assert RunState.resumed(500, tmp_path, legacy).total_steps == 77
    assert RunState.resumed(500, tmp_path, None).total_steps == 500  # a new run: nothing of a folder read
    # a different budget is a different run
    with pytest.raises(ConfigError, match="time_budget"):
        check_run_folder(_cfg(out, max_steps=n + 7, time_budget=5.0), overwrite=False)


def test_the_cli_takes_a_duration_and_refuses_a_bad_one_in_one_line(tmp_path):
    from helpers import cli

    r = cli("run", "--teacher", "builtin:gaussian-mixture", "--output", tmp_path / "r", "--time-budget", "soon")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--time-budget" in r.stderr
    assert not (tmp_path / "r").exists()
    r = cli("run", "--teacher", "builtin:gaussian-mixture", "--output", tmp_path / "r", "--time-budget", "2m",
            "--dry-run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["time_budget"] == 120.0 and "fitted to 120 s of training" in r.stderr
