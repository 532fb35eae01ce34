"""The GPU check of issue 18: the plan's predictions against one real GPU, in at most 8 minutes.

    python benchmarks/gpu_check.py                       # CUDA: an SD3.5-medium-sized student (random weights), bf16
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --tiny     # the same path on CPU, tiny, in ~2 min

On one device it

1. plans the run (``ttfm_distill.plan``, counted on the meta device) for one GPU of this kind;
2. builds the teacher from its config with random weights and the two-time student (full, then LoRA),
   bf16 autocast over fp32 weights as ``ttfm-distill run --set mixed_precision=bf16`` trains;
3. times ITVM training steps (the trainer's ``backward_micro_batches``, default options) and plain
   flow-matching steps on the same network (``benchmarks/cost.py``'s ``Stepper``), alternating blocks;
   reports samples/s, MFU (the plan's model FLOPs per sample x samples/s / the GPU's bf16 dense peak)
   and the ITVM / flow-matching step-time ratio;
4. measures peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the live-tensor peak) against
   the plan's predicted peak at the same batch;
5. runs ``ttfm-distill run`` for 30 steps on the embedded teacher (on CUDA when there is one) and
   evaluates the exported student on the same device (``evaluate_student``).

It writes ``benchmarks/results/gpu-<device>.json`` (``--output`` to change).  Every section has a time
guard; the whole check stops adding sections once ``--budget`` seconds (default 420) have passed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from cost import Stepper, sync  # noqa: E402

from ttfm_distill import scale  # noqa: E402
from ttfm_distill.fileio import write_json  # noqa: E402
from ttfm_distill.plan import GPUS, count, make_plan, objective_evaluations, resolve_teacher  # noqa: E402
from ttfm_distill.plan.estimate import build_models, example_inputs  # noqa: E402
from ttfm_distill.plan.meta import LiveTracker  # noqa: E402


def gpu_kind(device: torch.device) -> str:
    if device.type != "cuda":
        return "H100"  # a stand-in peak for the CPU dry run; its MFU figure means nothing
    name = torch.cuda.get_device_name(device).upper()
    return next((k for k in GPUS if k in name), "H100")


def device_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.time(), seconds

    def left(self) -> float:
        return self.seconds - (time.time() - self.start)


def time_modes(steppers: dict, steps: int, block: int, device, budget: Budget) -> dict:
    for st in steppers.values():  # warm-up (kernels, allocator, optimizer state)
        for _ in range(2):
            st.step()
    sync(device)
    times = {m: [] for m in steppers}
    while min(len(v) for v in times.values()) < steps and budget.left() > 60:
        for mode, st in steppers.items():
            for _ in range(block):
                sync(device)
                t0 = time.perf_counter()
                st.step().item()
                sync(device)
                times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items() if v}


def student_section(name: str, spec, plan, rank: int, batch: int, device, steps: int, budget: Budget) -> dict:
    """Build, time and measure one student (full: rank 0, else LoRA)."""
    kind = "lora" if rank else "full"
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    accelerator = scale.make_accelerator("bf16", False, cpu=device.type == "cpu")
    teacher, student, view = build_models(spec, rank, device=str(device))
    scale.keep_time_embedders_fp32(student, teacher)

    def cond(n, g, teacher=teacher):  # bound now: the section deletes its own name for the teacher at the end
        return example_inputs(teacher, spec.text_tokens, batch=n, device=str(device), generator=g)[3]

    itvm = Stepper(accelerator, student, view, cond, batch, "itvm")
    out = {"student": kind, "lora_rank": rank, "batch": batch,
           "trained_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad)}
    lay = next(lay for lay in plan.layouts if lay.student == kind and lay.parallel == "dp"
               and lay.precision == "bf16" and not lay.checkpointing)
    # peak memory over 3 ITVM steps, from a fresh peak
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3):
            itvm.step()
        sync(device)
        out["peak_bytes_measured"] = torch.cuda.max_memory_allocated(device)
        out["peak_measure"] = "torch.cuda.max_memory_allocated over 3 ITVM steps (models, optimizer, activations)"
    else:
        itvm.step()
        held = [*student.parameters(), *student.buffers(), *view.network.parameters(), *view.network.buffers()]
        opt = getattr(itvm.opt, "optimizer", itvm.opt)
        held += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        keys = {v.untyped_storage()._cdata: v.untyped_storage().nbytes() for v in held}
        tracker = LiveTracker(set(keys))
        with tracker.mode:
            itvm.step()
        out["peak_bytes_measured"] = sum(keys.values()) + tracker.peak
        out["peak_measure"] = "live-tensor peak of one ITVM step plus the bytes held before it (CPU)"
    out["peak_bytes_planned"] = lay.peak_bytes
    out["peak_planned_over_measured"] = lay.peak_bytes / out["peak_bytes_measured"]
    # timing: ITVM against flow matching on the same network (its own copy for the full student)
    steppers = {"itvm": itvm}
    if budget.left() > 90:
        if kind == "full":
            fm_student = build_models(spec, 0, device=str(device))[1]
            scale.keep_time_embedders_fp32(fm_student)
            steppers["flow_matching"] = Stepper(accelerator, fm_student, view, cond, batch, "flow_matching")
        else:
            steppers["flow_matching"] = Stepper(accelerator, student, view, cond, batch, "flow_matching")
    med = time_modes(steppers, steps, 2, device, budget)
    flops = lay.flops_per_sample
    peak = GPUS[plan.gpu]["bf16"]
    out["step_seconds_median"] = med
    out["samples_per_second"] = {m: batch / v for m, v in med.items()}
    if "itvm" in med:
        out["itvm_flops_per_sample_planned"] = flops
        out["mfu_itvm"] = flops * batch / med["itvm"] / peak if device.type == "cuda" else None
        out["mfu_itvm_planned_assumption"] = plan.mfu
        out["step_seconds_planned_at_assumed_mfu"] = (batch * lay.hardware_flops_per_sample / (peak * plan.mfu)
                                                      if device.type == "cuda" else None)
    if "flow_matching" in med and "itvm" in med:
        fm_flops = (student_flops := next(c for c in (plan.counts.full, plan.counts.lora) if c and c.kind == kind)
                    ).train_flops
        out["flow_matching_flops_per_sample_planned"] = fm_flops
        out["mfu_flow_matching"] = fm_flops * batch / med["flow_matching"] / peak if device.type == "cuda" else None
        out["itvm_over_flow_matching_time"] = med["itvm"] / med["flow_matching"]
        out["itvm_over_flow_matching_flops"] = flops / student_flops.train_flops
    del steppers, itvm, student, teacher, view
    return out


def end_to_end(device, steps: int, budget: Budget, extra: tuple = ()) -> dict:
    """``ttfm-distill run`` for ``steps`` steps on the embedded teacher (with ``extra`` flags: the
    distribution-matching term's row adds ``--set dm_weight=...``), then evaluation on ``device``."""
    from ttfm_distill.evaluate import evaluate_student, load_student_and_teacher

    out_dir = Path(tempfile.mkdtemp(prefix="ttfm-gpu-check-")) / "run"
    cmd = [sys.executable, "-m", "ttfm_distill", "run", "--teacher", "builtin:fashion16", "--output", str(out_dir),
           "--max-steps", str(steps), "--batch-size", "32", "--set", "pool_size=256", "--set", "eval_samples=64",
           "--set", "reference_steps=16", "--set", "checkpoint_every=1000", "-q", *extra]
    env = dict(os.environ)
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(60, int(budget.left())))
    res = {"command": " ".join(cmd[1:]), "returncode": r.returncode, "run_seconds": round(time.time() - t0, 1),
           "stderr_tail": r.stderr[-600:]}
    if r.returncode:
        return res
    folder, student, _, teacher = load_student_and_teacher(str(out_dir))
    t0 = time.time()
    report = evaluate_student(student.to(device), teacher, steps=(1, 2, 4), num=64, reference_steps=16,
                              batch_size=64, device=str(device))
    res["eval_seconds"] = round(time.time() - t0, 1)
    res["eval_device"] = str(device)
    from ttfm_distill.evaluate import summary_lines

    res["flow_map_error"] = {sampler: {n: (m or {}).get("flow_map_error") for n, m in by_n.items()}
                             for sampler, by_n in report["results"].items()}
    res["summary"] = summary_lines(report)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="a tiny SD3 config (for the CPU dry run)")
    p.add_argument("--teacher", default=None, help="built-in name (default: sd3.5-medium, or tiny-sd3 with --tiny)")
    p.add_argument("--resolution", type=int, default=None, help="image side in px (default: 512 on CUDA)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: min(8, the plan's largest))")
    p.add_argument("--steps", type=int, default=8, help="timed steps per mode")
    p.add_argument("--run-steps", type=int, default=30, help="steps of the end-to-end run")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--budget", type=float, default=420.0, help="seconds; sections are skipped past it")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu --tiny for the dry run")
    if args.device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = torch.device(args.device)
    budget = Budget(args.budget)
    name = args.teacher or ("tiny-sd3" if args.tiny else "sd3.5-medium")
    spec = resolve_teacher(name)
    resolution = args.resolution or (None if args.tiny else 512)
    t0 = time.time()
    counts = count(spec, lora_rank=args.lora_rank, resolution=resolution,
                   autocast_device="cuda" if device.type == "cuda" else "cpu")
    if resolution:
        spec.resolution = resolution  # count() checked it against the VAE factor
    kind = gpu_kind(device)
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 16e9
    ev = objective_evaluations("itvm", {}, 0.0)
    probe = make_plan(counts, ev, gpus=1, gpu=kind, gpu_memory=memory)
    full_fit = next(lay for lay in probe.layouts if lay.student == "full" and lay.precision == "bf16"
                    and not lay.checkpointing).largest_batch
    batch = args.batch_size or max(1, min(8 if device.type == "cuda" else 4, full_fit))
    plan = make_plan(counts, ev, gpus=1, gpu=kind, gpu_memory=memory, batch_size=batch)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({torch.get_num_threads()} threads)",
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__, "teacher": name, "resolution": spec.resolution, "data_shape": counts.data_shape,
        "text_tokens": counts.text_tokens, "mixed_precision": "bf16 (autocast, fp32 master weights)",
        "plan_seconds": round(time.time() - t0, 1), "gpu_kind_for_peak": kind,
        "peak_bf16_dense_flops": GPUS[kind]["bf16"], "plan_recommendation": plan.recommendation,
        "largest_full_batch_planned": full_fit, "sections": {},
    }
    for rank in (0, args.lora_rank):
        key = "lora" if rank else "full"
        if budget.left() < 120:
            result["sections"][key] = {"skipped": "time budget"}
            continue
        try:
            result["sections"][key] = student_section(name, spec, plan, rank, batch, device, args.steps, budget)
        except torch.cuda.OutOfMemoryError as e:  # the check itself reports, the plan said it would fit
            result["sections"][key] = {"error": f"out of memory at batch {batch}: {str(e).splitlines()[0]}"}
        print(json.dumps({key: result["sections"][key]}, default=str), flush=True)
    if budget.left() > 60:
        result["end_to_end"] = end_to_end(device, args.run_steps, budget)
        # the distribution-matching term: a fake network beside the student, its state in the checkpoint
        result["end_to_end_dm"] = end_to_end(device, args.run_steps, budget,
                                             ("--set", "dm_weight=0.1", "--set", "dm_batch=16"))
    else:
        result["end_to_end"] = {"skipped": "time budget"}
    result["wall_seconds"] = round(time.time() - budget.start, 1)
    out = Path(args.output or ROOT / "results" / f"gpu-{device_tag(device)}.json")
    write_json(out, result)
    print(json.dumps(result, indent=2, default=str))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
