"""``ttfm-distill``: a thin Typer shell over the library. Heavy imports live inside commands."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distil a diffusers flow-matching or diffusion model into a two-timed flow model that samples in 1-4 steps.",
)

DEFAULT_OUTPUT = "ttfm-output"


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _guard(fn):
    """Run a command body: the tool's own errors become one line and a non-zero exit, never a traceback.

    SIGINT exits 130 and SIGTERM 143 wherever they land.  Anything that is not a
    ``TTFMError`` (or an OS error such as a full disk) is a bug: one line says so
    and where the traceback is (``TTFM_DEBUG=1``), and the exit code is 1.
    """
    from .errors import TTFMError
    from .signals import SigtermAsInterrupt, interrupt_signal

    try:
        with SigtermAsInterrupt():
            return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt as e:
        signum = interrupt_signal(e)
        _fail("interrupted" + (" (SIGTERM)" if signum == 15 else ""), 128 + signum)
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into messages
        if os.environ.get("TTFM_DEBUG"):
            raise
        if isinstance(e, TTFMError):
            _fail(_one_line(str(e)) or type(e).__name__, int(e.exit_code))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            _fail(f"disk full while writing {e.filename or 'the output'}; free some space or choose another "
                  "--output (files written before are intact)", 1)
        if isinstance(e, OSError):
            _fail(_one_line(f"{e.strerror or e} ({e.filename})" if e.filename else str(e)), 1)
        if isinstance(e, MemoryError):
            _fail("out of memory; lower --batch-size (or --num) and try again", 1)
        _fail(_one_line(f"internal error, a bug in ttfm-distill: {type(e).__name__}: {str(e)}", 150)
              + " (TTFM_DEBUG=1 shows the traceback)", 1)


def _one_line(text: str, limit: int = 190) -> str:
    """The first line of ``text``, cut to ``limit`` characters."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_steps(text: str, flag: str = "--steps") -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)`` (sorted, unique, each >= 1); a bad list is an ``InputError``."""
    from .errors import InputError

    try:
        values = sorted({int(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        raise InputError(f"{flag} expects comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not values or values[0] < 1:
        raise InputError(f"{flag} needs step counts >= 1, got {text!r}")
    return tuple(values)


def parse_options(items: List[str] | None, flag: str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            _fail(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


@app.command()
def run(
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Hub id, diffusers folder, or builtin:NAME (default: the embedded Fashion-MNIST teacher)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help=f"Run folder (default: ./{DEFAULT_OUTPUT})."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Training steps."),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Fit training into this long (600, 90s, 10m, 1.5h): the speed of the first steps fixes the step count, at most --max-steps."),
    loss: Optional[str] = typer.Option(None, "--loss", help="Objective: itvm (default), lfmd, lsd, meanflow, progressive (each with its own defaults; see --dry-run)."),
    loss_option: Optional[List[str]] = typer.Option(None, "--loss-option", "-L", help="Objective option KEY=VALUE (repeatable), e.g. -L tau=0.1 -L intermediate=uniform."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay"),
    data: Optional[str] = typer.Option(None, "--data", help="'teacher' (data-free: samples of the teacher's ODE), 'fashion-mnist', an image folder, parquet/arrow file(s), a save_to_disk folder, or a hub dataset id."),
    data_image_column: Optional[str] = typer.Option(None, "--image-column", help="Image column of --data (default: the first image column)."),
    data_label_column: Optional[str] = typer.Option(None, "--label-column", help="Class-label column (class-conditioned teachers; default: 'label')."),
    data_caption_column: Optional[str] = typer.Option(None, "--caption-column", help="Caption column (text teachers; default: 'text'/'caption'/'prompt')."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Text file of prompts, one per line (text teachers)."),
    data_resolution: Optional[int] = typer.Option(None, "--resolution", help="Resize images to this shorter side before cropping to the teacher's size."),
    data_crop: Optional[str] = typer.Option(None, "--crop", help="center (default) or random."),
    data_streaming: bool = typer.Option(False, "--streaming", help="Stream --data instead of preparing it once (sets larger than memory or disk)."),
    subfolder: Optional[str] = typer.Option(None, "--subfolder", help="Denoiser subfolder of a pipeline folder."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle teacher weights (.bin/.pt/.ckpt) when there are no safetensors; they can run code."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Classifier-free guidance baked into the student (1 = none)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt of the baked guidance (text teachers)."),
    sample_size: Optional[int] = typer.Option(None, "--sample-size", help="Latent size for teachers whose config does not fix it (Flux: default 128)."),
    report_to: Optional[str] = typer.Option(None, "--report-to", help="Accelerate trackers, comma-separated: tensorboard (pip install 'ttfm-distill[tensorboard]'), wandb, trackio, aim, mlflow, ... or all; files under RUN/trackers."),
    validate_every: Optional[int] = typer.Option(None, "--validate-every", help="Validate (flow-map error, FD, a sample grid) every N steps; default: at each checkpoint; 0: never."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="JSON or TOML file of run settings (flags override it)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any run setting KEY=VALUE (repeatable), e.g. --set time_sampling=uniform."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run in --output (only what a run wrote; a folder holding anything else is refused) and start over."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything a run would refuse, print the resolved config, and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Distil a teacher into a two-timed student; writes student/, samples.png, metrics.json, train_log.jsonl,
    validation/ and training-curves.png."""
    given = dict(locals())  # every flag whose parameter is named as a setting is that setting

    def body():
        from dataclasses import fields

        from .config import RunConfig, load_config_file

        values = load_config_file(config) if config else {}
        values.update(parse_options(set_, "--set"))
        settings = {f.name for f in fields(RunConfig)}
        # a switch left off is not given (False would override a config file's true)
        values.update({k: v for k, v in given.items() if k in settings and v is not None and v is not False})
        if time_budget is not None:
            from .budget import parse_duration

            values["time_budget"] = parse_duration(time_budget)
        if loss_option:
            earlier = values.get("loss_options", {})
            if not isinstance(earlier, dict):
                _fail(f"loss_options must be a table of KEY=VALUE (e.g. -L tau=0.1), got {earlier!r}")
            values["loss_options"] = {**earlier, **parse_options(loss_option, "--loss-option")}
        if loss and loss != values.get("loss") and "loss_options" not in values:
            values["loss_options"] = {}
        from .preflight import resolve_run

        # the run resolved once, as the trainer uses it (a dry run fetches nothing)
        resolved = resolve_run(RunConfig.from_dict(values), overwrite, fetch=not dry_run)
        cfg = resolved.cfg
        from .data.hf import check_data_spec

        data_info = check_data_spec(cfg.data)  # fail fast on a missing or unreachable data set
        if dry_run:
            teacher_info = resolved.teacher_info
            if resolved.prediction_type is None and resolved.folder.saved is None:
                teacher_info += "; the automatic settings (null or auto) are filled in once it is loaded"
            typer.echo(json.dumps(cfg.to_dict(), indent=2))
            steps = resolved.state.total_steps
            budget = f" (fitted to {cfg.time_budget:g} s of training)" if cfg.time_budget and \
                resolved.state.fitted_steps is None else ""
            typer.echo(f"teacher: {teacher_info}; data: {data_info}; objective: {cfg.loss}; {steps} steps"
                       f"{budget} -> {cfg.output}", err=True)
            return
        from .trainer import run_distillation

        result = run_distillation(resolved, overwrite=overwrite, show_progress=not quiet)
        if result.is_main:
            typer.echo(f"done: {result.output} ({result.steps} steps, {result.seconds:.0f}s training)")

    _guard(body)


@app.command()
def sample(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Run folder or exported student (default: ./{DEFAULT_OUTPUT})."),
    steps: int = typer.Option(2, "--steps", "-n", help="Number of flow-map jumps (any N >= 1)."),
    num: int = typer.Option(64, "--num", "-k", help="How many samples."),
    seed: int = typer.Option(0, "--seed"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG grid to write (default: samples-<N>step.png in the model folder)."),
    save_raw: Optional[Path] = typer.Option(None, "--save-raw", help="Also save the raw samples (.safetensors or .npy)."),
    batch_size: int = typer.Option(256, "--batch-size"),
    class_label: Optional[int] = typer.Option(None, "--class-label", help="Class of every sample (class-conditional students; default: random)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt (text students; encoded by the teacher's text encoders saved in the export)."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Guidance scale, for students distilled with a guidance_range."),
):
    """Generate with the distilled student in any number of steps."""

    def body():
        if steps < 1:
            _fail(f"--steps must be >= 1, got {steps}")
        if num < 1:
            _fail(f"--num must be >= 1, got {num}")
        if batch_size < 1:
            _fail(f"--batch-size must be >= 1, got {batch_size}")
        if save_raw is not None and save_raw.suffix not in (".safetensors", ".npy"):
            _fail(f"--save-raw must end in .safetensors or .npy, got {save_raw.name}")
        import warnings

        import torch

        from .export import resolve_student_folder
        from .generate import load_pipeline, save_samples

        folder = resolve_student_folder(model or DEFAULT_OUTPUT)
        target = output or (folder.parent if folder.name == "student" else folder) / f"samples-{steps}step.png"
        if target.suffix.lower() != ".png":
            _fail(f"--output must be a .png file, got {target.name}")
        import math

        from .errors import InputError
        from .preflight import check_fits
        from .rundir import writer_lock

        pipe = load_pipeline(folder)
        shape = pipe.student_config.data_shape
        check_fits(4.0 * math.prod(shape) * num * 3, f"--num {num}", "lower --num (or sample in several calls)")
        check_fits(4.0 * math.prod(shape) * min(num, batch_size) * 16, f"--batch-size {batch_size}",
                   "lower --batch-size")
        if steps > 1000:
            typer.echo(f"warning: --steps {steps} makes {steps} network calls per batch; the student is trained "
                       "for 1-8 jumps, and this will take a while", err=True)
        with writer_lock(target.parent, "sample"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                x = pipe(prompt=prompt, num_inference_steps=steps, num_images_per_prompt=num, batch_size=batch_size,
                         generator=torch.Generator().manual_seed(seed), class_labels=class_label,
                         guidance_scale=guidance_scale, output_type="raw").images
            except ValueError as e:  # the pipeline's own refusals (diffusers' convention): bad input, one line
                raise InputError(str(e)) from None
            for w in caught:
                typer.echo(f"warning: {w.message}", err=True)
            save_samples(x, pipe.student_config.kind, target, save_raw)
        typer.echo(f"wrote {target}" + (f" and {save_raw}" if save_raw else ""))

    _guard(body)


@app.command("eval")
def eval_(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Run folder or exported student (default: ./{DEFAULT_OUTPUT})."),
    steps: str = typer.Option("1,2,4,8", "--steps", "-n", help="Step counts (= network evaluations) to compare, e.g. 1,2,4,8."),
    teacher_steps: Optional[str] = typer.Option(None, "--teacher-steps", help="NFEs for the teacher's Euler/Heun (default: --steps), e.g. 1,2,4,8,16,50."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSON report (default: eval.json in the run folder)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of each metric against steps (default: the --output path with .png)."),
    num: Optional[int] = typer.Option(None, "--num", "-k", help="Samples per sampler (default 512 for images, 65536 for 2-D)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the shared noise."),
    reference_steps: int = typer.Option(32, "--reference-steps", help="RK4 steps of the teacher's fine solve."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="Local TorchScript Inception file (inception-2015-12-05.pt) for a real FID."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Override the teacher recorded in the student's ttfm_config.json."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle teacher weights when there are no safetensors."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Samples per network call (default 256 for images, 8192 for 2-D)."),
    time_grid: Optional[str] = typer.Option(None, "--time-grid", help="Grid of every sampler: uniform or timesteps (default: the student's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Score the student against the teacher's Euler and Heun samplers at the same NFE; writes JSON and a PNG."""

    def body():
        from .evaluate import EvalError

        step_list = parse_steps(steps)
        teacher_list = parse_steps(teacher_steps, "--teacher-steps") if teacher_steps else None
        if num is not None and num < 2:
            raise EvalError(f"--num must be >= 2, got {num}")
        if (batch_size is not None and batch_size < 1) or reference_steps < 1:
            raise EvalError("--batch-size and --reference-steps must be >= 1")
        if output is not None and output.suffix.lower() != ".json":
            raise EvalError(f"--output must be a .json file, got {output.name}")
        if plot is not None and plot.suffix.lower() != ".png":
            raise EvalError(f"--plot must be a .png file, got {plot.name}")
        from .evaluate import evaluate_student, load_student_and_teacher, summary_lines
        from .features import load_inception
        from .fileio import write_json
        from .plots import save_metric_curves

        detector = load_inception(inception) if inception else None  # a bad file fails before the models load
        from .rundir import writer_lock
        from .sampling import TIME_GRIDS, resolve_time_grid

        if time_grid is not None and time_grid not in TIME_GRIDS:
            raise EvalError(f"--time-grid must be one of {', '.join(TIME_GRIDS)}, got {time_grid!r}")
        folder, student, config, t = load_student_and_teacher(model or DEFAULT_OUTPUT, teacher, allow_pickle)
        grid = resolve_time_grid(time_grid or config.time_grid, t.io)
        target = output or (folder.parent if folder.name == "student" else folder) / "eval.json"
        png = plot or target.with_suffix(".png")
        with writer_lock(target.parent, "eval"):  # refused while a run trains in that folder
            report = evaluate_student(student, t, step_list, teacher_list, num=num, seed=seed,
                                      reference_steps=reference_steps, batch_size=batch_size,
                                      inception=detector, show_progress=not quiet, time_grid=grid)
            report = {"model": str(folder), **report}
            from .evaluate import quality_warnings, run_data_report

            report["warnings"] = quality_warnings({**report, "data": run_data_report(folder)})
            write_json(target, report)
            save_metric_curves(report["results"], report["floors"], png,
                               title=f"{folder}: student vs teacher {report['teacher']}")

        from .tracking import LOG_NAME, draw_curves

        run_folder, curves = (folder.parent if folder.name == "student" else folder), None
        if (run_folder / LOG_NAME).is_file():  # a run folder with a training log: its curves, under its lock
            with writer_lock(run_folder, "eval"):
                curves = draw_curves(run_folder)
        for line in summary_lines(report):
            typer.echo(line)
        for line in report["warnings"]:
            typer.echo(f"warning: {line}")
        typer.echo(f"wrote {target} and {png}" + (f" and {curves}" if curves else ""))

    _guard(body)


@app.command()
def inspect(
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Hub id, diffusers folder, or builtin:NAME."),
    subfolder: Optional[str] = typer.Option(None, "--subfolder"),
    revision: Optional[str] = typer.Option(None, "--revision"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle weights when there are no safetensors."),
    sample_size: Optional[int] = typer.Option(None, "--sample-size", help="Latent size for teachers whose config does not fix it."),
):
    """Print what was detected about a teacher (class, units, shift, prediction type, conditioning, latents, VAE), without training.

    Supported denoiser classes: AuraFlowTransformer2DModel, DiTTransformer2DModel, FluxTransformer2DModel,
    Lumina2Transformer2DModel, PixArtTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel,
    UNet2DConditionModel, UNet2DModel.
    """

    def body():
        from .teachers.loading import load_teacher

        if sample_size is not None and sample_size < 1:
            _fail(f"--sample-size must be >= 1, got {sample_size}")
        t = load_teacher(teacher, subfolder, revision, allow_pickle=allow_pickle, sample_size=sample_size)
        typer.echo(json.dumps(t.describe(), indent=2))

    _guard(body)


@app.command()
def plan(
    teacher: str = typer.Option("builtin:fashion16", "--teacher", "-t", help="Diffusers folder, config.json, or a built-in name (sd3.5-medium, sd3.5-large, flux.1-dev, sana-1.6b, pixart-sigma, fashion16, tiny-*)."),
    gpus: int = typer.Option(1, "--gpus", help="GPUs (data parallel or FSDP over all of them)."),
    gpu: str = typer.Option("H100", "--gpu", help="H100, H200 or A100 (spec-sheet dense peak)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory per GPU, e.g. 80GB (default: the GPU's)."),
    mfu: float = typer.Option(0.35, "--mfu", help="Assumed model FLOPs utilisation for the step time."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Image side in pixels (default: the model's native)."),
    text_tokens: Optional[int] = typer.Option(None, "--text-tokens", help="Text tokens per sample (default: the pipeline's)."),
    loss: str = typer.Option("itvm", "--loss", help="Objective whose evaluations are counted."),
    loss_option: Optional[List[str]] = typer.Option(None, "--loss-option", "-L", help="Objective option KEY=VALUE (repeatable)."),
    diagonal_fraction: float = typer.Option(0.0, "--diagonal-fraction", help="Share of s == t pairs (the run default is 0)."),
    lora_rank: int = typer.Option(16, "--lora-rank", help="Rank of the LoRA student planned beside the full one (0: none)."),
    ema: bool = typer.Option(False, "--ema", help="Count an EMA copy (runs with --ema-decay > 0)."),
    guidance: bool = typer.Option(False, "--guidance", help="Baked classifier-free guidance (two teacher passes per evaluation)."),
    dm: bool = typer.Option(False, "--dm", help="Plan distribution matching (runs with dm_weight > 0; a flow teacher's default run ends with it): the fake network as each student holds it (full: a copy of the teacher; LoRA: adapters on the shared base)."),
    dm_fake_updates: int = typer.Option(5, "--dm-fake-updates", help="Fake-network updates per generated sample (the run's dm_fake_updates)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Per-GPU batch to plan for (default: the largest that fits)."),
    headroom: float = typer.Option(0.10, "--headroom", help="Share of GPU memory kept free (CUDA context, fragmentation)."),
    subfolder: Optional[str] = typer.Option(None, "--subfolder", help="Denoiser subfolder of a pipeline folder."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the plan as JSON here."),
):
    """Will it fit, and how long will it take: parameters, memory per GPU, FLOPs and step time, counted without weights."""

    def body():
        from .plan import PlanError, count, make_plan, objective_evaluations, parse_memory, resolve_teacher
        from .plan.report import render

        if not 0 <= diagonal_fraction <= 1:
            raise PlanError(f"--diagonal-fraction must be in [0, 1], got {diagonal_fraction}")
        if lora_rank < 0 or (batch_size is not None and batch_size < 1) or (text_tokens is not None and text_tokens < 0):
            raise PlanError("--lora-rank and --text-tokens must be >= 0 and --batch-size >= 1")
        memory = parse_memory(gpu_memory) if gpu_memory else None
        ev = objective_evaluations(loss, parse_options(loss_option, "--loss-option"), diagonal_fraction, guidance)
        counts = count(resolve_teacher(teacher, subfolder), lora_rank, text_tokens, resolution, dm=dm)
        result = make_plan(counts, ev, gpus=gpus, gpu=gpu.upper(), gpu_memory=memory, mfu=mfu, headroom=headroom,
                           ema=ema, batch_size=batch_size, dm=dm, dm_fake_updates=dm_fake_updates)
        render(result)
        if json_out is not None:
            from .fileio import write_json

            write_json(json_out, result.to_json())
            typer.echo(f"wrote {json_out}")

    _guard(body)


def main() -> None:
    """Entry point: usage errors (unknown flag, non-numeric value) are one line too, exit 2."""
    try:  # typer >= 0.20 vendors click as typer._click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as cx

    try:
        code = app(prog_name="ttfm-distill", standalone_mode=False)
    except getattr(cx, "NoArgsIsHelpError", ()) as e:
        typer.echo(e.ctx.get_help())
        sys.exit(0)
    except cx.UsageError as e:
        where = f"ttfm-distill {e.ctx.info_name} --help" if e.ctx is not None and e.ctx.parent is not None else "ttfm-distill --help"
        message = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
        typer.echo(f"error: {message} (see {where})", err=True)
        sys.exit(2)
    except getattr(cx, "Abort", None) or getattr(typer, "Abort", ()):  # Ctrl-C while click itself is prompting
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
