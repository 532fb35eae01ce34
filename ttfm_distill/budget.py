"""A training time budget: the step count that fits, from the speed of the run's first steps.

``time_budget`` (seconds of the training loop) is turned into a step count once, at the end of the lr
warm-up's last-but-one step, before anything in the run depends on the total (the cosine's shape is the
first thing that does). The count is stored in the run's ``config.json`` as ``fitted_steps``, so an
interrupted run resumes to the same count and replays the same schedule bit for bit, whatever speed the
resumed process has. The pure parts live here; the trainer times its steps and calls :func:`fit_steps`.
"""

from __future__ import annotations

import math
import re

from .errors import ConfigError

#: the steps at the start of a run that are not timed (lazy initialisation, allocator warm-up)
UNTIMED_STEPS = 3
#: the fewest warm-up steps a time budget can be fitted on: the steps timed are those of the warm-up
MIN_WARMUP_STEPS = 10

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"600"``, ``"90s"``, ``"10m"``, ``"1.5h"`` -> seconds (a positive, finite number)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
    seconds = float(m.group(1)) * _UNITS[m.group(2) or ""] if m else float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"--time-budget must be a positive duration such as 600, 90s, 10m or 1.5h, got {text!r}")
    return seconds


def fit_point(warmup_steps: int) -> int:
    """How many steps are done when the count is fitted: one before the warm-up ends (the scheduler computes the
    lr of step ``warmup_steps`` at the end of the step before it, and from there the cosine reads the total)."""
    return max(1, int(warmup_steps)) - 1


def fit_steps(budget: float, elapsed: float, done: int, seconds_per_step: float, cap: int) -> int:
    """The total step count that ends training within ``budget`` seconds.

    ``elapsed``: seconds the loop has run for its ``done`` steps; ``seconds_per_step``: the measured pace of what
    is left. The result is at least ``done + 1`` (the warm-up's last step runs anyway) and at most ``cap``
    (``max_steps``).
    """
    if not seconds_per_step > 0:
        return int(cap)
    more = math.floor(max(0.0, budget - elapsed) / seconds_per_step)
    return int(min(cap, max(done + 1, done + more)))
