"""The distillation loop: boring on purpose.

Every random draw of step ``k`` on rank ``r`` comes from a generator seeded
with ``(seed, r, k)``, so a resumed run sees exactly the batches the
uninterrupted run would have seen.  Re-running the same command in the same
output folder resumes from the latest checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .batch import BatchPath, step_generator
from .budget import BudgetClock
from .checkpoints import load_newest, save_checkpoint
from .config import RunConfig
from .data import build_data
from .errors import ConfigError, Interrupted, NonFiniteLoss, RunError
from .factory import build_student, student_for_run
from .fileio import write_json
from .finish import distributed_report, final_weights, finish_run
from .objectives import TrainBatch
from .schedules import ema_decay_at, ema_update, lr_factor
from .signals import SigtermAsInterrupt, interrupt_signal
from .preflight import ResolvedRun, keep_student_output
from .step import backward_micro_batches, begin_stage
from .teachers.analytic import AnalyticTeacher
from .tracking import RunTracking, accelerator_trackers, training_progress

# ---------------------------------------------------------------- run -------
@dataclass
class RunResult:
    output: Path
    steps: int
    seconds: float
    metrics: dict
    resumed_from: int
    is_main: bool = True


def run_distillation(cfg: RunConfig | ResolvedRun, overwrite: bool = False, show_progress: bool = True,
                     console=None) -> RunResult:
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
        from .preflight import check_parallelism

        cfg = self.cfg  # resolved by preflight
        on_cpu = not torch.cuda.is_available()
        scale.check_mixed_precision(cfg.mixed_precision, "cpu" if on_cpu else "cuda")
        self.accelerator = scale.make_accelerator(cfg.mixed_precision, cfg.compile, cpu=on_cpu,
                                                  **accelerator_trackers(cfg, self.out))
        check_parallelism(cfg, scale.is_sharded(self.accelerator), self.accelerator.num_processes)
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.log = (lambda msg: self.console.print(msg)) if self.main else (lambda msg: None)

    def preflight(self) -> None:
        """The run resolved once (settings, output folder, the objective); refuses before anything is loaded or
        written. A run the CLI resolved already is taken as it is."""
        from .preflight import resolve_run

        run = self.cfg if isinstance(self.cfg, ResolvedRun) else resolve_run(self.cfg, self.overwrite)
        self.resolved, self.cfg, self.objective, self.folder, self.out = run, run.cfg, run.objective, run.folder, \
            run.folder.out
        self.state = run.state  # the step count and the teacher's key: run state, filled in below

    def setup_teacher(self) -> None:
        from .data.cache import teacher_fingerprint
        from .preflight import (check_memory, check_prediction_type, check_teacher, check_teacher_unchanged,
                                settings_warnings)
        from .teachers.loading import load_teacher

        cfg = self.cfg
        teacher = load_teacher(cfg.teacher, cfg.subfolder, cfg.revision, allow_pickle=cfg.allow_pickle,
                               sample_size=cfg.sample_size, guidance_scale=cfg.default_guidance(),
                               negative_prompt=cfg.negative_prompt, guided=cfg.guidance_range is not None)
        if teacher.has_network:  # an unsupported time embedding is refused here, before any data work
            teacher.adapter.projection(teacher.network)
        teacher.to(self.device)
        check_prediction_type(self.resolved, teacher)
        for line in settings_warnings(cfg, teacher.prediction_type):
            self.log(f"[yellow]warning:[/] {line}")
        check_memory(cfg, teacher, self.device)  # before the first tensor of the teacher's data shape is made
        check_teacher(teacher, self.device)
        fingerprint = teacher_fingerprint(teacher)
        check_teacher_unchanged(self.folder, fingerprint)
        self.state.teacher_fingerprint = fingerprint
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
        if cfg.trajectory_share() > 0 and data.trajectories is None:
            raise ConfigError("trajectory_fraction needs a data-free pool of teacher solves; this teacher's data is "
                              "exact (analytic) or real, so set trajectory_fraction=0")
        self.data = data
        self.batches = BatchPath.from_run(cfg, teacher, data, device)

    def write_config(self) -> None:
        """The resolved config and the run state, written once the data is ready: a refused run leaves none behind."""
        if self.main:
            write_json(self.out / "config.json", self.cfg.to_dict())
            self.state.save(self.out)
        self.accelerator.wait_for_everyone()

    def setup_student(self) -> None:
        from . import scale

        cfg = self.cfg
        keep_student_output(cfg, self.out, self.folder.saved)  # a run from before auto meant gated resumes as it ran
        # a LoRA student's adapters sit on the teacher's own network; the teacher becomes its base-weights view
        student, self.teacher = student_for_run(self.teacher, cfg)
        if cfg.init_from:
            from .warmstart import init_student_from

            init_student_from(student, cfg.init_from)
        student = student.to(self.device)
        if cfg.mixed_precision != "no":
            scale.keep_time_embedders_fp32(student, self.teacher)
        self.dm = None
        if cfg.dm_weight > 0:  # the fake network copies the teacher before it is held in the training precision
            from .fake import DmTerm

            self.dm = DmTerm.for_run(cfg, self.state, self.teacher, self.device, self.accelerator, student)
        if cfg.lora_rank == 0 and self.teacher.has_network:  # (a LoRA teacher is the student's own base)
            scale.prepare_frozen(self.accelerator, self.teacher.network, cfg.mixed_precision)  # bf16; FSDP: sharded
        if cfg.gradient_checkpointing:
            scale.enable_gradient_checkpointing(student)
        self.ema = None
        if (self.objective.needs_ema or cfg.export_weights == "ema") and cfg.ema_decay > 0:
            self.ema = student.make_ema()
        self.student = student

    def setup_optimizer(self) -> None:
        cfg, state = self.cfg, self.state  # the schedule reads the step count when a time budget has fitted it
        self.optimizer = torch.optim.AdamW([p for p in self.student.parameters() if p.requires_grad], lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda k: lr_factor(k, cfg, state.total_steps))

    def resume(self) -> None:
        """Load the newest readable checkpoint (a damaged one is reported and skipped), then prepare for Accelerate."""
        from . import scale

        self.start_step, self.history, opt_state, dm_state = load_newest(self.out, self.student, self.ema,
                                                                         self.scheduler, self.dm is not None, self.log)
        scale.shard_fp32_modules(self.accelerator, self.student, self.optimizer)  # FSDP2 + bf16/fp16 only
        self.wrapped, self.optimizer = self.accelerator.prepare(self.student, self.optimizer)
        if opt_state is not None:
            try:
                scale.load_optimizer_state(self.accelerator, self.wrapped, self.optimizer, opt_state)
            except (ValueError, KeyError, RuntimeError) as e:
                raise RunError(f"the optimizer state of the latest checkpoint does not fit this run "
                               f"({type(e).__name__}); pass --overwrite to start over") from None
        if self.dm is not None:
            self.dm.restore(dm_state, self.start_step, self.log)
        self.last_saved = self.start_step

    def checkpoint(self, at_step: int) -> None:
        """A collective under FSDP: every rank gathers, rank 0 writes."""
        from . import scale

        state = scale.full_model_state(self.accelerator, self.wrapped, self.student)
        opt = scale.optimizer_state(self.accelerator, self.wrapped, self.optimizer)
        dm_state = self.dm.state() if self.dm is not None else None  # a collective too, when sharded
        if self.main:
            save_checkpoint(self.out, at_step, state, self.ema, opt, self.scheduler, self.cfg.keep_checkpoints,
                            self.history, dm_state)
        self.last_saved = at_step

    def make_batch(self, step: int) -> TrainBatch:
        """The batch of ``step`` on this rank: every draw from the generator of (seed, rank, step)."""
        batch, x1 = self.batches.draw(self.cfg.batch_size, step_generator(self.cfg.seed, self.accelerator.process_index, step))
        if step == self.start_step:
            self.first_batch = x1.double().sum().item()
        self.data_rows = x1  # the adversarial term's real rows (fake.DmTerm.fake_step)
        return batch

    def train_step(self, step: int) -> float | None:
        """One optimiser step; returns the loss, or ``None`` for a non-finite step skipped by ``nan_policy``."""
        cfg = self.cfg
        stage = cfg.dm_stage_start(self.state.total_steps)
        if stage is not None and step == stage > 0:
            begin_stage(self.student, self.ema, self.optimizer)
            self.log(f"distribution-matching stage: steps {stage} to {self.state.total_steps}, from the EMA's weights")
        in_stage = stage is not None and step >= stage
        dm_on = self.dm is not None and self.dm.runs_at(step)
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
        if dm_on:  # the distribution-matching term's gradient joins the objective's
            samples, dm_metrics = self.dm.student_step(self.wrapped, step, batch.cond, batch.generator, self.device)
            step_metrics = {**step_metrics, **dm_metrics}
        if cfg.grad_clip > 0 or self.tracking.measures_grad_norm(step):  # max_norm inf: the norm alone (grads x 1)
            self.grad_norm = self.accelerator.clip_grad_norm_(self.wrapped.parameters(), cfg.grad_clip or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:  # (the EMA's warm-up restarts with a stage)
            decay = ema_decay_at(step - stage if in_stage else step, cfg.ema_decay, cfg.ema_warmup,
                                 cfg.ema_offset_value())
            ema_update(self.ema, self.student, decay)
        if dm_on:  # then the fake network learns the student's samples of this step
            real = self.data_rows.to(self.device) if self.dm.settings.gan_weight > 0 else None  # its real rows
            step_metrics = {**step_metrics, **self.dm.fake_step(samples, batch.generator, real)}
        self.step_metrics = step_metrics
        lv = loss.item()
        if step % cfg.log_every == 0 or step == self.state.total_steps - 1:
            self.history.append({"step": step, "loss": lv, **step_metrics})
        return lv

    def train(self) -> None:
        cfg = self.cfg
        self.skipped, self.first_batch = 0, 0.0
        t_start = time.time()
        progress = training_progress(self.console, self.show_progress and self.main)
        task = progress.add_task("distilling", total=self.state.total_steps, completed=self.start_step,
                                 loss=float("nan"))
        clock = BudgetClock.for_run(self.cfg, self.state, t_start, self.start_step, self.log)
        step = self.start_step
        self.tracking = RunTracking(self)  # train_log.jsonl, trackers, validation (tracking.py)
        try:
            with progress, SigtermAsInterrupt():
                self.tracking.start()
                while step < self.state.total_steps:
                    lv = self.train_step(step)
                    step += 1
                    self.tracking.after_step(step, lv)
                    if clock is not None and clock.tick(step):
                        if clock.fits:
                            self.fit_time_budget(clock)
                            progress.update(task, total=self.state.total_steps)
                        else:
                            self.log(clock.estimate(self.state.total_steps, cfg.dm_stage_steps or 0))
                    if lv is None:
                        continue
                    progress.update(task, completed=step, loss=lv)
                    if step % cfg.checkpoint_every == 0 and step < self.state.total_steps:
                        self.checkpoint(step)
                    self.tracking.validate_if_due(step)
        except KeyboardInterrupt as e:
            if step > self.last_saved:
                self.checkpoint(step)
            raise Interrupted(f"interrupted at step {step}; checkpoint saved in {self.out / 'checkpoints'}; "
                              "re-run the same command to resume", interrupt_signal(e)) from None
        self.seconds = time.time() - t_start

    def fit_time_budget(self, clock: BudgetClock) -> None:
        """Fix the step count from the pace so far (rank 0's on every rank) and record it in the run state."""
        self.state.fitted_steps, message = clock.fitted(self.cfg, self.accelerator)
        if self.main:
            self.state.save(self.out)
        self.log(message)

    def finish(self) -> RunResult:
        """Last checkpoint, export and report; a kill here is finished by re-running the same command."""
        from . import scale

        cfg = self.cfg
        distributed = distributed_report(self.accelerator, self.student, self.first_batch)
        metrics = {}
        if self.state.total_steps > self.last_saved:
            self.checkpoint(self.state.total_steps)
        self.tracking.at_end()  # the last validation and training-curves.png, before the card shows them
        final = final_weights(cfg, self.accelerator, self.wrapped, self.student, self.ema,
                              lambda: build_student(self.teacher, cfg).to(self.device))
        if self.teacher.has_network:  # sharded: gathered whole on every rank, so rank 0 evaluates alone
            scale.unshard_frozen(self.teacher.network)
        if self.main:
            metrics = finish_run(cfg, self.state, self.out, final.eval(), self.teacher, self.objective, self.seconds,
                                 self.history, self.device, self.log, self.skipped, distributed,
                                 data_report=self.data.report, reference=self.tracking.report_reference())
        self.accelerator.wait_for_everyone()
        return RunResult(self.out, self.state.total_steps, self.seconds, metrics, self.start_step, self.main)


