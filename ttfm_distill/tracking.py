"""Seeing a run as it trains: the training log, Accelerate's trackers, validation at checkpoints, the curves.

What a run writes for it (rank 0 only; docs/observability.md describes every field):

* ``train_log.jsonl``: one JSON object a line, appended as training goes: a ``"train"`` row every
  ``log_every`` steps (and at the first and last step), a ``"validation"`` row at each validation.
  A resume rewrites it first (atomically) to the rows at or before the checkpoint it resumes from, so
  after a kill and a re-run it holds each step once.
* ``validation/step-XXXXXXXX.png``: the student's 1, 2 and 4 steps beside the teacher's fine solve on
  the validation's first noises.
* ``training-curves.png``: the loss terms and the validation scores against training samples (the
  end of a run, ``eval --model RUN``), also shown in the exported model card.
* ``trackers/``: the files of the trackers chosen by ``report_to`` (TensorBoard: ``trackers/ttfm-distill/``).

Validation never draws from the training generators or the global random state (it runs inside
``torch.random.fork_rng``, on the run report's noises from their own generator), so a run with it trains
exactly as one without.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import torch

from .errors import ConfigError

LOG_NAME = "train_log.jsonl"
VALIDATION_DIR = "validation"
CURVES_NAME = "training-curves.png"
TRACKER_DIR = "trackers"
PROJECT_NAME = "ttfm-distill"
#: the student's step counts scored at each validation
VALIDATION_STEPS = (1, 2, 4)
#: validation scores the run report's noises (seed + 1, apart from the training draws of (seed, rank, step)): the
#: last validation is the report's own reading, and the teacher's fine solve of them is computed once for both
VALIDATION_SEED_OFFSET = 1
#: noises shown in each validation figure
FIGURE_COLUMNS = 8
#: the measures of a validation row, as eval names them (those the teacher's kind allows)
VALIDATION_MEASURES = ("flow_map_error", "fd_test_images", "fd_teacher_fine", "kl")
#: the keys of a train row; an objective metric of the same name is logged as ``term_<name>``
TRAIN_KEYS = ("kind", "step", "samples", "seconds", "time", "loss", "lr", "grad_norm", "skipped_steps",
              "steps_per_second")
#: validation above this share of the run's time so far earns one warning
VALIDATION_SHARE_WARNING = 0.05
#: trackers that send to a server unless set to work offline: (variable, its offline values, default host)
NETWORK_TRACKERS = {
    "wandb": ("WANDB_MODE", ("offline", "disabled", "dryrun"), "api.wandb.ai"),
    "comet_ml": ("COMET_MODE", ("offline", "disabled"), "www.comet.com"),
    "clearml": ("CLEARML_OFFLINE_MODE", ("1", "true", "yes"), "api.clear.ml"),
    "swanlab": ("SWANLAB_MODE", ("local", "offline", "disabled"), "api.swanlab.cn"),
}
#: the package behind each tracker, for the install hint
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml", "dvclive": "dvclive"}


# ------------------------------------------------------------ trackers ------
def tracker_names(report_to) -> list[str]:
    """``report_to`` ("tensorboard,wandb", a list, "none", "all") as tracker names; unknown names are refused."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    items = report_to if isinstance(report_to, (list, tuple)) else str(report_to or "").split(",")
    names = [str(n).strip().lower() for n in items if str(n).strip()]
    if not names or names == ["none"]:
        return []
    if "all" in names:
        names = [str(t) for t in get_available_trackers()]
        return [n for n in names if _offline_problem(n) is None]  # "all" means what can run here
    known = sorted(LOGGER_TYPE_TO_CLASS)
    for name in names:
        if name not in known:
            raise ConfigError(f"report_to: unknown tracker {name!r}; choose from {', '.join(known)}, all or none")
    return list(dict.fromkeys(names))


def check_report_to(report_to) -> list[str]:
    """The trackers of ``report_to``, each installed and able to work here; else one line, before any work."""
    from accelerate.tracking import get_available_trackers

    names = tracker_names(report_to)
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in available:
            package = TRACKER_PACKAGES.get(name, name)
            hint = "pip install 'ttfm-distill[tensorboard]'" if name == "tensorboard" else f"pip install {package}"
            raise ConfigError(f"report_to {name}: the {package} package is not installed; {hint}, or drop it")
        problem = _offline_problem(name)
        if problem:
            raise ConfigError(f"report_to {name}: {problem}")
    return names


def _offline_problem(name: str) -> str | None:
    """Why tracker ``name`` cannot work here (it needs a server that cannot be reached), or ``None``."""
    if name == "mlflow":
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri.startswith(("http://", "https://")):
            return None  # a local file store
        host = uri.split("://", 1)[1].split("/", 1)[0]
        variable, offline, default = "MLFLOW_TRACKING_URI", (), host
    elif name in NETWORK_TRACKERS:
        variable, offline, default = NETWORK_TRACKERS[name]
        if os.environ.get(variable, "").strip().lower() in offline:
            return None
        base = os.environ.get("WANDB_BASE_URL", "") if name == "wandb" else ""
        host = base.split("://", 1)[-1].split("/", 1)[0] if base else default
    else:
        return None
    fix = f"set {variable}={offline[0]} to log locally, or drop it" if offline else "use a local store, or drop it"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes"):
        return f"it sends to {host} and this environment is offline (HF_HUB_OFFLINE); {fix}"
    if not _reachable(host):
        return f"it sends to {host}, which cannot be reached; {fix}"
    return None


def _reachable(host: str, timeout: float = 3.0) -> bool:
    name, _, port = host.partition(":")
    try:
        with socket.create_connection((name, int(port or 443)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def accelerator_trackers(cfg, out: Path) -> dict:
    """``log_with`` and ``project_dir`` for the run's ``Accelerator`` (nothing when no tracker is chosen)."""
    names = tracker_names(cfg.report_to)
    return {"log_with": names, "project_dir": str(Path(out) / TRACKER_DIR)} if names else {}


def _tracker_config(cfg) -> dict:
    """The run config as trackers take it: numbers, strings and booleans (the rest as JSON text)."""
    flat = {}
    for key, value in cfg.to_dict().items():
        flat[key] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return flat


# ------------------------------------------------------------- the log ------
def read_log(path: Path) -> list[dict]:
    """The rows of a training log; a line a kill cut short (the last one) is left out."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _finite(value):
    """A JSON-safe number: non-finite floats become ``None``."""
    if isinstance(value, torch.Tensor):
        from .scale import full_tensor

        value = full_tensor(value).item()  # FSDP2: a DTensor
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def logs_at(step: int, log_every: int, total: int) -> bool:
    """Whether the train row of ``step`` (steps done, 1-based) is logged: the first, every ``log_every``, the last."""
    return step == 1 or step % log_every == 0 or step == total


class RunTracking:
    """The training log, the trackers and validation of one :class:`~ttfm_distill.trainer.Distillation`.

    Built by ``train`` once the run has resumed; the trainer calls :meth:`start`, ``measures_grad_norm``
    and :meth:`after_step` each step, :meth:`validate_if_due` after each checkpoint, :meth:`at_end`
    before the export and :meth:`close` at last.  Every rank calls each hook (the logged means are a
    collective); only rank 0 writes.
    """

    def __init__(self, run):
        self.run, self.cfg, self.out = run, run.cfg, Path(run.out)
        self.accelerator, self.main = run.accelerator, run.main
        self.path = self.out / LOG_NAME
        self.file = None
        self.trackers = bool(tracker_names(self.cfg.report_to))
        self.validator = None
        self.validated: set[int] = set()
        self.seconds0 = self.skipped0 = 0
        self.t0 = self.t_row = time.time()
        self.step_row = run.start_step
        #: validation seconds: scoring in all (the setup not counted: the report would solve the reference
        #: anyway), and everything since the last train row (steps_per_second leaves it out)
        self.validation_time = self.validation_since_row = 0.0
        self.noted = False
        #: the thread hook in place before the trackers started (restored by ``close``)
        self._thread_hook = None

    # -- hooks ------------------------------------------------------------------
    def start(self) -> None:
        """Cut the log back to the resumed checkpoint, open it, start the trackers, and validate the
        checkpoint resumed from if a kill took its validation."""
        start = self.run.start_step
        if self.main:
            kept = [r for r in read_log(self.path) if r["step"] <= start]
            from .fileio import atomic_path

            if self.path.exists() or kept:
                with atomic_path(self.path) as tmp:
                    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self.validated = {r["step"] for r in kept if r.get("kind") == "validation"}
            train = [r for r in kept if r.get("kind") == "train"]
            if kept:
                self.seconds0 = max(float(r.get("seconds") or 0) for r in kept)
            if train:
                self.skipped0 = int(train[-1].get("skipped_steps") or 0)
            self.file = open(self.path, "a", buffering=1)
        if self.accelerator.num_processes > 1:  # every rank must agree on which validations are still to do
            from accelerate.utils import broadcast_object_list

            self.validated = set(broadcast_object_list([sorted(self.validated)], from_process=0)[0])
        if self.trackers:
            kwargs = {"tensorboard": {"purge_step": start + 1}} if start else {}
            kwargs["wandb"] = {"name": self.out.name, "dir": str(self.out / TRACKER_DIR)}
            if self.main:
                (self.out / TRACKER_DIR).mkdir(exist_ok=True)
            self._thread_hook = _quiet_thread_failures(self.run.log)
            self.accelerator.init_trackers(PROJECT_NAME, config=_tracker_config(self.cfg), init_kwargs=kwargs)
        if 0 < start < self.total_steps and self.due(start):
            self.validate(start)

    @property
    def total_steps(self) -> int:
        """The steps the run trains (its run state: a time budget may fit them after the start)."""
        return self.run.state.total_steps

    def measures_grad_norm(self, step_index: int) -> bool:
        """Whether step ``step_index`` (0-based) needs the gradient norm (a logged step)."""
        return logs_at(step_index + 1, self.cfg.log_every, self.total_steps)

    def after_step(self, step: int, loss: float | None) -> None:
        """After ``step`` steps (1-based): the train row, if this step is logged; ``loss`` ``None``: skipped."""
        cfg, run = self.cfg, self.run
        if not logs_at(step, cfg.log_every, self.total_steps):
            return
        metrics = dict(run.step_metrics) if loss is not None else {}
        values = [loss, *metrics.values()] if loss is not None else []
        if values and self.accelerator.num_processes > 1:  # every rank's mean (all ranks take the same branch)
            t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=run.device)
            values = self.accelerator.reduce(t, "mean").tolist()
        if not self.main:
            return
        from .schedules import lr_factor

        now = time.time()
        busy = now - self.t_row - self.validation_since_row
        row = {"kind": "train", "step": step, "samples": self.samples(step),
               "seconds": round(self.seconds0 + now - self.t0, 3), "time": round(now, 3),
               "loss": _finite(values[0]) if values else None}
        for key, value in zip(metrics, values[1:]):
            row[f"term_{key}" if key in TRAIN_KEYS else key] = _finite(float(value))
        norm = run.grad_norm if loss is not None else None
        row.update(lr=float(cfg.lr) * lr_factor(step - 1, cfg, self.total_steps), grad_norm=_finite(norm),
                   skipped_steps=self.skipped0 + int(run.skipped),
                   steps_per_second=round((step - self.step_row) / busy, 4) if busy > 0 else None)
        self.t_row, self.step_row, self.validation_since_row = now, step, 0.0
        self.write(row)
        if self.trackers:
            self.accelerator.log({f"train/{k}": v for k, v in row.items()
                                  if k not in ("kind", "step", "time") and isinstance(v, (int, float))}, step=step)

    def due(self, step: int) -> bool:
        every = self.cfg.validate_every if self.cfg.validate_every is not None else self.cfg.checkpoint_every
        return bool(every) and step % int(every) == 0 and step not in self.validated

    def validate_if_due(self, step: int) -> None:
        """Validate after ``step`` steps when ``validate_every`` (default: each checkpoint) says so."""
        if step < self.total_steps and self.due(step):
            self.validate(step)

    def at_end(self) -> None:
        """The last validation (at the last step, unless validation is off) and the curves."""
        cfg = self.cfg
        if cfg.validate_every != 0 and self.total_steps not in self.validated:
            self.validate(self.total_steps)
        if self.main:
            if self.file is not None:
                self.file.flush()
            draw_curves(self.out)

    def report_reference(self):
        """The teacher's fine solve of the run report's noises, where this session's validation already made it
        (the same count, seed and steps), else ``None``."""
        from .report import REPORT_SEED_OFFSET, report_samples

        if self.validator is None:  # no validation ran in this session
            return None
        ev, cfg = self.validator.ev, self.cfg
        if ev.num != report_samples(cfg, ev.kind) or ev.seed != cfg.seed + REPORT_SEED_OFFSET or \
                ev.reference_steps != cfg.reference_steps:
            return None
        return ev.reference

    def close(self) -> None:
        """Close the log and finish the trackers (not ``end_training``: that also ends the process group).

        Called on the way out of every run, a failed one too, so it raises nothing that would hide why the
        run ended (a full disk, say): the log's rows are written line by line already."""
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass
        if self.main and self.trackers:
            for tracker in self.accelerator.trackers:
                try:
                    tracker.finish()
                except Exception as e:  # noqa: BLE001 - a tracker's own failure, reported, not raised
                    self.run.log(f"[yellow]warning:[/] tracker {tracker.name} did not finish: {type(e).__name__}")
            self.accelerator.trackers = []
        if self._thread_hook is not None:  # the hook the trackers' start replaced
            import threading

            threading.excepthook, self._thread_hook = self._thread_hook, None

    # -- pieces -----------------------------------------------------------------
    def samples(self, step: int) -> int:
        """Training samples seen after ``step`` steps, over every process."""
        return int(step) * int(self.cfg.batch_size) * int(self.accelerator.num_processes)

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row, allow_nan=False) + "\n")

    def validate(self, step: int) -> None:
        """Score the weights that would be exported on the validation noises: rank 0 alone, the rest waiting, or,
        for a sharded (FSDP) student, every rank alike (its forward is a collective) and rank 0 records."""
        run = self.run
        model, everywhere = validation_model(run)
        if self.main or everywhere:
            setup = None
            if self.validator is None:  # the fine solve and the teacher's Euler: once a session
                begin = time.time()
                self.validator = Validator(run.teacher, self.cfg, run.device)
                setup = time.time() - begin
            begin = time.time()
            import contextlib

            # a sharded student holds its weights in the training precision (FSDP's policy): run it as training does
            with self.accelerator.autocast() if everywhere else contextlib.nullcontext():
                result = self.validator.run(model, run.student)
            if self.main:
                self.record(step, result, begin, setup)
        self.validated.add(step)
        self.accelerator.wait_for_everyone()

    def record(self, step: int, result: "ValidationResult", begin: float, setup: float | None = None) -> None:
        """The validation row, its figure, its line on the console and its scalars and image to the trackers;
        ``setup``: the seconds of the validator's setup, at a session's first validation."""
        image = self.out / VALIDATION_DIR / f"step-{step:08d}.png"
        result.save_figure(image)
        now = time.time()
        seconds = now - begin
        self.validation_time += seconds
        self.validation_since_row += seconds + (setup or 0.0)
        row = {"kind": "validation", "step": step, "samples": self.samples(step),
               "seconds": round(self.seconds0 + now - self.t0, 3), "time": round(now, 3),
               "validation_seconds": round(seconds, 3), "validation_samples": result.num,
               **({"setup_seconds": round(setup, 3)} if setup is not None else {}),
               **{k: {n: _finite(v) for n, v in table.items()} for k, table in result.student.items()},
               "teacher_euler": result.teacher, "image": str(image.relative_to(self.out))}
        self.write(row)
        self.run.log(result.line(step))
        elapsed = now - self.t0
        if (not self.noted and len(self.validated) >= 1 and elapsed > 0
                and self.validation_time / elapsed > VALIDATION_SHARE_WARNING):
            self.run.log(f"[yellow]note:[/] validation has taken {100 * self.validation_time / elapsed:.0f}% of this "
                         f"run's time so far ({self.validation_time:.1f} s); raise --validate-every or lower "
                         "validation_samples to make it cheaper")
            self.noted = True
        if self.trackers:
            scalars = {f"validation/{k}_{n}step": v for k, table in result.student.items()
                       for n, v in table.items() if v is not None}
            self.accelerator.log({**scalars, "validation/seconds": seconds}, step=step)
            log_image(self.accelerator, "validation/samples", result.image, step)


def validation_model(run) -> tuple:
    """``(model, on every rank)``: the weights ``finish`` would export, the EMA by default (whole on each rank);
    the student itself, which under FSDP is sharded, so every rank runs its forward (a collective)."""
    from . import scale

    if run.ema is not None and run.cfg.export_weights == "ema":
        return run.ema, False
    if scale.is_sharded(run.accelerator, run.wrapped):
        return run.wrapped, True
    return run.student, False


def _quiet_thread_failures(log):
    """Make a failure in a tracker's writer thread (TensorBoard writes its event file from one; a full disk
    stops it) one warning line instead of a traceback: the run's own next write meets the same fault and
    names it. Returns the hook it replaced."""
    import threading

    previous = threading.excepthook

    def hook(args) -> None:
        if args.exc_type is SystemExit:
            return
        detail = getattr(args.exc_value, "strerror", None) or args.exc_value
        log(f"[yellow]warning:[/] a tracker's writer thread stopped: {args.exc_type.__name__}: {detail}")

    threading.excepthook = hook
    return previous


def log_image(accelerator, key: str, image, step: int) -> None:
    """One ``(H, W, C)`` uint8 image to every tracker that takes images (a tracker's failure is not the run's)."""
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        try:
            if tracker.name == "tensorboard":
                tracker.log_images({key: image[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({key: [image]}, step=step)
        except Exception as e:  # noqa: BLE001 - an image a tracker refuses must not stop training
            import warnings

            warnings.warn(f"tracker {tracker.name} did not take the validation image: {type(e).__name__}: {e}")


# ----------------------------------------------------------- validation -----
class ValidationResult:
    """One validation: ``student`` (``{measure: {"1": v, "2": v, "4": v}}``), ``teacher`` (the teacher's
    Euler at the same steps, the same layout), the figure's rows and ``image`` (``(H, W, C)`` uint8)."""

    def __init__(self, num, student, teacher, rows, kind, title):
        self.num, self.student, self.teacher, self.rows, self.kind, self.title = num, student, teacher, rows, kind, title
        self.image = None

    def save_figure(self, path: Path) -> None:
        import numpy as np
        from PIL import Image

        from .fileio import atomic_path
        from .plots import image_grid, save_comparison

        if self.kind == "image":
            grid = image_grid(torch.cat(list(self.rows.values())), ncol=FIGURE_COLUMNS)
            img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
            img = img.resize((img.width * 3, img.height * 3), Image.NEAREST)
            with atomic_path(path) as tmp:
                img.save(tmp, format="PNG")
        else:
            save_comparison(self.rows, path, kind=self.kind, title=self.title)
            img = Image.open(path)
        self.image = np.asarray(img.convert("RGB"))

    def line(self, step: int) -> str:
        """The one short line ``run`` prints: each measure at 1/2/4 steps."""
        parts = []
        for key, label in (("flow_map_error", "error"), ("fd_test_images", "FD"), ("kl", "KL")):
            table = self.student.get(key)
            if table:
                parts.append(f"{label} " + "/".join("nan" if v is None else f"{v:.3g}" for v in table.values()))
        if self.student.get("nonfinite_samples"):
            parts.append("non-finite samples")
        return f"step {step} validation ({'/'.join(map(str, VALIDATION_STEPS))} steps): " + "; ".join(parts)


class Validator:
    """The fixed validation noises, the teacher's fine solve of them (computed once, kept in memory) and its
    Euler scores, then each call scores a student with the same code as ``eval`` (evaluate.Evaluation)."""

    def __init__(self, teacher, cfg, device):
        from .evaluate import Evaluation, teacher_euler_sampler
        from .sampling import resolve_time_grid

        self.teacher, self.device = teacher, device
        self.grid = resolve_time_grid(cfg.time_grid, teacher.io)
        from .report import report_samples

        num = report_samples(cfg, teacher.kind) if cfg.validation_samples is None else int(cfg.validation_samples)
        with torch.random.fork_rng(devices=_rng_devices(device)), torch.no_grad():
            self.ev = Evaluation(teacher, num=num, seed=cfg.seed + VALIDATION_SEED_OFFSET,
                                 reference_steps=cfg.reference_steps, batch_size=128, device=device)
            self.teacher_scores = _table(self.ev.run(teacher_euler_sampler(teacher, self.grid), VALIDATION_STEPS))
        self.title = f"{teacher.name}: student at {'/'.join(map(str, VALIDATION_STEPS))} steps"

    def run(self, model, student) -> ValidationResult:
        """Score ``model`` (the EMA or ``student`` itself); ``student`` is put in eval mode meanwhile."""
        from .evaluate import student_flow_map_sampler

        was_training = student.training
        student.eval()
        try:
            with torch.random.fork_rng(devices=_rng_devices(self.device)), torch.no_grad():
                samples = {}
                sampler = student_flow_map_sampler(model, float(self.teacher.shift), grid=self.grid,
                                                   io=self.teacher.io)
                scores = _table(self.ev.run(sampler, VALIDATION_STEPS, samples))
                rows = self._figure_rows(samples)
        finally:
            student.train(was_training)
        return ValidationResult(self.ev.num, scores, self.teacher_scores, rows, self.ev.kind, self.title)

    def _figure_rows(self, samples: dict) -> dict:
        if self.ev.kind != "image":
            rows = {"teacher fine": self.ev.reference}
            rows.update({f"student {n}": samples[n] for n in VALIDATION_STEPS})
            return rows
        k = FIGURE_COLUMNS
        rows = {"teacher fine": self.ev.reference[:k]}
        rows.update({f"student {n}": samples[n][:k] for n in VALIDATION_STEPS})
        return {label: self.ev._pixels(x) for label, x in rows.items()}


def _table(results: dict) -> dict:
    """``{str(n): metrics}`` (Evaluation.run) -> ``{measure: {str(n): value}}`` for the validation measures."""
    out = {}
    for measure in VALIDATION_MEASURES:
        table = {n: _finite(row.get(measure)) for n, row in results.items() if row is not None and measure in row}
        if table:
            out[measure] = table
    bad = {n: row["nonfinite_samples"] for n, row in results.items() if row and "nonfinite_samples" in row}
    if bad:
        out["nonfinite_samples"] = bad
    return out


def _rng_devices(device) -> list:
    device = torch.device(device)
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


# --------------------------------------------------------------- curves -----
def draw_curves(folder: Path) -> Path | None:
    """``training-curves.png`` in run folder ``folder`` from its training log (``None`` when it has none); the same
    log gives the same figure, at the end of the run or from ``eval``."""
    folder = Path(folder)
    rows = read_log(folder / LOG_NAME)
    if not rows:
        return None
    from .plots import save_training_curves

    title = folder.name
    try:
        from .runstate import RunState

        saved = json.loads((folder / "config.json").read_text())
        steps = RunState.read(folder, saved).get("fitted_steps") or saved.get("max_steps")
        title += f": {saved.get('loss')}, {steps} steps"
    except (OSError, ValueError, AttributeError):  # (ConfigError is a ValueError: a damaged run_state.json)
        pass
    path = folder / CURVES_NAME
    save_training_curves(rows, path, title=title)
    return path


def training_progress(console, enabled: bool):
    """The training bar (rich): steps, loss, elapsed and left; off when ``enabled`` is false."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4g}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )
