"""The end of a run: the export, the report against the teacher, samples.png, the model card, and the ranks'
checksums of a distributed run."""

from __future__ import annotations

import torch

from .fileio import write_json
from .scale import full_tensor


def recipe_line(cfg, total_steps: int) -> str:
    """What the run trained, for the sample grid's title: the objective, the steps, and a distribution-matching
    term or stage where the (resolved) run has one."""
    steps = f"{int(total_steps)} steps"
    if not cfg.dm_weight:
        return f"{cfg.loss}, {steps}"
    if cfg.dm_stage_steps:
        return f"{cfg.loss}, {steps}, the last {int(cfg.dm_stage_steps)} with distribution matching"
    return f"{cfg.loss} + distribution matching, {steps}"


def distributed_report(accelerator, student, first_batch: float) -> dict | None:
    """Per-rank parameter checksums (equal if data parallel works) and first-batch checksums (different)."""
    if accelerator.num_processes == 1:
        return None
    with torch.no_grad():
        params = sum(full_tensor(p).double().sum() for p in student.parameters())
        row = torch.stack([params, torch.tensor(first_batch, dtype=torch.float64)]).to(accelerator.device)[None]
    rows = accelerator.gather(row).cpu()
    return {"processes": accelerator.num_processes,
            "param_checksums": rows[:, 0].tolist(), "first_batch_checksums": rows[:, 1].tolist(),
            "ranks_in_sync": bool(torch.allclose(rows[:, 0], rows[0, 0].expand(len(rows)), rtol=0, atol=0))}


def final_weights(cfg, accelerator, wrapped, student, ema, rebuild):
    """The weights the run exports: its EMA (``export_weights="ema"``), or the student, as an unsharded copy
    (``rebuild()`` makes the empty student; sharded runs gather into it on rank 0)."""
    from . import scale

    if cfg.export_weights == "ema" and ema is not None:
        return ema
    return scale.unsharded_copy(accelerator, wrapped, student, rebuild)


def finish_run(cfg, state, out, student, teacher, objective, seconds, history, device, log, skipped=0,
               distributed: dict | None = None, data_report: dict | None = None, reference=None) -> dict:
    """Export the student, measure it against the teacher, draw ``samples.png``; ``state``: the run state
    (``runstate.RunState``: the steps trained); ``reference``: the teacher's fine solve of the report's noises, if
    the run's validation kept it (tracking.RunTracking.report_reference)."""
    from .export import export_run
    from .report import run_report
    from .pipeline_card import write_model_card
    from .plots import save_comparison

    export_run(student, out / "student", cfg, teacher, objective, state.total_steps, standalone=cfg.standalone)
    log(f"exported student -> {out / 'student'}")
    from .report import REPORT_SEED_OFFSET, report_samples
    from .sampling import resolve_time_grid

    n = report_samples(cfg, teacher.kind)
    grid = resolve_time_grid(cfg.time_grid, teacher.io)
    metrics, rows, errors = run_report(student, teacher, n, cfg.seed + REPORT_SEED_OFFSET, cfg.reference_steps,
                                       device, grid, reference)
    metrics["training"] = {"steps": state.total_steps, "seconds": round(seconds, 1), "skipped_steps": skipped,
                           "final_loss": history[-1]["loss"] if history else None}
    if cfg.time_budget is not None:
        metrics["training"]["time_budget"] = {"seconds": cfg.time_budget, "max_steps": cfg.max_steps,
                                              "fitted_steps": state.fitted_steps}
    if distributed is not None:
        metrics["distributed"] = distributed
    if data_report:
        metrics["data"] = data_report
    metrics["settings"] = {"eval_samples": n, "reference": f"rk4 {cfg.reference_steps} steps", "seed": cfg.seed + 1,
                           "time_grid": grid, "student_output": student.student_output}
    from .evaluate import quality_warnings  # one plain line each: worse than the teacher, samples out of range

    metrics["warnings"] = quality_warnings(metrics)
    write_json(out / "metrics.json", metrics)
    if teacher.is_latent:  # the grid shows images: decode the latents with the teacher's VAE
        rows = {k: torch.cat([teacher.decode(c.to(device)).cpu() for c in v.split(64)]) for k, v in rows.items()}
    save_comparison(rows, out / "samples.png", kind=teacher.kind, errors=errors,
                    title=f"{teacher.name}: student ({recipe_line(cfg, state.total_steps)}) vs teacher, same noise")
    write_model_card(out / "student", metrics, state.command_settings(cfg.to_dict()), out / "samples.png",  # the export's README.md
                     curves=out / "training-curves.png")
    fme = metrics["flow_map_error"]
    for k in fme["student"]:  # one short line each: a narrow or non-terminal console must not cut them
        log(f"flow-map error, {k} step: student {fme['student'][k]:.4f}, teacher Euler {fme['teacher_euler'][k]:.4f}")
    for line in metrics["warnings"]:
        log(f"[yellow]warning:[/] {line}")
    return metrics
