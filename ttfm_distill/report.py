"""The run report: ``metrics.json`` and ``samples.png`` at the end of a run, from one :class:`Evaluation`.

The student at 1, 2 and 4 jumps and the teacher's Euler sampler at the same NFE are scored from the same
noises with the same measures as ``ttfm-distill eval``: the flow-map error against the teacher's RK4 solve,
and, where they apply, the Frechet distances in the shipped classifier's features (1x16x16 pixel teachers)
and the histogram KL (2-D teachers).  The figure shows the first samples of the same evaluation, beside the
teacher's 50-step Euler from the same noises.
"""

from __future__ import annotations

import torch

from .evaluate import Evaluation, student_flow_map_sampler, teacher_euler_sampler
from .sampling import euler, uniform_time_grid

REPORT_STEPS = (1, 2, 4)
#: the report's noises come from seed + 1, apart from the training draws of (seed, rank, step)
REPORT_SEED_OFFSET = 1
#: samples per row of the image figure
FIGURE_ROWS = 10
#: the measures copied from the evaluation into metrics.json, each as {"student": {N: v}, "teacher_euler": {N: v}}
MEASURES = ("flow_map_error", "fd_test_images", "fd_teacher_fine", "kl", "out_of_range", "coverage", "class_entropy")


def report_samples(cfg, kind: str) -> int:
    """How many noises the run report scores: ``eval_samples``, at least 4096 for 2-D teachers (a histogram)."""
    return int(cfg.eval_samples) if kind == "image" else max(int(cfg.eval_samples), 4096)


def run_report(student, teacher, num: int, seed: int, reference_steps: int, device,
               time_grid: str = "uniform", reference: torch.Tensor | None = None) -> tuple[dict, dict, dict]:
    """``(metrics, figure rows, figure errors)`` for ``student`` against ``teacher``, from ``num`` shared noises;
    both samplers step on ``time_grid`` (sampling.time_grid). ``reference``: the teacher's fine solve of these
    noises, kept by the run's validation (tracking.py), so it is not solved twice."""
    ev = Evaluation(teacher, num=num, seed=seed, reference_steps=reference_steps, batch_size=128, device=device,
                    reference=reference)
    shift = float(teacher.shift)
    samples = {"student": {}, "teacher_euler": {}}
    results = {"student": ev.run(student_flow_map_sampler(student, shift, grid=time_grid, io=teacher.io),
                                 REPORT_STEPS, samples["student"]),
               "teacher_euler": ev.run(teacher_euler_sampler(teacher, time_grid), REPORT_STEPS, samples["teacher_euler"])}
    metrics = {}
    for measure in MEASURES:
        table = {who: {str(n): row[measure] for n, row in ((n, rows[str(n)]) for n in REPORT_STEPS)
                       if row is not None and measure in row}
                 for who, rows in results.items()}
        if any(table.values()):
            metrics[measure] = table
    if ev.kl_teacher is not None:  # the teacher's fine solve is the floor
        from .metrics import histogram_kl

        metrics.setdefault("kl", {})["reference"] = histogram_kl(ev.reference, ev.kl_teacher)
    for who, rows in results.items():  # a sampler whose samples blew up is reported, not scored
        for n, row in rows.items():
            if row is not None and "nonfinite_samples" in row:
                metrics.setdefault("nonfinite_samples", {}).setdefault(who, {})[n] = row["nonfinite_samples"]
    if ev.not_computed:
        metrics["not_computed"] = dict(ev.not_computed)
    rows, errors = _figure_rows(ev, samples, metrics, teacher, device)
    return metrics, rows, errors


def _figure_rows(ev: Evaluation, samples: dict, metrics: dict, teacher, device) -> tuple[dict, dict]:
    """The sample grid's rows (first samples of each sampler) and their flow-map errors."""
    k = FIGURE_ROWS if teacher.kind == "image" else None
    pick = (lambda x: x[:k]) if k else (lambda x: x)
    fme = metrics["flow_map_error"]
    rows, errors = {}, {}
    for who, label in (("student", "student"), ("teacher_euler", "teacher Euler")):
        for n in REPORT_STEPS:
            rows[f"{label} {n}"] = pick(samples[who][n])
            errors[f"{label} {n}"] = fme[who].get(str(n), float("nan"))
    x0 = pick(ev.x0).to(device)
    cond = {key: pick(v).to(device) for key, v in ev.cond.items()} if ev.cond else None
    grid = uniform_time_grid(50, teacher.shift).to(device)
    with torch.no_grad():
        rows["teacher Euler 50"] = euler(lambda x, t: teacher.velocity(x, t, cond), x0, grid).cpu()
    return rows, errors
