"""Export a student as a diffusers pipeline folder, and load any student folder back.

Layout of an export (docs/pipeline.md)::

    model_index.json          TTFMPipeline and its components
    flow_map/                 the student, written by its own ``save_pretrained``:
        ttfm_config.json      the typed StudentConfig: time convention, parametrisation,
                              second time, teacher, loss, training, package versions
        <backbone>/           diffusers folder of the backbone (``unet/`` ...)
        second_time.safetensors  (and guidance_embed / null_text where they apply)
    scheduler/                FlowMapEulerDiscreteScheduler carrying the teacher's shift
    vae/, text_encoder*/, tokenizer*/   the teacher's, where it has them
    README.md                 the model card

A LoRA student exported as ``adapters`` is a student folder alone (the base is
the teacher's).  Format-1 exports (``ttfm_config.json`` at the top, no
``model_index.json``) still load with :func:`load_student`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .student import (CONFIG_NAME, PARAMETRISATION, StudentConfig, StudentLoadError, package_versions,  # noqa: F401
                      student_class)
from .student import load_student as _load_student_folder

from .layout import COMPONENT, resolve_student_folder, student_folder  # noqa: F401 - re-exported


def run_record(cfg, teacher, objective, steps: int | None = None) -> StudentConfig:
    """The run's part of a student's config: teacher, sampler settings, loss and training settings; ``steps``: the
    steps trained (``runstate.RunState.total_steps``; unset: ``cfg.max_steps``)."""
    from .sampling import resolve_time_grid

    return StudentConfig(
        data_shape=list(teacher.data_shape), kind=teacher.kind, sigma0=float(teacher.sigma0),
        shift=float(teacher.shift), sample_size=cfg.sample_size, teacher=teacher.describe(),
        scheduler_config=teacher.scheduler_config, loss=objective.config(),
        weights=cfg.export_weights if cfg.ema_decay > 0 else "raw",
        time_grid=resolve_time_grid(cfg.time_grid, teacher.io),
        training={"steps": int(cfg.max_steps if steps is None else steps), "seed": cfg.seed, "batch_size": cfg.batch_size, "lr": cfg.lr,
                  "ema_decay": cfg.ema_decay, "time_sampling": cfg.time_sampling,
                  "diagonal_fraction": cfg.diagonal_fraction, "data": cfg.data})


def teacher_parts(teacher) -> tuple[object | None, dict, str | None]:
    """``(vae, text components, pipeline class name)`` of a diffusers teacher (``None``/empty for what it lacks)."""
    from .pipeline import TEXT_COMPONENTS

    vae = teacher.codec.vae if teacher.codec is not None else None
    if teacher.prompts is None:
        return vae, {}, _pipeline_class_of(teacher.source)
    pipe = teacher.prompts.pipeline()
    text = {k: v for k, v in pipe.components.items() if k in TEXT_COMPONENTS and v is not None}
    return vae, text, type(pipe).__name__


def _pipeline_class_of(source) -> str | None:
    """The ``_class_name`` of a local teacher folder's ``model_index.json`` (a diffusers pipeline class), if any."""
    import json

    index = Path(str(source or "")).expanduser() / "model_index.json"
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError):
        return None
    import diffusers

    return name if isinstance(name, str) and name != "DiffusionPipeline" and hasattr(diffusers, name) else None


def export_student(student, folder: str | Path, config: StudentConfig | None = None, teacher=None,
                   lora_export: str = "merged", standalone: bool = False) -> Path:
    """Write ``student`` (unwrapped; a LoRA student or its EMA too) to ``folder`` atomically.

    ``config``: the run's record (:func:`run_record`); ``teacher``: the teacher whose VAE and text encoders
    join the pipeline.  A LoRA student with ``lora_export="adapters"`` is written as its adapter folder.
    ``standalone``: also write the module files that let diffusers load the folder without ttfm-distill.
    """
    from .fileio import atomic_dir
    from .pipeline import TTFMPipeline

    folder = Path(folder)
    saved = student.for_export(lora_export, config)
    vae, text, pipeline_class = teacher_parts(teacher) if teacher is not None else (None, {}, None)
    with atomic_dir(folder) as tmp:
        cfg = saved.student_config()
        if pipeline_class:
            cfg = cfg.replace(teacher_pipeline=pipeline_class)
        if vae is not None:
            cfg = cfg.replace(vae={"subfolder": "vae", "class_name": type(vae).__name__})
        if cfg.student_class == "LoraFlowMap":  # adapters only: the base weights stay the teacher's
            saved.save_pretrained(tmp, cfg)
        else:
            saved.ttfm_config = cfg
            pipe = TTFMPipeline.from_student(saved, vae=vae, text_components=text)
            pipe.save_pretrained(tmp, standalone=standalone)
            from .pipeline_card import write_model_card

            write_model_card(tmp, standalone=standalone)
    return folder


def export_run(student, folder: str | Path, cfg, teacher, objective, steps: int, standalone: bool = False) -> Path:
    """What ``ttfm-distill run`` exports at the end: the pipeline folder of ``student`` (``steps`` trained) with the
    run's record."""
    return export_student(student, folder, run_record(cfg, teacher, objective, steps), teacher=teacher,
                          lora_export=cfg.lora_export, standalone=standalone)


def load_student(path: str | Path, device: str | torch.device = "cpu"):
    """Load an exported student strictly, whatever its kind. Returns ``(student, config)`` (a :class:`StudentConfig`)."""
    student = _load_student_folder(student_folder(path), device=device)
    return student, student.ttfm_config
