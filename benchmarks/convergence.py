"""Convergence benchmark: few-step quality of the student along its training, on the embedded teacher.

    python benchmarks/convergence.py train --rows lfmd_adaptive_lr0.0003   # train rows through the CLI
    python benchmarks/convergence.py score --rows itvm_default --follow     # score checkpoints as they land
    python benchmarks/convergence.py report                                 # JSON, table, figures
    python benchmarks/convergence.py all --rows ...                         # the three in turn

Every row is a real ``ttfm-distill run`` (a subprocess of the CLI, one thread,
``OMP_NUM_THREADS=1``) in ``--runs-dir/ROW`` with checkpoints kept at least
every tenth of its budget.  A row folder that already holds the run (for
example one started by hand with the row's command) is adopted: ``train``
resumes it only when it is unfinished and not being written by another
process; ``score`` only reads it.

``score`` loads each checkpoint's raw weights (``student.safetensors``) and,
where the run kept one, its EMA (``ema.safetensors``), and scores them as
``ttfm-distill eval`` does (``evaluate.Evaluation``): FD to the real test
images and to the teacher's fine solve in the shipped classifier's features,
and the flow-map error against the teacher's RK4 solve, for the student at
1/2/4/8 steps, all from one fixed set of ``--num`` noises (seed ``--seed``).
The teacher's Euler (1/2/4/8/16/50) and Heun (2/4/8/16 NFE) are scored once on
the same noises.  One JSON file per ``(row, checkpoint, weights)`` lands in
``benchmarks/results/convergence/points/ROW/``; a point already there is not
scored again, so ``score`` is resumable and may run beside the training
(``--follow`` waits for new checkpoints until every named row has finished).

Training seconds of a point: the checkpoint folder's modification time minus
that of the run's data-free pool file (written just before the first step),
i.e. wall time on one thread, under whatever else shared the machine.
``train`` also records each row's CPU seconds (user + system of the
subprocess) in ``RUNS/ROW.cpu.json`` (beside the run folder: a run folder holds only what a run writes).

``report`` gathers the points into ``benchmarks/results/convergence.json``,
prints the table and draws ``convergence.png`` (FD to test images against
training samples), ``convergence-seconds.png`` (against training seconds),
``convergence-fme.png`` (flow-map error) and ``convergence-fd-teacher.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
POINTS = RESULTS / "convergence" / "points"
TEACHER = "builtin:fashion16"
#: --teacher NAME -> (the teacher's source, its prediction type); each row runs on one of them ("teacher" in its
#: spec, default fashion16) and the report of one teacher holds only its rows. ddpm: the epsilon-prediction UNet
#: of docs/second-teacher.md (benchmarks/ddpm_teacher.py), whose weights are committed beside the results
TEACHERS = {"fashion16": ("builtin:fashion16", "flow"),
            "ddpm": (str(REPO / "benchmarks" / "results" / "ddpm-teacher"), "epsilon")}
PREDICTION = "flow"


def other_teacher() -> bool:
    """Whether this invocation runs another teacher's rows than the embedded one's (``--teacher``)."""
    return TEACHER != TEACHERS["fashion16"][0]
STUDENT_STEPS = (1, 2, 4, 8)
EULER_STEPS = (1, 2, 4, 8, 16, 50)
HEUN_STEPS = (2, 4, 8, 16)
DEFAULT_SAMPLES = 2400 * 32  # the default `ttfm-distill run`: 2400 fp32 steps at batch 32 (1200 before the third round)
#: since the sixth round: 3000 bf16 steps, in the wall time 2400 fp32 steps took; a bf16 row is judged at this budget
DEFAULT_SAMPLES_BF16 = 3000 * 32

_LFMD = ["--loss", "lfmd", "-L", "derivative=fd", "-L", "adaptive_p=1", "--set", "diagonal_fraction=0.25"]


#: the 1-step-only trajectory rows: 12.5% of each batch on the Heun-16 pool's (noise, sample) pairs
_TRAJ_1STEP = ["--set", "trajectory_fraction=0.125", "--set", "pool_solver=heun", "--set",
               "trajectory_time_sampling=dyadic", "--set", "trajectory_dyadic_levels=0"]


def _keep(every: int) -> list[str]:
    return ["--set", f"checkpoint_every={every}", "--set", "keep_checkpoints=100"]


def more_seeds(base: str, tag: str, args: list[str], what: str) -> None:
    """Seeds 1 and 2 of row ``base`` (seed 0): rows ``TAG_s1``, ``TAG_s2`` with ``--seed`` before ``args``, all three
    in the report's seed table ``tag``."""
    ROWS[base]["seeds"] = tag
    ROWS.update({f"{tag}_s{seed}": {"args": ["--seed", str(seed), *args], "what": f"seed {seed}: {what}", "seeds": tag}
                 for seed in (1, 2)})


#: name -> the row's ``ttfm-distill run`` arguments (besides --output and -q), what it tests, and its group
ROWS: dict[str, dict] = {
    # the tool's defaults (ITVM, r = s + tau, current weights as target), with an export EMA kept beside the raw
    # weights: one run gives both curves (the eval-EMA A/B at no training cost)
    # (ema_warmup=false pins what ran: the row started before warm-up existed, when the export was the raw weights)
    "itvm_default": {"headline": True, "args": ["--max-steps", "10000", "--ema-decay", "0.999", "--set", "ema_warmup=false", *_keep(500)],
                     "what": "ITVM at the previous defaults, 10k steps; raw weights and an export EMA 0.999 (no warm-up)"},
    # the strongest rival on the image benchmark and the 2-D ring: LFMD (finite differences) with MeanFlow's
    # adaptive weighting, which stopped its divergence on the 2-D teachers; its own lr from a 600-step sweep
    **{f"lfmd_adaptive_lr{lr}": {"args": [*_LFMD, "--lr", lr, "--max-steps", "600", *_keep(300)],
                                 "what": f"LFMD adaptive, lr {lr}, 600 steps (lr sweep)", "sweep": "lfmd_adaptive",
                                 "lr": float(lr)}
       for lr in ("0.0001", "0.0003", "0.001", "0.003", "0.01")},
    # "SWEEP": the lr is the sweep's best at the time the row starts (recorded in the run's config.json)
    "lfmd_adaptive": {"headline": True, "args": [*_LFMD, "--lr", "SWEEP", "--max-steps", "10000", "--ema-decay", "0.999", "--set",
                               "ema_warmup=false", *_keep(1000)],
                      "what": "LFMD adaptive at the sweep's best lr, 10k steps; raw and EMA 0.999",
                      "lr_from_sweep": "lfmd_adaptive"},
    # A/Bs against itvm_default at 1500 steps (same seed, so the same data, noise and time draws where the
    # recipe does not change them); the baseline is itvm_default's raw checkpoints at 500/1000/1500
    "ab_tau0.05": {"args": ["-L", "tau=0.05", "--max-steps", "1500", *_keep(150)], "what": "tau 0.05 (default 0.1)",
                   "ab": "itvm_default"},
    "ab_tau0.2": {"args": ["-L", "tau=0.2", "--max-steps", "1500", *_keep(150)], "what": "tau 0.2 (default 0.1)",
                  "ab": "itvm_default"},
    "ab_levels2": {"args": ["--set", "dyadic_levels=2", "--max-steps", "1500", *_keep(150)],
                   "what": "dyadic half of the pairs only on the 1/2/4-step grids (dyadic_levels 2, default 4)",
                   "ab": "itvm_default"},
    "ab_lr4e-4": {"args": ["--lr", "0.0004", "--max-steps", "1500", *_keep(150)], "what": "lr 4e-4 (default 2e-4)",
                  "ab": "itvm_default"},
    "ab_lr1e-4": {"args": ["--lr", "0.0001", "--max-steps", "1500", *_keep(150)], "what": "lr 1e-4 (default 2e-4)",
                  "ab": "itvm_default"},
    "ab_batch64": {"args": ["--batch-size", "64", "--max-steps", "750", *_keep(75)],
                   "what": "batch 64 at the same samples (750 steps)", "ab": "itvm_default"},
    "ab_terminal": {"args": ["-L", "intermediate=terminal", "--max-steps", "1500", *_keep(150)],
                    "what": "r = t - tau", "ab": "itvm_default"},
    # the export EMA with a warm-up (decay min(0.999, (1+k)/(10+k))): training is unchanged (the target is the
    # current weights), so its raw checkpoints must equal itvm_default's; scored with --weights ema
    "ab_ema_warmup": {"args": ["--ema-decay", "0.999", "--set", "ema_warmup=true", "--max-steps", "1500", *_keep(150)],
                      "what": "export EMA 0.999 with warm-up (EMA weights)", "ab": "itvm_default", "ab_weights": "ema",
                      "same_raw_as": "itvm_default"},
    "ab_cosine": {"args": ["--set", "lr_schedule=cosine", "--max-steps", "1500", *_keep(150)],
                  "what": "cosine lr decay to 0 over the budget (default constant)", "ab": "itvm_default"},
    # the candidate default: export EMA with warm-up and a cosine lr, at the default run's 1200 steps
    "recipe_default": {"args": ["--ema-decay", "0.999", "--set", "ema_warmup=true", "--set", "lr_schedule=cosine",
                                "--max-steps", "1200", *_keep(120)],
                       "what": "cosine lr + export EMA 0.999 with warm-up, 1200 steps (the default run's budget)",
                       "ab": "itvm_default", "ab_weights": "ema"},
    "ab_diag0.25": {"args": ["--set", "diagonal_fraction=0.25", "--max-steps", "1500", *_keep(150)],
                    "what": "initial-velocity term on 25% diagonal pairs", "ab": "itvm_default"},
    # trajectory supervision and the pool's solver, against the current defaults (export EMA with warm-up):
    # EMA weights against ab_ema_warmup's EMA weights at the same step
    **{name: {"args": [*extra, "--max-steps", "1500", *_keep(150)], "what": what, "ab": "ab_ema_warmup",
              "ab_weights": "ema", "ab_base_weights": "ema"}
       for name, extra, what in [
           ("ab_traj0.25", ["--set", "trajectory_fraction=0.25"],
            "25% of each batch on the pool's stored Euler-16 solves (trajectory_fraction 0.25)"),
           ("ab_traj0.25_heun", ["--set", "trajectory_fraction=0.25", "--set", "pool_solver=heun"],
            "25% of each batch on stored Heun-16 solves (the pool itself Heun-16)"),
           ("ab_heun_pool", ["--set", "pool_solver=heun"], "a Heun-16 pool (32 NFE a sample), no trajectory rows"),
           ("ab_traj0.5_heun", ["--set", "trajectory_fraction=0.5", "--set", "pool_solver=heun"],
            "50% of each batch on stored Heun-16 solves"),
           ("ab_r_uniform", ["-L", "intermediate=uniform"],
            "ITVM reading r ~ U(s, t), both segments the student's (the teacher on 25% diagonal pairs)"),
           ("ab_r_terminal", ["-L", "intermediate=terminal"], "ITVM reading r = t - tau (teacher segment last)"),
           ("ab_ema_only", ["-L", "reading=ema_only"], "ITVM's EMA-only reading (the student's own segments)"),
           ("ab_initial_on_all", ["-L", "initial_on_all=true"],
            "the initial-velocity term on every pair (u(x_s, s, s) against the teacher)"),
           ("ab_traj_1step_heun", ["--set", "trajectory_fraction=0.125", "--set", "pool_solver=heun", "--set",
                                   "trajectory_time_sampling=dyadic", "--set", "trajectory_dyadic_levels=0"],
            "12.5% of each batch on stored Heun-16 solves, only on the 1-step jump (0, 1)"),
           ("ab_real_data", ["--data", "fashion-mnist"],
            "real Fashion-MNIST training images instead of the data-free pool (the same ITVM targets)"),
           ("ab_tau0.25_sub3", ["-L", "tau=0.25", "-L", "teacher_substeps=3"],
            "tau 0.25 taken in 3 Heun substeps (a shorter chain of student segments at the same step accuracy)"),
           ("ab_traj_sampler_heun", ["--set", "trajectory_fraction=0.25", "--set", "pool_solver=heun", "--set",
                                     "trajectory_time_sampling=dyadic", "--set", "trajectory_dyadic_levels=1"],
            "25% of each batch on stored Heun-16 solves, only on the 1- and 2-step jumps"),
       ]},
    # short lr sweeps of the other objectives (each at its own defaults; finite differences where there is a
    # time derivative), 600 steps, raw weights at the end, like LFMD's sweep
    **{f"{loss}_lr{lr}": {"args": ["--loss", loss, *extra, "--lr", lr, "--max-steps", "600", *_keep(600)],
                          "what": f"{loss}, lr {lr}, 600 steps (lr sweep)", "sweep": loss, "lr": float(lr)}
       for loss, extra in [("lsd", ["-L", "derivative=fd"]), ("meanflow", ["-L", "derivative=fd"]), ("progressive", [])]
       for lr in ("0.0001", "0.0003", "0.001")},
    # the 1-step trajectory rows over a longer budget: does their 1-step gain grow? (against itvm_default's EMA)
    "traj_1step_long": {"headline": True, "args": ["--max-steps", "5000", "--set", "trajectory_fraction=0.125", "--set", "pool_solver=heun",
                                 "--set", "trajectory_time_sampling=dyadic", "--set", "trajectory_dyadic_levels=0",
                                 *_keep(1000)],
                        "what": "1-step-only trajectory rows (12.5%, Heun-16 pool), 5000 steps, EMA with warm-up"},
    # a second seed for the candidate default, at the default run's 1200 steps (final point only)
    "s1_default": {"args": ["--seed", "1", "--max-steps", "1200", *_keep(600)],
                   "what": "seed 1: the defaults at the default run's 1200 steps", "group": "seed 1"},
    "s1_traj_1step_heun": {"args": ["--seed", "1", "--max-steps", "1200", "--set", "trajectory_fraction=0.125", "--set",
                                    "pool_solver=heun", "--set", "trajectory_time_sampling=dyadic", "--set",
                                    "trajectory_dyadic_levels=0", *_keep(600)],
                           "what": "seed 1: 1-step-only trajectory rows (12.5%, Heun-16 pool), 1200 steps",
                           "group": "seed 1"},
    # the default run's budget doubled to 2400 steps (about 8 minutes in all on one thread, inside the 10-minute
    # budget): the defaults of the time against the 1-step trajectory rows, three seeds each (EMA at
    # 600/1200/1800/2400); the trajectory rows won and are the defaults since (docs/quality.md)
    **{f"budget_{tag}_s{seed}": {"args": ["--seed", str(seed), "--max-steps", "2400", *extra, *_keep(600)],
                                 "what": f"seed {seed}: {what}, 2400 steps", "seeds": tag,
                                 "headline": (tag, seed) == ("traj", 0)}
       for tag, extra, what in [
           ("default", [], "the defaults before this comparison (no trajectory rows, Euler pool)"),
           ("traj", _TRAJ_1STEP, "1-step-only trajectory rows (12.5%, Heun-16 pool)")]
       for seed in (0, 1, 2)},
    # the rivals' long rows, each at its own sweep's best lr (recorded in the run's config.json)
    **{f"{loss}_long": {"headline": True, "args": ["--loss", loss, *extra, "--lr", "SWEEP", "--max-steps", "3000", *_keep(300)],
                        "what": f"{loss} at its sweep's best lr, 3000 steps", "lr_from_sweep": loss}
       for loss, extra in [("progressive", []), ("lsd", ["-L", "derivative=fd"]), ("meanflow", ["-L", "derivative=fd"])]},
    # progressive_long continued: its folder copied at step 3000 (checkpoints and pool byte for byte, so its points
    # up to 3000 are progressive_long's), resumed to 6000 by the same command with a larger --max-steps
    "progressive_6k": {"args": ["--loss", "progressive", "--lr", "SWEEP", "--max-steps", "6000",
                                                  *_keep(300)],
                       "what": "progressive at its sweep's best lr, progressive_long resumed from step 3000 to 6000",
                       "lr_from_sweep": "progressive"},
}


def _pin_previous_defaults(args: list[str]) -> list[str]:
    """The trajectory settings the rows ran under before they became automatic, added where a row leaves them
    unset, so each row's command keeps meaning what ran: no trajectory rows and an Euler pool, and for a row
    that sets ``trajectory_fraction`` alone, pairs drawn like its objective's."""
    given = {a.split("=", 1)[0] for a in args if "=" in a}
    pins = {"pool_solver": "euler"}
    if "trajectory_fraction" in given:
        pins.update(trajectory_time_sampling="null", trajectory_dyadic_levels="null")
    else:
        pins["trajectory_fraction"] = "0.0"
    return [*args, *(x for k, v in pins.items() if k not in given for x in ("--set", f"{k}={v}"))]


for _spec in ROWS.values():
    _spec["args"] = _pin_previous_defaults(_spec["args"])

# rows of the third round on: the defaults as they are now (trajectory rows on, 2400 steps), seed 0, against
# budget_traj_s0 (the same defaults, no change) at the same steps
ROWS.update({
    name: {"args": [*extra, "--max-steps", "2400", *_keep(600)], "what": what, "ab": "budget_traj_s0",
           "ab_weights": "ema", "ab_base_weights": "ema"}
    for name, extra, what in [
        ("ab3_span2", ["-L", "span_power=2"],
         "ITVM residuals weighted by (t - s)^2 (measured in phi, as progressive distillation measures them)"),
        ("ab3_span1", ["-L", "span_power=1"], "ITVM residuals weighted by (t - s)"),
        ("ab3_long0.5", ["-L", "long_jump_span=0.5"],
         "progressive distillation's target (two EMA jumps through r ~ U(s, t)) on pairs with t - s >= 0.5"),
        ("ab3_long0.75", ["-L", "long_jump_span=0.75"],
         "progressive distillation's target on pairs with t - s >= 0.75"),
    ]})
# more seeds of the long-jump option; with ab3_long0.5 (seed 0) a seed table beside budget_traj_s{0,1,2}
more_seeds("ab3_long0.5", "long0.5", ["-L", "long_jump_span=0.5", "--max-steps", "2400", *_keep(600)],
           "the defaults with long_jump_span=0.5, 2400 steps")


def _pin_no_long_jumps(args: list[str]) -> list[str]:
    """ITVM's long jumps became automatic after the rows above ran: an ITVM row that leaves them unset ran
    without them, and says so."""
    loss = args[args.index("--loss") + 1] if "--loss" in args else "itvm"
    given = any(a.startswith("long_jump_span=") for a in args)
    return args if loss != "itvm" or given else [*args, "-L", "long_jump_span=0.0"]


for _spec in ROWS.values():
    _spec["args"] = _pin_no_long_jumps(_spec["args"])

# the rows from here on run the current defaults (long jumps included)
# the cosine lr that steadied the DDPM teacher (docs/second-teacher.md), on this teacher at the current defaults
ROWS["ab4_cosine"] = {"args": ["-L", "long_jump_span=0.5", "--set", "lr_schedule=cosine", "--max-steps", "2400",
                               *_keep(600)], "what": "cosine lr decay to 0, with the long jumps, 2400 steps",
                      "ab": "ab3_long0.5", "ab_weights": "ema", "ab_base_weights": "ema"}
# the long setting (examples/long.toml: the defaults for 10,000 steps) with the long-jump option: the 60-minute goals
# the same with a pool four times larger: do the trajectory rows, 2048 fixed solves, over-fit a long run?
ROWS["long10k_pool8k"] = {"args": ["-L", "long_jump_span=0.5", "--set", "pool_size=8192", "--max-steps", "10000",
                                   *_keep(1000)],
                          "what": "the long setting with long jumps and an 8192-sample pool, 10,000 steps"}
# fifth round, against the current defaults (ab3_long0.5 is them, bit for bit): an Euler teacher segment (one
# teacher evaluation fewer on the ITVM pairs: cheaper steps) and twice the batch at half the steps (same samples)
ROWS.update({
    name: {"args": ["-L", "long_jump_span=0.5", *extra], "what": what,
           "ab": "ab3_long0.5", "ab_weights": "ema", "ab_base_weights": "ema"}
    for name, extra, what in [
        ("ab5_euler_seg", ["-L", "teacher_solver=euler", "--max-steps", "2400", *_keep(600)],
         "the teacher segment in one Euler step (default Heun): one teacher evaluation fewer per ITVM pair"),
        ("ab5_batch64", ["--batch-size", "64", "--max-steps", "1200", *_keep(300)],
         "batch 64 for 1200 steps (default 32 for 2400): the same training samples"),
        ("ab5_adaptive", ["-L", "adaptive_p=1", "--max-steps", "2400", *_keep(600)],
         "MeanFlow's adaptive weight 1 / (l + 1e-3) on each ITVM pair's loss (normalised to mean 1 per batch)"),
        ("ab5_lr4e-4_cosine", ["--lr", "4e-4", "--set", "lr_schedule=cosine", "--max-steps", "2400", *_keep(600)],
         "twice the lr (4e-4) with a cosine decay to 0 (default 2e-4, constant)"),
        ("ab5_adaptive0.5", ["-L", "adaptive_p=0.5", "--max-steps", "2400", *_keep(600)],
         "the adaptive weight at half MeanFlow's power: 1 / (l + 1e-3)^0.5 (normalised to mean 1 per batch)"),
    ]})
# more seeds of twice the lr with a cosine decay; with ab5_lr4e-4_cosine (seed 0) a seed table beside long0.5_s{1,2}
more_seeds("ab5_lr4e-4_cosine", "lr4e-4_cosine",
           ["-L", "long_jump_span=0.5", "--lr", "4e-4", "--set", "lr_schedule=cosine", "--max-steps", "2400", *_keep(600)],
           "the defaults with lr 4e-4 and a cosine decay, 2400 steps")
# the DDPM teacher (--teacher ddpm): its defaults (a cosine lr, no trajectory rows or long jumps) along 2400 steps
ROWS["ddpm_default"] = {"teacher": "ddpm", "headline": True, "args": ["--max-steps", "2400", *_keep(300)],
                        "what": "the DDPM teacher's defaults (cosine lr, no trajectory rows, no long jumps), 2400 steps"}
ROWS["long10k_jump0.5"] = {"headline": True, "args": ["-L", "long_jump_span=0.5", "--max-steps", "10000", *_keep(1000)],
                           "what": "the defaults with long_jump_span=0.5, 10,000 steps (the long setting)"}


def _pin_previous_lr(args: list[str]) -> list[str]:
    """The lr became automatic (4e-4 with a cosine decay on a flow teacher) after the rows above ran: a row that
    leaves the lr or its schedule unset ran at 2e-4, constant, and says so."""
    pins = [] if "--lr" in args else ["--lr", "2e-4"]
    if not any(a.startswith("lr_schedule=") for a in args):
        pins += ["--set", "lr_schedule=constant"]
    return [*args, *pins]


for _spec in ROWS.values():
    if _spec.get("teacher", "fashion16") == "fashion16":  # the DDPM row's automatic lr and schedule did not change
        _spec["args"] = _pin_previous_lr(_spec["args"])

# the rows from here on run the fifth round's defaults (lr 4e-4, cosine)
# the adaptive weight at p = 0.5 on top of them (seeds 0 and 1), against ab5_lr4e-4_cosine / lr4e-4_cosine_s1
ROWS.update({
    f"lr4_adaptive0.5_s{seed}": {"args": ["--seed", str(seed), "-L", "adaptive_p=0.5", "--lr", "4e-4", "--set",
                                          "lr_schedule=cosine", "--max-steps", "2400", *_keep(600)],
                                 "what": f"seed {seed}: lr 4e-4 with a cosine decay and adaptive_p=0.5, 2400 steps",
                                 **({"ab": "ab5_lr4e-4_cosine", "ab_weights": "ema", "ab_base_weights": "ema"}
                                    if seed == 0 else {})}
    for seed in (0, 1)})


# sixth round, against ab5_lr4e-4_cosine (the fifth round's defaults, seed 0, bit for bit): the 1-step jump
ROWS.update({
    name: {"args": [*extra, "--max-steps", "2400", *_keep(600)], "what": what,
           "ab": "ab5_lr4e-4_cosine", "ab_weights": "ema", "ab_base_weights": "ema"}
    for name, extra, what in [
        ("ab6_lr8e-4", ["--lr", "8e-4"], "twice the automatic lr again: 8e-4, with the automatic cosine decay"),
        ("ab6_traj0.25", ["--set", "trajectory_fraction=0.25"],
         "a quarter of each batch on the pool's 1-step jump (default an eighth)"),
        ("ab6_trajw2", ["--set", "trajectory_weight=2"], "the trajectory rows' loss weighted 2 (default 1)"),
        ("ab6_long0.25", ["-L", "long_jump_span=0.25"],
         "progressive's target on every pair with t - s >= 0.25 (default 0.5): the 1-step leader's target on more pairs"),
        ("ab6_bf16", ["--set", "mixed_precision=bf16"],
         "bf16 autocast (fp32 master weights): cheaper steps on a CPU with bf16 units, if the FD holds"),
    ]})
ROWS["ab6_bf16_3000"] = {"headline": True, "args": ["--set", "mixed_precision=bf16", "--max-steps", "3000", *_keep(600)],
                         "what": "bf16 autocast for 3000 steps: what its cheaper steps buy in the default run's time",
                         "ab": "ab5_lr4e-4_cosine", "ab_weights": "ema", "ab_base_weights": "ema"}
more_seeds("ab6_bf16_3000", "bf16_3000", ["--set", "mixed_precision=bf16", "--max-steps", "3000", *_keep(600)],
           "bf16 autocast for 3000 steps")
# the long setting's recipe (examples/long.toml: no trajectory rows, no long jumps) at the fifth round's lr
ROWS["long10k_lr4"] = {"headline": True,
                       "args": ["--set", "trajectory_fraction=0.0", "--set", "pool_solver=euler", "-L",
                                "long_jump_span=0.0", "--lr", "4e-4", "--set", "lr_schedule=cosine",
                                "--max-steps", "10000", *_keep(1000)],
                       "what": "the long setting's recipe (itvm_default with the EMA warm-up) at lr 4e-4 with a "
                               "cosine decay, 10,000 steps"}


def _pin_setting(key: str, value: str) -> None:
    """A setting became automatic after the rows defined so far ran: every row that leaves ``key`` unset ran with
    ``value``, and its command now says so (``--set key=value``)."""
    for spec in ROWS.values():
        if not any(a.startswith(f"{key}=") for a in spec["args"]):
            spec["args"] = [*spec["args"], "--set", f"{key}={value}"]


# mixed_precision became automatic (bf16 for a flow teacher on hardware with native bf16): the rows above ran fp32
_pin_setting("mixed_precision", "no")

# after the sixth round's defaults: what bf16 does where the automatic value keeps fp32 (not pinned above)
ROWS["ddpm_bf16"] = {"teacher": "ddpm", "args": ["--set", "mixed_precision=bf16", "--max-steps", "2400", *_keep(300)],
                     "what": "the DDPM teacher's defaults in bf16 (its automatic value is fp32), 2400 steps",
                     "ab": "ddpm_default", "ab_weights": "ema", "ab_base_weights": "ema"}
ROWS["long10k_bf16"] = {"headline": True,
                        "args": ["--set", "trajectory_fraction=0.0", "--set", "pool_solver=euler", "-L",
                                 "long_jump_span=0.0", "--lr", "2e-4", "--set", "lr_schedule=constant", "--set",
                                 "mixed_precision=bf16", "--max-steps", "10000", *_keep(1000)],
                        "what": "examples/long.toml's recipe in bf16, 10,000 steps (itvm_default's, with the EMA warm-up)"}

# seventh round, against ab6_bf16_3000 (the sixth round's defaults, seed 0, bit for bit): the 1-step jump again
_BF16_3000 = ["--set", "mixed_precision=bf16", "--max-steps", "3000", *_keep(600)]
ROWS.update({
    name: {"args": [*extra, *_BF16_3000], "what": what,
           "ab": "ab6_bf16_3000", "ab_weights": "ema", "ab_base_weights": "ema"}
    for name, extra, what in [
        ("ab7_trajw2", ["--set", "trajectory_weight=2"], "the trajectory rows' loss weighted 2 (default 1)"),
        ("ab7_lrfinal0.25", ["--set", "lr_final_fraction=0.25"],
         "the cosine decays to a quarter of the lr, not to 0: the 1-step jump is still learning at the end"),
    ]})

# the long setting in bf16 at lr 4e-4 with the cosine, as many steps as one thread beside another row trains in
# about 60 minutes (long10k_bf16: 0.186 s a step): the 60-minute goal's budget, not 10,000 steps
ROWS["long18k_bf16_lr4"] = {"headline": True,
                            "args": ["--set", "trajectory_fraction=0.0", "--set", "pool_solver=euler", "-L",
                                     "long_jump_span=0.0", "--lr", "4e-4", "--set", "lr_schedule=cosine", "--set",
                                     "mixed_precision=bf16", "--max-steps", "18000", *_keep(2000)],
                            "what": "the long setting's recipe in bf16 at lr 4e-4 with a cosine decay, 18,000 steps "
                                    "(about 60 minutes on one thread)"}

# from here on the trajectory rows ride in the objective's gradient forward (objectives/trajectory.py,
# JoinedForward): the same loss, 1.16x cheaper steps on one thread, so 3500 steps take what 3000 took
ROWS["ab7_joined3500"] = {"args": ["--set", "mixed_precision=bf16", "--max-steps", "3500", *_keep(500)],
                          "what": "the sixth round's defaults with the trajectory rows joined, 3500 steps",
                          "default_steps": 3500,
                          "ab": "ab6_bf16_3000", "ab_weights": "ema", "ab_base_weights": "ema"}
ROWS["cand7"] = {"headline": True,
                 "args": ["--set", "lr_final_fraction=0.25", "--set", "mixed_precision=bf16", "--max-steps", "3500",
                          *_keep(500)],
                 "what": "the seventh round's candidate: the rows joined, 3500 steps, the cosine down to a quarter",
                 "default_steps": 3500,
                 "ab": "ab6_bf16_3000", "ab_weights": "ema", "ab_base_weights": "ema"}
more_seeds("cand7", "cand7", ["--set", "lr_final_fraction=0.25", "--set", "mixed_precision=bf16", "--max-steps",
                              "3500", *_keep(500)], "the seventh round's candidate (3500 steps, cosine to a quarter)")
ROWS["cand7_s1"]["default_steps"] = ROWS["cand7_s2"]["default_steps"] = 3500

# lr_final_fraction became automatic (a quarter for a flow teacher): the rows above ran their cosine down to 0
_pin_setting("lr_final_fraction", "0")

# the 3500-step candidate's wall time was 606.7 s on this round's (slower) machine, over the 10 minutes: the same
# recipe for 3300 steps, three seeds, all automatic settings as they resolve now (lr_final_fraction 0.25)
ROWS["def3300"] = {"headline": True, "args": ["--set", "mixed_precision=bf16", "--max-steps", "3300", *_keep(550)],
                   "what": "the seventh round's defaults at 3300 steps (rows joined, cosine to a quarter)",
                   "default_steps": 3300, "ab": "ab6_bf16_3000", "ab_weights": "ema", "ab_base_weights": "ema"}
more_seeds("def3300", "def3300", ["--set", "mixed_precision=bf16", "--max-steps", "3300", *_keep(550)],
           "the seventh round's defaults at 3300 steps")
ROWS["def3300_s1"]["default_steps"] = ROWS["def3300_s2"]["default_steps"] = 3300


# pool_precision became automatic (bf16 when the run trains in bf16): the rows above solved their pool in fp32
_pin_setting("pool_precision", "no")

# eighth round: the pool solved in bf16 (about half its time) pays for 200 more steps; the 3500-step candidate of
# the seventh round (cand7, cand7_s1, cand7_s2: the same recipe with an fp32 pool) is the A/B, seed for seed
_DEF3500 = ["--set", "mixed_precision=bf16", "--max-steps", "3500", *_keep(500)]
ROWS["def3500"] = {"headline": True, "args": list(_DEF3500),
                   "what": "the eighth round's defaults: 3500 steps, the pool in bf16 (else the seventh round's)",
                   "default_steps": 3500, "ab": "cand7", "ab_weights": "ema", "ab_base_weights": "ema"}
more_seeds("def3500", "def3500", list(_DEF3500), "the eighth round's defaults (3500 steps, the pool in bf16)")
for _seed in (1, 2):
    ROWS[f"def3500_s{_seed}"].update(default_steps=3500, ab=f"cand7_s{_seed}", ab_weights="ema", ab_base_weights="ema")
# the export EMA's profile (it is also the long jumps' target): the warm-up's offset o weighs step j about as
# j ** (o - 2), so 5 averages over more of the run than the default 10, and 20 over less
ROWS.update({
    f"ab8_ema{o}": {"args": [*_DEF3500, "--set", f"ema_warmup_offset={o}"],
                    "what": f"the EMA warm-up's offset {o} (default 10): a {'longer' if o < 10 else 'shorter'} average",
                    "default_steps": 3500, "ab": "def3500", "ab_weights": "ema", "ab_base_weights": "ema"}
    for o in (5, 20)})
# the shorter average was lower at 1 and 2 steps on seed 0 (and at 1 step at every checkpoint from step 1000): seeds
# 1 and 2, each against def3500's own seed
more_seeds("ab8_ema20", "ema20", [*_DEF3500, "--set", "ema_warmup_offset=20"],
           "the EMA warm-up's offset 20 (a shorter average)")
for _seed in (1, 2):
    ROWS[f"ema20_s{_seed}"].update(default_steps=3500, ab=f"def3500_s{_seed}", ab_weights="ema", ab_base_weights="ema")


# ema_warmup_offset became automatic (20 for a flow teacher): the rows above ran with 10
_pin_setting("ema_warmup_offset", "10")

# tenth round: the default recipe (every automatic setting as it resolves now) over the 60-minute goal's budget,
# and the same with a pool four times larger: is the 1-step floor the 2048 stored trajectories the 1-step rows
# revisit (about 30 times each over 15,000 steps), or the method? (benchmarks/pool_overfit.py measures the
# 1-step error on the pool's own noises against fresh ones, per checkpoint)
_LONG15K = ["--max-steps", "15000", *_keep(1500)]
ROWS["long15k_def"] = {"headline": True, "args": list(_LONG15K),
                       "what": "the tenth round's defaults (bf16 on a machine with AVX512-BF16, 2048-sample pool) "
                               "over 15,000 steps"}
ROWS["long15k_pool8k"] = {"headline": True, "args": ["--set", "pool_size=8192", *_LONG15K],
                          "what": "the same with an 8192-sample pool (each stored trajectory revisited a quarter as "
                                  "often)", "ab": "long15k_def", "ab_weights": "ema", "ab_base_weights": "ema"}
# the default run at its own budget with the 8192-sample pool, three seeds, each against the eighth round's rows of
# the same recipe and seed (ab8_ema20, ema20_s1, ema20_s2: the defaults since then, scored on that round's machine);
# def10 adopts the tenth round's timed default run (two threads, `ttfm-distill run` as it is) as a same-machine
# check of seed 0
_DEF10 = ["--max-steps", "3500", *_keep(500)]
ROWS["def10"] = {"args": ["--max-steps", "3500"], "what": "`ttfm-distill run` as it is, timed on the tenth round's "
                 "machine (two threads; its last two checkpoints kept)", "default_steps": 3500, "ab": "ab8_ema20",
                 "ab_weights": "ema", "ab_base_weights": "ema"}
ROWS["def10_pool8k"] = {"args": ["--set", "pool_size=8192", *_DEF10],
                        "what": "the defaults with an 8192-sample pool (about 60 s more for the pool here)",
                        "default_steps": 3500, "ab": "ab8_ema20", "ab_weights": "ema", "ab_base_weights": "ema"}
more_seeds("def10_pool8k", "def10_pool8k", ["--set", "pool_size=8192", *_DEF10],
           "the defaults with an 8192-sample pool")
# the same-machine controls of seeds 1 and 2: the defaults as they are, one thread
ROWS.update({f"def10_s{_seed}": {"args": ["--seed", str(_seed), *_DEF10], "default_steps": 3500,
                                 "what": f"seed {_seed}: the defaults as they are, on the tenth round's machine"}
             for _seed in (1, 2)})
for _seed in (1, 2):
    ROWS[f"def10_pool8k_s{_seed}"].update(default_steps=3500, ab=f"def10_s{_seed}", ab_weights="ema",
                                          ab_base_weights="ema")


def _pin_tuned_recipe(args: list[str], ema_offset: float) -> list[str]:
    """The flow teacher's automatic values changed in the eleventh round (the zoo's DiT teacher: docs/results.md):
    a row of the eighth round on left its rows, long jumps, lr, cosine end and EMA offset to the then automatic
    values, now examples/embedded-tuned.toml's (the EMA offset 10 until the eighth round adopted 20); pinned so
    the row runs as it ran. Rows before the eighth round ran other automatic values of their own and are not
    pinned: their run folders' config.json hold what they ran with."""
    from ttfm_distill.config import load_config_file

    tuned = load_config_file(REPO / "examples" / "embedded-tuned.toml")  # the recipe's one copy
    pins = [] if "--lr" in args else ["--lr", f"{tuned['lr']:g}"]
    for key, value in (("lr_final_fraction", tuned["lr_final_fraction"]), ("ema_warmup_offset", ema_offset),
                       ("trajectory_fraction", tuned["trajectory_fraction"])):
        if not any(a.startswith(f"{key}=") for a in args):
            pins += ["--set", f"{key}={value}"]
    for key, value in tuned["loss_options"].items():
        if not any(a.startswith(f"{key}=") for a in args):
            pins += ["-L", f"{key}={value}"]
    return [*args, *pins]


_names = list(ROWS)
for _name in _names[_names.index("def3500"):]:
    ROWS[_name]["args"] = _pin_tuned_recipe(ROWS[_name]["args"], 20.0 if _names.index(_name) >= _names.index(
        "long15k_def") else 10.0)


def row_args(name: str, runs_dir: Path | None = None) -> list[str]:
    """The row's CLI arguments; an lr of ``SWEEP`` becomes the one its run used, or the sweep's best so far."""
    args = list(ROWS[name]["args"])
    if "SWEEP" in args:
        cfg = run_config(runs_dir / name) if runs_dir is not None else None
        if cfg is not None:
            lr = cfg["lr"]
        else:
            lr = sweeps(load_points()).get(ROWS[name]["lr_from_sweep"], {}).get("best_lr")
            if lr is None:
                raise SystemExit(f"{name}: its lr comes from the {ROWS[name]['lr_from_sweep']} sweep, which has no "
                                 "scored runs yet; train and score the sweep rows first")
        args[args.index("SWEEP")] = str(lr)
    return args


def cli_command(name: str, runs_dir: Path) -> list[str]:
    teacher = ["--teacher", TEACHER] if other_teacher() else []
    return [sys.executable, "-m", "ttfm_distill", "run", "--output", str(runs_dir / name), *teacher,
            *row_args(name, runs_dir), "-q"]


def one_thread_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# ------------------------------------------------------------------ runs --
def run_config(run: Path) -> dict | None:
    try:
        return json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None


def finished(run: Path) -> bool:
    """The run wrote its metrics, or at least its last checkpoint (training is over; only the export may be missing)."""
    if (run / "metrics.json").exists() and (run / "student" / "ttfm_config.json").exists():
        return True
    return trained(run)


def trained(run: Path) -> bool:
    from ttfm_distill.runstate import RunState

    cfg = run_config(run)
    if cfg is None:
        return False
    # a run with a time budget trains the count it fitted (its run state)
    total = RunState.read(run, cfg).get("fitted_steps") or cfg["max_steps"]
    return any(step == int(total) for step, _ in checkpoints(run))


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    root = run / "checkpoints"
    if not root.exists():
        return []
    out = []
    for p in sorted(root.glob("step-*")):
        if (p / "trainer_state.json").exists() and (p / "student.safetensors").exists():
            out.append((int(p.name.split("-")[1]), p))
    return out


def training_start(run: Path) -> float | None:
    """The pool file's mtime: written just before the first training step (real data: config.json's, written
    once the data is ready)."""
    pools = sorted((run / "cache").glob("pool-*.safetensors"))
    # the oldest: a run resumed by newer code may have written a second, re-keyed pool file on the way
    if pools:
        return min(p.stat().st_mtime for p in pools)
    config = run / "config.json"
    return config.stat().st_mtime if config.exists() else None


def busy_elsewhere(run: Path, seconds: float = 180.0) -> bool:
    """An unfinished run whose folder changed recently: another process is probably training it."""
    if finished(run) or not run.exists():
        return False
    newest = max((p.stat().st_mtime for p in [run, *run.rglob("*")]), default=0.0)
    return time.time() - newest < seconds


def seed_pool(name: str, cmd: list[str], runs_dir: Path) -> None:
    """A new row folder gets the data-free pool another row already built (the same cache file name: same
    teacher weights, size, solver, steps, kept states and seed), with the config the CLI resolves
    (``--dry-run``), as a run interrupted after its pool would leave it; the CLI then resumes it and finds the
    pool in its cache."""
    import shutil

    from ttfm_distill.config import RunConfig
    from ttfm_distill.data.pool import pool_file_name
    from ttfm_distill.runstate import RunState

    run = runs_dir / name
    if run.exists():
        return
    dry = subprocess.run([*cmd[:-1], "--dry-run"], env=one_thread_env(), cwd=str(REPO), capture_output=True, text=True)
    if dry.returncode != 0:
        return
    cfg = json.loads(dry.stdout)
    if cfg["data"] != "teacher":
        return
    for donor in sorted(runs_dir.glob("*/config.json")):
        saved = run_config(donor.parent) or {}
        key = RunState.read(donor.parent, saved).get("teacher_fingerprint") if saved else None
        if saved.get("teacher") != cfg["teacher"] or not key:
            continue
        pool = pool_file_name(RunConfig.from_dict(cfg).resolve_automatic(PREDICTION), fingerprint=key)
        if (donor.parent / "cache" / pool).exists():
            (run / "cache").mkdir(parents=True)
            (run / "config.json").write_text(json.dumps(cfg, indent=2))
            shutil.copy(donor.parent / "cache" / pool, run / "cache" / pool)  # its mtime marks the start of training
            print(f"{name}: pool copied from {donor.parent / 'cache' / pool}", flush=True)
            return


def train(names: list[str], runs_dir: Path) -> None:
    for name in names:
        run = runs_dir / name
        if finished(run):
            print(f"{name}: finished already ({run})", flush=True)
            continue
        if busy_elsewhere(run):
            print(f"{name}: {run} is being written by another process; not touching it", flush=True)
            continue
        cmd = cli_command(name, runs_dir)
        seed_pool(name, cmd, runs_dir)
        print(f"{name}: {' '.join(cmd)}", flush=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        rc = subprocess.call(cmd, env=one_thread_env(), cwd=str(REPO))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        record = {"command": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ttfm-distill run --output RUNS/" + name + " "
                  + " ".join(cmd[6:]), "returncode": rc,
                  "cpu_seconds": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
                  "wall_seconds": round(time.time() - t0, 1), "threads": 1,
                  "note": "the whole CLI process: pool, training, export and the run's own metrics"}
        if run.exists():
            old = {}
            try:
                old = json.loads((runs_dir / f"{name}.cpu.json").read_text())
            except (OSError, ValueError):
                pass
            if old:  # a resumed row: add up the pieces
                record["cpu_seconds"] = round(record["cpu_seconds"] + old.get("cpu_seconds", 0), 1)
                record["wall_seconds"] = round(record["wall_seconds"] + old.get("wall_seconds", 0), 1)
                record["pieces"] = old.get("pieces", 1) + 1
            (runs_dir / f"{name}.cpu.json").write_text(json.dumps(record, indent=1))
        print(f"{name}: exit {rc}, {record['cpu_seconds']} CPU s", flush=True)


# --------------------------------------------------------------- scoring --
class Scorer:
    """One :class:`Evaluation` (shared noises, RK4 reference, classifier) for every point."""

    def __init__(self, args, runs_dir: Path):
        from ttfm_distill.evaluate import Evaluation
        from ttfm_distill.teachers.loading import load_teacher

        self.args, self.runs_dir = args, runs_dir
        self.teacher = load_teacher(TEACHER)
        cache = runs_dir / "_eval-cache"
        cache.mkdir(parents=True, exist_ok=True)
        tag = f"{args.teacher}-" if other_teacher() else ""  # one reference per teacher
        ref_path = cache / f"{tag}reference-n{args.num}-seed{args.seed}-rk4-{args.reference_steps}.pt"
        reference = torch.load(ref_path, weights_only=True) if ref_path.exists() else None
        t0 = time.perf_counter()
        self.ev = Evaluation(self.teacher, num=args.num, seed=args.seed, reference_steps=args.reference_steps,
                             batch_size=256, reference=reference)
        if reference is None:
            torch.save(self.ev.reference, ref_path)
            print(f"reference (RK4 {args.reference_steps} steps, {args.num} noises) in "
                  f"{time.perf_counter() - t0:.0f}s -> {ref_path}", flush=True)
        self.score_teacher()

    def score_teacher(self) -> None:
        from ttfm_distill.evaluate import teacher_euler_sampler, teacher_heun_sampler
        from ttfm_distill.fileio import write_json

        path = RESULTS / "convergence" / "teacher.json"
        if path.exists() and json.loads(path.read_text()).get("settings", {}).get("num") == self.args.num:
            return
        t0 = time.perf_counter()
        report = {"teacher": TEACHER,
                  "results": {"teacher_euler": self.ev.run(teacher_euler_sampler(self.teacher), EULER_STEPS),
                              "teacher_heun": self.ev.run(teacher_heun_sampler(self.teacher), HEUN_STEPS)},
                  "floors": self.ev.floors(), "settings": self.ev.settings(), "not_computed": self.ev.not_computed,
                  **self.ev.info}
        report["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(path, report)
        print(f"teacher scored in {report['seconds']}s -> {path}", flush=True)

    def student(self, cfg: dict, ckpt: Path, weights: str):
        from safetensors.torch import load_file

        from ttfm_distill.config import RunConfig
        from ttfm_distill.factory import build_student

        student = build_student(self.teacher, RunConfig.from_dict(cfg))
        student.load_state_dict(load_file(ckpt / ("ema.safetensors" if weights == "ema" else "student.safetensors")),
                                strict=True)
        return student.eval()

    def score_point(self, name: str, run: Path, step: int, ckpt: Path, weights: str) -> bool:
        from ttfm_distill.evaluate import student_flow_map_sampler
        from ttfm_distill.fileio import write_json

        path = POINTS / name / f"step-{step:08d}-{weights}.json"
        if path.exists():
            return False
        cfg = run_config(run)
        start = training_start(run)
        t0 = time.perf_counter()
        results = self.ev.run(student_flow_map_sampler(self.student(cfg, ckpt, weights), 1.0), STUDENT_STEPS)
        point = {"row": name, "step": step, "weights": weights, "samples": step * int(cfg["batch_size"]),
                 "train_seconds": None if start is None else round(ckpt.stat().st_mtime - start, 1),
                 "results": results, "score_seconds": round(time.perf_counter() - t0, 1),
                 "checkpoint": str(ckpt), "settings": self.ev.settings()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, point)
        fd = {n: round(r["fd_test_images"], 2) for n, r in results.items() if r and "fd_test_images" in r}
        print(f"{name} step {step} {weights}: FD {fd} ({point['score_seconds']}s)", flush=True)
        return True

    def pass_over(self, names: list[str]) -> bool:
        """Score every new point of ``names`` once; whether anything was scored."""
        did = False
        for name in names:
            run = self.runs_dir / name
            cfg = run_config(run)
            if cfg is None:
                continue
            for step, ckpt in checkpoints(run):
                for weights in self.args.weights.split(","):
                    if weights == "ema" and not (ckpt / "ema.safetensors").exists():
                        continue
                    last = step == int(cfg["max_steps"])
                    if self.args.only_final and not last:
                        continue
                    if self.args.stride and step % self.args.stride and not last:
                        continue
                    did |= self.score_point(name, run, step, ckpt, weights)
        return did


def score(args, names: list[str], runs_dir: Path) -> None:
    torch.set_num_threads(1)
    scorer = Scorer(args, runs_dir)
    while True:
        did = scorer.pass_over(names)
        if not args.follow:
            return
        if not did and all(finished(runs_dir / n) for n in names if (runs_dir / n).exists()) \
                and all((runs_dir / n).exists() for n in names):
            if not scorer.pass_over(names):
                return
        if not did:
            time.sleep(20)


# ---------------------------------------------------------------- report --
def load_points() -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for f in sorted(POINTS.glob("*/*.json")):
        p = json.loads(f.read_text())
        rows.setdefault(p["row"], []).append(p)
    return rows


def fd(point: dict, n, key: str = "fd_test_images"):
    r = point["results"].get(str(n))
    return None if r is None else r.get(key)


def series(points: list[dict], weights: str) -> list[dict]:
    return sorted((p for p in points if p["weights"] == weights), key=lambda p: p["step"])


def goals(points: dict, teacher: dict) -> dict:
    """The issue's goals, on FD to the test images, per row and weights."""
    e = {n: teacher["results"]["teacher_euler"][str(n)]["fd_test_images"] for n in EULER_STEPS}
    out = {"teacher_euler_fd": e,
           "rules": {"long": "within 3600 s of training: FD1 <= 1.5 x Euler50, FD2 <= 1.1 x Euler50, FD4 <= Euler50",
                     "default": "at the default run's budget (2400 fp32 steps x 32 = 76,800 samples, or 3000 bf16 "
                                "steps, or 3500 with the trajectory rows joined (rows with default_steps): the same time; the last "
                                "point at or below it): FD2 <= Euler16, FD1 <= Euler8",
                     "time_to_quality": "first point with FD2 <= Euler16 (training seconds; checkpoint resolution)"}}
    for name, pts in points.items():
        for weights in ("raw", "ema"):
            s = series(pts, weights)
            if not s:
                continue

            def last_within(limit):
                ok = [p for p in s if p["train_seconds"] is not None and p["train_seconds"] <= limit]
                return ok[-1] if ok else None

            entry = {}
            p = last_within(3600)
            if p:
                entry["long"] = {"step": p["step"], "train_seconds": p["train_seconds"],
                                 "fd": {n: fd(p, n) for n in (1, 2, 4)},
                                 "ratio_to_euler50": {n: round(fd(p, n) / e[50], 3) for n in (1, 2, 4)},
                                 "met": fd(p, 1) <= 1.5 * e[50] and fd(p, 2) <= 1.1 * e[50] and fd(p, 4) <= e[50]}
            spec = ROWS.get(name, {})
            budget = (spec["default_steps"] * 32 if "default_steps" in spec else
                      DEFAULT_SAMPLES_BF16 if "mixed_precision=bf16" in spec.get("args", []) else DEFAULT_SAMPLES)
            ok = [p for p in s if p["samples"] <= budget]
            p = ok[-1] if ok else None
            if p:
                entry["default"] = {"step": p["step"], "train_seconds": p["train_seconds"],
                                    "fd": {n: fd(p, n) for n in (1, 2)},
                                    "met": fd(p, 2) <= e[16] and fd(p, 1) <= e[8]}
            hit = next((p for p in s if fd(p, 2) is not None and fd(p, 2) <= e[16]), None)
            entry["time_to_quality"] = ({"step": hit["step"], "train_seconds": hit["train_seconds"],
                                         "samples": hit["samples"], "fd_2": fd(hit, 2)} if hit else
                                        f"not reached within its budget (last point: step {s[-1]['step']}, "
                                        f"{s[-1]['train_seconds']} s, FD2 {fd(s[-1], 2):.2f})")
            out[f"{name}/{weights}"] = entry
    return out


def sweeps(points: dict) -> dict:
    out = {}
    for name, spec in ROWS.items():
        group = spec.get("sweep")
        if not group:
            continue
        final = [p for p in points.get(name, []) if p["weights"] == "raw"]
        final = max(final, key=lambda p: p["step"]) if final else None
        entry = out.setdefault(group, {"rule": "the lr with the lowest mean FD (test images) over 1/2/4 steps "
                                               "at the end of the sweep budget", "runs": {}})
        entry["runs"][str(spec["lr"])] = ({"step": final["step"], "fd": {n: fd(final, n) for n in STUDENT_STEPS},
                                           "flow_map_error": {n: fd(final, n, "flow_map_error") for n in STUDENT_STEPS}}
                                          if final else "not run")
    for group, entry in out.items():
        done = {lr: r for lr, r in entry["runs"].items() if isinstance(r, dict) and None not in r["fd"].values()}
        if done:
            entry["best_lr"] = float(min(done, key=lambda lr: sum(done[lr]["fd"][n] for n in (1, 2, 4))))
        used = [n for n, s in ROWS.items() if s.get("lr_from_sweep") == group]
        entry["used_by"] = used
    return out


def baseline_raw(points: dict, base: str, weights: str = "raw") -> dict[int, dict]:
    """Points of ``base`` by samples (its raw weights, or ``weights``); raw points add those of rows whose raw
    weights are the same run's (``same_raw_as``: only the export EMA differs, so training is identical)."""
    out = {p["samples"]: p for p in series(points.get(base, []), weights)}
    for name, spec in ROWS.items():
        if weights == "raw" and spec.get("same_raw_as") == base:
            for p in series(points.get(name, []), "raw"):
                out.setdefault(p["samples"], p)
    return out


def determinism(points: dict) -> dict:
    """Rows that should repeat ``base``'s raw weights: their FD at a shared checkpoint, side by side."""
    out = {}
    for name, spec in ROWS.items():
        base = spec.get("same_raw_as")
        if not base:
            continue
        theirs = {p["samples"]: p for p in series(points.get(base, []), "raw")}
        for p in series(points.get(name, []), "raw"):
            if p["samples"] in theirs:
                out[f"{name} vs {base} at step {p['step']}"] = {
                    "fd": [fd(p, 2), fd(theirs[p["samples"]], 2)],
                    "equal": all(fd(p, n) == fd(theirs[p["samples"]], n) for n in STUDENT_STEPS)}
    return out


def _mean_late(pts: list[dict], budget_samples: int) -> dict:
    """Mean FD over the points in the second half of the budget (the raw iterate is noisy at a constant lr)."""
    late = [p for p in pts if p["samples"] >= budget_samples / 2 and p["samples"] <= budget_samples]
    if not late:
        return {}
    return {"steps": [p["step"] for p in late],
            "fd": {str(n): round(sum(fd(p, n) for p in late) / len(late), 2) for n in STUDENT_STEPS}}


def ab_table(points: dict) -> dict:
    """Each A/B row's last point against its baseline's raw point at the same samples (same seed), and the
    mean over the second half of the budget for both."""
    out = {}
    for name, spec in ROWS.items():
        base = spec.get("ab")
        mine = series(points.get(name, []), spec.get("ab_weights", "raw"))
        if not base or not mine:
            continue
        last = mine[-1]
        pool = baseline_raw(points, base, spec.get("ab_base_weights", "raw"))
        same = [pool[last["samples"]]] if last["samples"] in pool else []
        entry = {"what": spec["what"], "weights": spec.get("ab_weights", "raw"), "step": last["step"],
                 "samples": last["samples"],
                 "train_seconds": last["train_seconds"],
                 "fd": {str(n): fd(last, n) for n in STUDENT_STEPS},
                 "flow_map_error": {str(n): fd(last, n, "flow_map_error") for n in STUDENT_STEPS}}
        if same:
            b = same[0]
            entry["baseline"] = {"row": base, "weights": spec.get("ab_base_weights", "raw"), "step": b["step"],
                                 "train_seconds": b["train_seconds"],
                                 "fd": {str(n): fd(b, n) for n in STUDENT_STEPS},
                                 "flow_map_error": {str(n): fd(b, n, "flow_map_error") for n in STUDENT_STEPS}}
            entry["fd_ratio_to_baseline"] = {str(n): round(fd(last, n) / fd(b, n), 3) for n in STUDENT_STEPS}
        entry["late_mean"] = _mean_late(mine, last["samples"])
        entry["baseline_late_mean"] = _mean_late(sorted(pool.values(), key=lambda p: p["samples"]), last["samples"])
        out[name] = entry
    return out


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for k, i in enumerate(order):
        ranks[i] = float(k)
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two lists (no ties expected: FD and flow-map errors are continuous)."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def measure_agreement(points: dict, below: float = 60.0) -> dict:
    """How well the cheaper measures rank students like FD to the test images: Spearman's rho over every scored
    point (all rows, weights and steps) whose FD at that step count is below ``below`` (the students worth
    ranking), for the flow-map error against RK4 and for FD to the teacher's fine solve."""
    out = {"rule": f"Spearman rank correlation with fd_test_images over all points with FD < {below:g}"}
    every = [p for pts in points.values() for p in pts]
    for n in STUDENT_STEPS:
        sel = [p for p in every if fd(p, n) is not None and fd(p, n) < below]
        if len(sel) < 3:
            continue
        ref = [fd(p, n) for p in sel]
        out[str(n)] = {"points": len(sel), **{key: round(spearman([fd(p, n, key) for p in sel], ref), 3)
                                              for key in ("flow_map_error", "fd_teacher_fine")}}
    return out


def seed_table(points: dict, weights: str = "ema") -> dict:
    """Rows run over several seeds (``"seeds": tag``): FD per seed at every step all of them have scored, with
    the median and the mean over the seeds, so an A/B reads against the seed spread, not one draw."""
    out = {}
    for tag in dict.fromkeys(s["seeds"] for s in ROWS.values() if s.get("seeds")):
        names = [n for n, s in ROWS.items() if s.get("seeds") == tag]
        by_row = {n: {p["step"]: p for p in series(points.get(n, []), weights)} for n in names}
        done = [n for n in names if by_row[n]]
        if not done:
            continue
        steps = sorted(set.intersection(*(set(by_row[n]) for n in done)))
        entry = {"weights": weights, "rows": done, "steps": {}}
        for step in steps:
            per = {n: {str(k): fd(by_row[n][step], k) for k in STUDENT_STEPS} for n in done}
            stats = {}
            for k in map(str, STUDENT_STEPS):
                vals = sorted(per[n][k] for n in done)
                mid = len(vals) // 2
                median = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
                stats[k] = {"median": round(median, 2), "mean": round(sum(vals) / len(vals), 2),
                            "min": round(vals[0], 2), "max": round(vals[-1], 2)}
            entry["steps"][str(step)] = {"per_seed": per, "over_seeds": stats,
                                         "train_seconds": {n: by_row[n][step]["train_seconds"] for n in done}}
        out[tag] = entry
    return out


def cpu_seconds(runs_dir: Path, name: str, metrics: dict | None) -> dict | None:
    """The CPU seconds ``train`` measured, or for a row trained by hand its training wall seconds (one thread)."""
    try:
        return json.loads((runs_dir / f"{name}.cpu.json").read_text())
    except (OSError, ValueError):
        pass
    if metrics is not None:
        seconds = metrics["training"]["seconds"]
    else:
        ckpts = checkpoints(runs_dir / name)
        start = training_start(runs_dir / name)
        if not ckpts or start is None:
            return None
        seconds = round(ckpts[-1][1].stat().st_mtime - start, 1)
    return {"cpu_seconds": seconds, "threads": 1,
            "note": "not measured by train (the row was started by hand): its training wall seconds on one thread, "
                    "an upper bound of its training CPU seconds; pool, export and metrics not included"}


def report(args, runs_dir: Path) -> None:
    from ttfm_distill.fileio import write_json

    teacher = json.loads((RESULTS / "convergence" / "teacher.json").read_text())
    points = load_points()
    # a row whose run folder is not on this machine (an earlier session's, its points committed) keeps what the
    # committed report said of its run: status, budget, seconds and CPU seconds
    try:
        before = json.loads((RESULTS / "convergence.json").read_text()).get("rows", {})
    except (OSError, ValueError):
        before = {}
    rows = {}
    for name, spec in ROWS.items():
        run = runs_dir / name
        pts = points.get(name, [])
        cfg = run_config(run)
        try:
            shown = row_args(name, runs_dir)
        except SystemExit:
            shown = spec["args"]
        flag = f"--teacher {Path(TEACHER).relative_to(REPO)} " if other_teacher() else ""
        entry = {"what": spec["what"], "command": "ttfm-distill run --output RUNS/" + name + " " + flag
                 + " ".join(shown) + " -q (OMP_NUM_THREADS=1)"}
        if not pts:
            entry["status"] = ("not run" if cfg is None else
                               "trained, not scored" if finished(run) else "training, not scored yet")
            rows[name] = entry
            continue
        metrics = None
        try:
            metrics = json.loads((run / "metrics.json").read_text())
        except (OSError, ValueError):
            pass
        entry.update({
            "status": ("finished" if (run / "metrics.json").exists() else
                       "trained (last checkpoint written; no export or metrics.json)" if trained(run) else
                       "partial (training or scoring still going)"),
            "budget_steps": None if cfg is None else cfg["max_steps"],
            "batch_size": None if cfg is None else cfg["batch_size"],
            "train_seconds_total": None if metrics is None else metrics["training"]["seconds"],
            "cpu": cpu_seconds(runs_dir, name, metrics),
            "points": {w: [{"step": p["step"], "samples": p["samples"], "train_seconds": p["train_seconds"],
                            **{key: {str(n): fd(p, n, key) for n in STUDENT_STEPS}
                               for key in ("fd_test_images", "fd_teacher_fine", "flow_map_error")}}
                           for p in series(pts, w)] for w in ("raw", "ema") if series(pts, w)},
        })
        if cfg is None and "points" in before.get(name, {}):
            entry.update({k: before[name].get(k) for k in ("status", "budget_steps", "batch_size",
                                                            "train_seconds_total", "cpu")})
        rows[name] = entry
    out = {"teacher": teacher, "rows": rows, "sweeps": sweeps(points), "ab": ab_table(points),
           "seeds": seed_table(points),
           "measures": measure_agreement(points),
           "determinism": determinism(points),
           "goals": goals(points, teacher),
           "not_run": [n for n, r in rows.items() if r.get("status") == "not run"],
           "settings": {"num": teacher["settings"]["num"], "seed": teacher["settings"]["seed"],
                        "reference": teacher["settings"]["reference"], "student_steps": list(STUDENT_STEPS),
                        "threads": "1 per process; at most two processes on the 2-core machine",
                        "train_seconds": "checkpoint folder mtime minus the pool file's mtime (wall, one thread)",
                        "command": "python benchmarks/convergence.py report --runs-dir " + str(args.runs_dir)}}
    write_json(RESULTS / "convergence.json", out)
    print_table(out)
    plot(out)


def print_table(out: dict) -> None:
    e = out["goals"]["teacher_euler_fd"]
    print("\nteacher Euler FD (test images): " + ", ".join(f"{n}: {v:.2f}" for n, v in e.items()))
    fl = out["teacher"]["floors"]
    print("floors: " + ", ".join(f"{k} {v.get('fd_test_images', float('nan')):.2f}" for k, v in fl.items()
                                 if isinstance(v, dict) and "fd_test_images" in v))
    print("\n| row | weights | step | samples | train s | FD 1 | FD 2 | FD 4 | FD 8 | FME 1 | FME 2 | FME 4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in out["rows"].items():
        if "points" not in r:
            print(f"| {name} | {r['status']} |" + " |" * 10)
            continue
        for w, pts in r["points"].items():
            best = min(pts, key=lambda p: p["fd_test_images"]["2"] if p["fd_test_images"]["2"] is not None else 1e9)
            for tag, p in (("last", pts[-1]), ("best FD2", best)):
                if tag == "best FD2" and p is pts[-1]:
                    continue
                f, m = p["fd_test_images"], p["flow_map_error"]
                print(f"| {name}{'' if tag == 'last' else ' (best FD2)'} | {w} | {p['step']} | {p['samples']} | "
                      f"{p['train_seconds']} | " + " | ".join(f"{f[n]:.2f}" for n in ("1", "2", "4", "8")) + " | "
                      + " | ".join(f"{m[n]:.4f}" for n in ("1", "2", "4")) + " |")
    for name, r in out["rows"].items():  # the whole curve of the long rows
        if "points" not in r or ROWS[name].get("sweep") or ROWS[name].get("ab"):
            continue
        print(f"\n{name}: FD to test images at 1/2/4/8 steps (raw | ema), flow-map error at 1 step (raw | ema)\n")
        print("| step | samples | train s | raw 1 | raw 2 | raw 4 | raw 8 | ema 1 | ema 2 | ema 4 | ema 8 | FME1 raw | FME1 ema |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        by_step = {}
        for w, pts in r["points"].items():
            for p in pts:
                by_step.setdefault(p["step"], {})[w] = p
        for step, ws in sorted(by_step.items()):
            any_p = next(iter(ws.values()))
            cells = []
            for w in ("raw", "ema"):
                f = ws[w]["fd_test_images"] if w in ws else {}
                cells += [f"{f[n]:.2f}" if f.get(n) is not None else "-" for n in ("1", "2", "4", "8")]
            fme = [f"{ws[w]['flow_map_error']['1']:.4f}" if w in ws else "-" for w in ("raw", "ema")]
            print(f"| {step} | {any_p['samples']} | {any_p['train_seconds']} | " + " | ".join(cells + fme) + " |")
    if out["ab"]:
        print("\nA/Bs at the same samples and seed: FD to test images at 1/2/4/8 steps (baseline in brackets)\n")
        print("| A/B | weights | step | FD 1 | FD 2 | FD 4 | FD 8 | late mean FD 1/2/4/8 (baseline) | train s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, a in out["ab"].items():
            b = a.get("baseline", {}).get("fd", {})
            cells = [f"{a['fd'][n]:.2f}" + (f" ({b[n]:.2f})" if n in b else "") for n in ("1", "2", "4", "8")]
            lm, bm = a["late_mean"].get("fd", {}), a["baseline_late_mean"].get("fd", {})
            late = "/".join(f"{lm[n]:.1f}" for n in ("1", "2", "4", "8")) + " (" + "/".join(
                f"{bm[n]:.1f}" for n in ("1", "2", "4", "8")) + ")" if lm and bm else "-"
            print(f"| {name}: {a['what']} | {a['weights']} | {a['step']} | " + " | ".join(cells)
                  + f" | {late} | {a['train_seconds']} |")
    for tag, entry in out.get("seeds", {}).items():
        print(f"\nseeds of '{tag}' ({entry['weights']}; {', '.join(entry['rows'])}): FD to test images 1/2/4/8\n")
        print("| step | " + " | ".join(entry["rows"]) + " | median | mean |")
        print("|---|" + "---|" * (len(entry["rows"]) + 2))
        for step, st in entry["steps"].items():
            cells = ["/".join(f"{st['per_seed'][n][k]:.1f}" for k in ("1", "2", "4", "8")) for n in entry["rows"]]
            for stat in ("median", "mean"):
                cells.append("/".join(f"{st['over_seeds'][k][stat]:.1f}" for k in ("1", "2", "4", "8")))
            print(f"| {step} | " + " | ".join(cells) + " |")
    if out.get("measures"):
        m = out["measures"]
        print(f"\nmeasures ({m['rule']}): " + "; ".join(
            f"{n} step(s), {v['points']} points: flow-map error {v['flow_map_error']:.2f}, FD to the teacher's fine "
            f"solve {v['fd_teacher_fine']:.2f}" for n, v in m.items() if n != "rule"))
    if out.get("determinism"):
        print("\ndeterminism:", json.dumps(out["determinism"]))
    print("\ntime to quality (FD2 <= Euler16 = %.2f):" % e["16"] if "16" in e else "")
    for key, g in out["goals"].items():
        if "/" in key:
            print(f"  {key}: {g['time_to_quality']}")
    cpu = {n: r["cpu"]["cpu_seconds"] for n, r in out["rows"].items() if r.get("cpu")}
    print("CPU seconds per trained row:", cpu)
    print("not run:", out["not_run"])


def plot(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 - matplotlib.ticker below

    from ttfm_distill.plots import save_figure

    e = out["teacher"]["results"]["teacher_euler"]
    scored = [n for n, r in out["rows"].items() if "points" in r and not ROWS[n].get("sweep")]
    # the headline figures: the long rows of each objective and the default recipe; the A/Bs and seed rows
    # get a figure of their own
    headline = [n for n in scored if ROWS[n].get("headline")]
    others = [n for n in scored if not ROWS[n].get("headline")]
    for key, xkey, fname, label, shown in (
            ("fd_test_images", "samples", "convergence.png", "FD to real test images", headline),
            ("fd_test_images", "train_seconds", "convergence-seconds.png", "FD to real test images", headline),
            ("flow_map_error", "samples", "convergence-fme.png", "flow-map error vs RK4", headline),
            ("fd_teacher_fine", "samples", "convergence-fd-teacher.png", "FD to the teacher's fine solve", headline),
            ("fd_test_images", "samples", "convergence-ab.png", "FD to real test images (A/Bs, seeds)", others)):
        if not shown:  # a teacher with headline rows only: no A/B figure
            continue
        fig, axes = plt.subplots(1, len(STUDENT_STEPS), figsize=(4.0 * len(STUDENT_STEPS), 3.6), squeeze=False)
        for ax, n in zip(axes[0], STUDENT_STEPS):
            for i, name in enumerate(shown):
                for w, pts in out["rows"][name]["points"].items():
                    xy = [(p[xkey], p[key][str(n)]) for p in pts if p[xkey] is not None and p[key][str(n)] is not None]
                    if xy:
                        ax.plot(*zip(*xy), marker="o", ms=2.5, lw=1.2, color=f"C{i % 10}",
                                ls="-" if w == "raw" else "--", label=f"{name} ({w})")
            for j, m in enumerate(sorted({n, 8, 16, 50})):
                if str(m) in e and e[str(m)] and e[str(m)].get(key) is not None:
                    ax.axhline(e[str(m)][key], color="k", alpha=0.25 + 0.15 * j, ls=":", lw=1)
                    ax.text(ax.get_xlim()[0] if False else 1.0, e[str(m)][key], f" Euler {m}", fontsize=6,
                            transform=ax.get_yaxis_transform(), ha="right", va="bottom")
            ax.set_xscale("log"), ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: no crowded labels
            ax.set_xlabel("training samples" if xkey == "samples" else "training seconds (1 thread)")
            ax.set_title(f"student, {n} step{'s' if n > 1 else ''}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
        axes[0][0].set_ylabel(label)
        axes[0][-1].legend(fontsize=6, loc="upper right")
        teacher = TEACHER if TEACHER.startswith("builtin:") else Path(TEACHER).name
        save_figure(fig, RESULTS / fname, f"{teacher}: {label} along training "
                     f"({out['settings']['num']} samples, dotted: teacher Euler)", fontsize=9, dpi=100)
    print("wrote", ", ".join(str(RESULTS / f) for f in ("convergence.json", "convergence.png",
                                                          "convergence-seconds.png", "convergence-fme.png",
                                                          "convergence-fd-teacher.png", "convergence-ab.png")))


def main():
    global RESULTS, POINTS, TEACHER, PREDICTION, ROWS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("train", "score", "report", "all"))
    p.add_argument("--rows", default="", help="comma-separated row names (default: every row with a run folder)")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "convergence"),
                   help="where the row folders live (default: runs/convergence, ignored by git)")
    p.add_argument("--num", type=int, default=1024, help="noises (samples per sampler)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-steps", type=int, default=32)
    p.add_argument("--weights", default="raw,ema", help="which weights of each checkpoint: raw, ema or both")
    p.add_argument("--only-final", action="store_true", help="score only each row's last checkpoint")
    p.add_argument("--stride", type=int, default=0, help="score only checkpoints at multiples of this step (and the last)")
    p.add_argument("--follow", action="store_true", help="keep scoring new checkpoints until the rows finish")
    p.add_argument("--results-dir", default=None,
                   help="where results and figures go (default: benchmarks/results, or benchmarks/results/TEACHER for "
                        "a teacher other than fashion16)")
    p.add_argument("--teacher", choices=TEACHERS, default="fashion16",
                   help="whose rows: the embedded flow teacher (default) or the DDPM teacher")
    args = p.parse_args()
    TEACHER, PREDICTION = TEACHERS[args.teacher]
    ROWS = {n: spec for n, spec in ROWS.items() if spec.get("teacher", "fashion16") == args.teacher}
    RESULTS = Path(args.results_dir) if args.results_dir else (
        RESULTS if args.teacher == "fashion16" else RESULTS / f"{args.teacher}-convergence")
    POINTS = RESULTS / "convergence" / "points"
    runs_dir = Path(args.runs_dir)
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; rows: {', '.join(ROWS)}")
    if not names and args.command != "train":
        names = [n for n in ROWS if (runs_dir / n).exists()]
    if args.command in ("train", "all"):
        train(names, runs_dir)
    if args.command in ("score", "all"):
        score(args, names, runs_dir)
    if args.command in ("report", "all"):
        report(args, runs_dir)


if __name__ == "__main__":
    main()
