"""The distillation loop: boring on purpose.

Every random draw of step ``k`` on rank ``r`` comes from a generator seeded
with ``(seed, r, k)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.  Re-running the same command in the same
output folder resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from .config import EMA_OFFSET_OTHER, RunConfig
from .convention import interpolate
from .data import build_data
from .errors import ConfigError, Interrupted, NonFiniteLoss, RunError, Terminated  # noqa: F401 - re-exported
from .fileio import write_json
from .objectives import TrainBatch
from .preflight import check_objective_fits, trajectory_rows  # noqa: F401 - re-exported
from .tracking import RunTracking, accelerator_trackers
from .objectives.timesampling import sample_time_pairs
from .teachers.analytic import AnalyticTeacher


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The generator for every draw of (seed, rank, step)."""
    key = (int(seed) * 1_000_003 + int(rank)) * 1_000_000_007 + int(step)
    return torch.Generator().manual_seed(key % (2**63 - 1))


def cond_to(cond: dict | None, device) -> dict | None:
    if not cond:
        return None
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cond.items()}


# -------------------------------------------------------------- models ------
def build_student(teacher, cfg: RunConfig):
    """The student initialised from the teacher (diffusers) or fresh (analytic), seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if teacher.has_network:
        from .student import TwoTimeFlowMap

        from .scale import trainable_copy

        network = trainable_copy(teacher.network).train().requires_grad_(True)
        guidance = None
        if cfg.guidance_range is not None:
            guidance = {"range": [float(v) for v in cfg.guidance_range], "default": cfg.default_guidance()}
        from .student import resolve_student_output

        return TwoTimeFlowMap(network, second_time_input=cfg.second_time_input, adapter=teacher.adapter, io=teacher.io,
                              null_text=teacher.null_text, guidance=guidance,
                              student_output=resolve_student_output(cfg.student_output, teacher.io, network))
    if cfg.student_output not in ("auto", "native"):
        raise ConfigError(f"student_output={cfg.student_output} is for diffusers teachers; {teacher.name} trains an "
                          "MLP student: use student_output=native")
    from .mlp import MlpFlowMap

    return MlpFlowMap(dim=teacher.data_shape[0], width=cfg.mlp_width, depth=cfg.mlp_depth)


def lr_factor(k: int, cfg: RunConfig) -> float:
    """The learning-rate multiplier at step ``k``: linear warm-up, then constant or a cosine to the final fraction."""
    import math

    warm = max(1, cfg.warmup_steps)
    factor = min(1.0, (k + 1) / warm)
    if cfg.lr_schedule_name() == "cosine" and k + 1 > warm:
        progress = min(1.0, (k + 1 - warm) / max(1, cfg.total_steps() - warm))
        low = cfg.lr_final_value()
        factor = low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def ema_decay_at(step: int, decay: float, warmup: bool, offset: float = EMA_OFFSET_OTHER) -> float:
    """The EMA decay used after step ``step`` (0-based): ``decay``, or with warm-up
    ``min(decay, (1 + k) / (offset + k))``."""
    return min(decay, (1.0 + step) / (offset + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    ema.follow(model, decay)  # (a LoRA student's EMA covers its trained tensors only)


def _unsharded(p: torch.Tensor) -> torch.Tensor:
    """The full tensor of an FSDP-sharded parameter (a collective), else ``p``."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


# ---------------------------------------------------------------- run -------
@dataclass
class RunResult:
    output: Path
    steps: int
    seconds: float
    metrics: dict
    resumed_from: int
    is_main: bool = True


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
        raise Terminated

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def interrupt_signal(exc: BaseException) -> int:
    """The signal number behind a ``KeyboardInterrupt`` (SIGINT unless it is a :class:`Terminated`)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def run_distillation(cfg: RunConfig, overwrite: bool = False, show_progress: bool = True, console=None) -> RunResult:
    """Distil ``cfg.teacher`` into a two-timed student; see :class:`RunConfig` and :class:`Distillation`."""
    return Distillation(cfg, overwrite, show_progress, console).run()


class Distillation:
    """One distillation run, as named steps (each a method, called in this order by :meth:`run`):

    ``preflight`` (settings, output folder: no writes) -> ``setup_accelerator`` -> ``setup_teacher``
    (load, finite check, fingerprint, memory) -> ``claim_output`` (lock, ``--overwrite``, sweep
    temporaries) -> ``setup_data`` -> ``write_config`` -> ``setup_student`` -> ``setup_optimizer``
    -> ``resume`` -> ``train`` (``train_step`` per step) -> ``finish`` (last checkpoint, export,
    report).  Every refusal happens before ``claim_output``; nothing is written before it.
    """

    def __init__(self, cfg: RunConfig, overwrite: bool = False, show_progress: bool = True, console=None):
        from rich.console import Console

        self.cfg, self.overwrite, self.show_progress = cfg, overwrite, show_progress
        self.console = console or Console(stderr=True)
        self.lock = None
        #: set by the steps that make them (claim_output, train); None until then
        self.claim = self.tracking = None
        #: the last step's objective metrics and gradient norm, and the skipped steps, for the training log
        self.step_metrics, self.grad_norm, self.skipped = {}, None, 0

    def run(self) -> RunResult:
        from .errors import TTFMError

        try:
            try:
                self.preflight()
                self.setup_accelerator()
                self.setup_teacher()
                self.claim_output()
                self.setup_data()
                self.write_config()
                self.setup_student()
                self.setup_optimizer()
                self.resume()
            except TTFMError:  # a refusal before training leaves the output folder as it found it
                if self.claim is not None:
                    self.claim.undo()
                raise
            if self.claim is not None:
                self.claim.commit()  # training starts: what --overwrite set aside goes
            self.train()
            return self.finish()
        finally:
            if self.tracking is not None:
                self.tracking.close()
            if self.lock is not None:
                self.lock.release()

    # -- steps -----------------------------------------------------------------
    def setup_accelerator(self) -> None:
        from . import scale
        from .preflight import resolve_precision

        cfg = self.cfg  # validated by preflight
        resolve_precision(cfg, self.folder.saved)  # "auto": from the teacher's configs and this machine
        on_cpu = not torch.cuda.is_available()
        scale.check_mixed_precision(cfg.mixed_precision, "cpu" if on_cpu else "cuda")
        self.accelerator = scale.make_accelerator(cfg.mixed_precision, cfg.compile, cpu=on_cpu,
                                                  **accelerator_trackers(cfg, self.out))
        if cfg.lora_rank > 0 and scale.is_sharded(self.accelerator):
            raise ConfigError("LoRA students under FSDP are not supported yet; use data parallel (the base is frozen, "
                              "so each GPU holds one copy of it plus the adapters)")
        if cfg.dm_weight > 0 and scale.is_sharded(self.accelerator):
            raise ConfigError("dm_weight under FSDP is not supported yet: the fake network is not sharded; use data "
                              "parallel or set dm_weight=0")
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.log = (lambda msg: self.console.print(msg)) if self.main else (lambda msg: None)

    def preflight(self) -> None:
        """Settings and the output folder; refuses before anything is loaded or written."""
        from .preflight import check_run_folder, resolve_settings

        self.cfg, self.objective = resolve_settings(self.cfg)
        self.folder = check_run_folder(self.cfg, self.overwrite)
        self.out = self.folder.out

    def setup_teacher(self) -> None:
        from .data.cache import teacher_fingerprint
        from .preflight import (check_memory, check_teacher, check_teacher_unchanged, resolve_teacher_settings,
                                settings_warnings)
        from .teachers.loading import load_teacher

        cfg = self.cfg
        teacher = load_teacher(cfg.teacher, cfg.subfolder, cfg.revision, allow_pickle=cfg.allow_pickle,
                               sample_size=cfg.sample_size, guidance_scale=cfg.default_guidance(),
                               negative_prompt=cfg.negative_prompt, guided=cfg.guidance_range is not None)
        if teacher.has_network:  # an unsupported time embedding is refused here, before any data work
            teacher.adapter.projection(teacher.network)
        teacher.to(self.device)
        self.objective = resolve_teacher_settings(cfg, self.objective, teacher, self.folder.saved)
        for line in settings_warnings(cfg):
            self.log(f"[yellow]warning:[/] {line}")
        check_memory(cfg, teacher, self.device)  # before the first tensor of the teacher's data shape is made
        check_teacher(teacher, self.device)
        cfg.teacher_fingerprint = teacher_fingerprint(teacher)
        check_teacher_unchanged(self.folder, cfg.teacher_fingerprint)
        self.teacher = teacher

    def claim_output(self) -> None:
        """Lock the folder (main process), set the run aside for ``--overwrite``, sweep what a killed run left
        (:class:`~ttfm_distill.rundir.OutputClaim`: a refusal before training undoes it)."""
        from .rundir import OutputClaim

        if self.main:
            self.claim = OutputClaim(self.out, lambda msg: self.log(f"[yellow]warning:[/] {msg}"))
            self.lock = self.claim.acquire(self.overwrite)
        self.accelerator.wait_for_everyone()

    def setup_data(self) -> None:
        cfg, teacher, out, device = self.cfg, self.teacher, self.out, self.device
        data = build_data(teacher, cfg, out, device, self.log, self.console, self.show_progress) if (
            self.main or isinstance(teacher, AnalyticTeacher)) else None
        if data is None or self.accelerator.num_processes > 1:
            self.accelerator.wait_for_everyone()
            if data is None:
                data = build_data(teacher, cfg, out, device, self.log)
        if cfg.trajectory_share() > 0 and getattr(data, "trajectories", None) is None:
            raise ConfigError("trajectory_fraction needs a data-free pool of teacher solves; this teacher's data is "
                              "exact (analytic) or real, so set trajectory_fraction=0")
        self.data = data

    def write_config(self) -> None:
        """The resolved config, written once the data is ready: a refused run leaves none behind."""
        if self.main:
            write_json(self.out / "config.json", self.cfg.to_dict())
        self.accelerator.wait_for_everyone()

    def setup_student(self) -> None:
        from . import scale

        cfg = self.cfg
        if cfg.lora_rank > 0:  # adapters on the teacher's own network; the teacher becomes its base-weights view
            from .lora import build_lora_student

            student, self.teacher = build_lora_student(self.teacher, cfg)
        else:
            student = build_student(self.teacher, cfg)
        if cfg.init_from:
            from .warmstart import init_student_from

            init_student_from(student, cfg.init_from)
        student = student.to(self.device)
        if cfg.mixed_precision != "no":
            scale.keep_time_embedders_fp32(student, self.teacher)
        self.dm = None
        if cfg.dm_weight > 0:  # the fake network copies the teacher before it is held in the training precision
            from .fake import FakeVelocity

            self.fake = FakeVelocity.from_teacher(self.teacher, cfg.mlp_width, cfg.mlp_depth).to(self.device)
            if cfg.mixed_precision != "no":
                scale.keep_time_embedders_fp32(self.fake)
        if cfg.lora_rank == 0 and self.teacher.has_network:  # (a LoRA teacher is the student's own base)
            scale.prepare_frozen(self.accelerator, self.teacher.network, cfg.mixed_precision)  # bf16; FSDP: sharded
        if cfg.gradient_checkpointing:
            scale.enable_gradient_checkpointing(student)
        self.ema = None
        if (self.objective.needs_ema or cfg.export_weights == "ema") and cfg.ema_decay > 0:
            self.ema = student.make_ema()
        self.student = student

    def setup_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda k: lr_factor(k, cfg))
        if cfg.dm_weight > 0:
            from .fake import DmTerm
            from .objectives.dm import DmSettings

            settings = DmSettings.from_run(cfg)
            fake_opt = torch.optim.AdamW(self.fake.parameters(), lr=settings.fake_lr or cfg.lr,
                                         weight_decay=cfg.weight_decay)
            self.dm = DmTerm(settings, self.teacher, self.fake, fake_opt, self.accelerator, cfg.grad_clip)

    def resume(self) -> None:
        """Load the newest readable checkpoint (a damaged one is reported and skipped), then prepare for Accelerate."""
        from . import scale

        from .checkpoints import load_dm_state

        self.start_step, self.history = 0, []
        ckpts = list_checkpoints(self.out)
        opt_state = dm_state = None
        for ckpt in reversed(ckpts):
            try:
                self.start_step, self.history, opt_state = load_checkpoint(ckpt, self.student, self.ema,
                                                                           self.scheduler)
                dm_state = load_dm_state(ckpt) if self.dm is not None else None
            except RunError as e:
                self.log(f"[yellow]warning:[/] {e}")
                continue
            self.log(f"resuming from {ckpt} (step {self.start_step})")
            break
        else:
            if ckpts:
                raise RunError(f"no checkpoint in {self.out / 'checkpoints'} could be read; "
                               "pass --overwrite to start over")
        scale.shard_fp32_modules(self.accelerator, self.student, self.optimizer)  # FSDP2 + bf16/fp16 only
        self.wrapped, self.optimizer = self.accelerator.prepare(self.student, self.optimizer)
        if opt_state is not None:
            try:
                scale.load_optimizer_state(self.accelerator, self.wrapped, self.optimizer, opt_state)
            except (ValueError, KeyError, RuntimeError) as e:
                raise RunError(f"the optimizer state of the latest checkpoint does not fit this run "
                               f"({type(e).__name__}); pass --overwrite to start over") from None
        if self.dm is not None:
            if dm_state is not None:
                self.fake.load_state_dict(dm_state["fake"], strict=True)
            elif self.start_step > 0:
                self.log("[yellow]warning:[/] the checkpoint has no fake network (dm_weight was 0 when it was "
                         "written): the fake network starts from the teacher")
            self.dm.prepare()
            if dm_state is not None:
                self.dm.optimizer.load_state_dict(dm_state["optimizer"])
        self.last_saved = self.start_step

    def checkpoint(self, at_step: int) -> None:
        """A collective under FSDP: every rank gathers, rank 0 writes."""
        from . import scale

        state = scale.full_model_state(self.accelerator, self.wrapped, self.student)
        opt = scale.optimizer_state(self.accelerator, self.wrapped, self.optimizer)
        if self.main:
            save_checkpoint(self.out, at_step, state, self.ema, opt, self.scheduler, self.cfg.keep_checkpoints,
                            self.history, self.dm.state() if self.dm is not None else None)
        self.last_saved = at_step

    def make_batch(self, step: int) -> TrainBatch:
        """The batch of ``step`` on this rank: every draw from the generator of (seed, rank, step)."""
        cfg = self.cfg
        g = step_generator(cfg.seed, self.accelerator.process_index, step)
        m = trajectory_rows(cfg)
        n = cfg.batch_size - m
        x1, cond = self.data.sample(n, g)  # a data.sources.DataSource
        x0 = self.teacher.sample_noise(n, generator=g)
        s, t = sample_time_pairs(n, cfg.time_sampling, cfg.diagonal_fraction, cfg.dyadic_levels, generator=g)
        if cfg.guidance_range is not None:  # one guidance scale per sample, seen by teacher and student
            lo, hi = cfg.guidance_range
            cond = {**(cond or {}), "cfg_scale": lo + (hi - lo) * torch.rand(n, generator=g)}
        if step == self.start_step:
            self.first_batch = x1.double().sum().item()
        return TrainBatch(interpolate(x0, x1, s).to(self.device), s.to(self.device), t.to(self.device),
                          cond_to(cond, self.device), g, self.trajectory_batch(m, g) if m else None)

    def trajectory_batch(self, m: int, g: torch.Generator):
        """``m`` rows on the pool's stored solves: grid pairs drawn like the objective's pairs (no diagonal)."""
        from .objectives.timesampling import grid_pairs
        from .objectives.trajectory import TrajectoryRows

        cfg = self.cfg
        rows = torch.randint(0, self.data.trajectories.shape[0], (m,), generator=g)
        mode, levels = cfg.trajectory_pairs()
        su, tu = sample_time_pairs(m, mode, 0.0, levels, generator=g)
        i, j = grid_pairs(su, tu, self.data.trajectories.shape[1] - 1)
        x_s, x_t, s, t, cond = self.data.trajectory_rows(rows, i, j)
        if cfg.guidance_range is not None:  # the pool was solved at the default scale: so are its targets
            cond = {**(cond or {}), "cfg_scale": torch.full((m,), cfg.default_guidance())}
        d = self.device
        return TrajectoryRows(x_s.to(d), x_t.to(d), s.to(d), t.to(d), cond_to(cond, d))

    def train_step(self, step: int) -> float | None:
        """One optimiser step; returns the loss, or ``None`` for a non-finite step skipped by ``nan_policy``."""
        cfg = self.cfg
        batch = self.make_batch(step)
        target = self.ema if self.ema is not None else self.student
        loss, step_metrics, finite = backward_micro_batches(self.accelerator, self.wrapped, self.objective,
                                                            self.teacher, batch, target, cfg.grad_accum_steps)
        if not finite:
            if cfg.nan_policy == "skip":
                self.skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                return None
            raise NonFiniteLoss(f"loss became {loss.item()} at step {step}; stopped without saving "
                                f"(last good checkpoint: step {self.last_saved}); lower --lr or use nan_policy=skip")
        if self.dm is not None:  # the distribution-matching term's gradient joins the objective's
            samples, dm_metrics = self.dm.student_step(self.wrapped, step, batch.cond, batch.generator, self.device)
            step_metrics = {**step_metrics, **dm_metrics}
        if cfg.grad_clip > 0 or self.tracking.measures_grad_norm(step):  # max_norm inf: the norm alone (grads x 1)
            self.grad_norm = self.accelerator.clip_grad_norm_(self.wrapped.parameters(), cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            ema_update(self.ema, self.student, ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup,
                                                               cfg.ema_offset_value()))
        if self.dm is not None:  # then the fake network learns the student's samples of this step
            step_metrics = {**step_metrics, **self.dm.fake_step(samples, batch.generator)}
        self.step_metrics = step_metrics
        lv = loss.item()
        if step % cfg.log_every == 0 or step == cfg.total_steps() - 1:
            self.history.append({"step": step, "loss": lv, **step_metrics})
        return lv

    def train(self) -> None:
        cfg = self.cfg
        self.skipped, self.first_batch = 0, 0.0
        t_start = time.time()
        progress = _progress(self.console, self.show_progress and self.main)
        task = progress.add_task("distilling", total=cfg.total_steps(), completed=self.start_step, loss=float("nan"))
        clock = self.budget_clock(t_start)
        step = self.start_step
        self.tracking = RunTracking(self)  # train_log.jsonl, trackers, validation (tracking.py)
        try:
            with progress, _SigtermAsInterrupt():
                self.tracking.start()
                while step < cfg.total_steps():
                    lv = self.train_step(step)
                    step += 1
                    self.tracking.after_step(step, lv)
                    if clock is not None and clock.tick(step):
                        self.fit_time_budget(clock)
                        progress.update(task, total=cfg.total_steps())
                    if lv is None:
                        continue
                    progress.update(task, completed=step, loss=lv)
                    if step % cfg.checkpoint_every == 0 and step < cfg.total_steps():
                        self.checkpoint(step)
                    self.tracking.validate_if_due(step)
        except KeyboardInterrupt as e:
            if step > self.last_saved:
                self.checkpoint(step)
            raise Interrupted(f"interrupted at step {step}; checkpoint saved in {self.out / 'checkpoints'}; "
                              "re-run the same command to resume", interrupt_signal(e)) from None
        self.seconds = time.time() - t_start

    def budget_clock(self, t_start: float):
        """The clock of ``time_budget``'s fit, or ``None``: no budget, a count fitted already, or a resume past the
        fit point (a changed max_steps: that count is trained)."""
        from .budget import fit_point

        cfg = self.cfg
        if cfg.time_budget is None or cfg.fitted_steps is not None:
            return None
        fit_at = fit_point(cfg.warmup_steps)
        if self.start_step >= fit_at:
            self.log(f"time budget: the run is past its warm-up with no fitted step count; training to max_steps "
                     f"{cfg.max_steps}")
            return None
        return _BudgetClock(t_start, self.start_step, fit_at)

    def fit_time_budget(self, clock: "_BudgetClock") -> None:
        """Fix the step count from the pace so far (rank 0's on every rank) and record it in config.json."""
        from .budget import fit_steps

        cfg = self.cfg
        elapsed, pace = time.time() - clock.t_start, clock.pace
        fitted = fit_steps(cfg.time_budget, elapsed, clock.fit_at, pace, cfg.max_steps)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            fitted = int(broadcast(torch.tensor([fitted], device=self.device), from_process=0).item())
        cfg.fitted_steps = fitted
        if self.main:
            write_json(self.out / "config.json", cfg.to_dict())
        cap = "" if fitted < cfg.max_steps else " (max_steps)"
        self.log(f"time budget {cfg.time_budget:g} s: {pace:.3f} s a step over the first {clock.fit_at} steps -> "
                 f"{fitted} steps{cap}, about {elapsed + (fitted - clock.fit_at) * pace:.0f} s of training")

    def finish(self) -> RunResult:
        """Last checkpoint, export and report; a kill here is finished by re-running the same command."""
        from . import scale

        cfg = self.cfg
        distributed = _distributed_report(self.accelerator, self.student, self.first_batch)
        metrics = {}
        if cfg.total_steps() > self.last_saved:
            self.checkpoint(cfg.total_steps())
        self.tracking.at_end()  # the last validation and training-curves.png, before the card shows them
        final = self.ema if (cfg.export_weights == "ema" and self.ema is not None) else self.student
        if final is self.student:  # sharded: an unsharded copy holding the gathered weights, built on rank 0
            final = scale.unsharded_copy(self.accelerator, self.wrapped, self.student,
                                         lambda: build_student(self.teacher, cfg).to(self.device))
        if self.teacher.has_network:  # sharded: gathered whole on every rank, so rank 0 evaluates alone
            scale.unshard_frozen(self.teacher.network)
        if self.main:
            metrics = finish_run(cfg, self.out, final.eval(), self.teacher, self.objective, self.seconds,
                                 self.history, self.device, self.log, self.skipped, distributed,
                                 data_report=getattr(self.data, "report", None),
                                 reference=self.tracking.report_reference())
        self.accelerator.wait_for_everyone()
        return RunResult(self.out, cfg.total_steps(), self.seconds, metrics, self.start_step, self.main)


class _BudgetClock:
    """Times the steps before the fit point; ``tick(done)`` is true once, when ``done`` reaches it."""

    def __init__(self, t_start: float, start_step: int, fit_at: int):
        from .budget import UNTIMED_STEPS

        self.t_start, self.fit_at = t_start, fit_at
        self.mark_at = min(start_step + UNTIMED_STEPS, fit_at - 1)
        self.mark_step, self.mark_time = start_step, t_start
        #: seconds a step between the mark and the fit point, once ``tick`` has reached it
        self.pace = 0.0

    def tick(self, done: int) -> bool:
        now = time.time()
        if done == self.mark_at:
            self.mark_step, self.mark_time = done, now
        if done != self.fit_at:
            return False
        self.pace = (now - self.mark_time) / max(1, done - self.mark_step)
        return True


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
               distributed: dict | None = None, data_report: dict | None = None, reference=None) -> dict:
    """Export the student, measure it against the teacher, draw ``samples.png``; ``reference``: the teacher's fine
    solve of the report's noises, if the run's validation kept it (tracking.RunTracking.report_reference)."""
    from .export import export_run
    from .report import run_report
    from .pipeline_card import write_model_card
    from .plots import save_comparison

    export_run(student, out / "student", cfg, teacher, objective, standalone=cfg.standalone)
    log(f"exported student -> {out / 'student'}")
    from .report import REPORT_SEED_OFFSET, report_samples
    from .sampling import resolve_time_grid

    n = report_samples(cfg, teacher.kind)
    grid = resolve_time_grid(cfg.time_grid, teacher.io)
    metrics, rows, errors = run_report(student, teacher, n, cfg.seed + REPORT_SEED_OFFSET, cfg.reference_steps,
                                       device, grid, reference)
    metrics["training"] = {"steps": cfg.total_steps(), "seconds": round(seconds, 1), "skipped_steps": skipped,
                           "final_loss": history[-1]["loss"] if history else None}
    if cfg.time_budget is not None:
        metrics["training"]["time_budget"] = {"seconds": cfg.time_budget, "max_steps": cfg.max_steps,
                                              "fitted_steps": cfg.fitted_steps}
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
                    title=f"{teacher.name}: student ({cfg.loss}, {cfg.total_steps()} steps) vs teacher, same noise")
    write_model_card(out / "student", metrics, cfg.to_dict(), out / "samples.png",  # the export's README.md
                     curves=out / "training-curves.png")
    fme = metrics["flow_map_error"]
    for k in fme["student"]:  # one short line each: a narrow or non-terminal console must not cut them
        log(f"flow-map error, {k} step: student {fme['student'][k]:.4f}, teacher Euler {fme['teacher_euler'][k]:.4f}")
    for line in metrics["warnings"]:
        log(f"[yellow]warning:[/] {line}")
    return metrics


def _progress(console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )
