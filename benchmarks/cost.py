"""What a distillation step costs: ITVM against plain flow matching on the same network, and memory.

    python benchmarks/cost.py                      # CPU: the embedded teacher's UNet (1.06 M parameters)
    python benchmarks/cost.py --device cuda        # GPU: a DiT-style SD3 transformer (~330 M parameters), bf16
    python benchmarks/cost.py --model sd3-tiny --steps 3 --memory-steps 2     # the transformer path, quick, on CPU

In one process, on one network, it times training steps of

* ``itvm``: the trainer's step with ITVM at its default options (and the
  default diagonal fraction, 0), through the same code as ``ttfm-distill run``
  (``backward_micro_batches``, gradient clipping, AdamW);
* ``itvm_euler``: the same with an Euler teacher segment (one teacher evaluation fewer);
* ``flow_matching``: plain flow-matching training of the same student network,
  ``|u(x_t, t, t) - (x1 - x0)|^2`` (what training the teacher cost per step);

alternating blocks of steps so that a busy machine slows all of them alike, and
reports the median per-sample step time and the ratio to flow matching.  Then,
each in a fresh subprocess, the peak memory of a full student (student copy +
teacher + gradients + AdamW state) and of a LoRA student (one shared base,
adapters only): on CUDA ``torch.cuda.max_memory_allocated``; on CPU (Linux) the
peak resident set size during model building and training (``VmHWM``, reset
through ``/proc/self/clear_refs`` just before) minus the resident size at that
moment: page-level, so it includes allocator caching and fragmentation.

On CUDA it also counts the FLOPs of one step with
``torch.utils.flop_counter.FlopCounterMode`` (every matmul, convolution and
attention FLOP of all network evaluations, forward and backward) and reports
model FLOPs utilisation against ``--peak-tflops`` (default 989: H100 SXM bf16
dense).  Mixed precision is the trainer's: bf16 autocast over fp32 master
weights, time embeddings in fp32.

Results go to ``benchmarks/results/cost-<device>.json`` with the device named.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ttfm_distill import scale
from ttfm_distill.config import RunConfig
from ttfm_distill.convention import interpolant_velocity, interpolate
from ttfm_distill.fileio import write_json
from ttfm_distill.batch import BatchPath, step_generator
from ttfm_distill.objectives import make_objective
from ttfm_distill.objectives.base import per_sample_mse
from ttfm_distill.step import backward_micro_batches
from ttfm_distill.factory import build_student

H100_BF16_DENSE_TFLOPS = 989.0

# DiT-style MMDiT (SD3 family) configs; the real SD3-medium keys, shrunk
SD3_CONFIGS = {
    # 332.8 M parameters; 32x32x16 latents (256 image tokens) + 77 text tokens
    "sd3-330m": dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=9,
                     attention_head_dim=64, num_attention_heads=16, joint_attention_dim=1024,
                     caption_projection_dim=1024, pooled_projection_dim=768, pos_embed_max_size=64),
    "sd3-tiny": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                     caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8),
}
TEXT_TOKENS = 77


# ---------------------------------------------------------------- models ----
def build_teacher(model: str, device):
    """``(teacher, cond_fn)``: ``cond_fn(n, generator)`` gives per-sample conditioning or None."""
    if model == "fashion16":
        from ttfm_distill.teachers.loading import load_teacher

        return load_teacher("builtin:fashion16").to(device), (lambda n, g: None)
    from diffusers import SD3Transformer2DModel

    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher

    cfg = SD3_CONFIGS[model]
    torch.manual_seed(0)
    network = SD3Transformer2DModel(**cfg)
    teacher = DiffusersFlowTeacher(network, source=f"random {model}").to(device)

    def cond(n, g):
        return {"encoder_hidden_states": torch.randn(n, TEXT_TOKENS, cfg["joint_attention_dim"], generator=g).to(device),
                "pooled_projections": torch.randn(n, cfg["pooled_projection_dim"], generator=g).to(device)}

    return teacher, cond


def build(model: str, device, lora_rank: int, mixed_precision: str):
    teacher, cond = build_teacher(model, device)
    cfg = RunConfig(lora_rank=lora_rank)
    if lora_rank:
        from ttfm_distill.lora import build_lora_student

        student, teacher = build_lora_student(teacher, cfg)
    else:
        student = build_student(teacher, cfg)
    student = student.to(device).train()
    if mixed_precision != "no":
        scale.keep_time_embedders_fp32(student, teacher)
    return teacher, student, cond


# ----------------------------------------------------------------- steps ----
class NoiseData:
    """A data source for timing (``BatchPath``'s ``sample(n, generator) -> (x1, cond)``): scaled noise and the
    model's conditioning; the cost does not depend on the data."""

    def __init__(self, teacher, cond):
        self.teacher, self.cond = teacher, cond

    def sample(self, n: int, generator: torch.Generator):
        return self.teacher.sample_noise(n, generator=generator) * 0.5, self.cond(n, generator)


class Stepper:
    """One trainer-style optimiser step of an objective (or of flow matching) on fixed-size batches: an
    objective's batch is drawn by the trainer's own ``BatchPath``; flow matching, the baseline, draws its
    ``(x0, x1, t)`` itself (it is not a batch of the tool's)."""

    def __init__(self, accelerator, student, teacher, cond, batch_size: int, mode: str, diagonal_fraction: float = 0.0):
        self.acc, self.teacher, self.cond, self.n, self.mode = accelerator, teacher, cond, batch_size, mode
        self.student = student
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
        self.model, self.opt = accelerator.prepare(student, opt)
        self.objective = {"itvm": make_objective("itvm"),
                          "itvm_euler": make_objective("itvm", teacher_solver="euler")}.get(mode)
        self.path = BatchPath(teacher, NoiseData(teacher, cond), "mixed", diagonal_fraction, device=accelerator.device)
        self.k = 0

    def generator(self) -> torch.Generator:
        self.k += 1
        return step_generator(0, 0, self.k - 1)

    def step(self):
        g = self.generator()
        if self.mode == "flow_matching":
            dev = self.acc.device
            x1, cond = self.path.data.sample(self.n, g)
            x0, t = self.teacher.sample_noise(self.n, generator=g).to(dev), torch.rand(self.n, generator=g).to(dev)
            x1 = x1.to(dev)
            with self.acc.autocast():
                u = self.model(interpolate(x0, x1, t), t, t, cond)
                loss = per_sample_mse(u, interpolant_velocity(x0, x1)).mean()
            self.acc.backward(loss)
        else:
            batch = self.path(self.n, g)
            loss, _, _ = backward_micro_batches(self.acc, self.model, self.objective, self.teacher, batch, None, 1)
        self.acc.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(stepper, n: int, device) -> list[float]:
    out = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        stepper.step().item()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def count_flops(stepper) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        stepper.step()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- memory ----
def memory_probe(args) -> dict:
    """Run in a fresh process: peak memory of ``--steps`` training steps of a full or LoRA student."""
    device = torch.device(args.device)
    accelerator = scale.make_accelerator(args.mixed_precision, False, cpu=device.type == "cpu")
    _warm_up(device)  # imports and first-op buffers are not the student's memory
    if device.type == "cpu":
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        rss0 = _proc_status_kib("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    teacher, student, cond = build(args.model, device, args.memory_probe_rank, args.mixed_precision)
    stepper = Stepper(accelerator, student, teacher, cond, args.batch_size, "itvm")
    for _ in range(args.memory_steps):
        stepper.step()
    sync(device)
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    out = {"trainable_parameters": trained, "model_state_bytes": model_state_bytes(teacher, student, stepper.opt)}
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated()
        out["measure"] = "torch.cuda.max_memory_allocated (models, optimizer state, activations)"
    else:
        out["peak_bytes"] = (_proc_status_kib("VmHWM") - rss0) * 1024
        out["measure"] = ("peak resident set size (VmHWM, reset before building the models) minus the resident "
                          "size before building them; page-level, includes allocator caching")
    return out


def model_state_bytes(teacher, student, optimizer) -> dict:
    """Exact bytes of the weights held (teacher and student, shared storage counted once), gradients and AdamW state."""
    seen, weights = set(), 0
    for module in (teacher.network, student):
        for p in (module.parameters() if module is not None else []):
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                weights += p.numel() * p.element_size()
    grads = sum(p.numel() * p.element_size() for p in student.parameters() if p.requires_grad)
    opt = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    return {"weights": weights, "gradients": grads, "optimizer": opt, "total": weights + grads + opt}


def _warm_up(device) -> None:
    """Import everything the probe uses and run each kind of kernel once (conv, attention, backward)."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import SD3Transformer2DModel, UNet2DModel  # noqa: F401
    from peft.tuners.lora import LoraModel  # noqa: F401

    x = torch.randn(2, 4, 8, 8, device=device, requires_grad=True)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(device)
    q = conv(x).flatten(2).transpose(1, 2)[:, None]
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()


def _proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def run_probe(args, rank: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", "--memory-probe-rank", str(rank), "--model", args.model,
           "--device", args.device, "--batch-size", str(args.batch_size), "--memory-steps", str(args.memory_steps),
           "--mixed-precision", args.mixed_precision]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ main ----
def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--model", default=None, help="fashion16 (CPU default), sd3-330m (CUDA default), sd3-tiny")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 32 on CUDA")
    p.add_argument("--steps", type=int, default=24, help="timed steps per mode")
    p.add_argument("--block", type=int, default=4, help="steps per mode before switching to the next mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--diagonal-fraction", type=float, default=0.0, help="share of s == t pairs (the run default is 0)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--mixed-precision", default=None, help="default: no on CPU, bf16 on CUDA")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    p.add_argument("--output", default=None, help="default: benchmarks/results/cost-<device>.json")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-probe-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = args.model or ("sd3-330m" if args.device == "cuda" else "fashion16")
    args.batch_size = args.batch_size or 32
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device == "cuda" else "no")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible")
    if args.memory_probe:
        print(json.dumps(memory_probe(args)))
        return

    device = torch.device(args.device)
    accelerator = scale.make_accelerator(args.mixed_precision, False, cpu=device.type == "cpu")
    teacher, student, cond = build(args.model, device, 0, args.mixed_precision)
    params = sum(p.numel() for p in student.network.parameters())
    modes = ("itvm", "itvm_euler", "flow_matching")
    steppers = {}
    for mode in modes:  # each mode trains its own copy from the same start, so none sees another's updates
        st = build_student(teacher, RunConfig()).to(device).train() if mode != modes[0] else student
        if mode != modes[0] and args.mixed_precision != "no":
            scale.keep_time_embedders_fp32(st)
        steppers[mode] = Stepper(accelerator, st, teacher, cond, args.batch_size, mode, args.diagonal_fraction)
    for st in steppers.values():
        time_steps(st, args.warmup, device)
    times = {m: [] for m in modes}
    started = time.time()
    while len(times[modes[0]]) < args.steps:
        for mode in modes:
            times[mode] += time_steps(steppers[mode], min(args.block, args.steps - len(times[mode])), device)
    wall = time.time() - started
    per_sample = {m: statistics.median(v) / args.batch_size for m, v in times.items()}
    result = {
        "device": device_name(device),
        "command": "python benchmarks/cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "network_parameters": params, "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision, "steps_per_mode": args.steps, "timing_wall_seconds": round(wall, 1),
        "itvm_options": make_objective("itvm").config(), "diagonal_fraction": args.diagonal_fraction,
        "step_seconds_median": {m: statistics.median(v) for m, v in times.items()},
        "per_sample_ms": {m: 1e3 * v for m, v in per_sample.items()},
        "samples_per_second": {m: 1.0 / v for m, v in per_sample.items()},
        "ratio_to_flow_matching": {m: per_sample[m] / per_sample["flow_matching"] for m in modes},
        "goal_itvm_at_most_1.5x": per_sample["itvm"] / per_sample["flow_matching"] <= 1.5,
    }
    if device.type == "cuda" or args.model != "fashion16":
        flops = {m: count_flops(steppers[m]) for m in modes}
        result["flops_per_step"] = flops
        result["achieved_tflops"] = {m: flops[m] / result["step_seconds_median"][m] / 1e12 for m in modes}
        if device.type == "cuda":
            result["peak_tflops_assumed"] = args.peak_tflops
            result["mfu"] = {m: result["achieved_tflops"][m] / args.peak_tflops for m in modes}
    full, lora = run_probe(args, 0), run_probe(args, args.lora_rank)
    result["memory"] = {"measure": full["measure"], "steps": args.memory_steps, "lora_rank": args.lora_rank,
                        "full": full, "lora": lora, "lora_over_full": lora["peak_bytes"] / max(full["peak_bytes"], 1),
                        "model_state_lora_over_full": lora["model_state_bytes"]["total"] / full["model_state_bytes"]["total"]}
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = Path(args.output or Path(__file__).parent / "results" / f"cost-{tag}-{args.model}.json")
    write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
