"""--time-budget: the step count fitted from the first steps' speed, fixed once, resumed to.

No ``torch.set_num_threads`` here: it would outlive these tests in the pytest process, and a later test that
compares an in-process result with a CLI subprocess's bit for bit (test_lora's sample check) then fails.
"""

import pytest

from helpers import budget_cfg as _cfg
from ttfm_distill.budget import fit_point, fit_steps, parse_duration
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
    # the fit happens one step before the warm-up ends, when nothing has read the total yet
    assert fit_point(50) == 49 and fit_point(1) == 0


def test_a_budget_needs_warmup_steps_to_time():
    with pytest.raises(ConfigError, match="warmup_steps >= 10"):
        _cfg("x", time_budget=60.0, warmup_steps=5).validate()
    with pytest.raises(ConfigError, match="time_budget must be a positive"):
        _cfg("x", time_budget=0.0).validate()
