"""2-D benchmark: every objective distils the exact checkerboard and 8-Gaussian teachers.

    python benchmarks/toy2d.py --steps 3000 --batch-size 1024

Equal budget per objective (same steps, batch and seeds, so the same training
samples). Reports the histogram KL (docs/method.md, Metrics: 64k samples, 50x50 grid
plus an overflow cell, the teacher's ``kl_range``) at 1/2/4/8/16 steps, the
teacher's Euler KL at the same NFE, the teacher's fine-solve KL (the floor),
network evaluations per training sample, wall time and step time relative to
plain flow matching on the same MLP. Writes ``benchmarks/results/toy2d.json``
(checkerboard) and ``toy2d-gaussian-mixture.json`` as
``{objective: {"kl": {...}, "seconds": s, ...}}``, their ``-settings.json`` and PNGs.
``python benchmarks/toy2d_table.py`` prints the tables of docs/benchmarks.md.

Every row trains through the package's own trainer, ``ttfm_distill.trainer.run_distillation``
(one training loop: what the CLI's ``ttfm-distill run`` runs), on ``teacher="builtin:<name>"``, in a
folder under a ``tempfile.mkdtemp()`` folder that this script makes and removes. The run's exported
student is loaded back (``ttfm_distill.export.load_student``) and scored here with the same 65536 fixed
noises as before. Each row's :class:`RunConfig` (``run_config``) is the benchmark's recipe: the row's loss
and options, ``time_sampling`` and ``diagonal_fraction`` (0 unless the row sets it, not the objective's
own default), the same steps, batch, seed, lr (a row may set its own), MLP width and depth, gradient
norm clip, linear warm-up, a constant lr after it unless the row sets ``lr_schedule="cosine"`` (a cosine
to 0 at the last step), no EMA unless the row sets ``ema_decay`` (then the EMA is exported, as before),
fp32 (``mixed_precision="no"``) and non-finite steps skipped and counted (``nan_policy="skip"``). The
trainer's extras are off or minimal: no validation, no checkpoint before the last step, the smallest run
report (4096 noises, a 2-step reference), a log row every 100 steps. The student is the same
``MlpFlowMap`` built after ``torch.manual_seed(seed)``, and the batches are the trainer's batch path
(data, noise, then the time pairs from the generator of ``(seed, 0, step)``), as the old loop drew them.

Against the training loop this script once kept by hand (the committed tables' runs): AdamW without weight decay
is Adam's update; the EMA rows' EMA is the trainer's (offset 10, as before); non-finite steps are the trainer's
``nan_policy="skip"``; ``seconds`` is ``RunResult.seconds`` (the loop, not the set-up, export or report);
``evals_per_sample`` is the planner's count (``plan.objective_evaluations``: ``null`` for the jvp rows, which it
does not count, 4.0 rather than the counted 3.67 for the long-jump rows); ``flow_matching_euler`` is LSD on
diagonal pairs only (exactly flow matching on the teacher's velocity, with other draws of its times); the step-time
yardstick is a trainer run of that row (it calls the teacher), so ``step_time_vs_flow_matching`` is not comparable
with the old ratios. At 20 steps every distillation row's weights were bit-identical to the old loop's, and
``itvm`` at 3000 steps gave the committed KL again (0.348 / 0.264 / 0.140 / 0.128 / 0.130 on the checkerboard).

``--kl-samples`` (default 65536, the documented figure) lowers the KL sample count for smoke tests.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from ttfm_distill.config import RunConfig
from ttfm_distill.export import load_student
from ttfm_distill.fileio import atomic_path, write_json
from ttfm_distill.metrics import histogram_kl
from ttfm_distill.plan import PlanError, objective_evaluations
from ttfm_distill.sampling import euler, flow_map, sample_flow_map, uniform_time_grid
from ttfm_distill.teachers.analytic import get_analytic_teacher
from ttfm_distill.trainer import RunResult, run_distillation

STEPS = (1, 2, 4, 8, 16)
KL_SAMPLES = 65536
#: steps of the flow-matching run whose step time is the yardstick (step_time_vs_flow_matching)
FM_TIMING_STEPS = 50
# name -> (loss, options, run settings)
CONFIGS = {
    "itvm": ("itvm", {}, {}),  # the tool's default reading (r = s + tau, no diagonal pairs)
    "itvm_terminal": ("itvm", {"intermediate": "terminal"}, {}),
    # r uniform has no teacher signal off the diagonal: it needs diagonal pairs (the CLI refuses 0)
    "itvm_uniform": ("itvm", {"intermediate": "uniform"}, {"diagonal_fraction": 0.25}),
    "itvm_initial_term": ("itvm", {}, {"diagonal_fraction": 0.25}),
    "itvm_ema_target": ("itvm", {"target_model": "ema"}, {"ema_decay": 0.999}),
    # progressive distillation's target (two EMA jumps through r ~ U(s, t)) on the pairs with t - s >= 0.5; with
    # the trainer's EMA warm-up as `ttfm-distill run` has it, against the default reading with the same EMA
    "itvm_long0.5": ("itvm", {"long_jump_span": 0.5}, {"ema_decay": 0.999}),
    "itvm_long0.5_warm": ("itvm", {"long_jump_span": 0.5}, {"ema_decay": 0.999, "ema_warmup": True}),
    "itvm_ema_warm": ("itvm", {}, {"ema_decay": 0.999, "ema_warmup": True}),
    # the cosine lr decay (to 0 at the last step) that the trainer uses for diffusion teachers, alone and with the
    # warmed-up EMA; LFMD with its stabiliser under the same schedule, for the comparison at equal footing
    "itvm_cosine": ("itvm", {}, {"lr_schedule": "cosine"}),
    "itvm_cosine_ema": ("itvm", {}, {"lr_schedule": "cosine", "ema_decay": 0.999, "ema_warmup": True}),
    "lfmd_fd_adaptive_cosine": ("lfmd", {"derivative": "fd", "adaptive_p": 1.0},
                                {"diagonal_fraction": 0.25, "lr_schedule": "cosine"}),
    "lfmd_fd": ("lfmd", {"derivative": "fd"}, {"diagonal_fraction": 0.25}),
    "lfmd_jvp": ("lfmd", {"derivative": "jvp"}, {"diagonal_fraction": 0.25}),
    "progressive": ("progressive", {}, {"diagonal_fraction": 0.25, "ema_decay": 0.999}),
    "lsd": ("lsd", {}, {"diagonal_fraction": 0.25}),
    "meanflow": ("meanflow", {"adaptive_p": 1.0}, {"diagonal_fraction": 0.75}),
    # the baselines with the stabilisers their own papers use, where the plain rows diverge: MeanFlow's
    # adaptive weighting (p = 1) on LFMD and LSD, LSD's 75% diagonal pairs, a lower lr for MeanFlow
    "lfmd_fd_adaptive": ("lfmd", {"derivative": "fd", "adaptive_p": 1.0}, {"diagonal_fraction": 0.25}),
    "lfmd_jvp_adaptive": ("lfmd", {"derivative": "jvp", "adaptive_p": 1.0}, {"diagonal_fraction": 0.25}),
    "lsd_adaptive": ("lsd", {"adaptive_p": 1.0}, {"diagonal_fraction": 0.75}),
    "meanflow_lr1e-4": ("meanflow", {"adaptive_p": 1.0}, {"diagonal_fraction": 0.75, "lr": 1e-4}),
    # not a flow-map objective: the same MLP fitted to the teacher's velocity and sampled with Euler,
    # i.e. what this network and budget can learn of the flow itself (the 16-step rows' yardstick). In the trainer
    # it is LSD on diagonal pairs only: |u(x_t, t, t) - v_teacher(x_t, t)|^2, plain flow matching on the exact
    # teacher's velocity (VELOCITY_ROWS: scored as a velocity field with Euler, not as a flow map)
    "flow_matching_euler": ("lsd", {}, {"diagonal_fraction": 1.0}),
}


#: rows whose network is scored as a velocity field u(x, t, t) with Euler rather than as a flow map
VELOCITY_ROWS = ("flow_matching_euler",)
#: the trainer's messages (export, flow-map error lines, warnings) would bury the benchmark's own lines
QUIET = Console(stderr=True, quiet=True)


def run_config(teacher: str, name: str, output, steps: int, batch: int, lr: float, seed: int, width: int,
               depth: int, grad_clip: float = 1.0, warmup: int = 50) -> RunConfig:
    """The trainer's settings for row ``name`` of ``CONFIGS`` on the exact teacher ``teacher`` (e.g. "checkerboard"):
    the benchmark's recipe, with the trainer's extras (validation, checkpoints, the run report) off or minimal."""
    loss, options, settings = CONFIGS[name]
    decay = float(settings.get("ema_decay", 0.0))
    return RunConfig(
        teacher=f"builtin:{teacher}", output=str(output), loss=loss, loss_options=dict(options),
        max_steps=steps, batch_size=batch, lr=float(settings.get("lr", lr)), weight_decay=0.0,
        warmup_steps=warmup, lr_schedule=settings.get("lr_schedule", "constant"), lr_final_fraction=0.0,
        grad_clip=grad_clip, ema_decay=decay, ema_warmup=bool(settings.get("ema_warmup", False)),
        export_weights="ema" if decay > 0 else "raw", seed=seed,
        time_sampling=settings.get("time_sampling", "mixed"),
        diagonal_fraction=float(settings.get("diagonal_fraction", 0.0)),
        trajectory_fraction=0.0, mlp_width=width, mlp_depth=depth, mixed_precision="no", nan_policy="skip",
        validate_every=0, checkpoint_every=steps, keep_checkpoints=1, log_every=100, eval_samples=16,
        reference_steps=2,
    )


def train_row(teacher: str, name: str, workdir, steps: int, batch: int, lr: float, seed: int, width: int,
              depth: int, grad_clip: float = 1.0, warmup: int = 50):
    """Train row ``name`` through ``run_distillation`` in a new folder under ``workdir``; returns
    ``(exported student in eval mode, training-loop seconds, non-finite steps skipped)``."""
    out = Path(workdir) / f"{teacher}-{name}-seed{seed}-steps{steps}"
    cfg = run_config(teacher, name, out, steps, batch, lr, seed, width, depth, grad_clip, warmup)
    result: RunResult = run_distillation(cfg, show_progress=False, console=QUIET)
    student, _ = load_student(result.output)
    return student.eval(), result.seconds, int(result.metrics["training"]["skipped_steps"])


def evals_per_sample(name: str) -> tuple[float | None, str | None]:
    """Network evaluations per training sample of row ``name`` (student with and without gradient, and teacher),
    as ``ttfm_distill.plan`` counts them, or ``(None, why)`` where the planner does not count the row."""
    loss, options, settings = CONFIGS[name]
    try:
        ev = objective_evaluations(loss, options, float(settings.get("diagonal_fraction", 0.0)))
    except PlanError as e:
        return None, f"not counted: {e}"
    return round(ev.train + ev.student_nograd + ev.teacher, 2), None


def flow_matching_step_time(teacher: str, workdir, args) -> float:
    """Seconds per step of the ``flow_matching_euler`` recipe in the trainer (FM_TIMING_STEPS steps)."""
    _, seconds, _ = train_row(teacher, "flow_matching_euler", workdir, FM_TIMING_STEPS, args.batch_size, args.lr,
                              args.seed, args.width, args.depth, args.grad_clip, args.warmup)
    return seconds / FM_TIMING_STEPS


@torch.no_grad()
def kls(teacher, sampler, n=KL_SAMPLES, seed=123):
    """KL at each step count, plus 8192 of the samples per step count for the figure."""
    x0 = teacher.sample_noise(n, generator=torch.Generator().manual_seed(seed))
    kl, shown = {}, {}
    for k in STEPS:
        x = sampler(x0, uniform_time_grid(k))
        kl[str(k)] = histogram_kl(x, teacher)
        shown[k] = x[:8192].clone()
    return kl, shown, x0


def flow_map_sampler(model):
    """The student's jumps on a time grid, as ``kls`` calls a sampler."""
    return lambda x, g: sample_flow_map(lambda a, s, t: flow_map(model, a, s, t), x, g)


def teacher_rows(teacher, tname, n=KL_SAMPLES):
    """The teacher's Euler KL at each NFE and its fine-solve floor."""
    t0 = time.perf_counter()
    euler_kl, euler_x, x0 = kls(teacher, lambda x, g: euler(teacher.velocity, x, g), n)
    floor = histogram_kl(euler(teacher.velocity, x0, uniform_time_grid(512)), teacher)
    res = {
        "teacher_euler": {"kl": euler_kl, "seconds": round(time.perf_counter() - t0, 1), "evals_per_sample": None,
                          "note": "the teacher's own Euler sampler at the same NFE; not trained"},
        "teacher_fine": {"kl": {str(k): floor for k in STEPS}, "seconds": None, "evals_per_sample": None,
                         "note": "Euler 512 steps: the floor of the metric (finite samples, histogram)"},
    }
    print(tname, "teacher euler", {k: round(v, 3) for k, v in euler_kl.items()}, f"floor {floor:.4f}", flush=True)
    return res, {"teacher_euler": euler_x}


def run_teacher(tname, args, workdir, only=None):
    """``{name: {"kl": {...}, "seconds": s, ...}}`` for one teacher, and the samples to plot."""
    teacher = get_analytic_teacher(tname)
    fm = flow_matching_step_time(tname, workdir, args)
    res, shown = {}, {}
    if only is None:
        res, shown = teacher_rows(teacher, tname, args.kl_samples)
    for name in args.objectives.split(","):
        if only is not None and name not in only:
            continue
        if name in VELOCITY_ROWS:
            res[name], shown[name] = velocity_row(teacher, tname, name, args, workdir)
            continue
        loss, options, settings = CONFIGS[name]
        model, seconds, nonfinite = train_row(tname, name, workdir, args.steps, args.batch_size, args.lr, args.seed,
                                              args.width, args.depth, args.grad_clip, args.warmup)
        kl, xs, _ = kls(teacher, flow_map_sampler(model), args.kl_samples)
        evals, why = evals_per_sample(name)
        res[name] = {"kl": kl, "seconds": round(seconds, 1), "evals_per_sample": evals,
                     "step_time_vs_flow_matching": round(seconds / args.steps / fm, 2),
                     "nonfinite_steps_skipped": nonfinite, "loss": loss, "options": options, "settings": settings}
        if why:
            res[name]["evals_note"] = why
        shown[name] = xs
        print(tname, name, {k: round(v, 3) for k, v in kl.items()}, f"{seconds:.0f}s",
              f"{evals} evals/sample" if evals is not None else "evals/sample not counted",
              f"{seconds / args.steps / fm:.2f}x FM step", f"{nonfinite} non-finite", flush=True)
    return res, shown, fm


def velocity_row(teacher, tname, name, args, workdir):
    """A ``VELOCITY_ROWS`` row: KL of the fitted velocity's Euler sampler at each NFE, and at 512 steps."""
    model, seconds, nonfinite = train_row(tname, name, workdir, args.steps, args.batch_size, args.lr, args.seed,
                                          args.width, args.depth, args.grad_clip, args.warmup)
    velocity = lambda x, t: model(x, t, t)  # noqa: E731
    kl, xs, x0 = kls(teacher, lambda x, g: euler(velocity, x, g), args.kl_samples)
    with torch.no_grad():
        fine = histogram_kl(euler(velocity, x0, uniform_time_grid(512)), teacher)
    evals, _ = evals_per_sample(name)
    loss, options, settings = CONFIGS[name]
    print(tname, name, {k: round(v, 3) for k, v in kl.items()}, f"512 steps {fine:.3f}", f"{seconds:.0f}s",
          f"{nonfinite} non-finite", flush=True)
    return {"kl": kl, "kl_512_steps": fine, "seconds": round(seconds, 1), "evals_per_sample": evals,
            "nonfinite_steps_skipped": nonfinite, "loss": loss, "options": options, "settings": settings,
            "note": "the same MLP fitted to the teacher velocity (s = t only: the trainer's lsd with diagonal_fraction "
                    "1), sampled with Euler at the same NFE"}, xs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="as the trainer (RunConfig.grad_clip)")
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, as the trainer")
    p.add_argument("--teachers", default="checkerboard,gaussian-mixture")
    p.add_argument("--objectives", default=",".join(CONFIGS))
    p.add_argument("--output", default="benchmarks/results")
    p.add_argument("--merge", action="store_true",
                   help="update the named objectives in existing results (same settings) instead of starting over")
    p.add_argument("--kl-samples", type=int, default=KL_SAMPLES,
                   help=f"noises each KL is measured on ({KL_SAMPLES}, the documented figure; fewer for smoke tests)")
    args = p.parse_args()
    unknown = [o for o in args.objectives.split(",") if o not in CONFIGS]
    if unknown:
        p.error(f"unknown objective(s) {unknown}; choose from {sorted(CONFIGS)}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="toy2d-runs-"))  # the trainer's run folders; removed below
    try:
        for tname in args.teachers.split(","):
            run_and_write(p, args, out, tname, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_and_write(p, args, out: Path, tname: str, workdir: Path) -> None:
    """One teacher's rows (all, or with ``--merge`` the named ones into the saved results), written to ``out``."""
    t0 = time.perf_counter()
    stem = "toy2d" if tname == "checkerboard" else f"toy2d-{tname}"
    cache = out / f".{stem}-samples.pt"  # the figure's samples, so --merge can redraw it (not committed)
    old, old_shown, old_total = {}, {}, 0.0
    requested = args.objectives.split(",")
    if args.merge:
        prev = json.loads((out / f"{stem}-settings.json").read_text())
        for key in ("steps", "batch_size", "lr", "width", "depth", "seed", "grad_clip", "warmup"):
            if prev[key] != getattr(args, key):
                p.error(f"--merge: {key} differs from the saved results ({prev[key]} != {getattr(args, key)})")
        if prev.get("kl_samples", KL_SAMPLES) != args.kl_samples:
            p.error(f"--merge: kl_samples differs from the saved results ({prev.get('kl_samples')} != "
                    f"{args.kl_samples})")
        old = json.loads((out / f"{stem}.json").read_text())
        old_shown = torch.load(cache) if cache.exists() else {}  # rows without samples: KL curve only
        old_total = prev["total_seconds"]
        args.objectives = ",".join(dict.fromkeys(prev["objectives"].split(",") + args.objectives.split(",")))
    res, shown, fm = run_teacher(tname, args, workdir, only=requested if args.merge else None)
    res, shown = {**old, **res}, {**old_shown, **shown}
    order = ["teacher_euler", "teacher_fine", *args.objectives.split(",")]
    res = {k: res[k] for k in order if k in res}
    shown = {k: shown[k] for k in order if k in shown}
    torch.save(shown, cache)
    write_json(out / f"{stem}.json", res)
    shown_args = {k: v for k, v in vars(args).items() if k != "kl_samples"}  # recorded as kl_samples below
    write_json(out / f"{stem}-settings.json", {
        **shown_args, "teacher": tname, "kl_samples": args.kl_samples, "kl_bins": 50,
        "kl_range": get_analytic_teacher(tname).kl_range, "flow_matching_step_seconds": fm,
        "trainer": "ttfm_distill.trainer.run_distillation (see benchmarks/toy2d.py run_config)",
        "total_seconds": round(old_total + time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/toy2d.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("teachers", "merge") and not (k == "kl_samples" and v == KL_SAMPLES)) + f" --teachers {tname}",
    })
    plot(tname, res, shown, out / f"{stem}.png", args.kl_samples)
    print(f"wrote {out / stem}.json and .png", flush=True)


def plot(tname, res, shown, path, kl_samples=KL_SAMPLES):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(shown)
    rng = get_analytic_teacher(tname).kl_range
    fig = plt.figure(figsize=(1.3 * len(STEPS) + 6.5, 1.3 * len(rows) + 0.6))
    grid = fig.add_gridspec(len(rows), len(STEPS) + 5)
    for i, name in enumerate(rows):
        for j, k in enumerate(STEPS):
            ax = fig.add_subplot(grid[i, j])
            x = shown[name][k].numpy()
            ax.hist2d(x[:, 0], x[:, 1], bins=80, range=[list(rng[0]), list(rng[1])], cmap="magma")
            ax.set_xticks([]), ax.set_yticks([]), ax.set_aspect("equal")
            if i == 0:
                ax.set_title(f"{k} step" + ("s" if k > 1 else ""), fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
            ax.text(0.03, 0.03, f"{res[name]['kl'][str(k)]:.3f}", transform=ax.transAxes, color="w", fontsize=6)
    ax = fig.add_subplot(grid[1:-1, len(STEPS) + 1:] if len(rows) > 2 else grid[:, len(STEPS) + 1:])
    for name, r in res.items():
        ax.plot(STEPS, [r["kl"][str(k)] for k in STEPS], marker="" if name == "teacher_fine" else "o",
                label=name, ls="--" if name.startswith("teacher") else "-", lw=1.2, ms=3)
    ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.set_xlabel("steps (NFE)"), ax.set_ylabel("KL")
    ax.set_xticks(STEPS, [str(k) for k in STEPS])
    ax.set_title(f"{tname}: histogram KL ({kl_samples // 1024}k samples, 50x50)", fontsize=9), ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
