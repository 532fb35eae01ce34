"""Image benchmark: the embedded Fashion-MNIST teacher distilled by every objective at an equal budget.

    python benchmarks/image.py --steps 150 --batch-size 32

Each objective trains through the real trainer (``trainer.run_distillation``,
the tool's optimiser recipe and data-free teacher pool) for the same steps,
batch and seed, so every objective sees the same training samples.  Each
student is then scored like ``ttfm-distill eval`` does, from one shared set of
noises: flow-map error against the teacher's RK4 solve, Frechet distance (FD)
in the shipped classifier's features to the real test images and to the
teacher's fine solve, and sampling speed, at 1/2/4/8 steps; the teacher's
Euler (1/2/4/8/16/50 NFE) and Heun (2/4/8/16 NFE) are scored on the same
noises once.  The floors are the teacher's fine solve and ``--eval-num``
real training images.

Writes ``benchmarks/results/image.json`` (``{"results": {sampler: {nfe:
metrics}}, "floors", "training", "goal", ...}``), ``image-settings.json``,
``image.png`` (each metric against steps) and ``image-samples.png`` (the same
noises through every sampler).  ``python benchmarks/image.py --table`` prints
the tables of docs/benchmarks.md from the saved JSON.

The data-free pool (teacher Euler samples) is the same for every objective
(same size, steps and seed), so it is built once and placed in each run
folder's cache, as a resumed run would find it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from ttfm_distill.config import RunConfig
from ttfm_distill.cli import parse_steps
from ttfm_distill.evaluate import (Evaluation, student_flow_map_sampler, teacher_euler_sampler,
                                   teacher_heun_sampler)
from ttfm_distill.export import load_student
from ttfm_distill.fileio import write_json
from ttfm_distill.plots import save_comparison, save_metric_curves
from ttfm_distill.teachers.loading import load_teacher
from ttfm_distill.data import build_pool
from ttfm_distill.trainer import run_distillation

TEACHER = "builtin:fashion16"
# name -> (loss, loss options, run settings); the settings the trainer's check needs (check_objective_fits):
# lsd and progressive see the teacher only on diagonal pairs, so they get 25% of them, like lfmd and meanflow.
CONFIGS = {
    "itvm": ("itvm", {}, {}),  # the tool's defaults: r = s + tau, current weights as target, no diagonal pairs
    "itvm_terminal": ("itvm", {"intermediate": "terminal"}, {}),
    "lfmd_fd": ("lfmd", {"derivative": "fd"}, {"diagonal_fraction": 0.25}),
    "progressive": ("progressive", {}, {"diagonal_fraction": 0.25, "ema_decay": 0.99}),
    "lsd": ("lsd", {}, {"diagonal_fraction": 0.25}),
    # JVP fails on the teacher's mid-block attention on CPU (docs/environment.md): finite differences
    "meanflow": ("meanflow", {"derivative": "fd"}, {"diagonal_fraction": 0.25}),
}


def run_config(name, args, workdir: Path) -> RunConfig:
    loss, options, settings = CONFIGS[name]
    return RunConfig(teacher=TEACHER, output=str(workdir / name), loss=loss, loss_options=dict(options),
                     max_steps=args.steps, batch_size=args.batch_size, seed=args.seed, pool_size=args.pool_size,
                     pool_steps=args.pool_steps, eval_samples=8, reference_steps=2,
                     checkpoint_every=10 * args.steps, **settings).validate()


def shared_pool(teacher, args, workdir: Path) -> Path:
    """Build the data-free pool once; returns the cache file every run would build identically."""
    cfg = run_config("itvm", args, workdir)
    cache = workdir / "shared-cache"
    build_pool(teacher, cfg, cache, "cpu", print)
    return next(cache.glob("pool-*.safetensors"))


def seed_run_folder(cfg: RunConfig, pool: Path) -> None:
    """A fresh run folder holding the pool, as a run interrupted after building it would leave it."""
    out = Path(cfg.output)
    if out.exists():
        shutil.rmtree(out)
    (out / "cache").mkdir(parents=True)
    shutil.copy(pool, out / "cache" / pool.name)
    write_json(out / "config.json", cfg.to_dict())


def goal(results: dict) -> dict:
    """The issue's goal, checked on FD to the real test images."""

    def fd(name, n):
        row = results.get(name, {}).get(str(n))
        return None if row is None else row.get("fd_test_images")

    e16, e50 = fd("teacher_euler", 16), fd("teacher_euler", 50)
    out = {"rule": "2-step student FD <= teacher Euler 16 FD; 4-step student FD <= 1.1 x teacher Euler 50 FD",
           "teacher_euler_16": e16, "teacher_euler_50": e50}
    for name in results:
        if name.startswith("teacher"):
            continue
        s2, s4 = fd(name, 2), fd(name, 4)
        out[name] = {"fd_2": s2, "fd_4": s4,
                     "two_step_at_or_below_euler16": None if None in (s2, e16) else s2 <= e16,
                     "four_step_within_10pct_of_euler50": None if None in (s4, e50) else s4 <= 1.1 * e50}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps per objective")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-size", type=int, default=1024)
    p.add_argument("--pool-steps", type=int, default=16)
    p.add_argument("--objectives", default=",".join(CONFIGS))
    p.add_argument("--eval-num", type=int, default=512)
    p.add_argument("--eval-steps", default="1,2,4,8")
    p.add_argument("--teacher-steps", default="1,2,4,8,16,50", help="NFEs of the teacher's Euler")
    p.add_argument("--heun-steps", default="1,2,4,8,16", help="NFEs of the teacher's Heun (even only; 1 gives null)")
    p.add_argument("--reference-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/ttfm-image-benchmark")
    p.add_argument("--output", default="benchmarks/results")
    p.add_argument("--table", action="store_true", help="print the docs/benchmarks.md tables from saved results, exit")
    args = p.parse_args()
    out = Path(args.output)
    if args.table:
        print_tables(json.loads((out / "image.json").read_text()), json.loads((out / "image-settings.json").read_text()))
        return
    names = args.objectives.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown objective(s) {unknown}; choose from {sorted(CONFIGS)}")
    torch.set_num_threads(args.threads)
    eval_steps, teacher_steps = parse_steps(args.eval_steps), parse_steps(args.teacher_steps, "--teacher-steps")
    heun_steps = parse_steps(args.heun_steps, "--heun-steps")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    teacher = load_teacher(TEACHER)

    t0 = time.perf_counter()
    pool = shared_pool(teacher, args, workdir)
    pool_seconds = time.perf_counter() - t0

    training = {}
    for name in names:
        cfg = run_config(name, args, workdir)
        seed_run_folder(cfg, pool)
        t0 = time.perf_counter()
        result = run_distillation(cfg, show_progress=False)
        training[name] = {"loss": cfg.loss, "options": cfg.loss_options,
                          "diagonal_fraction": cfg.diagonal_fraction, "ema_decay": cfg.ema_decay,
                          "train_seconds": result.metrics["training"]["seconds"],
                          "run_seconds": round(time.perf_counter() - t0, 1),
                          "final_loss": result.metrics["training"]["final_loss"]}
        print(f"{name}: trained in {training[name]['train_seconds']}s, final loss {training[name]['final_loss']:.4g}",
              flush=True)

    t0 = time.perf_counter()
    ev = Evaluation(teacher, num=args.eval_num, seed=args.seed + 100, reference_steps=args.reference_steps,
                    batch_size=256, keep=8)
    results = {"teacher_euler": ev.run(teacher_euler_sampler(teacher), teacher_steps),
               "teacher_heun": ev.run(teacher_heun_sampler(teacher), heun_steps)}
    print("teacher rows done", flush=True)
    for name in names:
        student, meta = load_student(Path(run_config(name, args, workdir).output) / "student")
        results[name] = ev.run(student_flow_map_sampler(student, float(meta.shift), name), eval_steps)
        print(name, {n: round(r["fd_test_images"], 3) for n, r in results[name].items() if r}, flush=True)
    floors = ev.floors()
    eval_seconds = time.perf_counter() - t0

    order = ["teacher_euler", "teacher_heun", *names]
    results = {k: results[k] for k in order}
    report = {"teacher": TEACHER, "results": results, "floors": floors, "goal": goal(results),
              "training": training, "not_computed": ev.not_computed, **ev.info}
    write_json(out / "image.json", report)
    write_json(out / "image-settings.json", {
        **{k: v for k, v in vars(args).items() if k != "table"}, "evaluation": ev.settings(),
        "pool_seconds": round(pool_seconds, 1), "eval_seconds": round(eval_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "command": "python benchmarks/image.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("table", "workdir", "output")),
    })
    save_metric_curves(results, floors, out / "image.png",
                       title=f"{TEACHER}: every objective, {args.steps} steps x batch {args.batch_size}")
    rows = {"RK4 fine": ev.kept["reference"]}
    for n in (2, 16, 50):
        if ("teacher_euler", n) in ev.kept:
            rows[f"Euler {n}"] = ev.kept[("teacher_euler", n)]
    for name in names:  # every student at 2 steps, the default objective also at 1 and 4
        for n in ((1, 2, 4) if name == "itvm" else (2,)):
            if (name, n) in ev.kept:
                rows[f"{name} {n}"] = ev.kept[(name, n)]
    save_comparison(rows, out / "image-samples.png")
    print(f"wrote {out / 'image.json'}, image.png, image-samples.png in {time.perf_counter() - t_all:.0f}s")
    print_tables(report, json.loads((out / "image-settings.json").read_text()))


def print_tables(report: dict, settings: dict) -> None:
    res, floors = report["results"], report["floors"]
    steps = [int(n) for n in next(r for k, r in res.items() if not k.startswith("teacher"))]
    tsteps = sorted(int(n) for n in res["teacher_euler"])

    def cell(name, n, key, digits=3):
        row = res.get(name, {}).get(str(n))
        return "-" if row is None or row.get(key) is None else f"{row[key]:.{digits}f}"

    for key, label, digits in (("fd_test_images", "FD to real test images", 2),
                               ("fd_teacher_fine", "FD to the teacher's fine solve", 2),
                               ("flow_map_error", "flow-map error", 4),
                               ("ms_per_sample", "ms per sample", 1)):
        print(f"\n{label}\n")
        print("| sampler | " + " | ".join(f"{n}" for n in tsteps) + " | train s |")
        print("|---|" + "---|" * (len(tsteps) + 1))
        for name in res:
            train = report["training"].get(name, {}).get("train_seconds", "")
            label_name = f"*{name}*" if name.startswith("teacher") else name
            print(f"| {label_name} | " + " | ".join(cell(name, n, key, digits) for n in tsteps) + f" | {train} |")
        for fname, values in floors.items():
            if isinstance(values, dict) and values.get(key) is not None:
                print(f"| *floor: {fname}* | {values[key]:.{digits}f} |" + " |" * len(tsteps))
    print("\ngoal:", json.dumps(report["goal"], indent=1))
    print(f"\nstudent steps {steps}; settings: {settings['command']}; total {settings['total_seconds']}s")


if __name__ == "__main__":
    main()
