"""The resolved run configuration, written to every run folder."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError  # noqa: F401 - re-exported: most callers import it from here

#: the fewest warm-up steps a time budget can be fitted on: the steps timed are those of the warm-up (budget.py)
MIN_WARMUP_STEPS = 10
#: the built-in 2-D teachers with an exact flow (``builtin:NAME``; teachers/analytic.py registers them by these)
EXACT_TEACHERS = ("checkerboard", "gaussian-mixture", "gaussian")

DEFAULT_OUTPUT = "ttfm-output"
#: how the (s, t) pairs of a batch are drawn (objectives/timesampling.py draws them)
TIME_SAMPLINGS = ("uniform", "dyadic", "mixed")
#: the share of each batch on the pool's 1-step trajectories that beat none on the embedded teacher (three seeds at
#: 2400 steps, docs/quality.md); not a default: on the zoo's second flow teacher (dit) it cost the 1-step student
#: (docs/results.md "Do the flow rules hold"), so trajectory_fraction unset means 0 for every teacher
AUTO_TRAJECTORY_FRACTION = 0.125
#: settings whose value is only known once the teacher is loaded (RunConfig.resolve_automatic): their unset
#: values, which the resume check lets match what a run resolved them to
AUTOMATIC = {"trajectory_fraction": (None,), "pool_solver": ("auto",), "lr_schedule": ("auto",), "lr": (None,),
             "mixed_precision": ("auto",), "lr_final_fraction": (None,), "pool_precision": ("auto",),
             "ema_warmup_offset": (None,), "dm_exact_fake": ("auto",), "dm_weight": (None,), "dm_stage_steps": (None,)}
#: the learning rate where the command leaves it unset (RunConfig.lr_value), for every teacher. The embedded flow
#: teacher alone trained better at 4e-4 with the cosine ending at a quarter and an EMA offset of 20 (docs/quality.md);
#: on the zoo's second flow teacher those values and the rows and long jumps above together cost the 1-step student
#: (docs/results.md "Do the flow rules hold"), so no setting is keyed on flow teachers but the precision
AUTO_LR_OTHER = 2e-4
#: the EMA warm-up's offset where the command leaves it unset (RunConfig.ema_offset_value)
EMA_OFFSET_OTHER = 10.0
#: ITVM's long_jump_span (progressive distillation's target on the pairs with t - s >= span) that beat none on the
#: embedded teacher; on dit it was even at 2-8 steps and worse at 1; unset means 0 (off) for every teacher
AUTO_LONG_JUMP_SPAN = 0.5
#: objective options a run fills in where ``loss_options`` leaves them unset (RunConfig.automatic_loss_options),
#: with the value a run folder written before they were automatic ran with
AUTOMATIC_LOSS_OPTIONS = {"itvm": {"long_jump_span": 0.0}}
#: the distribution-matching stage a flow image teacher's ITVM run ends with where dm_weight and dm_stage_steps are
#: unset (RunConfig.dm_default_applies): its weight and length. Chosen on the zoo's two flow teachers, two seeds each
#: (docs/results.md, "Distribution matching as a second stage"): the 1-step FD -23% to -56%, the 2-step -1% to -10%
DM_STAGE_WEIGHT = 0.3
DM_STAGE_STEPS = 400
#: the shortest run (max_steps) the stage is added to by default: it starts from a trained student; measured after
#: 3100 and after 1000 ITVM steps on both flow teachers (docs/results.md, "How long a run")
DM_STAGE_MIN_RUN = 1400



@dataclass
class RunConfig:
    """Everything that determines a distillation run.

    Re-running with the same config in the same ``output`` resumes it.
    """

    teacher: str = "builtin:fashion16"
    subfolder: str | None = None
    revision: str | None = None
    #: read pickle (.bin/.pt/.ckpt) teacher weights when no safetensors exist (they can run code)
    allow_pickle: bool = False
    #: latent (or pixel) size for teachers whose config does not fix it (Flux), or to override it
    sample_size: int | None = None
    #: classifier-free guidance baked into the student (1 = none), against negative_prompt or the null class
    guidance_scale: float = 1.0
    negative_prompt: str = ""
    #: [lo, hi]: a guidance scale drawn per sample in this range and given to the student as an input
    #: (sampling picks any scale in it; default guidance_scale, or the middle when guidance_scale is 1)
    guidance_range: list | None = None
    output: str = DEFAULT_OUTPUT
    loss: str = "itvm"
    loss_options: dict = field(default_factory=dict)
    #: 3500 steps with the data-free pool solved in bf16 (pool_precision) take about the wall time 3300 took with an
    #: fp32 pool on a 2-core CPU with bf16 autocast, and bring the 1-step student below the teacher's 8-step Euler on
    #: three seeds; 1200, 2400, 3000 and 3300 left it above (docs/quality.md, eighth round)
    max_steps: int = 3500
    #: seconds of training to fit the run into (the training loop: the data-free pool and the report add their own
    #: time). Unset: no budget, max_steps steps. Set: the speed of the lr warm-up's steps fixes the step count once
    #: (run state, runstate.RunState.fitted_steps, at most max_steps), before anything depends on it (budget.py)
    time_budget: float | None = None
    batch_size: int = 32
    #: None (unset): AUTO_LR_OTHER (RunConfig.lr_value); a resumed run keeps the lr it ran with
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 50
    #: after the warm-up: "constant", or "cosine" (down to lr_final_fraction * lr at max_steps; docs/quality.md);
    #: "auto": cosine (it steadied the diffusion teacher measured, and with twice the lr it beat the flow teacher's
    #: constant lr), constant for the exact 2-D teachers, where it was worse (RunConfig.lr_schedule_name)
    lr_schedule: str = "auto"
    #: None (unset): 0, a cosine to 0 (RunConfig.lr_final_value); a resumed run keeps what it ran with
    lr_final_fraction: float | None = None
    grad_clip: float = 1.0
    #: the exported weights are this EMA (export_weights="ema"); ITVM's composed target stays the current weights,
    #: its long jumps (long_jump_span, off unless set) jump with the EMA.
    #: 0.999 with warm-up beat the raw weights at 2/4/8 steps at 1200-10000 steps (docs/quality.md)
    ema_decay: float = 0.999
    #: EMA warm-up: the decay at step k is min(ema_decay, (1 + k) / (ema_warmup_offset + k)), so the EMA of a short
    #: run is not still mostly the initial weights (docs/quality.md)
    ema_warmup: bool = True
    #: the warm-up's offset o: while it governs, the EMA weighs step j about as j ** (o - 2), so it averages about the
    #: last 2 / o of the run (larger: shorter; 10 about the last fifth). Unset: EMA_OFFSET_OTHER
    #: (RunConfig.ema_offset_value; 20 helped the embedded teacher alone, docs/quality.md, eighth round)
    ema_warmup_offset: float | None = None
    seed: int = 0
    time_sampling: str = "mixed"
    #: fraction of pairs with s == t; None: the objective's own default (ITVM 0, LSD 0.75, others 0.25)
    diagonal_fraction: float | None = None
    dyadic_levels: int = 4
    second_time_input: str = "delta"
    data: str = "teacher"
    #: real data (``data`` = a folder, parquet/arrow file, saved dataset or hub id): see ttfm_distill/data
    data_split: str = "train"
    data_image_column: str | None = None
    data_label_column: str | None = None
    data_caption_column: str | None = None
    #: text file of prompts, one per line (data-free mode of a text teacher, or one per data row)
    prompts: str | None = None
    #: images are resized to this shorter side, then cropped to the teacher's size (default: the teacher's size)
    data_resolution: int | None = None
    data_crop: str = "center"
    data_channels: str = "convert"
    data_range: str = "auto"
    data_streaming: bool = False
    data_max_samples: int | None = None
    #: where prepared images, latents and prompt embeddings are cached (default: ~/.cache/ttfm-distill/data)
    data_cache: str | None = None
    pool_size: int = 2048
    pool_steps: int = 16
    #: the teacher solver of the data-free pool: "euler" (pool_steps evaluations a sample), "heun" (twice that),
    #: or "auto": heun when the run has trajectory rows (their targets are the solves), else euler
    pool_solver: str = "auto"
    #: the precision of the data-free pool's solve: "no" (fp32), "bf16" (autocast, the teacher's time embedders in
    #: fp32, states accumulated in fp32), or "auto": bf16 when the run trains in bf16 (RunConfig.pool_precision_name)
    pool_precision: str = "auto"
    #: fraction of each batch supervised by the pool's own teacher trajectories: a pair (s, t) on the pool's
    #: time grid whose target is the stored solve, (x_t - x_s) / (t - s), at no teacher cost (docs/quality.md).
    #: Unset: 0 for every teacher (RunConfig.trajectory_share; AUTO_TRAJECTORY_FRACTION is the share measured on
    #: the embedded teacher); a resumed run keeps what it ran with
    trajectory_fraction: float | None = None
    #: weight of those rows' loss against the objective's rows
    trajectory_weight: float = 1.0
    #: how those rows' pairs are drawn (as time_sampling / dyadic_levels; unset: the run's own). The default,
    #: dyadic with levels 0, is the 1-step jump (0, 1) alone; levels 1 adds the 2-step sampler's jumps
    trajectory_time_sampling: str | None = "dyadic"
    trajectory_dyadic_levels: int | None = 0
    mlp_width: int = 256
    mlp_depth: int = 4
    #: "auto": bf16 autocast for a flow teacher on hardware with native bf16 (a CUDA GPU that has it, a CPU with
    #: AVX512-BF16 or AMX), else "no" (RunConfig.precision_name); resolved before the accelerator is made
    mixed_precision: str = "auto"
    #: a row of the training log (train_log.jsonl) and of the trackers every this many steps (ttfm_distill/tracking.py)
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_samples: int = 128
    reference_steps: int = 32
    export_weights: str = "ema"
    nan_policy: str = "stop"
    # watching a run (docs/observability.md)
    #: Accelerate trackers, comma-separated (tensorboard, wandb, trackio, aim, mlflow, ...; "all": every one
    #: installed), or "none"; their files go under trackers/ in the run folder
    report_to: str | list = "none"
    #: validate every this many steps (and at the end); unset: at each checkpoint; 0: never
    validate_every: int | None = None
    #: fixed noises of each validation (seeded from seed): the student's flow-map error and, for 1x16x16 teachers, FD.
    #: Unset: the run report's (eval_samples; 4096 at least for 2-D teachers), whose noises they then are
    validation_samples: int | None = None
    # training at scale (docs/scale.md, "Settings")
    #: split each step's batch (per process) into this many micro-batches; memory only, same update
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    #: torch.compile the student through Accelerate: true (inductor) or a dynamo backend name
    compile: bool | str = False
    #: > 0: a LoRA student of this rank on the teacher's own (frozen, shared) network
    lora_rank: int = 0
    #: LoRA scale numerator (scale = alpha / rank); 0 means alpha = rank
    lora_alpha: float = 0.0
    #: module name suffixes to adapt, comma-separated or a list; "" = the family's defaults
    lora_targets: str | list = ""
    #: "merged" (a plain student folder) or "adapters" (adapter safetensors + config)
    lora_export: str = "merged"
    #: also write the module files that let diffusers load the export without ttfm-distill (trust_remote_code)
    standalone: bool = False
    # second teachers (docs/second-teacher.md)
    #: the time grid of the data-free pool's Euler solve, the run report's samplers and the student's sampler:
    #: "uniform" in package time, or "timesteps" (uniform in a diffusion scheduler's discrete timesteps, as DDIM
    #: spaces them; the uniform grid for flow teachers). Uniform was better on the DDPM teacher measured
    time_grid: str = "uniform"
    #: how the student's network output becomes its average velocity: "native" (the teacher's conversion),
    #: "velocity" (plus a zero-initialised gain-1 velocity head, conversion gradient capped), "gated" (that head only
    #: where the conversion's gain passes the cap: near the noise end of an epsilon teacher), or "auto" (gated for
    #: epsilon teachers, native for the rest: student.AUTO_STUDENT_OUTPUT, chosen on the teacher zoo, docs/results.md)
    student_output: str = "auto"
    # distribution matching beside the objective (objectives/dm.py; docs/method.md, "Distribution matching")
    #: weight of the term; 0 = off (no fake network is made). Unset: DM_STAGE_WEIGHT where a stage is asked for
    #: (dm_stage_steps > 0) or added by default (a flow image teacher's ITVM run of at least DM_STAGE_MIN_RUN steps,
    #: no dm_start_step: RunConfig.dm_weight_value), else 0; a resumed run keeps what it ran with
    dm_weight: float | None = None
    #: the fake velocity network's learning rate; unset: the student's
    dm_fake_lr: float | None = None
    #: fake-network updates per student step: 5 (as DMD2's ratio) kept the term steady where 1 swung the student,
    #: and won as a stage on the three flow and v-prediction zoo teachers (docs/results.md, "Distribution
    #: matching as a second stage")
    dm_fake_updates: int = 5
    #: the term's noising times are uniform in [dm_time_min, dm_time_max] (package time: 0 noise, 1 data)
    dm_time_min: float = 0.02
    dm_time_max: float = 0.98
    #: how the fake network's flow-matching times are drawn: "uniform" or "logit_normal"
    dm_fake_time: str = "uniform"
    #: the fake network of an exact 2-D teacher, which has no network to copy: "residual" (auto), the exact
    #: velocity plus an MLP whose last layer starts at zero, so the fake equals the teacher at step 0 as a copied
    #: network does; "mlp", a freshly initialised MLP (folders from before the setting resume with it)
    dm_exact_fake: str = "auto"
    #: the student rollouts the term is applied to, one drawn per step (1: the jump from noise to data)
    dm_rollout_steps: list = field(default_factory=lambda: [1])
    #: the step from which the term's gradient reaches the student (the fake network learns from step 0)
    dm_start_step: int = 0
    #: generated samples per step (per process)
    dm_batch: int = 16
    #: a distribution-matching stage: the run's last N steps (all of them in a shorter run). At its first step the
    #: student takes its EMA's weights, the EMA restarts there, the optimiser's moments reset and the lr follows
    #: its own warm-up and schedule from dm_stage_lr; the term (and the fake network, a fresh copy of the teacher
    #: until then) only runs in the stage. The in-run form of a warm start from a finished run (docs/results.md).
    #: 0: no stage (the term, if on, from dm_start_step). Unset: DM_STAGE_STEPS when the term is on in a run of at
    #: least DM_STAGE_MIN_RUN steps without dm_start_step, else 0 (RunConfig.dm_stage_value)
    dm_stage_steps: int | None = None
    #: the stage's learning rate (its peak, before the run's lr schedule shape)
    dm_stage_lr: float = 1e-4
    #: the adversarial term beside distribution matching (objectives/adversarial.py): the weight of the student's
    #: generator loss; 0 = off (no discriminator head is made). It rides on the term: it runs where the term runs
    dm_gan_weight: float = 0.0
    #: the weight of the discriminator loss in the fake network's updates (beside its flow-matching loss)
    dm_gan_fake_weight: float = 0.1
    #: warm start: a run folder (or student export) whose student weights this run starts from, instead of the
    #: teacher's; its EMA starts there too
    init_from: str | None = None

    def validate(self) -> "RunConfig":
        check_types(self.to_dict(), {f.name: f.type for f in fields(self)}, "setting")
        positive = ["max_steps", "batch_size", "pool_size", "pool_steps", "log_every", "checkpoint_every",
                    "keep_checkpoints", "eval_samples", "reference_steps", "dyadic_levels", "mlp_width", "mlp_depth"]
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("data_resolution", "data_max_samples"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.sample_size is not None and int(self.sample_size) < 1:
            raise ConfigError(f"sample_size must be a positive integer, got {self.sample_size}")
        if not self.guidance_scale >= 0:
            raise ConfigError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.guidance_range is not None:
            r = self.guidance_range
            if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r)
                    and 0 <= r[0] <= r[1]):
                raise ConfigError(f"guidance_range must be [lo, hi] with 0 <= lo <= hi, got {r!r}")
            if int(self.lora_rank) > 0:
                raise ConfigError("guidance_range is not supported with LoRA students yet; use a fixed guidance_scale")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_warmup_offset is not None and not self.ema_warmup_offset > 1:
            raise ConfigError(f"ema_warmup_offset must be > 1 (the decay at step 0 is 1 / offset), got "
                              f"{self.ema_warmup_offset}")
        if self.diagonal_fraction is not None and not 0 <= self.diagonal_fraction <= 1:
            raise ConfigError(f"diagonal_fraction must be in [0, 1], got {self.diagonal_fraction}")
        if int(self.grad_accum_steps) < 1 or self.batch_size % int(self.grad_accum_steps):
            raise ConfigError(f"grad_accum_steps must be a positive divisor of batch_size ({self.batch_size}), "
                              f"got {self.grad_accum_steps}")
        if not isinstance(self.compile, (bool, str)):
            raise ConfigError(f"compile must be true, false or a torch.compile backend name, got {self.compile!r}")
        if int(self.lora_rank) < 0 or self.lora_alpha < 0:
            raise ConfigError(f"lora_rank and lora_alpha must be >= 0, got {self.lora_rank} and {self.lora_alpha}")
        if (self.trajectory_fraction is not None and not 0 <= self.trajectory_fraction < 1) or not (
                self.trajectory_weight >= 0):
            raise ConfigError(f"trajectory_fraction must be in [0, 1) and trajectory_weight >= 0, got "
                              f"{self.trajectory_fraction} and {self.trajectory_weight}")
        if self.trajectory_time_sampling not in (None, *TIME_SAMPLINGS):
            raise ConfigError("trajectory_time_sampling must be one of uniform, dyadic, mixed (or unset), got "
                              f"{self.trajectory_time_sampling!r}")
        if self.trajectory_dyadic_levels is not None and int(self.trajectory_dyadic_levels) < 0:
            raise ConfigError(f"trajectory_dyadic_levels must be >= 0, got {self.trajectory_dyadic_levels}")
        if (self.trajectory_fraction or 0) > 0 and self.data != "teacher":
            raise ConfigError("trajectory_fraction needs the data-free pool (data=teacher): real data has no "
                              "teacher trajectories; set trajectory_fraction=0 or drop --data")
        if self.lr_final_fraction is not None and not 0 <= self.lr_final_fraction <= 1:
            raise ConfigError(f"lr_final_fraction must be in [0, 1], got {self.lr_final_fraction}")
        if self.validate_every is not None and int(self.validate_every) < 0:
            raise ConfigError(f"validate_every must be >= 0 (0: never), got {self.validate_every}")
        if self.validation_samples is not None and int(self.validation_samples) < 2:
            raise ConfigError(f"validation_samples must be >= 2 (a covariance needs two), got {self.validation_samples}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("weight_decay, grad_clip and warmup_steps must be >= 0")
        if self.time_budget is not None:
            if not self.time_budget > 0:
                raise ConfigError(f"time_budget must be a positive number of seconds, got {self.time_budget}")
            if self.warmup_steps < MIN_WARMUP_STEPS:
                raise ConfigError(f"time_budget times the lr warm-up's steps: it needs warmup_steps >= "
                                  f"{MIN_WARMUP_STEPS}, got {self.warmup_steps}")
        choices = {
            "time_sampling": TIME_SAMPLINGS,
            "second_time_input": ("delta", "t"),
            "mixed_precision": ("auto", "no", "fp16", "bf16"),
            "export_weights": ("ema", "raw"),
            "nan_policy": ("stop", "skip"),
            "lr_schedule": ("auto", "constant", "cosine"),
            "pool_solver": ("auto", "euler", "heun"),
            "pool_precision": ("auto", "no", "bf16"),
            "data_crop": ("center", "random"),
            "data_channels": ("convert", "strict"),
            "data_range": ("auto", "0-255", "0-1", "-1-1"),
            "lora_export": ("merged", "adapters"),
            "time_grid": ("uniform", "timesteps"),
            "student_output": ("auto", "native", "velocity", "gated"),
            "dm_exact_fake": ("auto", "residual", "mlp"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self.check_dm()
        if self.student_output in ("velocity", "gated") and int(self.lora_rank) > 0:
            raise ConfigError(f"student_output={self.student_output} is not supported with LoRA students; use "
                              "student_output=native")
        return self

    def check_dm(self) -> None:
        """The distribution-matching settings (objectives/dm.py)."""
        if self.dm_weight is not None and not self.dm_weight >= 0:
            raise ConfigError(f"dm_weight must be >= 0 (0: off), got {self.dm_weight}")
        if self.dm_fake_lr is not None and not self.dm_fake_lr > 0:
            raise ConfigError(f"dm_fake_lr must be > 0 (or unset: the student's lr), got {self.dm_fake_lr}")
        if int(self.dm_fake_updates) < 1 or int(self.dm_batch) < 1 or int(self.dm_start_step) < 0:
            raise ConfigError("dm_fake_updates and dm_batch must be >= 1 and dm_start_step >= 0")
        stage = self.dm_stage_steps or 0
        if stage < 0 or not self.dm_stage_lr > 0:
            raise ConfigError(f"dm_stage_steps must be >= 0 and dm_stage_lr > 0, got {self.dm_stage_steps} and "
                              f"{self.dm_stage_lr}")
        if stage > 0 and self.dm_weight is not None and not self.dm_weight > 0:
            raise ConfigError("dm_stage_steps needs the term on: set dm_weight (0.3 was measured) or dm_stage_steps=0")
        if stage > 0 and self.dm_start_step > 0:
            raise ConfigError("dm_stage_steps and dm_start_step both say when the term starts; set one of them")
        if not 0 <= self.dm_time_min < self.dm_time_max <= 1:
            raise ConfigError(f"need 0 <= dm_time_min < dm_time_max <= 1, got {self.dm_time_min} and "
                              f"{self.dm_time_max}")
        if self.dm_fake_time not in ("uniform", "logit_normal"):
            raise ConfigError(f"dm_fake_time must be uniform or logit_normal, got {self.dm_fake_time!r}")
        steps = self.dm_rollout_steps
        if not steps or not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 8 for k in steps):
            raise ConfigError(f"dm_rollout_steps must be a list of step counts from 1 to 8, e.g. [1, 2], got {steps!r}")
        if self.init_from is not None and not Path(self.init_from).exists():
            raise ConfigError(f"init_from {self.init_from} does not exist; pass an earlier run folder or student export")
        if not (self.dm_gan_weight >= 0 and self.dm_gan_fake_weight >= 0):
            raise ConfigError(f"dm_gan_weight and dm_gan_fake_weight must be >= 0, got {self.dm_gan_weight} and "
                              f"{self.dm_gan_fake_weight}")
        if self.dm_gan_weight > 0 and self.dm_weight is not None and not self.dm_weight > 0:
            raise ConfigError("dm_gan_weight rides on the distribution-matching term: set dm_weight (0.3 was "
                              "measured) or dm_gan_weight=0")
        if self.dm_gan_weight > 0 and self.exact_teacher():
            raise ConfigError("dm_gan_weight needs a teacher network to read features from; the exact 2-D teachers "
                              "have none: set dm_gan_weight=0")
        if self.dm_gan_weight > 0 and int(self.lora_rank) > 0:
            raise ConfigError("dm_gan_weight (the adversarial term) is not supported with LoRA students yet; set "
                              "dm_gan_weight=0 or lora_rank=0")

    def trajectory_share(self, prediction_type: str = "flow") -> float:
        """The fraction of each batch on the pool's trajectories: ``trajectory_fraction``, or 0 when unset, for every
        teacher (they helped the embedded flow teacher, cost the zoo's DiT flow teacher its 1-step student and
        destabilised the epsilon DDPM teacher measured: docs/results.md). ``prediction_type`` is kept for the
        rules' common signature."""
        if self.trajectory_fraction is not None:
            return float(self.trajectory_fraction)
        return 0.0

    def dm_default_applies(self, prediction_type: str = "flow") -> bool:
        """Whether this run ends with the distribution-matching stage when dm_weight and dm_stage_steps are unset:
        a flow image teacher (the zoo's two flow teachers won at 1 and 2 steps on three seeds with full students, and
        with rank-16 LoRA students on one seed each; the term broke the epsilon DDPM teacher measured, and
        v-prediction has one teacher of evidence), the ITVM objective it was measured with, a run of at least
        :data:`DM_STAGE_MIN_RUN` steps and no ``dm_start_step`` (which asks for the term from that step instead)."""
        return (self.flow_image_teacher(prediction_type) and self.loss == "itvm"
                and int(self.max_steps) >= DM_STAGE_MIN_RUN and int(self.dm_start_step) == 0)

    def dm_weight_value(self, prediction_type: str = "flow") -> float:
        """The term's weight: ``dm_weight``, or when unset :data:`DM_STAGE_WEIGHT` where ``dm_stage_steps`` asks
        for a stage or (``dm_stage_steps`` unset too) :meth:`dm_default_applies`, else 0."""
        if self.dm_weight is not None:
            return float(self.dm_weight)
        if self.dm_stage_steps is not None:
            return DM_STAGE_WEIGHT if self.dm_stage_steps > 0 else 0.0
        return DM_STAGE_WEIGHT if self.dm_default_applies(prediction_type) else 0.0

    def dm_stage_value(self, prediction_type: str = "flow") -> int:
        """The stage's length: ``dm_stage_steps``, or when unset :data:`DM_STAGE_STEPS` for a run with the term on
        (:meth:`dm_weight_value`), at least :data:`DM_STAGE_MIN_RUN` steps long and no ``dm_start_step``, else 0."""
        if self.dm_stage_steps is not None:
            return int(self.dm_stage_steps)
        on = self.dm_weight_value(prediction_type) > 0
        return DM_STAGE_STEPS if on and int(self.max_steps) >= DM_STAGE_MIN_RUN and int(self.dm_start_step) == 0 else 0

    def flow_image_teacher(self, prediction_type: str) -> bool:
        """Whether the teacher predicts a flow and is not an exact 2-D one: the teachers the automatic precision
        (bf16 on a machine that computes it natively) was measured on."""
        return prediction_type == "flow" and not self.exact_teacher()

    def exact_teacher(self) -> bool:
        """Whether the teacher is one of the analytic 2-D teachers (``builtin:NAME``), whose flow is exact."""
        spec = self.teacher or ""
        return spec.startswith("builtin:") and spec.split(":", 1)[1] in EXACT_TEACHERS

    def pool_solver_name(self, prediction_type: str = "flow") -> str:
        """The pool's solver: ``pool_solver``, with ``auto`` read as heun when there are trajectory rows."""
        if self.pool_solver != "auto":
            return self.pool_solver
        return "heun" if self.trajectory_share(prediction_type) > 0 else "euler"

    def pool_precision_name(self, prediction_type: str = "flow", bf16_native: bool = False) -> str:
        """The pool solve's precision: ``pool_precision``, with ``auto`` read as bf16 when the run trains in bf16
        (:meth:`precision_name`) and fp32 ("no") otherwise. The teacher calls of the run's targets already run
        under that autocast; on the embedded teacher a bf16 Heun-16 solve took about half the time and moved the
        samples by 0.010 rms, against 0.025 between the fp32 solve and RK4 (docs/quality.md)."""
        if self.pool_precision != "auto":
            return self.pool_precision
        return "bf16" if self.precision_name(prediction_type, bf16_native) == "bf16" else "no"

    def automatic_loss_options(self, prediction_type: str = "flow") -> dict:
        """The objective options this run fills in where ``loss_options`` leaves them unset: ITVM's long jumps off
        for every teacher (:data:`AUTO_LONG_JUMP_SPAN` helped the embedded teacher; they were even or worse on the
        zoo's DiT teacher, made a diffusion teacher's training spike with the cosine lr, docs/second-teacher.md,
        and cost 4-16 steps on the checkerboard, docs/quality.md). ``prediction_type``: the common signature."""
        return {k: v for k, v in AUTOMATIC_LOSS_OPTIONS.get(self.loss, {}).items() if k not in self.loss_options}

    def lr_schedule_name(self, prediction_type: str = "flow") -> str:
        """The lr schedule: ``lr_schedule``, with ``auto`` read as cosine (the DDPM teacher measured trained
        unstably past 1500 steps at a constant lr, docs/second-teacher.md; on the embedded flow teacher the cosine
        with twice the lr beat the constant lr, docs/quality.md), and constant for the exact 2-D teachers (a
        cosine was worse on the checkerboard). ``prediction_type`` is kept for the rules' common signature."""
        if self.lr_schedule != "auto":
            return self.lr_schedule
        return "constant" if self.exact_teacher() else "cosine"

    def precision_name(self, prediction_type: str = "flow", bf16_native: bool = False) -> str:
        """The autocast precision: ``mixed_precision``, with ``auto`` read as bf16 for a flow teacher (not the
        exact 2-D ones, whose MLP gains nothing from it) on a device with native bf16 (``bf16_native``: a fact
        of the machine, ``machine.native_bf16``), and "no" otherwise. On the embedded teacher bf16 trained as
        well as fp32 at 2400 steps and 1.2x faster on this project's CPU (docs/quality.md). A diffusion
        teacher's velocity divides its noise estimate by alpha near the noise end, which could magnify bf16's
        rounding; on the DDPM teacher measured bf16 was even with fp32 on one seed, too little to change its
        default, so it stays fp32."""
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if self.flow_image_teacher(prediction_type) and bf16_native else "no"

    def lr_value(self, prediction_type: str = "flow") -> float:
        """The learning rate: ``lr``, or when unset :data:`AUTO_LR_OTHER` for every teacher."""
        if self.lr is not None:
            return float(self.lr)
        return AUTO_LR_OTHER

    def lr_final_value(self, prediction_type: str = "flow") -> float:
        """Where the cosine ends, as a fraction of the lr: ``lr_final_fraction``, or 0 when unset."""
        if self.lr_final_fraction is not None:
            return float(self.lr_final_fraction)
        return 0.0

    def ema_offset_value(self, prediction_type: str = "flow") -> float:
        """The EMA warm-up's offset: ``ema_warmup_offset``, or :data:`EMA_OFFSET_OTHER` when unset."""
        if self.ema_warmup_offset is not None:
            return float(self.ema_warmup_offset)
        return EMA_OFFSET_OTHER

    def resolve_automatic(self, prediction_type: str, saved: dict | None = None,
                          bf16_native: bool = False) -> "RunConfig":
        """Turn the automatic settings into the values that run, from the teacher's prediction type and whether
        the machine computes in bf16 natively (``preflight.resolve_run`` reads both before any weights load).

        A resumed run (``saved``: its config.json) keeps what it ran with; a folder written before the
        settings existed ran without trajectory rows, on an Euler pool, at a constant lr of 2e-4 and without
        ITVM's long jumps.
        """
        if saved is not None:
            before = saved.get("loss_options") or {}
            fill = {k: before.get(k, v) for k, v in AUTOMATIC_LOSS_OPTIONS.get(self.loss, {}).items()
                    if k not in self.loss_options}
        else:
            fill = self.automatic_loss_options(prediction_type)
        self.loss_options = {**self.loss_options, **fill}
        for key in AUTOMATIC:
            self.resolve_setting(key, prediction_type, saved, bf16_native)
        return self

    def resolve_setting(self, key: str, prediction_type: str, saved: dict | None = None,
                        bf16_native: bool = False) -> None:
        """One automatic setting (a key of :data:`AUTOMATIC`) as :meth:`resolve_automatic` fills it in: left
        alone when given, a resumed run's own value (``saved``; a folder from before it existed: the value it
        ran with), else the rule for ``prediction_type``."""
        resolve, before = {"trajectory_fraction": (self.trajectory_share, 0.0),
                           "pool_solver": (self.pool_solver_name, "euler"),
                           "lr_schedule": (self.lr_schedule_name, "constant"),
                           "lr": (self.lr_value, AUTO_LR_OTHER),
                           "mixed_precision": (lambda p: self.precision_name(p, bf16_native), "no"),
                           "lr_final_fraction": (self.lr_final_value, 0.0),
                           "pool_precision": (lambda p: self.pool_precision_name(p, bf16_native), "no"),
                           "ema_warmup_offset": (self.ema_offset_value, EMA_OFFSET_OTHER),
                           "dm_exact_fake": (lambda p: "residual", "mlp"),
                           "dm_weight": (self.dm_weight_value, 0.0),
                           "dm_stage_steps": (self.dm_stage_value, 0)}[key]
        if getattr(self, key) not in AUTOMATIC[key]:
            return
        value = before if saved is None else saved.get(key, before)
        setattr(self, key, resolve(prediction_type) if saved is None or value in AUTOMATIC[key] else value)

    @classmethod
    def automatic_defaults(cls, run_config: dict, prediction_type: str = "flow",
                           bf16_native: bool = False) -> tuple[dict, dict]:
        """What each automatic setting and objective option resolves to in a command that leaves it alone and
        keeps the rest of ``run_config`` (a config.json) on a machine with or without native bf16:
        ``(settings, loss_options)``. A setting equal to it is not part of the command that reproduces the run
        (the model card's)."""
        known = {f.name for f in fields(cls)}
        base = {k: v for k, v in run_config.items() if k in known}
        loss = base.get("loss", cls.loss)
        options = dict(base.get("loss_options") or {})
        automatic = AUTOMATIC_LOSS_OPTIONS.get(loss, {})
        probe = cls(**{**base, "loss_options": {k: v for k, v in options.items() if k not in automatic}})
        loss_defaults = probe.automatic_loss_options(prediction_type)
        settings = {key: getattr(cls(**{**base, key: unset[0]}).resolve_automatic(prediction_type,
                                                                                 bf16_native=bf16_native), key)
                    for key, unset in AUTOMATIC.items()}
        return settings, loss_defaults

    def dm_stage_start(self, total_steps: int) -> int | None:
        """The first step of the distribution-matching stage (``dm_stage_steps``) of a run that trains
        ``total_steps`` (``runstate.RunState.total_steps``), or None without one."""
        if not self.dm_stage_steps:
            return None
        return max(0, int(total_steps) - int(self.dm_stage_steps))

    def trajectory_pairs(self) -> tuple[str, int]:
        """``(time_sampling, dyadic_levels)`` the trajectory rows' pairs are drawn with (unset: the run's own)."""
        mode = self.trajectory_time_sampling or self.time_sampling
        levels = self.dyadic_levels if self.trajectory_dyadic_levels is None else self.trajectory_dyadic_levels
        return mode, int(levels)

    def default_guidance(self) -> float:
        """The guidance scale the teacher uses when a sample has none (evaluation, data-free pools)."""
        if self.guidance_range is not None and self.guidance_scale == 1.0:
            return (float(self.guidance_range[0]) + float(self.guidance_range[1])) / 2
        return float(self.guidance_scale)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown config key {key!r}{hint}")
        check_types(data, {f.name: f.type for f in fields(cls)}, "setting")
        return cls(**data)


def _describe(value) -> str:
    text = json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def type_problem(value, annotation: str) -> str | None:
    """What is wrong with ``value`` for a field annotated ``annotation`` (a string), or ``None``.

    Integers must be whole numbers (not ``2.5``, ``"10"`` or ``true``); numbers must be
    finite; ``None`` only where the annotation allows it.
    """
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None:
        return None if "None" in kinds else "must be set (got null)"
    wanted = []
    for kind in kinds:
        if kind == "int":
            wanted.append("an integer")
            if isinstance(value, int) and not isinstance(value, bool):
                return None
        elif kind == "float":
            wanted.append("a finite number")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return None if math.isfinite(value) else "must be a finite number"
        elif kind == "bool":
            wanted.append("true or false")
            if isinstance(value, bool):
                return None
        elif kind == "str":
            wanted.append("a string")
            if isinstance(value, str):
                return None
        elif kind == "list":
            wanted.append("a list")
            if isinstance(value, (list, tuple)):
                return None
        elif kind == "dict":
            wanted.append("a table of KEY=VALUE")
            if isinstance(value, dict):
                return None
        elif kind == "None":
            continue
        else:  # an annotation this checker does not know: accept rather than refuse a valid value
            return None
    return "must be " + " or ".join(wanted)


def check_types(data: dict, annotations: dict, what: str = "setting") -> None:
    """Raise ``ConfigError`` naming the first value of ``data`` whose type does not fit its annotation."""
    for key, value in data.items():
        if key not in annotations:
            continue
        problem = type_problem(value, annotations[key])
        if problem:
            raise ConfigError(f"{what} {key} {problem}, got {_describe(value)}")


def load_config_file(path: str | Path) -> dict:
    """Read a JSON (``.json``) or TOML (``.toml``) config file into a dict."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text; pass a .json or .toml file") from None
    kind = "TOML" if path.suffix == ".toml" else "JSON"
    try:
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            values = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"config file {path} is not valid {kind}: {str(e).splitlines()[0][:80]}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of settings, got a {type(values).__name__}")
    return values


# fields that may change between a run and its resumption
RESUMABLE_CHANGES = {"max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_samples",
                     "reference_steps", "output", "allow_pickle", "data_cache", "gradient_checkpointing", "compile",
                     "lora_export", "standalone",
                     # what a run shows while it trains, not what it trains
                     "report_to", "validate_every", "validation_samples",
                     # run state that folders of earlier versions kept in config.json (runstate.LEGACY_KEYS)
                     "fitted_steps", "teacher_fingerprint"}


def resume_mismatch(saved: dict, current: dict) -> list[str]:
    """Names of settings that differ and forbid resuming.

    A setting missing from ``saved`` (a run folder from before it existed) counts as its default.
    """
    defaults = RunConfig().to_dict()
    differ = sorted(k for k in set(saved) | set(current)
                    if k not in RESUMABLE_CHANGES and k != "loss_options"
                    and saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k))
                    and not (k in AUTOMATIC and current.get(k, defaults.get(k)) in AUTOMATIC[k])
                    and not (k == "diagonal_fraction" and current.get(k) is None))  # the objective's default
    if _loss_options_differ(saved.get("loss_options") or {}, current.get("loss_options") or {},
                            current.get("loss", defaults["loss"])):
        differ = sorted([*differ, "loss_options"])
    return differ


def _loss_options_differ(saved: dict, current: dict, loss: str) -> bool:
    """Whether the command's objective options contradict the run's: an automatic option the command leaves
    unset matches what the run filled in (missing from an older folder: its value from before)."""
    automatic = AUTOMATIC_LOSS_OPTIONS.get(loss, {})
    ran = {**automatic, **saved}
    return any(k not in ran or ran[k] != v for k, v in current.items()) or \
        any(k not in current for k in saved if k not in automatic)
