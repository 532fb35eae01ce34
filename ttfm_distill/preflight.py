"""Every refusal a run can make, made before any expensive work or any file is written.

``--dry-run`` and ``run`` share :func:`resolve_run` (settings, the output
folder, the facts the automatic settings depend on); ``run`` then loads the teacher and adds
:func:`check_teacher` (finite weights and outputs, a supported time
embedding), :func:`check_teacher_unchanged` and :func:`check_memory` before
it touches the data.  Only after all of them pass does it lock the folder,
clear it (``--overwrite``) and start.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig, resume_mismatch
from .errors import ConfigError, RunError
from .rundir import check_output
from .runstate import RunState


@dataclass
class FolderState:
    """What :func:`check_run_folder` found: the saved config (``None``: a new run), the newest checkpoint step and
    the run state the run starts from (a new one, or the resumed run's)."""

    out: Path
    saved: dict | None
    done_steps: int
    state: RunState


@dataclass(frozen=True)
class ResolvedRun:
    """A run's settings resolved once, by :func:`resolve_run`: what ``run`` trains with, ``--dry-run`` prints
    and config.json records.

    ``cfg`` has every automatic setting filled in (left automatic only where ``prediction_type`` is ``None``:
    ``--dry-run`` on a hub id it does not fetch); ``objective`` is built once, from it. What a run learns while it
    runs is run state, not a setting (:attr:`state`: the step count a time budget fits, the teacher's
    fingerprint once its weights load)."""

    cfg: RunConfig
    objective: object
    folder: FolderState
    #: what the teacher predicts, read from its configs before any weights load (None: not read, see above)
    prediction_type: str | None
    #: the teacher as its configs describe it (``teachers.loading.check_teacher_spec``), for ``--dry-run``
    teacher_info: str = ""

    @property
    def state(self) -> RunState:
        """The run state (mutable: the trainer fills it in), new or the resumed run's."""
        return self.folder.state


def resolve_run(cfg: RunConfig, overwrite: bool = False, fetch: bool = True) -> ResolvedRun:
    """Validate ``cfg``, check its output folder, read the facts the automatic settings depend on (the teacher's
    prediction type from its configs, fetched for a hub id with ``fetch``; whether this machine computes in bf16
    natively), fill every automatic setting in and build the objective. Refuses before anything is loaded or
    written."""
    from . import machine
    from .teachers.loading import check_teacher_spec, teacher_prediction_type

    cfg.validate()
    if cfg.report_to not in ("none", "", None, []):  # a tracker not installed or cut off from its server: now
        from .tracking import check_report_to

        check_report_to(cfg.report_to)
    trajectory_rows(cfg)  # an explicit share that leaves no objective rows, before the folder is looked at
    folder = check_run_folder(cfg, overwrite)
    teacher_info = check_teacher_spec(cfg.teacher, cfg.subfolder)  # what the load would refuse (custom code, ...)
    prediction_type = teacher_prediction_type(cfg.teacher, cfg.subfolder, cfg.revision,
                                              fetch=fetch and folder.saved is None)
    cfg, objective = resolve_settings(cfg, prediction_type, folder.saved, machine.native_bf16())
    return ResolvedRun(cfg, objective, folder, prediction_type, teacher_info)


def check_prediction_type(run: ResolvedRun, teacher) -> None:
    """The loaded teacher predicts what its configs said when the run was resolved (both read the same scheduler
    config: a difference is a teacher folder changed between the two reads)."""
    if run.prediction_type not in (None, teacher.prediction_type):
        raise RunError(f"the teacher's configs said it predicts {run.prediction_type} but it loaded as "
                       f"{teacher.prediction_type}; was the folder changed during the run's start? re-run")


def resolve_settings(cfg: RunConfig, prediction_type: str | None = None, saved: dict | None = None,
                     bf16_native: bool = False):
    """The settings part of :func:`resolve_run`, from facts given: every automatic setting filled in for a
    teacher that predicts ``prediction_type`` on a machine with or without native bf16 (a resumed run,
    ``saved``: its config.json, keeps what it ran with; ``prediction_type`` None and no ``saved``: left
    automatic), the objective's own share of diagonal pairs where unset, the objective built once.

    Returns ``(cfg, objective)``, the objective wrapped with the trajectory rows' loss when the run has them.
    """
    from .objectives import make_objective_from

    cfg.validate()
    if prediction_type is not None or saved is not None:
        cfg.resolve_automatic(prediction_type or "unknown", saved, bf16_native)
        cfg.validate()  # the combinations the automatic values make (a stage asked for on a LoRA student, ...)
    objective = make_objective_from(cfg.loss, cfg.loss_options)
    if cfg.diagonal_fraction is None:
        ran = (saved or {}).get("diagonal_fraction")
        cfg.diagonal_fraction = float(ran if ran is not None else objective.default_diagonal_fraction)
    check_objective_fits(objective, cfg)
    trajectory_rows(cfg)  # the resolved share, checked as an explicit one is
    return cfg, with_trajectory_rows(objective, cfg)


def with_trajectory_rows(objective, cfg: RunConfig):
    """``objective`` wrapped with the trajectory rows' loss when ``cfg`` has a share of them (a number > 0)."""
    from .objectives.trajectory import TrajectorySupervised

    if cfg.trajectory_fraction is None or cfg.trajectory_fraction <= 0 or isinstance(objective, TrajectorySupervised):
        return objective
    return TrajectorySupervised(objective, cfg.trajectory_weight)


def settings_warnings(cfg: RunConfig, prediction_type: str = "flow") -> list[str]:
    """Plain warnings about resolved settings that run but were measured to hurt (one line each)."""
    lines = []
    if (cfg.dm_weight or 0) > 0 and prediction_type == "epsilon":
        lines.append(f"dm_weight={cfg.dm_weight:g} on an epsilon teacher: on the project's DDPM the term collapsed the "
                     "1-step student (docs/results.md); it helped flow and v-prediction teachers")
    span = float((cfg.loss_options or {}).get("long_jump_span", 0.0)) if cfg.loss == "itvm" else 0.0
    if span <= 0:
        return lines
    if cfg.ema_decay <= 0:
        lines.append(f"ITVM's long jumps (long_jump_span={span:g}) jump with the current weights when no EMA is kept "
                     "(ema_decay=0); keep an EMA or pass -L long_jump_span=0")
    elif not cfg.ema_warmup and cfg.ema_decay >= 0.99:
        lines.append(f"ITVM's long jumps (long_jump_span={span:g}) jump with an EMA that without warm-up stays near "
                     "the initial weights for thousands of steps; keep ema_warmup=true or pass -L long_jump_span=0")
    return lines


def trajectory_rows(cfg: RunConfig) -> int:
    """Trajectory rows per batch: ``trajectory_fraction`` of it, a multiple of ``grad_accum_steps`` (at least one)."""
    if cfg.trajectory_fraction is None or cfg.trajectory_share() <= 0:  # automatic: counted once resolved
        return 0
    n = int(cfg.grad_accum_steps)
    m = max(n, int(round(cfg.trajectory_share() * cfg.batch_size / n)) * n)
    if m >= cfg.batch_size:
        raise ConfigError(f"trajectory_fraction {cfg.trajectory_fraction} leaves no rows for the objective at "
                          f"batch_size {cfg.batch_size}; lower it or raise batch_size")
    return m


def check_objective_fits(objective, cfg: RunConfig) -> None:
    """Refuse settings under which the teacher never reaches the loss."""
    if not objective.teacher_off_diagonal and cfg.diagonal_fraction == 0:
        raise ConfigError(f"{cfg.loss} with these options sees the teacher only on diagonal pairs (s == t), and "
                          "diagonal_fraction is 0, so nothing would be distilled; use --set diagonal_fraction=0.25")


def latest_checkpoint_step(out: Path) -> int:
    from .checkpoints import list_checkpoints

    ckpts = list_checkpoints(out)
    return int(ckpts[-1].name.split("-")[-1]) if ckpts else 0


def check_run_folder(cfg: RunConfig, overwrite: bool) -> FolderState:
    """Refuse an output folder this run must not use, a different run in it, or a run already past ``max_steps``."""
    out = Path(cfg.output).expanduser()
    saved = check_output(out, overwrite)
    if overwrite or saved is None:
        return FolderState(out, None, 0, RunState(cfg.max_steps))
    diff = resume_mismatch(saved, cfg.to_dict())
    if diff:
        shown = ", ".join(diff[:4]) + (", ..." if len(diff) > 4 else "")
        raise ConfigError(f"{out} holds a different run (differs in: {shown}); re-run with its settings to resume, "
                          "or pass --overwrite or another --output")
    state = RunState.resumed(cfg.max_steps, out, saved)  # a time budget's count kept (RunState.resumed)
    done = latest_checkpoint_step(out)
    if done > state.total_steps:
        raise ConfigError(f"{out} is already at step {done}, past max_steps {state.total_steps}; nothing was changed "
                          f"(pass --max-steps {done} or more to go on)")
    return FolderState(out, saved, done, state)


def check_teacher(teacher, device, n: int = 2) -> None:
    """Refuse a teacher whose weights or velocities are not finite (a short forward at a few times)."""
    from .convention import interpolate
    from .teachers.loading import TeacherLoadError

    bad = [k for k, v in teacher.state_dict().items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise TeacherLoadError(f"the teacher's weights hold NaN or Inf ({len(bad)} tensors, e.g. {bad[0][:60]}); "
                               "fix or re-export the teacher")
    g = torch.Generator().manual_seed(0)
    x0 = teacher.sample_noise(n, generator=g)
    cond = teacher.sample_cond(n, generator=g)
    if cond:
        cond = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cond.items()}
    with torch.no_grad():
        for t in (0.05, 0.5, 0.95):
            tt = torch.full((n,), t)
            x = interpolate(x0, torch.zeros_like(x0), tt).to(device)
            v = teacher.velocity(x, tt.to(device), cond)
            if not bool(torch.isfinite(v).all()):
                raise TeacherLoadError(f"the teacher's velocity is NaN or Inf at t={t} on a small test batch; "
                                       "check the teacher's weights and scheduler")


def check_teacher_unchanged(folder: FolderState, fingerprint: str) -> None:
    """Refuse to resume a run whose teacher weights were replaced at the same path."""
    old = folder.state.teacher_fingerprint
    if old and old != fingerprint:
        raise RunError(f"the teacher's weights changed since {folder.out} started; pass --overwrite to start over "
                       "with them, or another --output")


def available_memory(device) -> int:
    """Bytes this process may use on ``device`` (free GPU memory, or the machine's RAM)."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 62


#: a training sample holds at least this many copies of its own size at once (x0, x1, x_s, targets, outputs
#: and their gradients); a lower bound: the network's activations come on top
TRAIN_COPIES = 16


def check_fits(nbytes: float, what: str, fix: str, device="cpu") -> None:
    """Refuse (one line) when ``nbytes`` cannot fit in the memory of ``device``."""
    have = available_memory(device)
    if nbytes > have:
        raise ConfigError(f"{what} needs at least {_size(nbytes)}, more than the {_size(have)} this machine has; {fix}")


def check_memory(cfg: RunConfig, teacher, device) -> None:
    """Refuse batch, pool or evaluation sizes whose tensors alone cannot fit (before anything is allocated)."""
    per_sample = 4.0 * math.prod(int(d) for d in teacher.data_shape)
    shape = "x".join(str(int(d)) for d in teacher.data_shape)
    check_fits(per_sample * TRAIN_COPIES, f"one sample of shape {shape} (the teacher's sample_size)",
               "pass a smaller --sample-size or fix the teacher config", device)
    check_fits(per_sample * cfg.batch_size * TRAIN_COPIES, f"batch_size {cfg.batch_size}",
               "lower --batch-size (or use grad_accum_steps)", device)
    if cfg.data == "teacher":
        from .data.pool import trajectory_states

        states = len(trajectory_states(cfg))
        what = f"pool_size {cfg.pool_size}" + (f" with {states} trajectory states a sample" if states else "")
        check_fits(per_sample * cfg.pool_size * (2 + states), what, "lower --set pool_size", "cpu")
    check_fits(per_sample * cfg.eval_samples * 8, f"eval_samples {cfg.eval_samples}", "lower --set eval_samples",
               "cpu")


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if nbytes < 1024 or unit == "PB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} EB"


def check_parallelism(cfg: RunConfig, sharded: bool, processes: int = 1) -> None:
    """What several processes do not carry yet: a LoRA student and the adversarial term under FSDP (data parallel
    runs both; the distribution-matching fake network is sharded like the student, fake.DmTerm.prepare)."""
    if cfg.lora_rank > 0 and sharded:
        raise ConfigError("LoRA students under FSDP are not supported yet; use data parallel (the base is frozen, "
                          "so each GPU holds one copy of it plus the adapters)")
    if cfg.dm_gan_weight > 0 and sharded:
        raise ConfigError("dm_gan_weight (the adversarial term) is not supported under FSDP yet; use data parallel "
                          "or set dm_gan_weight=0")


def keep_student_output(cfg: RunConfig, out, saved: dict | None) -> None:
    """A resumed run whose config says ``student_output=auto`` keeps the output its checkpoints were trained with
    (``auto`` has meant ``velocity``, then ``native``, now ``gated`` for epsilon teachers): ``native`` when they
    carry no velocity head, so a run from an earlier version resumes instead of failing to load its student. Called
    when the student is built, after the resume check and config.json (which keep ``auto``)."""
    if saved is None or cfg.student_output != "auto" or saved.get("student_output", "auto") != "auto":
        return
    from .checkpoints import checkpoint_has_head

    if checkpoint_has_head(out) is False:
        cfg.student_output = "native"
