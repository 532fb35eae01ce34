"""2-D benchmark: every objective distils the exact checkerboard and 8-Gaussian teachers.

    python benchmarks/toy2d.py --steps 3000 --batch-size 1024

Equal budget per objective (same steps, batch and seeds, so the same training
samples). Reports the histogram KL (docs/method.md, Metrics: 64k samples, 50x50 grid
plus an overflow cell, the teacher's ``kl_range``) at 1/2/4/8/16 steps, the
teacher's Euler KL at the same NFE, the teacher's fine-solve KL (the floor),
network evaluations per training sample, wall time and step time relative to
plain flow matching on the same MLP. The optimiser is the trainer's recipe
(Adam, 50 warm-up steps, gradient norm clipped at 1, non-finite steps skipped
and counted); the student is an MLP from scratch (there is no teacher network
to start from). Writes ``benchmarks/results/toy2d.json`` (checkerboard) and
``toy2d-gaussian-mixture.json`` as ``{objective: {"kl": {...}, "seconds": s, ...}}``,
their ``-settings.json`` and PNGs. ``python benchmarks/toy2d_table.py`` prints
the tables of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ttfm_distill.config import RunConfig
from ttfm_distill.convention import interpolate
from ttfm_distill.fileio import atomic_path, write_json
from ttfm_distill.metrics import histogram_kl
from ttfm_distill.mlp import MlpFlowMap
from ttfm_distill.objectives import make_objective
from ttfm_distill.objectives.base import flow_map
from ttfm_distill.sampling import euler, sample_flow_map, uniform_time_grid
from ttfm_distill.teachers.analytic import get_analytic_teacher
from ttfm_distill.schedules import ema_decay_at, ema_update, lr_factor
from ttfm_distill.batch import BatchPath, step_generator
from ttfm_distill.data.build import ExactData

STEPS = (1, 2, 4, 8, 16)
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
    # i.e. what this network and budget can learn of the flow itself (the 16-step rows' yardstick)
    "flow_matching_euler": (None, {}, {}),
}


class Counting:
    """Counts rows evaluated by a callable (network evaluations per training sample)."""

    def __init__(self, fn):
        self.fn, self.rows = fn, 0

    def __call__(self, x, *a, **k):
        self.rows += x.shape[0]
        return self.fn(x, *a, **k)


class CountingTeacher:
    def __init__(self, teacher):
        self.teacher, self.velocity = teacher, Counting(teacher.velocity)


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x, s, t, cond=None):
        self.rows += x.shape[0]
        return self.model(x, s, t, cond)


def train(teacher, loss, options, settings, steps, batch, lr, seed, width, depth, grad_clip=1.0, warmup=50):
    """The trainer's optimiser recipe (Adam, linear warm-up, gradient clipping, non-finite steps skipped)."""
    torch.manual_seed(seed)
    student = MlpFlowMap(2, width, depth)
    decay = settings.get("ema_decay", 0.0)
    ema = MlpFlowMap(2, width, depth) if decay > 0 else None
    if ema is not None:
        ema.load_state_dict(student.state_dict())
    obj = make_objective(loss, **options)
    opt = torch.optim.Adam(student.parameters(), lr=settings.get("lr", lr))  # a row may set its own lr
    # the trainer's schedule: linear warm-up, then constant, or with the row setting lr_schedule="cosine" a cosine
    # decay to 0 at the last step
    sched_cfg = RunConfig(max_steps=steps, warmup_steps=warmup, lr_schedule=settings.get("lr_schedule", "constant"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, sched_cfg, steps))
    nonfinite = 0
    counted, ct = CountingModel(student), CountingTeacher(teacher)
    counted_ema = CountingModel(ema) if ema is not None else counted
    # the trainer's batch path on the teacher's exact data (draws: data, noise, then the time pairs)
    batches = BatchPath(teacher, ExactData(teacher), settings.get("time_sampling", "mixed"),
                        settings.get("diagonal_fraction", 0.0))
    t0 = time.perf_counter()
    for step in range(steps):
        g = step_generator(seed, 0, step)
        out = obj(counted, ct, batches(batch, g), counted_ema)
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(out.loss):
            nonfinite += 1
            continue
        out.loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema_update(ema, student, ema_decay_at(step, decay, settings.get("ema_warmup", False)))
    seconds = time.perf_counter() - t0
    evals = (counted.rows + (counted_ema.rows if ema is not None else 0) + ct.velocity.rows) / (steps * batch)
    return (ema if ema is not None else student).eval(), seconds, evals, nonfinite


def fit_velocity(teacher, steps, batch, lr, seed, width, depth, grad_clip=1.0, warmup=50):
    """The same MLP and optimiser recipe, trained on the diagonal only: ``u(x_t, t, t)`` regressed on
    the exact teacher velocity at ``x_t`` (the training draws of ``train`` with ``s = t``)."""
    torch.manual_seed(seed)
    model = MlpFlowMap(2, width, depth)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, warmup)))
    t0 = time.perf_counter()
    for step in range(steps):
        g = step_generator(seed, 0, step)
        x1, x0 = teacher.sample_data(batch, generator=g), teacher.sample_noise(batch, generator=g)
        t = torch.rand(batch, generator=g)
        x_t = interpolate(x0, x1, t)
        with torch.no_grad():
            v = teacher.velocity(x_t, t)
        loss = (model(x_t, t, t) - v).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
    return model.eval(), time.perf_counter() - t0


def flow_matching_step_time(teacher, steps, batch, width, depth):
    student = MlpFlowMap(2, width, depth)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for step in range(steps):
        g = step_generator(0, 0, step)
        x1, x0 = teacher.sample_data(batch, generator=g), teacher.sample_noise(batch, generator=g)
        t = torch.rand(batch, generator=g)
        loss = (student(interpolate(x0, x1, t), t, t) - (x1 - x0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def kls(teacher, sampler, n=65536, seed=123):
    """KL at each step count, plus 8192 of the samples per step count for the figure."""
    x0 = teacher.sample_noise(n, generator=torch.Generator().manual_seed(seed))
    kl, shown = {}, {}
    for k in STEPS:
        x = sampler(x0, uniform_time_grid(k))
        kl[str(k)] = histogram_kl(x, teacher)
        shown[k] = x[:8192].clone()
    return kl, shown, x0


def teacher_rows(teacher, tname):
    """The teacher's Euler KL at each NFE and its fine-solve floor."""
    t0 = time.perf_counter()
    euler_kl, euler_x, x0 = kls(teacher, lambda x, g: euler(teacher.velocity, x, g))
    floor = histogram_kl(euler(teacher.velocity, x0, uniform_time_grid(512)), teacher)
    res = {
        "teacher_euler": {"kl": euler_kl, "seconds": round(time.perf_counter() - t0, 1), "evals_per_sample": None,
                          "note": "the teacher's own Euler sampler at the same NFE; not trained"},
        "teacher_fine": {"kl": {str(k): floor for k in STEPS}, "seconds": None, "evals_per_sample": None,
                         "note": "Euler 512 steps: the floor of the metric (finite samples, histogram)"},
    }
    print(tname, "teacher euler", {k: round(v, 3) for k, v in euler_kl.items()}, f"floor {floor:.4f}", flush=True)
    return res, {"teacher_euler": euler_x}


def run_teacher(tname, args, only=None):
    """``{name: {"kl": {...}, "seconds": s, ...}}`` for one teacher, and the samples to plot."""
    teacher = get_analytic_teacher(tname)
    fm = flow_matching_step_time(teacher, 50, args.batch_size, args.width, args.depth)
    res, shown = {}, {}
    if only is None:
        res, shown = teacher_rows(teacher, tname)
    for name in args.objectives.split(","):
        if only is not None and name not in only:
            continue
        loss, options, settings = CONFIGS[name]
        if loss is None:
            res[name], shown[name] = velocity_row(teacher, tname, args)
            continue
        model, seconds, evals, nonfinite = train(teacher, loss, options, settings, args.steps, args.batch_size,
                                                 args.lr, args.seed, args.width, args.depth, args.grad_clip,
                                                 args.warmup)
        kl, xs, _ = kls(teacher, lambda x, g: sample_flow_map(lambda a, s, t: flow_map(model, a, s, t), x, g))
        res[name] = {"kl": kl, "seconds": round(seconds, 1), "evals_per_sample": round(evals, 2),
                     "step_time_vs_flow_matching": round(seconds / args.steps / fm, 2),
                     "nonfinite_steps_skipped": nonfinite, "loss": loss, "options": options, "settings": settings}
        shown[name] = xs
        print(tname, name, {k: round(v, 3) for k, v in kl.items()}, f"{seconds:.0f}s",
              f"{evals:.2f} evals/sample", f"{seconds / args.steps / fm:.2f}x FM step", f"{nonfinite} non-finite", flush=True)
    return res, shown, fm


def velocity_row(teacher, tname, args):
    """The ``flow_matching_euler`` row: KL of the fitted velocity's Euler sampler at each NFE, and at 512 steps."""
    model, seconds = fit_velocity(teacher, args.steps, args.batch_size, args.lr, args.seed, args.width, args.depth,
                                  args.grad_clip, args.warmup)
    velocity = lambda x, t: model(x, t, t)  # noqa: E731
    kl, xs, x0 = kls(teacher, lambda x, g: euler(velocity, x, g))
    with torch.no_grad():
        fine = histogram_kl(euler(velocity, x0, uniform_time_grid(512)), teacher)
    print(tname, "flow_matching_euler", {k: round(v, 3) for k, v in kl.items()}, f"512 steps {fine:.3f}",
          f"{seconds:.0f}s", flush=True)
    return {"kl": kl, "kl_512_steps": fine, "seconds": round(seconds, 1), "evals_per_sample": 2.0,
            "note": "the same MLP fitted to the teacher velocity (s = t only), sampled with Euler at the same NFE"}, xs


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
    args = p.parse_args()
    unknown = [o for o in args.objectives.split(",") if o not in CONFIGS]
    if unknown:
        p.error(f"unknown objective(s) {unknown}; choose from {sorted(CONFIGS)}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for tname in args.teachers.split(","):
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
            old = json.loads((out / f"{stem}.json").read_text())
            old_shown = torch.load(cache) if cache.exists() else {}  # rows without samples: KL curve only
            old_total = prev["total_seconds"]
            args.objectives = ",".join(dict.fromkeys(prev["objectives"].split(",") + args.objectives.split(",")))
        res, shown, fm = run_teacher(tname, args, only=requested if args.merge else None)
        res, shown = {**old, **res}, {**old_shown, **shown}
        order = ["teacher_euler", "teacher_fine", *args.objectives.split(",")]
        res = {k: res[k] for k in order if k in res}
        shown = {k: shown[k] for k in order if k in shown}
        torch.save(shown, cache)
        write_json(out / f"{stem}.json", res)
        write_json(out / f"{stem}-settings.json", {
            **vars(args), "teacher": tname, "kl_samples": 65536, "kl_bins": 50,
            "kl_range": get_analytic_teacher(tname).kl_range, "flow_matching_step_seconds": fm,
            "total_seconds": round(old_total + time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads(),
            "command": "python benchmarks/toy2d.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("teachers", "merge")) + f" --teachers {tname}",
        })
        plot(tname, res, shown, out / f"{stem}.png")
        print(f"wrote {out / stem}.json and .png", flush=True)


def plot(tname, res, shown, path):
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
    ax.set_title(f"{tname}: histogram KL (64k samples, 50x50)", fontsize=9), ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main()
