"""A training time budget: the step count that fits, from the speed of the run's first steps.

``time_budget`` (seconds of the training loop) is turned into a step count once, at the end of the lr
warm-up's last-but-one step, before anything in the run depends on the total (the cosine's shape is the
first thing that does). The count is run state (``runstate.RunState.fitted_steps``, the run folder's
``run_state.json``), so an
interrupted run resumes to the same count and replays the same schedule bit for bit, whatever speed the
resumed process has. The pure parts live here; the trainer times its steps and calls :func:`fit_steps`.
"""

from __future__ import annotations

import math
import re
import time

from .config import MIN_WARMUP_STEPS  # noqa: F401 - re-exported
from .errors import ConfigError

#: the steps at the start of a run that are not timed (lazy initialisation, allocator warm-up)
UNTIMED_STEPS = 3

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


#: what a step of a distribution-matching stage (``dm_stage_steps``) costs against one of the steps before it, whose
#: pace the warm-up measures: 5 fake-network updates and a student jump at dm_batch 16 on top of the objective's
#: rows (the default run alone on the project's 2-core AMD EPYC, two threads: 0.725 s against 0.229 s a step;
#: docs/benchmarks.md, "The default run")
STAGE_STEP_COST = 3.15


def remaining_seconds(total: int, done: int, seconds_per_step: float, stage_steps: int = 0) -> float:
    """Seconds the steps from ``done`` to ``total`` take at ``seconds_per_step``, the last ``stage_steps`` of the run
    at :data:`STAGE_STEP_COST` times that."""
    left = max(0, int(total) - int(done))
    return seconds_per_step * (left + min(left, max(0, int(stage_steps))) * (STAGE_STEP_COST - 1))


def fit_steps(budget: float, elapsed: float, done: int, seconds_per_step: float, cap: int,
              stage_steps: int = 0) -> int:
    """The total step count that ends training within ``budget`` seconds.

    ``elapsed``: seconds the loop has run for its ``done`` steps; ``seconds_per_step``: the measured pace of what
    is left, the last ``stage_steps`` (a distribution-matching stage) at :data:`STAGE_STEP_COST` times it. The
    result is at least ``done + 1`` (the warm-up's last step runs anyway) and at most ``cap`` (``max_steps``).
    """
    if not seconds_per_step > 0:
        return int(cap)
    units = max(0.0, budget - elapsed) / seconds_per_step  # plain steps' worth of time left
    stage = max(0, int(stage_steps))
    if units >= stage * STAGE_STEP_COST:  # the whole stage fits, and plain steps before it
        more = stage + math.floor(units - stage * STAGE_STEP_COST + 1e-9)
    else:  # only part of it: the run is all stage from here
        more = math.floor(units / STAGE_STEP_COST + 1e-9)
    return int(min(cap, max(done + 1, done + more)))


class BudgetClock:
    """Times the steps before the fit point; ``tick(done)`` is true once, when ``done`` reaches it."""

    @classmethod
    def for_run(cls, cfg, state, t_start: float, start_step: int, log) -> "BudgetClock | None":
        """The clock of the warm-up's pace, or ``None`` (a count fitted already, or a resume past the fit point: a
        changed max_steps is trained). With ``cfg.time_budget`` it fits the step count; without, it says how long
        the training will take (:meth:`estimate`)."""
        if state.fitted_steps is not None:  # (``state``: the run's RunState)
            return None
        fit_at = fit_point(cfg.warmup_steps)
        if start_step >= fit_at:
            if cfg.time_budget is not None:
                log(f"time budget: the run is past its warm-up with no fitted step count; training to max_steps "
                    f"{cfg.max_steps}")
            return None
        return cls(t_start, start_step, fit_at, fits=cfg.time_budget is not None)

    def __init__(self, t_start: float, start_step: int, fit_at: int, fits: bool = True):
        #: whether the clock fits a time budget's step count (else it only estimates the training's length)
        self.fits = fits
        self.t_start, self.fit_at = t_start, fit_at
        self.mark_at = min(start_step + UNTIMED_STEPS, fit_at - 1)
        self.mark_step, self.mark_time = start_step, t_start
        #: seconds a step between the mark and the fit point, once ``tick`` has reached it
        self.pace = 0.0

    def tick(self, done: int) -> bool:
        now = time.time()
        if done == self.mark_at:
            self.mark_step, self.mark_time = done, now
        if done != self.fit_at:
            return False
        self.pace = (now - self.mark_time) / max(1, done - self.mark_step)
        return True

    def fitted(self, cfg, accelerator) -> tuple[int, str]:
        """``(step count, the line that says so)`` from the pace so far; rank 0's count on every rank."""
        elapsed = time.time() - self.t_start
        stage = cfg.dm_stage_steps or 0
        count = fit_steps(cfg.time_budget, elapsed, self.fit_at, self.pace, cfg.max_steps, stage)
        if accelerator.num_processes > 1:
            import torch
            from accelerate.utils import broadcast

            count = int(broadcast(torch.tensor([count], device=accelerator.device), from_process=0).item())
        cap = "" if count < cfg.max_steps else " (max_steps)"
        return count, (f"time budget {cfg.time_budget:g} s: {self.pace:.3f} s a step over the first {self.fit_at} "
                       f"steps -> {count} steps{cap}, about "
                       f"{elapsed + remaining_seconds(count, self.fit_at, self.pace, stage):.0f} s of training")

    def estimate(self, total_steps: int, stage_steps: int = 0) -> str:
        """The line a run without a time budget prints at the fit point: the training's length at this pace (the
        last ``stage_steps``, a distribution-matching stage, at :data:`STAGE_STEP_COST` times it), and how to
        shorten it when it is past :data:`LONG_TRAINING` seconds."""
        left = remaining_seconds(total_steps, self.fit_at, self.pace, stage_steps)
        whole = time.time() - self.t_start + left
        line = (f"pace {self.pace:.3f} s a step: the {total_steps} steps take about {_minutes(whole)} of training "
                f"({_minutes(left)} from now)")
        if whole > LONG_TRAINING:
            line += "; --time-budget 7m fits the training into seven minutes (or lower --max-steps)"
        return line


#: seconds of training past which a run without a time budget says how to shorten it
LONG_TRAINING = 600


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
