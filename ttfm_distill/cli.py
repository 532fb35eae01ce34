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
    help="Distil a diffusers flow-matching model into a two-timed flow model that samples in 1-4 steps.",
)

DEFAULT_OUTPUT = "ttfm-output"


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _known_errors():
    from .config import ConfigError
    from .datasets import DatasetUnavailable
    from .export import StudentLoadError
    from .teachers.families import UnsupportedTeacher
    from .teachers.loading import TeacherLoadError
    from .trainer import RunError

    return (ConfigError, TeacherLoadError, UnsupportedTeacher, StudentLoadError, DatasetUnavailable, RunError)


def _guard(fn):
    """Run a command body: known errors become one line and a non-zero exit, never a traceback."""
    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - the one place that turns errors into messages
        if os.environ.get("TTFM_DEBUG"):
            raise
        known = _known_errors()
        if isinstance(e, known) or isinstance(e, ValueError):
            _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, 1 if _is_runtime(e) else 2)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            _fail(f"disk full while writing {e.filename or 'the output'}; free some space or choose another "
                  "--output (files written before are intact)", 1)
        if isinstance(e, OSError):
            _fail(f"{e.strerror or e} ({e.filename})" if e.filename else str(e), 1)
        _fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (set TTFM_DEBUG=1 for the traceback)", 1)


def _is_runtime(e: Exception) -> bool:
    from .trainer import RunError

    return isinstance(e, RunError)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_options(items: List[str] | None, flag: str) -> dict:
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
    loss: Optional[str] = typer.Option(None, "--loss", help="Objective: itvm (default), lfmd, progressive."),
    loss_option: Optional[List[str]] = typer.Option(None, "--loss-option", "-L", help="Objective option KEY=VALUE (repeatable), e.g. -L tau=0.1 -L intermediate=uniform."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    lr: Optional[float] = typer.Option(None, "--lr"),
    ema_decay: Optional[float] = typer.Option(None, "--ema-decay"),
    data: Optional[str] = typer.Option(None, "--data", help="'teacher' (data-free: samples of the teacher's ODE), 'fashion-mnist', an image folder, parquet/arrow file(s), a save_to_disk folder, or a hub dataset id."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Image column of --data (default: the first image column)."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Class-label column (class-conditioned teachers; default: 'label')."),
    caption_column: Optional[str] = typer.Option(None, "--caption-column", help="Caption column (text teachers; default: 'text'/'caption'/'prompt')."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Text file of prompts, one per line (text teachers)."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Resize images to this shorter side before cropping to the teacher's size."),
    crop: Optional[str] = typer.Option(None, "--crop", help="center (default) or random."),
    streaming: bool = typer.Option(False, "--streaming", help="Stream --data instead of preparing it once (sets larger than memory or disk)."),
    subfolder: Optional[str] = typer.Option(None, "--subfolder", help="Denoiser subfolder of a pipeline folder."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle teacher weights (.bin/.pt/.ckpt) when there are no safetensors; they can run code."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Classifier-free guidance baked into the student (1 = none)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt of the baked guidance (text teachers)."),
    sample_size: Optional[int] = typer.Option(None, "--sample-size", help="Latent size for teachers whose config does not fix it (Flux: default 128)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="JSON or TOML file of run settings (flags override it)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any run setting KEY=VALUE (repeatable), e.g. --set time_sampling=uniform."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run in --output and start over."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Distil a teacher into a two-timed student; writes student/, samples.png, metrics.json."""

    def body():
        from .config import RunConfig, load_config_file

        values = load_config_file(config) if config else {}
        values.update(_parse_options(set_, "--set"))
        flags = dict(teacher=teacher, output=output, max_steps=max_steps, loss=loss, seed=seed,
                     batch_size=batch_size, lr=lr, ema_decay=ema_decay, data=data, subfolder=subfolder,
                     revision=revision, allow_pickle=allow_pickle or None, guidance_scale=guidance_scale,
                     negative_prompt=negative_prompt, sample_size=sample_size, data_image_column=image_column,
                     data_label_column=label_column, data_caption_column=caption_column, prompts=prompts,
                     data_resolution=resolution, data_crop=crop, data_streaming=streaming or None)
        values.update({k: v for k, v in flags.items() if v is not None})
        if loss_option:
            values["loss_options"] = {**values.get("loss_options", {}), **_parse_options(loss_option, "--loss-option")}
        if loss and loss != values.get("loss") and "loss_options" not in values:
            values["loss_options"] = {}
        cfg = RunConfig.from_dict(values).validate()
        from .objectives import make_objective

        from .trainer import check_objective_fits

        check_objective_fits(make_objective(cfg.loss, **cfg.loss_options), cfg)  # fail fast on bad loss options
        from .data.hf import check_data_spec

        data_info = check_data_spec(cfg.data)  # fail fast on a missing or unreachable data set
        if dry_run:
            from .teachers.loading import check_teacher_spec

            teacher_info = check_teacher_spec(cfg.teacher, cfg.subfolder)
            typer.echo(json.dumps(cfg.to_dict(), indent=2))
            typer.echo(f"teacher: {teacher_info}; data: {data_info}; objective: {cfg.loss}; {cfg.max_steps} steps -> "
                       f"{cfg.output}", err=True)
            return
        from .trainer import run_distillation

        result = run_distillation(cfg, overwrite=overwrite, show_progress=not quiet)
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
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text prompt (text students; needs the teacher's pipeline folder for its text encoders)."),
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
        import torch

        from .export import load_student, resolve_student_folder
        from .generate import generate

        folder = resolve_student_folder(model or DEFAULT_OUTPUT)
        student, meta = load_student(folder)
        cond = None
        if prompt is not None:
            if meta.get("teacher", {}).get("conditioning") != "text":
                _fail("--prompt is only for text-conditioned students")
            from .teachers.loading import prompt_encoder_for

            row = prompt_encoder_for(meta["teacher"])([prompt])
            cond = {k: v.expand(num, *v.shape[1:]) for k, v in row.items()}
        if guidance_scale is not None:
            spec = meta.get("guidance_input")
            if not spec:
                baked = meta.get("teacher", {}).get("guidance_scale", 1.0)
                _fail(f"this student has guidance {baked} baked in and takes no --guidance-scale; "
                      "distil with --set guidance_range=[lo,hi] for a choosable scale")
            lo, hi = spec["range"]
            if not lo <= guidance_scale <= hi:
                typer.echo(f"warning: --guidance-scale {guidance_scale} is outside the trained range [{lo}, {hi}]", err=True)
            cond = {**(cond or {}), "cfg_scale": torch.full((num,), float(guidance_scale))}
        x = generate(student, meta, steps=steps, num=num, seed=seed, batch_size=batch_size, cond=cond,
                     class_label=class_label)
        from .export import load_codec

        codec = load_codec(folder)
        if codec is not None:  # latent student: decode with the teacher's VAE saved beside it
            x = torch.cat([codec.decode(c) for c in x.split(batch_size)])
        target = output or (folder.parent if folder.name == "student" else folder) / f"samples-{steps}step.png"
        if target.suffix.lower() != ".png":
            _fail(f"--output must be a .png file, got {target.name}")
        from .generate import save_samples

        save_samples(x, meta, target, save_raw)
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Score the student against the teacher's Euler and Heun samplers at the same NFE; writes JSON and a PNG."""

    def body():
        from .evaluate import EvalError, parse_steps

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
        folder, student, _, t = load_student_and_teacher(model or DEFAULT_OUTPUT, teacher, allow_pickle)
        report = evaluate_student(student, t, step_list, teacher_list, num=num, seed=seed,
                                  reference_steps=reference_steps, batch_size=batch_size,
                                  inception=detector, show_progress=not quiet)
        report = {"model": str(folder), **report}
        from .evaluate import quality_warnings, run_data_report

        report["warnings"] = quality_warnings({**report, "data": run_data_report(folder)})
        target = output or (folder.parent if folder.name == "student" else folder) / "eval.json"
        png = plot or target.with_suffix(".png")
        write_json(target, report)
        save_metric_curves(report["results"], report["floors"], png, title=f"{folder}: student vs teacher {report['teacher']}")
        for line in summary_lines(report):
            typer.echo(line)
        for line in report["warnings"]:
            typer.echo(f"warning: {line}")
        typer.echo(f"wrote {target} and {png}")

    _guard(body)


@app.command()
def inspect(
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Hub id, diffusers folder, or builtin:NAME."),
    subfolder: Optional[str] = typer.Option(None, "--subfolder"),
    revision: Optional[str] = typer.Option(None, "--revision"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Read pickle weights when there are no safetensors."),
    sample_size: Optional[int] = typer.Option(None, "--sample-size", help="Latent size for teachers whose config does not fix it."),
):
    """Print what was detected about a teacher (class, units, shift, prediction type, conditioning, latents, VAE), without training."""

    def body():
        from .teachers.loading import load_teacher

        if sample_size is not None and sample_size < 1:
            _fail(f"--sample-size must be >= 1, got {sample_size}")
        t = load_teacher(teacher, subfolder, revision, allow_pickle=allow_pickle, sample_size=sample_size)
        typer.echo(json.dumps(t.describe(), indent=2))

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
    except cx.Abort:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
