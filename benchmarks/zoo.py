"""The teacher zoo (issue 30, item 2): every zoo teacher scored with its own samplers, distilled with the defaults,
and the student scored, one command, resumable; ``--table`` writes one markdown table, every teacher a row.

    python benchmarks/zoo.py                                  # every teacher found: samplers, run, eval
    python benchmarks/zoo.py --teachers dit,vpred             # some of them
    python benchmarks/zoo.py --variant dm --set dm_weight=0.5 # an A/B variant: its own runs and rows
    python benchmarks/zoo.py --max-steps 300                  # a reduced budget (variant "steps300" unless named)
    python benchmarks/zoo.py --table                          # benchmarks/results/zoo/table.md from the rows
    python benchmarks/zoo.py --curves A,B --curves-out F.png  # validation rows of run folders A, B as curves

For each teacher (``ZOO``: name -> folder; ``--teacher-dir NAME=FOLDER`` points one elsewhere):

1. **its own samplers** (``teacher-NAME.json``): Euler and Heun on the tool's time grid (``evaluate.
   teacher_euler_sampler`` / ``teacher_heun_sampler``: uniform, through the scheduler's shift, the clip of a
   ``clip_sample`` scheduler honoured) and the scheduler's own diffusers sampler: ``FlowMatchEulerDiscreteScheduler``
   for flow teachers; for diffusion teachers ``DDIMScheduler`` (trailing spacing, eta 0) and the scheduler's own
   ``DDPMScheduler`` ancestral step (trailing spacing, noise from a generator seeded with ``--seed``: stochastic,
   so its flow-map error is not a distance to the ODE), built from the teacher's scheduler config (its
   ``prediction_type`` and clip), fed the network's raw output as a diffusers pipeline would. NFE 1, 2, 4, 8,
   16, 50 on ``--num`` noises of ``--seed`` (1024, 7), scored by ``evaluate.Evaluation`` (what ``ttfm-distill
   eval`` uses): FD to the Fashion-MNIST test images in the shipped classifier's features, FD to the teacher's
   fine solve (RK4, 32 steps), flow-map error.
2. **the distillation**: ``ttfm-distill run [--teacher FOLDER] --output RUNS/ROW -q`` with the defaults plus any
   ``--max-steps`` / ``--set`` of this command (one thread). An unfinished run folder is resumed by the same
   command; a finished one (``metrics.json`` and ``student/``) is not run again.
3. **the student**: ``ttfm-distill eval --model RUNS/ROW --steps 1,2,4,8 --teacher-steps 1,2,4,8,16,50 --num N
   --seed 7 -q --output RUNS/ROW/zoo-eval-nN-sS.json``; its JSON, with the run's settings, is the row
   ``ROW.json`` (``ROW`` = the teacher's name, or ``NAME--VARIANT``).

A row whose JSON exists is skipped (delete it to redo it); every row records the teacher folder's weight hash,
so a row of a re-trained teacher shows. Everything runs with one thread (``OMP_NUM_THREADS=1``).

The table: the student's FD to the test images at 1/2/4/8 steps, the teacher's 50-step Euler FD on the same
noises and grid (the eval report's ``teacher_euler``), their ratios against the issue's goals (3x / 1.5x / 1.2x at
1 / 2 / 4 steps), and the best of the teacher's own samplers at 50 NFE.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "zoo"
SHIPPED = REPO / "benchmarks" / "results" / "zoo-teachers"
#: name -> candidate folders, the first that holds a finished pipeline is used (the shipped copy before the
#: training folder); ``builtin:`` specs are the tool's own
ZOO: dict[str, list[str]] = {
    "embedded": ["builtin:fashion16"],
    "ddpm-project": [str(REPO / "benchmarks" / "results" / "ddpm-teacher")],
    "ddpm-script": [str(SHIPPED / "ddpm-script"), "/work/zoo/ddpm-script", "/work/zoo/ddpm-script-2000"],
    "vpred": [str(SHIPPED / "vpred"), "/work/zoo/vpred"],
    "dit": [str(SHIPPED / "dit"), "/work/zoo/dit"],
}
TEACHER_NFE = (1, 2, 4, 8, 16, 50)
STUDENT_STEPS = (1, 2, 4, 8)
#: the issue's goals: the student's FD at most this many times the teacher's 50-step sampler's
GOALS = {1: 3.0, 2: 1.5, 4: 1.2}


# ------------------------------------------------------------------------------------------------ teachers --
def teacher_ready(spec: str) -> bool:
    """A built-in teacher, or a folder whose pipeline is written (a training still under way has only its state)."""
    if spec.startswith("builtin:"):
        return True
    root = Path(spec)
    return (root / "model_index.json").exists() and any(root.glob("*/diffusion_pytorch_model.safetensors"))


def teacher_spec(name: str, overrides: dict[str, str]) -> str | None:
    if name in overrides:
        return overrides[name]
    return next((c for c in ZOO[name] if teacher_ready(c)), None)


def weights_hash(spec: str) -> str:
    """sha256 (first 16 hex) of the teacher's weight files; the shipped embedded teacher's for ``builtin:``."""
    if spec.startswith("builtin:"):
        from ttfm_distill.teachers.loading import EMBEDDED_TEACHERS

        root = EMBEDDED_TEACHERS[spec.split(":", 1)[1]]
    else:
        root = Path(spec)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _network_output(teacher, x, timestep, cond):
    """The teacher network's raw output (its own convention) at a diffusers scheduler timestep."""
    net, adapter = teacher.network, teacher.adapter
    cond = adapter.complete_cond(net, cond, x.shape[0], x.device, x.dtype, null_text=teacher.null_text)
    ts = timestep.reshape(1).to(x.device).expand(x.shape[0])
    return adapter.call(net, x, ts, cond)


def scheduler_samplers(teacher, seed: int) -> list:
    """The teacher's scheduler's own diffusers samplers, as ``evaluate.Sampler`` objects (possibly none)."""
    import diffusers
    import torch

    from ttfm_distill.evaluate import Sampler

    cfg = dict(teacher.scheduler_config or {})
    name = cfg.pop("_class_name", None)
    cfg.pop("_diffusers_version", None)
    if not name or not teacher.has_network:
        return []
    if teacher.io.prediction_type == "flow":
        if name != "FlowMatchEulerDiscreteScheduler":
            return []

        @torch.no_grad()
        def flow(x0, n, cond=None):
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(cfg)
            mu = {"mu": float(torch.log(torch.tensor(teacher.shift)))} if cfg.get("use_dynamic_shifting") else {}
            sched.set_timesteps(n, device=x0.device, **mu)
            x = x0.clone()
            for k in sched.timesteps:
                x = sched.step(_network_output(teacher, x, k, cond), k, x).prev_sample
            return x

        return [Sampler("scheduler_flowmatch_euler", flow, conditional=True)]

    base = {**cfg, "timestep_spacing": "trailing"}

    @torch.no_grad()
    def ddim(x0, n, cond=None):
        sched = diffusers.DDIMScheduler.from_config({**base, "set_alpha_to_one": True})
        sched.set_timesteps(n, device=x0.device)
        x = x0.clone()
        for k in sched.timesteps:
            x = sched.step(_network_output(teacher, x, k, cond), k, x, eta=0.0).prev_sample
        return x

    gen = {"g": None}

    @torch.no_grad()
    def ddpm(x0, n, cond=None):
        sched = diffusers.DDPMScheduler.from_config(base)
        sched.set_timesteps(n, device=x0.device)
        x = x0.clone()
        for k in sched.timesteps:
            x = sched.step(_network_output(teacher, x, k, cond), k, x, generator=gen["g"]).prev_sample
        return x

    return [Sampler("scheduler_ddim", ddim, conditional=True), _seeded_ddpm(ddpm, gen, seed)]


def _seeded_ddpm(ddpm, gen: dict, seed: int):
    """The ancestral sampler with its noise generator reset whenever a new NFE starts: each row is reproducible
    (``Evaluation.run`` calls it in a fixed order: a 2-sample warm-up, then the batches of each NFE)."""
    import torch

    from ttfm_distill.evaluate import Sampler

    state = {"nfe": None}

    def run(x0, n, cond=None):
        if state["nfe"] != n:
            gen["g"] = torch.Generator(device=x0.device).manual_seed(seed + 1000 * n)
            state["nfe"] = n
        return ddpm(x0, n, cond)

    return Sampler("scheduler_ddpm_ancestral", run, conditional=True)


def score_teacher(name: str, spec: str, args, out: Path) -> None:
    """Row 1: the teacher's own samplers on the shared noises."""
    import torch

    from ttfm_distill.evaluate import Evaluation, teacher_euler_sampler, teacher_heun_sampler
    from ttfm_distill.fileio import write_json
    from ttfm_distill.teachers.loading import load_teacher

    t0 = time.perf_counter()
    teacher = load_teacher(spec)
    ev = Evaluation(teacher, num=args.num, seed=args.seed, reference_steps=args.reference_steps, batch_size=256)
    print(f"{name}: reference (RK4 {args.reference_steps} steps) in {time.perf_counter() - t0:.0f} s", flush=True)
    results = {}
    samplers = [teacher_euler_sampler(teacher), teacher_heun_sampler(teacher), *scheduler_samplers(teacher, args.seed)]
    for sampler in samplers:
        s0 = time.perf_counter()
        results[sampler.name] = ev.run(sampler, args.teacher_nfe)
        fd = {n: round(r["fd_test_images"], 2) for n, r in results[sampler.name].items() if r and "fd_test_images" in r}
        print(f"{name}: {sampler.name} FD {fd} ({time.perf_counter() - s0:.0f} s)", flush=True)
    report = {"teacher": name, "folder": spec, "weights_sha256": weights_hash(spec),
              "describe": _plain(teacher.describe()),
              "results": results, "floors": ev.floors(), "settings": ev.settings(), "not_computed": ev.not_computed,
              "samplers": {"teacher_euler": "Euler on the tool's grid (evaluate.teacher_euler_sampler)",
                           "teacher_heun": "Heun, NFE/2 steps on the tool's grid (evaluate.teacher_heun_sampler)",
                           "scheduler_flowmatch_euler": "diffusers FlowMatchEulerDiscreteScheduler from the teacher's "
                                                        "config, set_timesteps(NFE)",
                           "scheduler_ddim": "diffusers DDIMScheduler from the teacher's config, trailing spacing, "
                                             "eta 0, set_alpha_to_one",
                           "scheduler_ddpm_ancestral": "diffusers DDPMScheduler.step from the teacher's config, "
                                                       "trailing spacing, noise seeded per NFE (stochastic)"},
              **ev.info, "torch_threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1)}
    write_json(out, report)
    print(f"{name}: teacher row -> {out} ({report['seconds']} s)", flush=True)


def _plain(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


# ------------------------------------------------------------------------------------------------ students --
def one_thread_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_finished(run: Path) -> bool:
    """The run wrote its metrics and exported its student (a pipeline folder, or the older bare layout)."""
    student = run / "student"
    return (run / "metrics.json").exists() and ((student / "model_index.json").exists()
                                                or (student / "ttfm_config.json").exists())


def _call(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.call(cmd, env=one_thread_env(), cwd=str(REPO), stdout=f, stderr=subprocess.STDOUT)
    return rc, round(time.time() - t0, 1)


def distill_and_score(name: str, spec: str, row: str, args, out: Path) -> bool:
    """Rows 2-3: ``ttfm-distill run`` then ``ttfm-distill eval``; the row JSON. False when a command failed."""
    from ttfm_distill.evaluate import quality_warnings
    from ttfm_distill.fileio import write_json
    from ttfm_distill.runstate import RunState

    runs = Path(args.runs_dir)
    run = runs / row
    runs.mkdir(parents=True, exist_ok=True)
    log = runs / f"{row}.log"
    teacher = [] if spec.startswith("builtin:") else ["--teacher", spec]
    extra = ([] if args.max_steps is None else ["--max-steps", str(args.max_steps)]) + [
        a for kv in args.set for a in ("--set", kv)]
    run_cmd = [sys.executable, "-m", "ttfm_distill", "run", *teacher, "--output", str(run), *extra, "-q"]
    run_seconds = None
    if run_finished(run):
        print(f"{row}: {run} has finished already", flush=True)
    else:
        print(f"{row}: {' '.join(run_cmd[1:])}  (log {log})", flush=True)
        rc, run_seconds = _call(run_cmd, log)
        if rc != 0 or not run_finished(run):
            print(f"{row}: the run failed (exit {rc}); see {log}", flush=True)
            return False
    eval_json = run / f"zoo-eval-n{args.num}-s{args.seed}.json"
    eval_cmd = [sys.executable, "-m", "ttfm_distill", "eval", "--model", str(run),
                "--steps", ",".join(map(str, args.student_steps)),
                "--teacher-steps", ",".join(map(str, args.teacher_nfe)), "--num", str(args.num),
                "--seed", str(args.seed), "--reference-steps", str(args.reference_steps), "-q",
                "--output", str(eval_json)]
    eval_seconds = None
    if not eval_json.exists():
        print(f"{row}: {' '.join(eval_cmd[1:])}", flush=True)
        rc, eval_seconds = _call(eval_cmd, log)
        if rc != 0 or not eval_json.exists():
            print(f"{row}: eval failed (exit {rc}); see {log}", flush=True)
            return False
    report = json.loads(eval_json.read_text())
    config = json.loads((run / "config.json").read_text())
    state = RunState.read(run, config)  # the run state: a time budget's fitted step count, the teacher's key
    record = {"row": row, "teacher": name, "folder": spec, "weights_sha256": weights_hash(spec),
              "variant": args.variant, "max_steps": args.max_steps, "set": list(args.set),
              "run": {"command": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ttfm-distill " + " ".join(run_cmd[3:]),
                      "folder": str(run), "wall_seconds": run_seconds, "config": config,
                      "state": state},
              "eval": {"command": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ttfm-distill " + " ".join(eval_cmd[3:]),
                       "wall_seconds": eval_seconds, "report": report},
              "summary": summary(report), "warnings": quality_warnings(report)}
    write_json(out, record)
    s = record["summary"]
    print(f"{row}: student FD {s['student_fd']}, teacher Euler-50 FD {s['teacher_euler_50_fd']}, "
          f"ratios {s['ratios']} -> {out}", flush=True)
    return True


def summary(report: dict) -> dict:
    """The table's figures from an eval report: student FD per step, teacher Euler-50 FD, ratios, goals met."""
    res = report["results"]

    def fd(rows: dict, n: int, key: str = "fd_test_images"):
        r = rows.get(str(n))
        return None if not r or r.get(key) is None else round(float(r[key]), 3)

    student = res.get("student", {})
    ref = fd(res.get("teacher_euler", {}), 50)
    out = {"student_fd": {n: fd(student, n) for n in STUDENT_STEPS},
           "student_fd_teacher_fine": {n: fd(student, n, "fd_teacher_fine") for n in STUDENT_STEPS},
           "student_fme": {n: fd(student, n, "flow_map_error") for n in STUDENT_STEPS},
           "teacher_euler_50_fd": ref}
    out["ratios"] = {n: (None if v is None or not ref else round(v / ref, 3)) for n, v in out["student_fd"].items()}
    out["goals_met"] = {n: (None if out["ratios"].get(n) is None else out["ratios"][n] <= g) for n, g in GOALS.items()}
    return out


# ------------------------------------------------------------------------------------------------- table --
def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_table(results: Path) -> Path:
    rows = sorted(p for p in results.glob("*.json") if not p.name.startswith("teacher-"))
    teachers = {p.name[len("teacher-"):-5]: json.loads(p.read_text()) for p in results.glob("teacher-*.json")}
    students = [json.loads(p.read_text()) for p in rows]
    order = list(ZOO) + sorted(set(teachers) - set(ZOO))
    lines = ["# The teacher zoo", "",
             "Written by `python benchmarks/zoo.py --table` from the rows in this folder. FD: Frechet distance to the "
             "Fashion-MNIST test images in the shipped classifier's features (`ttfm-distill eval`); the student's "
             "at 1 / 2 / 4 / 8 steps; ref.: the teacher's 50-step Euler on the same noises and grid; ratio = student / "
             "ref. against the issue's goals (<= 3x / 1.5x / 1.2x at 1 / 2 / 4 steps; a met goal in bold).", "",
             "| teacher | variant | steps trained | FD 1 | FD 2 | FD 4 | FD 8 | ref. (Euler 50) | 1-step ratio (3x) | "
             "2-step ratio (1.5x) | 4-step ratio (1.2x) | teacher's best own sampler at 50 NFE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        mine = [s for s in students if s["teacher"] == name]
        best = _best_own(teachers.get(name), 50)
        if not mine and name in teachers:
            lines.append(f"| {name} | (not distilled yet) | | | | | | | | | | {best} |")
        for s in sorted(mine, key=lambda s: (s["variant"] != "default", s["variant"])):
            sm = s["summary"]
            cfg = s["run"]["config"]
            trained = (s["run"].get("state") or {}).get("fitted_steps") or cfg.get("fitted_steps") or cfg["max_steps"]
            ratio = []
            for n, goal in GOALS.items():
                r = sm["ratios"].get(str(n), sm["ratios"].get(n))
                text = "-" if r is None else f"{r:.2f}x"
                ratio.append(f"**{text}**" if r is not None and r <= goal else text)
            fds = [sm["student_fd"].get(str(n), sm["student_fd"].get(n)) for n in STUDENT_STEPS]
            lines.append(f"| {name} | {s['variant']} | {trained} | " + " | ".join(_f(v) for v in fds)
                         + f" | {_f(sm['teacher_euler_50_fd'])} | " + " | ".join(ratio) + f" | {best} |")
    lines += ["", "## The students' flow-map error and FD to the teacher's fine solve", "",
              "Flow-map error: the student's N-step samples against the teacher's RK4 solve of the same noises "
              "(the teacher's own Euler at the same NFE in brackets); FD fine: FD to that solve's samples in the "
              "classifier's features. Wall: the run and the eval, seconds, one thread.", "",
              "| teacher | variant | FME 1 | FME 2 | FME 4 | FME 8 | FD fine 1 | FD fine 2 | FD fine 4 | FD fine 8 | "
              "wall run / eval |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        for s in sorted((s for s in students if s["teacher"] == name),
                        key=lambda s: (s["variant"] != "default", s["variant"])):
            sm, res = s["summary"], s["eval"]["report"]["results"]

            def fme(n):
                mine = sm["student_fme"].get(str(n), sm["student_fme"].get(n))
                euler = (res.get("teacher_euler", {}).get(str(n)) or {}).get("flow_map_error")
                return f"{_f(mine, 3)} ({_f(euler, 3)})"

            fine = [sm["student_fd_teacher_fine"].get(str(n), sm["student_fd_teacher_fine"].get(n))
                    for n in STUDENT_STEPS]
            lines.append(f"| {name} | {s['variant']} | " + " | ".join(fme(n) for n in STUDENT_STEPS) + " | "
                         + " | ".join(_f(v) for v in fine)
                         + f" | {_f(s['run']['wall_seconds'], 0)} / {_f(s['eval']['wall_seconds'], 0)} |")
    lines += ["", "## The teachers' own samplers", "",
              "FD to the test images (flow-map error against the teacher's RK4 solve in brackets) at each NFE, from "
              "the `teacher-NAME.json` rows (`scheduler_*`: diffusers' own scheduler, see benchmarks/zoo.py).", "",
              "| teacher | sampler | " + " | ".join(f"NFE {n}" for n in TEACHER_NFE) + " |",
              "|---|---|" + "---|" * len(TEACHER_NFE)]
    for name in order:
        t = teachers.get(name)
        if not t:
            continue
        for sampler, res in t["results"].items():
            cells = []
            for n in TEACHER_NFE:
                r = res.get(str(n))
                fme = r.get("flow_map_error", float("nan")) if r else None
                cells.append("" if not r else f"{_f(r.get('fd_test_images'))} ({fme:.3g})")
            lines.append(f"| {name} | {sampler} | " + " | ".join(cells) + " |")
    noises = sorted({(r["eval"]["report"]["settings"]["num"], r["eval"]["report"]["settings"]["seed"])
                     for r in students if "eval" in r} | {(t["settings"]["num"], t["settings"]["seed"])
                                                          for t in teachers.values() if "settings" in t})
    lines += ["", "Noises (seed): " + (", ".join(f"{n} ({s})" for n, s in noises) or "-")
              + ". Teacher folders and settings: each row's JSON (`folder`, `weights_sha256`, `settings`).", ""]
    path = results / "table.md"
    path.write_text("\n".join(lines))
    return path


def _best_own(teacher: dict | None, nfe: int) -> str:
    if not teacher:
        return "-"
    found = [(r[str(nfe)]["fd_test_images"], name) for name, r in teacher["results"].items()
             if r.get(str(nfe)) and r[str(nfe)].get("fd_test_images") is not None]
    if not found:
        return "-"
    fd, name = min(found)
    return f"{name} {fd:.1f}"


# -------------------------------------------------------------------------------------------------- main --
def write_curves(names: list[str], runs: Path, out: Path, measure: str = "fd_test_images") -> Path:
    """The validation rows (``train_log.jsonl``) of the run folders ``RUNS/NAME`` as one figure: ``measure`` at
    1, 2 and 4 steps against the step, a line style a run; the points beside it as JSON (``OUT.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ttfm_distill.plots import save_figure
    from ttfm_distill.tracking import read_log

    curves = {}
    for name in names:
        rows = [r for r in read_log(runs / name / "train_log.jsonl") if r.get("kind") == "validation"]
        curves[name] = {"steps": [r["step"] for r in rows],
                        **{n: [r[measure][n] for r in rows] for n in ("1", "2", "4")},
                        "validation_samples": rows[0]["validation_samples"] if rows else None}
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    styles = ["-", "--", ":", "-."]
    for ax, n in zip(axes, ("1", "2", "4")):
        for k, (name, c) in enumerate(curves.items()):
            ax.plot(c["steps"], c[n], styles[k % len(styles)], marker="o", ms=3, label=name)
        ax.set_title(f"{n} step(s)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(measure, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out, dpi=100)
    out.with_suffix(".json").write_text(json.dumps({"measure": measure, "runs": curves}, indent=1) + "\n")
    return out


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default=",".join(ZOO), help=f"comma-separated names (default: all: {', '.join(ZOO)})")
    p.add_argument("--teacher-dir", action="append", default=[], metavar="NAME=FOLDER",
                   help="use FOLDER for teacher NAME (a new NAME adds a teacher)")
    p.add_argument("--variant", default=None,
                   help="A/B variant name: its own run folders and rows (ROW = NAME--VARIANT)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to ttfm-distill run")
    p.add_argument("--max-steps", type=int, default=None, help="passed to ttfm-distill run (recorded in the row)")
    p.add_argument("--num", type=int, default=1024)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--reference-steps", type=int, default=32)
    p.add_argument("--teacher-nfe", default=",".join(map(str, TEACHER_NFE)))
    p.add_argument("--student-steps", default=",".join(map(str, STUDENT_STEPS)))
    p.add_argument("--stages", default="teacher,student", help="teacher (its samplers), student (run + eval), or both")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "zoo"), help="run folders (default runs/zoo, git-ignored)")
    p.add_argument("--results-dir", default=str(RESULTS),
                   help="row JSONs and table.md (default benchmarks/results/zoo)")
    p.add_argument("--table", action="store_true", help="only write RESULTS/table.md from the rows there")
    p.add_argument("--curves", default=None, metavar="RUN,RUN",
                   help="only draw the validation rows of these run folders (under --runs-dir) to --curves-out")
    p.add_argument("--curves-out", default=str(RESULTS / "curves.png"))
    args = p.parse_args(argv)
    from ttfm_distill.cli import parse_steps

    args.teacher_nfe = parse_steps(args.teacher_nfe, "--teacher-nfe")
    args.student_steps = parse_steps(args.student_steps, "--student-steps")
    if args.variant is None:
        if args.set:
            p.error("--set needs --variant NAME (the rows of a variant must not take the default rows' names)")
        args.variant = "default" if args.max_steps is None else f"steps{args.max_steps}"
    if "--" in args.variant or "/" in args.variant or not args.variant:
        p.error("--variant: a plain name without '--' or '/'")
    args.overrides = {}
    for item in args.teacher_dir:
        name, _, folder = item.partition("=")
        if not name or not folder:
            p.error(f"--teacher-dir expects NAME=FOLDER, got {item!r}")
        args.overrides[name] = folder
        ZOO.setdefault(name, [folder])
    args.names = [n for n in args.teachers.split(",") if n]
    unknown = [n for n in args.names if n not in ZOO]
    if unknown:
        p.error(f"unknown teacher(s) {unknown}; the zoo: {', '.join(ZOO)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    results = Path(args.results_dir)
    if args.table:
        print(f"wrote {write_table(results)}")
        return 0
    if args.curves:
        print(f"wrote {write_curves(args.curves.split(','), Path(args.runs_dir), Path(args.curves_out))}")
        return 0
    import torch

    torch.set_num_threads(1)
    stages = set(args.stages.split(","))
    failed = []
    for name in args.names:
        spec = teacher_spec(name, args.overrides)
        if spec is None:
            print(f"{name}: no finished teacher in {', '.join(ZOO[name])}; skipped", flush=True)
            failed.append(name)
            continue
        if "teacher" in stages:
            out = results / f"teacher-{name}.json"
            if out.exists():
                print(f"{name}: {out} exists; skipped", flush=True)
            else:
                score_teacher(name, spec, args, out)
        if "student" in stages:
            row = name if args.variant == "default" else f"{name}--{args.variant}"
            out = results / f"{row}.json"
            if out.exists():
                print(f"{row}: {out} exists; skipped", flush=True)
            elif not distill_and_score(name, spec, row, args, out):
                failed.append(row)
    if results.exists():
        print(f"wrote {write_table(results)}", flush=True)
    if failed:
        print(f"not done: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
