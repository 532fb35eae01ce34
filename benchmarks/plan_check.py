"""Check ``ttfm-distill plan`` against measurements on real tensors (CPU).

    OMP_NUM_THREADS=1 python benchmarks/plan_check.py            # writes benchmarks/results/plan-check.json and .md

For each model (the tiny families, the embedded teacher, a CPU-sized SD3-style transformer),
full and LoRA students:

* **FLOPs**: one real ITVM training step (the trainer's ``backward_micro_batches``, default
  options, diagonal fraction 0 and 0.5) on CPU tensors under the planner's FLOP counter
  (``torch.utils.flop_counter.FlopCounterMode`` with a grouped-convolution-correct backward),
  attention on the math kernel (torch's CPU fused kernel has no FLOP formula, so it would
  count as zero), against the plan's FLOPs per sample times the batch.
* **Peak memory**: ``benchmarks/cost.py``'s method, in a fresh process per case: peak
  resident set size (``VmHWM``, reset through ``/proc/self/clear_refs``) during model
  building and 3 training steps, minus the resident size before; against the plan's peak
  for one GPU, data parallel, at the same batch.  Page-level: includes allocator caching.

Tolerances (issue 18): 5% for FLOPs, 20% for memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from cost import Stepper, _proc_status_kib, _warm_up  # noqa: E402

from ttfm_distill import scale  # noqa: E402
from ttfm_distill.fileio import write_json  # noqa: E402
from ttfm_distill.plan import count, make_plan, objective_evaluations, resolve_teacher  # noqa: E402
from ttfm_distill.plan.estimate import build_models, example_inputs  # noqa: E402
from ttfm_distill.plan.meta import LiveTracker, flop_counter  # noqa: E402

#: model -> (FLOP batch, memory batch)
MODELS = {
    "tiny-sd3": (8, 1024), "tiny-flux": (8, 512), "tiny-unet-cond": (8, 512), "tiny-sana": (8, 1024),
    "tiny-pixart": (8, 1024), "fashion16": (8, 64), "sd3-small": (4, 16),
}
LORA_RANK = 4
FLOP_TOL, MEMORY_TOL = 0.05, 0.20


def build_real(name: str, lora_rank: int, mixed_precision: str):
    spec = resolve_teacher(name)
    teacher, student, view = build_models(spec, lora_rank, device="cpu")
    if mixed_precision != "no":
        scale.keep_time_embedders_fp32(student, teacher)
    if not lora_rank:  # the frozen teacher as the trainer holds it (bf16: its linear/conv weights in bf16)
        scale.hold_frozen(teacher.network, mixed_precision)
    tokens = spec.text_tokens

    def cond(n, g):
        return example_inputs(teacher, tokens, batch=n, device="cpu", generator=g)[3]

    return spec, teacher, student, view, cond


def measured_flops(name: str, lora_rank: int, batch: int, diagonal: float) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    accelerator = scale.make_accelerator("no", False, cpu=True)
    _, _, student, view, cond = build_real(name, lora_rank, "no")
    stepper = Stepper(accelerator, student, view, cond, batch, "itvm", diagonal)
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as counter:
        stepper.step()
    return float(counter.get_total_flops())


def memory_probe(args) -> dict:
    """In a fresh process: peak RSS growth over building the models and ``--steps`` ITVM steps."""
    torch.set_num_threads(1)
    accelerator = scale.make_accelerator(args.mixed_precision, False, cpu=True)
    _warm_up(torch.device("cpu"))
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = _proc_status_kib("VmRSS")
    _, _, student, view, cond = build_real(args.model, args.lora_rank, args.mixed_precision)
    if args.checkpointing:
        scale.enable_gradient_checkpointing(student)
    stepper = Stepper(accelerator, student, view, cond, args.batch, "itvm", 0.0)
    for _ in range(args.steps):
        stepper.step()
    rss_peak = (_proc_status_kib("VmHWM") - rss0) * 1024
    # then the tensor-level peak of one more step (the CPU analogue of torch.cuda.max_memory_allocated):
    # the bytes held before it (weights, teacher, AdamW state) plus the peak of what the step allocates
    seen, static = set(), 0
    opt = getattr(stepper.opt, "optimizer", stepper.opt)
    held = [*student.parameters(), *student.buffers(), *view.network.parameters(), *view.network.buffers()]
    held += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for v in held:
        key = v.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            static += v.untyped_storage().nbytes()
    tracker = LiveTracker(seen)
    with tracker.mode:
        stepper.step()
    return {"peak_bytes": rss_peak, "tensor_peak_bytes": static + tracker.peak}


#: glibc keeps freed mid-size blocks and raises its mmap threshold as it goes, so peak RSS includes
#: allocator caching; with a fixed threshold large tensors are mapped and unmapped one by one
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_probe(model, lora_rank, batch, precision, checkpointing, steps, env=None) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", "--model", model, "--lora-rank", str(lora_rank),
           "--batch", str(batch), "--mixed-precision", precision, "--steps", str(steps)]
    if checkpointing:
        cmd.append("--checkpointing")
    import os

    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode:
        raise RuntimeError(f"probe {cmd} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def planned(name: str, diagonal: float, batch: int):
    counts = count(resolve_teacher(name), lora_rank=LORA_RANK, autocast_device="cpu")
    ev = objective_evaluations("itvm", {}, diagonal)
    return counts, ev, make_plan(counts, ev, gpus=1, gpu="H100", batch_size=batch, headroom=0.0,
                                 gpu_memory=1e15)


def layout(plan, student, precision, ckpt):
    return next(lay for lay in plan.layouts if lay.student == student and lay.parallel == "dp"
                and lay.precision == precision and lay.checkpointing == ckpt)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", type=int, default=3, help="training steps of each memory probe")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--output", default=str(ROOT / "results" / "plan-check.json"))
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="fashion16", help=argparse.SUPPRESS)
    p.add_argument("--lora-rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--mixed-precision", default="no", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return
    rows, started = [], time.time()
    for name in args.models.split(","):
        flop_batch, mem_batch = MODELS[name]
        for diagonal in (0.0, 0.5):
            counts, ev, plan = planned(name, diagonal, flop_batch)
            for student, rank in (("full", 0), ("lora", LORA_RANK)):
                pred = layout(plan, student, "fp32", False).flops_per_sample * flop_batch
                meas = measured_flops(name, rank, flop_batch, diagonal)
                rows.append({"model": name, "check": "flops", "student": student, "diagonal_fraction": diagonal,
                             "batch": flop_batch, "predicted": pred, "measured": meas, "ratio": pred / meas,
                             "within": abs(pred / meas - 1) <= FLOP_TOL})
                print(json.dumps(rows[-1]), flush=True)
        if args.no_memory:
            continue
        counts, ev, plan = planned(name, 0.0, mem_batch)
        for student, rank, precision, ckpt in (("full", 0, "fp32", False), ("lora", LORA_RANK, "fp32", False),
                                               ("full", 0, "bf16", False), ("full", 0, "fp32", True)):
            lay = layout(plan, student, precision, ckpt)
            probe = run_probe(name, rank, mem_batch, "no" if precision == "fp32" else precision, ckpt, args.steps)
            meas, tensors = probe["peak_bytes"], probe["tensor_peak_bytes"]
            fixed = run_probe(name, rank, mem_batch, "no" if precision == "fp32" else precision, ckpt, args.steps,
                              FIXED_MMAP)["peak_bytes"]
            rows.append({"model": name, "check": "memory", "student": student, "precision": precision,
                         "checkpointing": ckpt, "batch": mem_batch, "predicted": lay.peak_bytes, "measured": meas,
                         "ratio": lay.peak_bytes / meas, "within": abs(lay.peak_bytes / meas - 1) <= MEMORY_TOL,
                         "rss_fixed_mmap": fixed, "ratio_fixed_mmap": lay.peak_bytes / fixed,
                         "within_fixed_mmap": abs(lay.peak_bytes / fixed - 1) <= MEMORY_TOL,
                         "tensor_peak": tensors, "ratio_tensor": lay.peak_bytes / tensors,
                         "within_tensor": abs(lay.peak_bytes / tensors - 1) <= MEMORY_TOL,
                         "terms": lay.terms, "activations_per_sample": lay.activations_per_sample})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "terms"}), flush=True)
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/plan_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": "CPU, 1 thread (torch.set_num_threads(1)), 2-core machine shared with other jobs",
        "torch": torch.__version__, "lora_rank": LORA_RANK, "tolerance": {"flops": FLOP_TOL, "memory": MEMORY_TOL},
        "rss_fixed_mmap": "the same RSS measure with MALLOC_MMAP_THRESHOLD_=65536",
        "bf16_note": "bf16 planned with CPU autocast's op lists (norms and softmax in bf16); the plan itself "
                     "uses CUDA's (norms and softmax in fp32), which this CPU check cannot test",
        "memory_measure": "peak RSS growth (VmHWM after clear_refs, minus VmRSS before building), as benchmarks/cost.py; "
                          "tensor_peak: bytes held before one more step plus the peak of live tensors it allocates "
                          "(a dispatch-mode tracker; the CPU analogue of torch.cuda.max_memory_allocated)",
        "flops_measure": "FlopCounterMode on real CPU tensors, one ITVM step, attention on the math kernel, "
                         "grouped-convolution-correct backward",
        "wall_seconds": round(time.time() - started, 1), "rows": rows,
    }
    out = Path(args.output)
    write_json(out, result)
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


def markdown(result) -> str:
    lines = [f"`{result['command']}` ({result['device']}, torch {result['torch']}, {result['wall_seconds']} s)", "",
             "| model | check | student | setting | batch | planned | measured (RSS, as cost.py) | planned/measured | within | "
             "RSS, fixed mmap threshold | planned/that | tensor-level peak | planned/tensor-level |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["check"] == "flops":
            setting, unit, scale_ = f"ITVM, diagonal {r['diagonal_fraction']}", "GFLOP", 1e9
        else:
            setting = f"{r['precision']}{', checkpointing' if r['checkpointing'] else ''}"
            unit, scale_ = "MB", 1e6
        tol = result["tolerance"]["flops" if r["check"] == "flops" else "memory"]
        lines.append(f"| {r['model']} | {r['check']} | {r['student']} | {setting} | {r['batch']} | "
                     f"{r['predicted'] / scale_:.4g} {unit} | {r['measured'] / scale_:.4g} {unit} | {r['ratio']:.3f} | "
                     f"{'yes' if r['within'] else 'no'} (±{100 * tol:.0f}%) | "
                     + (f"{r['rss_fixed_mmap'] / scale_:.4g} {unit} | {r['ratio_fixed_mmap']:.3f} | "
                        f"{r['tensor_peak'] / scale_:.4g} {unit} | {r['ratio_tensor']:.3f} |" if "tensor_peak" in r
                        else "- | - | - | - |"))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
