"""Is the few-step student blurrier than the teacher's solve? High-frequency energy of its samples.

    OMP_NUM_THREADS=1 python benchmarks/sharpness.py --run /work/conv-runs/long15k_def --steps 1,2,4,8

For the last checkpoint of ``--run`` (or ``--step``), the student's samples at each step count and the teacher's
own solve of the same noises (the fresh set ``benchmarks/pool_overfit.py`` caches in ``RUN/../_eval-cache``, so
run that first) are compared by two image statistics, each as a ratio to the solve's:

* ``laplacian``: mean squared 5-point Laplacian of each image (edges, texture: what an average of several
  plausible images loses first);
* ``contrast``: mean per-image standard deviation of the pixels.

A regression that averages over what it cannot tell apart gives ratios below 1 that grow with the steps.
Writes ``benchmarks/results/sharpness/RUN-stepN.json``. One thread; say what else ran beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "sharpness"


def laplacian_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean squared 5-point Laplacian of each image of ``x`` ``(N, C, H, W)`` (interior pixels), ``(N,)``."""
    x = x.double().clamp(-1, 1)
    lap = (x[..., 1:-1, :-2] + x[..., 1:-1, 2:] + x[..., :-2, 1:-1] + x[..., 2:, 1:-1] - 4 * x[..., 1:-1, 1:-1])
    return lap.pow(2).flatten(1).mean(1)


def contrast(x: torch.Tensor) -> torch.Tensor:
    return x.double().clamp(-1, 1).flatten(1).std(1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--weights", default="ema", choices=("ema", "raw"))
    p.add_argument("--steps", default="1,2,4,8")
    args = p.parse_args()
    torch.set_num_threads(1)

    from safetensors.torch import load_file

    from ttfm_distill.config import RunConfig
    from ttfm_distill.fileio import write_json
    from ttfm_distill.sampling import sample_flow_map, student_sampler, uniform_time_grid
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    run = args.run.resolve()
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    fresh = sorted((run.parent / "_eval-cache").glob("pool-n1024-*-seed1000-*.safetensors"))
    if not fresh:
        raise SystemExit("no fresh solves in RUN/../_eval-cache: run benchmarks/pool_overfit.py on this run first")
    traj = load_file(fresh[0])["trajectories"]
    noise, solve = traj[:, 0], traj[:, -1]
    ckpts = {int(c.name.split("-")[1]): c for c in (run / "checkpoints").glob("step-*")}
    step = args.step if args.step is not None else max(ckpts)
    teacher = load_teacher(cfg.teacher)
    student = build_student(teacher, cfg)
    name = "ema.safetensors" if args.weights == "ema" else "student.safetensors"
    student.load_state_dict(load_file(ckpts[step] / name), strict=True)
    student.eval()
    base = {"laplacian": laplacian_energy(solve).mean().item(), "contrast": contrast(solve).mean().item()}
    report = {"run": run.name, "step": step, "weights": args.weights, "solve": fresh[0].name, "teacher_solve": base,
              "student": {},
              "command": f"OMP_NUM_THREADS=1 python benchmarks/sharpness.py --run RUNS/{run.name} --step {step} "
                         f"--steps {args.steps}"}
    print(f"{run.name} step {step}: solve laplacian {base['laplacian']:.4f}, contrast {base['contrast']:.4f}")
    for n in (int(v) for v in args.steps.split(",")):
        with torch.no_grad():
            x = torch.cat([sample_flow_map(student_sampler(student), z, uniform_time_grid(n)) for z in noise.split(256)])
        row = {"laplacian_ratio": round(laplacian_energy(x).mean().item() / base["laplacian"], 4),
               "contrast_ratio": round(contrast(x).mean().item() / base["contrast"], 4)}
        report["student"][str(n)] = row
        print(f"  {n} step(s): laplacian x{row['laplacian_ratio']}, contrast x{row['contrast_ratio']}")
    OUT.mkdir(parents=True, exist_ok=True)
    write_json(OUT / f"{run.name}-step{step}.json", report)


if __name__ == "__main__":
    main()
