"""--time-budget: the step count fitted from the first steps' speed, fixed once, resumed to.

No ``torch.set_num_threads`` here: it would outlive these tests in the pytest process, and a later test that
compares an in-process result with a CLI subprocess's bit for bit (test_lora's sample check) then fails.
"""

import math

import pytest

from helpers import budget_cfg as _cfg
from ttfm_distill.budget import fit_point, fit_steps, parse_duration
from ttfm_distill.config import RunConfig
from ttfm_distill.errors import ConfigError


@pytest.mark.parametrize("text, seconds", [("600", 600.0), ("90s", 90.0), ("10m", 600.0), ("10min", 600.0),
                                           ("1.5h", 5400.0), (" 2.5 ", 2.5)])
def test_durations_read_as_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5", "ten", "10x", "1e3", "nan", "5 days"])
def test_bad_durations_are_refused_in_one_line(text):
    with pytest.raises(ConfigError) as e:
        parse_duration(text)
    assert "--time-budget" in str(e.value) and len(str(e.value)) <= 200


def test_fit_steps_fills_the_budget_between_the_floor_and_the_cap():
    # 49 steps took 5 s; 95 s left at 0.1 s a step: 950 more
    assert fit_steps(100.0, 5.0, 49, 0.1, cap=10_000) == 49 + 950
    assert fit_steps(100.0, 5.0, 49, 0.1, cap=500) == 500  # max_steps caps it
    assert fit_steps(4.0, 5.0, 49, 0.1, cap=500) == 50  # over budget already: the warm-up's last step still runs
    assert fit_steps(100.0, 5.0, 49, 0.0, cap=500) == 500  # no pace measured: the cap
    # a distribution-matching stage's steps cost STAGE_STEP_COST plain ones: the count leaves room for them
    from ttfm_distill.budget import STAGE_STEP_COST, remaining_seconds

    n = fit_steps(200.0, 5.0, 49, 0.1, cap=10_000, stage_steps=400)
    assert n == 49 + 1950 - math.ceil(400 * (STAGE_STEP_COST - 1) - 1e-9)
    assert remaining_seconds(n, 49, 0.1, 400) <= 195.0 < remaining_seconds(n + 1, 49, 0.1, 400)
    n = fit_steps(10.0, 5.0, 49, 0.1, cap=10_000, stage_steps=400)  # 50 steps' time: less than the stage
    assert n == 49 + math.floor(50 / STAGE_STEP_COST) and remaining_seconds(n, 49, 0.1, 400) <= 5.0
    assert fit_steps(200.0, 5.0, 49, 0.1, cap=500, stage_steps=400) == 500  # the cap still caps
    # the fit happens one step before the warm-up ends, when nothing has read the total yet
    assert fit_point(50) == 49 and fit_point(1) == 0


def test_a_budget_needs_warmup_steps_to_time():
    with pytest.raises(ConfigError, match="warmup_steps >= 10"):
        _cfg("x", time_budget=60.0, warmup_steps=5).validate()
    with pytest.raises(ConfigError, match="time_budget must be a positive"):
        _cfg("x", time_budget=0.0).validate()


def test_a_run_without_a_budget_is_told_its_length_at_the_warm_ups_pace_and_how_to_shorten_a_long_one():
    import time

    from ttfm_distill.budget import BudgetClock
    from ttfm_distill.runstate import RunState

    logs = []
    clock = BudgetClock.for_run(_cfg("unused", max_steps=3500), RunState(3500), time.time() - 100.0, 0, logs.append)
    assert clock is not None and not clock.fits and clock.fit_at == fit_point(10) and logs == []
    clock.pace = 0.3  # as tick() measures it at the fit point: 9 steps done in 100 s, 3491 left at 0.3 s
    line = clock.estimate(3500)
    assert "pace 0.300 s a step" in line and "3500 steps" in line and "about 19.1 min of training" in line
    assert "(17.5 min from now)" in line and "--time-budget 7m" in line
    clock = BudgetClock.for_run(_cfg("unused", max_steps=200), RunState(200), time.time() - 1.0, 0, logs.append)
    clock.pace = 0.01
    assert "--time-budget" not in clock.estimate(200)  # a short run gets the estimate alone
    # a budget fits instead; a fitted count or a resume past the fit point needs no clock
    assert BudgetClock.for_run(_cfg("unused", max_steps=3500, time_budget=60.0), RunState(3500), 0.0, 0,
                               logs.append).fits
    assert BudgetClock.for_run(_cfg("unused", max_steps=3500), RunState(3500), 0.0, 9, logs.append) is None
    assert BudgetClock.for_run(_cfg("unused", max_steps=3500, time_budget=60.0), RunState(3500, fitted_steps=20),
                               0.0, 0, logs.append) is None
    assert logs == []


def test_run_state_is_its_own_file_and_a_damaged_one_is_named_in_one_line(tmp_path):
    """The fitted count and the teacher's key are run state (run_state.json), never settings: config.json and a
    user's config file do not take them; a damaged run_state.json is refused naming the file and the fix."""
    from ttfm_distill.runstate import RunState

    with pytest.raises(ConfigError, match="unknown config key 'fitted_steps'"):
        RunConfig.from_dict({"fitted_steps": 12})
    state = RunState(500, 120, "ab12")
    state.save(tmp_path)
    assert RunState.resumed(500, tmp_path, {"max_steps": 500}) == state
    for text in ("{", '{"fitted_steps": "12"}', '{"fitted_steps": 0}', '{"steps": 3}', "[]"):
        (tmp_path / "run_state.json").write_text(text)
        with pytest.raises(ConfigError) as e:
            RunState.resumed(500, tmp_path, {"max_steps": 500})
        line = str(e.value)
        assert "run_state.json is damaged" in line and "--overwrite" in line and len(line) <= 200 and "\n" not in line
