"""The distillation loop: boring on purpose.

Every random draw of step ``k`` on rank ``r`` comes from a generator seeded
with ``(seed, r, k)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.  Re-running the same command in the same
output folder resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, RunConfig, resume_mismatch
from .convention import interpolate
from .data import build_data
from .fileio import atomic_dir, save_tensors, save_torch, write_json
from .objectives import TrainBatch, make_objective
from .objectives.timesampling import sample_time_pairs


class RunError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


class NonFiniteLoss(RunError):
    pass


class Interrupted(RunError):
    pass


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator for every draw of (seed, rank, step)."""
    key = (int(seed) * 1_000_003 + int(rank)) * 1_000_000_007 + int(step)
    return torch.Generator().manual_seed(key % (2**63 - 1))


# ---------------------------------------------------------------- data ------
# A data source has ``sample(n, generator)`` returning either clean samples ``x1``
# ``(n, *teacher.data_shape)`` in the teacher's data space (latents for latent
# teachers), or a pair ``(x1, cond)`` where ``cond`` is a dict of batch-first
# conditioning tensors (``class_labels``, prompt embeddings, ...) or ``None``.
def split_sample(drawn) -> tuple[torch.Tensor, dict | None]:
    if isinstance(drawn, tuple):
        x1, cond = drawn
        return x1, cond
    return drawn, None


def cond_to(cond: dict | None, device) -> dict | None:
    if not cond:
        return None
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cond.items()}


# -------------------------------------------------------------- models ------
def build_student(teacher, cfg: RunConfig):
    """The student initialised from the teacher (diffusers) or fresh (analytic), seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if hasattr(teacher, "network"):
        from .student import TwoTimeFlowMap

        network = copy.deepcopy(teacher.network).train().requires_grad_(True)
        guidance = None
        if cfg.guidance_range is not None:
            guidance = {"range": [float(v) for v in cfg.guidance_range], "default": cfg.default_guidance()}
        return TwoTimeFlowMap(network, second_time_input=cfg.second_time_input, adapter=teacher.adapter, io=teacher.io,
                              null_text=teacher.null_text, guidance=guidance)
    from .mlp import MlpFlowMap

    return MlpFlowMap(dim=teacher.data_shape[0], width=cfg.mlp_width, depth=cfg.mlp_depth)


def lr_factor(k: int, cfg: RunConfig) -> float:
    """The learning-rate multiplier at step ``k``: linear warm-up, then constant or a cosine to the final fraction."""
    import math

    warm = max(1, cfg.warmup_steps)
    factor = min(1.0, (k + 1) / warm)
    if cfg.lr_schedule == "cosine" and k + 1 > warm:
        progress = min(1.0, (k + 1 - warm) / max(1, cfg.max_steps - warm))
        low = float(cfg.lr_final_fraction)
        factor = low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay used after step ``step`` (0-based): ``decay``, or with warm-up ``min(decay, (1+k)/(10+k))``."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    if hasattr(ema, "update"):  # a LoRA student's EMA covers its trained tensors only
        ema.update(model, decay)
        return
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(_unsharded(pm.detach()).to(pe.dtype), 1.0 - decay)


def _unsharded(p: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP-sharded parameter (a collective), else ``p``."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


# --------------------------------------------------------- checkpoints ------
def list_checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())


def save_checkpoint(out: Path, step: int, student_state: dict, ema, optimizer_state: dict, scheduler, keep: int,
                    history: list) -> Path:
    """Write one checkpoint atomically; ``student_state``/``optimizer_state`` are full (gathered) state dicts."""
    final = out / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_tensors(tmp / "student.safetensors", student_state)
        if ema is not None:
            save_tensors(tmp / "ema.safetensors", ema.state_dict())
        save_torch(tmp / "optimizer.pt", {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()})
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "history": history[-1000:]}))
    for old in list_checkpoints(out)[:-keep]:
        # renamed away first (one atomic step), so a kill mid-delete never leaves a half checkpoint that
        # still looks like one; the hidden leftover is swept at the next start
        trash = old.with_name(f".{old.name}.deleted.tmp")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def load_checkpoint(path: Path, student, ema, scheduler) -> tuple[int, list, dict]:
    """Load model, EMA and scheduler; return ``(step, history, optimizer_state)``.

    The optimizer state is applied after ``accelerator.prepare`` (FSDP re-creates the parameters).
    """
    from safetensors.torch import load_file

    try:
        weights = load_file(path / "student.safetensors")
        if hasattr(student, "load_trainable_state_dict"):  # LoRA: adapters + second time only
            student.load_trainable_state_dict(weights)
        else:
            student.load_state_dict(weights, strict=True)
        if ema is not None:
            ema.load_state_dict(load_file(path / "ema.safetensors"), strict=True)
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        scheduler.load_state_dict(opt["scheduler"])
        state = json.loads((path / "trainer_state.json").read_text())
    except Exception as e:
        raise RunError(f"checkpoint {path} is damaged ({type(e).__name__}); skipping it") from None
    return int(state["step"]), list(state.get("history", [])), opt["optimizer"]


# ---------------------------------------------------------------- run -------
@dataclass
class RunResult:
    output: Path
    steps: int
    seconds: float
    metrics: dict
    resumed_from: int
    is_main: bool = True


def prepare_output(cfg: RunConfig, overwrite: bool) -> Path:
    """Create or check the output folder; refuse to mix two different runs."""
    out = Path(cfg.output)
    saved_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} exists and is a file; choose another --output")
    if overwrite and out.exists():
        shutil.rmtree(out)
    if out.exists() and any(out.iterdir()):
        if not saved_path.exists():
            raise ConfigError(f"output folder {out} is not empty and holds no ttfm-distill run; "
                              "choose another --output or pass --overwrite")
        try:
            saved = json.loads(saved_path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{saved_path} is damaged; pass --overwrite to start over") from None
        diff = resume_mismatch(saved, cfg.to_dict())
        if diff:
            raise ConfigError(f"output folder {out} holds a different run (differs in: {', '.join(diff)}); "
                              "re-run with the same settings to resume, or pass --overwrite or another --output")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {out}: {e.strerror}") from None
    write_json(saved_path, cfg.to_dict())
    return out


class _SigtermAsInterrupt:
    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def check_objective_fits(objective, cfg: RunConfig) -> None:
    """Refuse settings under which the teacher never reaches the loss."""
    if not objective.teacher_off_diagonal and cfg.diagonal_fraction == 0:
        raise ConfigError(f"{cfg.loss} with these options sees the teacher only on diagonal pairs (s == t), and "
                          "diagonal_fraction is 0, so nothing would be distilled; use --set diagonal_fraction=0.25")


def run_distillation(cfg: RunConfig, overwrite: bool = False, show_progress: bool = True, console=None) -> RunResult:
    """Distil ``cfg.teacher`` into a two-timed student; see :class:`RunConfig`."""
    from rich.console import Console

    from . import scale
    from .teachers.loading import load_teacher

    cfg.validate()
    console = console or Console(stderr=True)
    on_cpu = not torch.cuda.is_available()
    scale.check_mixed_precision(cfg.mixed_precision, "cpu" if on_cpu else "cuda")
    accelerator = scale.make_accelerator(cfg.mixed_precision, cfg.compile, cpu=on_cpu)
    if cfg.lora_rank > 0 and scale.is_sharded(accelerator):
        raise ConfigError("LoRA students under FSDP are not supported yet; use data parallel (the base is frozen, "
                          "so each GPU holds one copy of it plus the adapters)")
    main = accelerator.is_main_process
    log = (lambda msg: console.print(msg)) if main else (lambda msg: None)

    objective = make_objective(cfg.loss, **cfg.loss_options)
    check_objective_fits(objective, cfg)
    teacher = load_teacher(cfg.teacher, cfg.subfolder, cfg.revision, allow_pickle=cfg.allow_pickle,
                           sample_size=cfg.sample_size, guidance_scale=cfg.default_guidance(),
                           negative_prompt=cfg.negative_prompt, guided=cfg.guidance_range is not None)
    out = prepare_output(cfg, overwrite) if main else Path(cfg.output)
    accelerator.wait_for_everyone()
    device = accelerator.device
    teacher.to(device)
    data = build_data(teacher, cfg, out, device, log, console, show_progress) if main or hasattr(
        teacher, "sample_data") else None
    if data is None or accelerator.num_processes > 1:
        accelerator.wait_for_everyone()
        if data is None:
            data = build_data(teacher, cfg, out, device, log)

    if cfg.lora_rank > 0:  # adapters on the teacher's own network; the teacher becomes its base-weights view
        from .lora import build_lora_student

        student, teacher = build_lora_student(teacher, cfg)
    else:
        student = build_student(teacher, cfg)
    student = student.to(device)
    if cfg.mixed_precision != "no":
        scale.keep_time_embedders_fp32(student, teacher)
    if cfg.gradient_checkpointing:
        scale.enable_gradient_checkpointing(student)
    ema = None
    if (objective.needs_ema or cfg.export_weights == "ema") and cfg.ema_decay > 0:
        ema = student.make_ema() if hasattr(student, "make_ema") else copy.deepcopy(student).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, cfg))

    start_step, history = 0, []
    if main:
        for stale in (out / "checkpoints").glob(".*.tmp"):  # left by a kill mid-write
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    ckpts = list_checkpoints(out)
    opt_state = None
    for ckpt in reversed(ckpts):  # newest readable checkpoint; a damaged one is reported and skipped
        try:
            start_step, history, opt_state = load_checkpoint(ckpt, student, ema, scheduler)
        except RunError as e:
            log(f"[yellow]warning:[/] {e}")
            continue
        log(f"resuming from {ckpt} (step {start_step})")
        break
    else:
        if ckpts:
            raise RunError(f"no checkpoint in {out / 'checkpoints'} could be read; pass --overwrite to start over")
    scale.shard_fp32_modules(accelerator, student, optimizer)  # FSDP2 + bf16/fp16 only
    wrapped, optimizer = accelerator.prepare(student, optimizer)
    if opt_state is not None:
        try:
            scale.load_optimizer_state(accelerator, wrapped, optimizer, opt_state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise RunError(f"the optimizer state of the latest checkpoint does not fit this run ({type(e).__name__}); "
                           "pass --overwrite to start over") from None
    target_ema = ema if ema is not None else student

    def checkpoint(at_step: int) -> None:  # a collective under FSDP: every rank gathers, rank 0 writes
        state = scale.full_model_state(accelerator, wrapped, student)
        opt = scale.optimizer_state(accelerator, wrapped, optimizer)
        if main:
            save_checkpoint(out, at_step, state, ema, opt, scheduler, cfg.keep_checkpoints, history)

    rank = accelerator.process_index
    t_start = time.time()
    last_saved = start_step
    skipped = 0
    progress = _progress(console, show_progress and main)
    task = progress.add_task("distilling", total=cfg.max_steps, completed=start_step, loss=float("nan"))
    step = start_step
    first_batch = 0.0
    try:
        with progress, _SigtermAsInterrupt():
            for step in range(start_step, cfg.max_steps):
                g = step_generator(cfg.seed, rank, step)
                x1, cond = split_sample(data.sample(cfg.batch_size, g))
                x0 = teacher.sample_noise(cfg.batch_size, generator=g)
                s, t = sample_time_pairs(cfg.batch_size, cfg.time_sampling, cfg.diagonal_fraction,
                                         cfg.dyadic_levels, generator=g)
                if cfg.guidance_range is not None:  # one guidance scale per sample, seen by teacher and student
                    lo, hi = cfg.guidance_range
                    cond = {**(cond or {}), "cfg_scale": lo + (hi - lo) * torch.rand(cfg.batch_size, generator=g)}
                batch = TrainBatch(interpolate(x0, x1, s).to(device), s.to(device), t.to(device),
                                   cond_to(cond, device), g)
                if step == start_step:
                    first_batch = x1.double().sum().item()
                loss, step_metrics, finite = backward_micro_batches(accelerator, wrapped, objective, teacher, batch,
                                                                    target_ema, cfg.grad_accum_steps)
                if not finite:
                    if cfg.nan_policy == "skip":
                        skipped += 1
                        optimizer.zero_grad(set_to_none=True)
                        continue
                    raise NonFiniteLoss(
                        f"loss became {loss.item()} at step {step}; stopped without saving "
                        f"(last good checkpoint: step {last_saved}); lower --lr or use nan_policy=skip")
                if cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema_update(ema, student, ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup))
                lv = loss.item()
                if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                    history.append({"step": step, "loss": lv, **step_metrics})
                progress.update(task, completed=step + 1, loss=lv)
                if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
                    checkpoint(step + 1)
                    last_saved = step + 1
            step = cfg.max_steps
    except KeyboardInterrupt:
        if step > last_saved:
            checkpoint(step)
        raise Interrupted(f"interrupted at step {step}; checkpoint saved in {out / 'checkpoints'}; "
                          "re-run the same command to resume") from None
    seconds = time.time() - t_start
    distributed = _distributed_report(accelerator, student, first_batch)
    metrics = {}
    if cfg.max_steps > last_saved:
        checkpoint(cfg.max_steps)
    final = ema if (cfg.export_weights == "ema" and ema is not None) else student
    if final is student:  # sharded: an unsharded copy holding the gathered weights, built on rank 0
        final = scale.unsharded_copy(accelerator, wrapped, student, lambda: build_student(teacher, cfg).to(device))
    if main:
        metrics = finish_run(cfg, out, final.eval(), teacher, objective, seconds, history, device, log, skipped,
                             distributed, data_report=getattr(data, "report", None))
    accelerator.wait_for_everyone()
    return RunResult(out, cfg.max_steps, seconds, metrics, start_step, main)


def backward_micro_batches(accelerator, model, objective, teacher, batch: TrainBatch, ema, n_micro: int):
    """Forward and backward over ``n_micro`` equal slices of ``batch`` (gradient accumulation).

    Each slice's loss is divided by ``n_micro``, so the summed gradients are those of the
    whole batch's mean loss (exactly, up to rounding, for objectives whose loss is a
    per-sample mean).  Gradients are all-reduced on the last slice only.  Returns
    ``(loss, metrics, finite)`` averaged over the slices; at the first non-finite slice loss
    (checked on every rank together) it stops before that slice's backward.
    """
    slices = batch.split(n_micro)
    losses, metrics = [], []
    for i, micro in enumerate(slices):
        sync = contextlib.nullcontext() if i == len(slices) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                result = objective(model, teacher, micro, ema)
            if not _all_finite(result.loss, accelerator):
                return result.loss, result.metrics, False
            accelerator.backward(result.loss if len(slices) == 1 else result.loss / len(slices))
        losses.append(result.loss.detach())
        metrics.append(result.metrics)
    if len(slices) == 1:
        return losses[0], metrics[0], True
    mean = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
    return torch.stack(losses).mean(), mean, True


def _all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (all ranks take the same branch)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return bad.item() == 0


def _distributed_report(accelerator, student, first_batch: float) -> dict | None:
    """Per-rank parameter checksums (equal if data parallel works) and first-batch checksums (different)."""
    if accelerator.num_processes == 1:
        return None
    with torch.no_grad():
        params = sum(_unsharded(p).double().sum() for p in student.parameters())
        row = torch.stack([params, torch.tensor(first_batch, dtype=torch.float64)]).to(accelerator.device)[None]
    rows = accelerator.gather(row).cpu()
    return {"processes": accelerator.num_processes,
            "param_checksums": rows[:, 0].tolist(), "first_batch_checksums": rows[:, 1].tolist(),
            "ranks_in_sync": bool(torch.allclose(rows[:, 0], rows[0, 0].expand(len(rows)), rtol=0, atol=0))}


def finish_run(cfg, out, student, teacher, objective, seconds, history, device, log, skipped=0,
               distributed: dict | None = None, data_report: dict | None = None) -> dict:
    """Export the student, measure it against the teacher, draw ``samples.png``."""
    from .evaluate import compare_with_teacher
    from .export import export_student
    from .plots import save_comparison

    meta = {
        "teacher": teacher.describe(),
        "kind": teacher.kind,
        "data_shape": list(teacher.data_shape),
        "sample_size": cfg.sample_size,
        "sigma0": teacher.sigma0,
        "shift": float(getattr(teacher, "shift", 1.0)),
        "scheduler_config": getattr(teacher, "scheduler_config", None),
        "loss": objective.config(),
        "weights": cfg.export_weights if cfg.ema_decay > 0 else "raw",
        "training": {"steps": cfg.max_steps, "seed": cfg.seed, "batch_size": cfg.batch_size, "lr": cfg.lr,
                     "ema_decay": cfg.ema_decay, "time_sampling": cfg.time_sampling,
                     "diagonal_fraction": cfg.diagonal_fraction, "data": cfg.data},
    }
    codec = getattr(teacher, "codec", None)
    if hasattr(student, "export_to"):  # a LoRA student or its EMA: merged or adapters
        student.export_to(out / "student", meta, cfg.lora_export, codec=codec)
    else:
        export_student(student, out / "student", meta, codec=codec)
    log(f"exported student -> {out / 'student'}")
    n = cfg.eval_samples if teacher.kind == "image" else max(cfg.eval_samples, 4096)
    metrics, samples = compare_with_teacher(student, teacher, steps=(1, 2, 4), n=n,
                                            reference_steps=cfg.reference_steps, seed=cfg.seed + 1, device=device)
    if teacher.kind == "points" and hasattr(teacher, "sample_data"):
        from .metrics import histogram_kl

        metrics["kl"] = {k: histogram_kl(v, teacher) for k, v in samples.items() if torch.is_tensor(v)}
    metrics["training"] = {"steps": cfg.max_steps, "seconds": round(seconds, 1), "skipped_steps": skipped,
                           "final_loss": history[-1]["loss"] if history else None}
    if distributed is not None:
        metrics["distributed"] = distributed
    if data_report:
        metrics["data"] = data_report
    metrics["settings"] = {"eval_samples": n, "reference": f"rk4 {cfg.reference_steps} steps", "seed": cfg.seed + 1}
    from .evaluate import quality_warnings  # one plain line each: worse than the teacher, samples out of range

    metrics["warnings"] = quality_warnings(metrics)
    write_json(out / "metrics.json", metrics)
    rows, errors = _comparison_rows(samples, teacher, metrics, cfg, device)
    if getattr(teacher, "is_latent", False):  # the grid shows images: decode the latents with the teacher's VAE
        rows = {k: torch.cat([teacher.decode(c.to(device)).cpu() for c in v.split(64)]) for k, v in rows.items()}
    save_comparison(rows, out / "samples.png", kind=teacher.kind, errors=errors,
                    title=f"{teacher.name}: student ({cfg.loss}, {cfg.max_steps} steps) vs teacher, same noise")
    fme = metrics["flow_map_error"]
    for k in fme["student"]:  # one short line each: a narrow or non-terminal console must not cut them
        log(f"flow-map error, {k} step: student {fme['student'][k]:.4f}, teacher Euler {fme['teacher_euler'][k]:.4f}")
    for line in metrics["warnings"]:
        log(f"[yellow]warning:[/] {line}")
    return metrics


def _comparison_rows(samples, teacher, metrics, cfg, device):
    from .sampling import euler, uniform_time_grid

    k = 10 if teacher.kind == "image" else None
    pick = (lambda x: x[:k]) if k else (lambda x: x)
    rows, errors = {}, {}
    fme = metrics["flow_map_error"]
    for n in ("1", "2", "4"):
        rows[f"student {n}"] = pick(samples[f"student {n}"])
        errors[f"student {n}"] = fme["student"][n]
    for n in ("1", "2", "4"):
        rows[f"teacher Euler {n}"] = pick(samples[f"teacher euler {n}"])
        errors[f"teacher Euler {n}"] = fme["teacher_euler"][n]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x0 = teacher.sample_noise(samples["reference"].shape[0], generator=g)
    x0 = pick(x0).to(device)
    cond = {k: pick(v).to(device) for k, v in samples["cond"].items()} if "cond" in samples else None
    grid = uniform_time_grid(50, getattr(teacher, "shift", 1.0)).to(device)
    rows["teacher Euler 50"] = euler(lambda x, t: teacher.velocity(x, t, cond), x0, grid).cpu()
    return rows, errors


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )
