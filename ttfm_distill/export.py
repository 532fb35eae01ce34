"""Export a student as safetensors with everything needed to sample, and load it back.

Layout of an exported student folder::

    ttfm_config.json           format, time convention, parametrisation, second time,
                               teacher, loss, training settings, package versions
    <backbone>/                diffusers folder of the backbone (``unet/`` ...):
        config.json            its diffusers config (save_pretrained format)
        diffusion_pytorch_model.safetensors
    second_time.safetensors    the added second-time embedding
    scheduler/                 the teacher's scheduler config, when it has one

An MLP student (2-D teachers) is ``model.safetensors`` + ``ttfm_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .convention import TIME_CONVENTION
from .fileio import atomic_dir, save_tensors
from .errors import TTFMError

FORMAT = "ttfm-distill-student"
FORMAT_VERSION = 1
PARAMETRISATION = "average_velocity: phi(x, s, t) = x + (t - s) * u(x, s, t)"


class StudentLoadError(TTFMError, ValueError):
    """Not an exported student, or a damaged one; the message says which."""


def package_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("ttfm-distill", "torch", "diffusers", "accelerate", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def export_student(student, folder: str | Path, meta: dict, codec=None) -> Path:
    """Write ``student`` (unwrapped) to ``folder`` atomically. ``meta``: teacher, loss, training info.

    ``codec``: the teacher's VAE (latent teachers), saved as ``vae/`` so the folder samples images alone.
    """
    from .mlp import MlpFlowMap

    folder = Path(folder)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "time_convention": TIME_CONVENTION,
        "parametrisation": PARAMETRISATION,
        "package_versions": package_versions(),
        **meta,
    }
    with atomic_dir(folder) as tmp:
        if isinstance(student, MlpFlowMap):
            config["backbone"] = {"class_name": "MlpFlowMap", "config": student.config}
            save_tensors(tmp / "model.safetensors", student.state_dict())
        else:
            network = student.network
            sub = student.adapter.subfolder
            config["backbone"] = {"class_name": type(network).__name__, "subfolder": sub}
            config["second_time"] = {
                "recipe": "additive_zero_init",
                "input": student.second_time_input,
                "injected_at": "output of the family's timestep embedder (temb)",
                "units": {"scale": student.units.scale, "reversed": student.units.reversed},
                "network_io": student.io.describe(),
                "projection": vars(student.second_time.spec),
            }
            network.save_pretrained(tmp / sub, safe_serialization=True)
            save_tensors(tmp / "second_time.safetensors", student.second_time.state_dict())
            if getattr(student, "guidance_embed", None) is not None:
                save_tensors(tmp / "guidance_embed.safetensors", student.guidance_embed.state_dict())
                config["guidance_input"] = {**student.guidance, "key": "cfg_scale",
                                            "weights": "guidance_embed.safetensors (additive, zero-initialised)"}
            if getattr(student, "null_text", None):
                save_tensors(tmp / "null_text.safetensors", {k: v.contiguous() for k, v in student.null_text.items()})
                config["null_text"] = "null_text.safetensors: the empty prompt's embeddings, used when no prompt is given"
            if codec is not None:
                codec.vae.save_pretrained(tmp / "vae", safe_serialization=True)
                config["vae"] = {"subfolder": "vae", **codec.describe()}
            sched = meta.get("scheduler_config")
            if sched:
                (tmp / "scheduler").mkdir()
                (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        (tmp / "ttfm_config.json").write_text(json.dumps(config, indent=2))
    return folder


def resolve_student_folder(path: str | Path) -> Path:
    """Accept a student folder or a run folder holding ``student/``."""
    from .fileio import recover_dir

    path = Path(path)
    recover_dir(path)
    recover_dir(path / "student")
    if (path / "ttfm_config.json").exists():
        return path
    if (path / "student" / "ttfm_config.json").exists():
        return path / "student"
    if not path.exists():
        raise StudentLoadError(f"{path} does not exist; pass a run folder or an exported student folder")
    raise StudentLoadError(f"{path} is not an exported student (no ttfm_config.json); pass the folder 'ttfm-distill run' wrote")


def load_student(path: str | Path, device: str | torch.device = "cpu"):
    """Load an exported student strictly. Returns ``(student, config)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = resolve_student_folder(path)
    try:
        config = json.loads((folder / "ttfm_config.json").read_text())
    except json.JSONDecodeError as e:
        raise StudentLoadError(f"{folder / 'ttfm_config.json'} is not valid JSON: {e}") from None
    if config.get("format") != FORMAT:
        raise StudentLoadError(f"{folder} is not a ttfm-distill student (format {config.get('format')!r})")
    backbone = config.get("backbone", {})
    try:
        if backbone.get("class_name") == "MlpFlowMap":
            from .mlp import MlpFlowMap

            student = MlpFlowMap(**backbone["config"])
            student.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        else:
            student = _load_diffusers_student(folder, config)
    except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as e:
        if isinstance(e, StudentLoadError):
            raise
        msg = " ".join(line.strip() for line in str(e).strip().splitlines())[:400] or type(e).__name__
        raise StudentLoadError(f"cannot load the student in {folder}: {msg}") from None
    return student.to(device).eval(), config


def _load_diffusers_student(folder: Path, config: dict):
    import diffusers
    from safetensors.torch import load_file

    from .student import TwoTimeFlowMap
    from .teachers.families import ADAPTERS

    name = config["backbone"]["class_name"]
    if name not in ADAPTERS:
        raise StudentLoadError(f"{folder}: backbone class {name} is not supported by this version")
    sub = folder / config["backbone"]["subfolder"]
    cls = getattr(diffusers, name)
    network = cls.from_config(cls.load_config(sub))
    weights = sub / "diffusion_pytorch_model.safetensors"
    if not weights.exists():
        raise StudentLoadError(f"{sub} has no diffusion_pytorch_model.safetensors")
    network.load_state_dict(load_file(weights), strict=True)
    from .teachers.diffusers_teacher import network_io

    adapter = ADAPTERS[name]
    io = network_io(adapter, network, config.get("scheduler_config"))
    null_text = load_file(folder / "null_text.safetensors") if (folder / "null_text.safetensors").exists() else None
    guidance = config.get("guidance_input")
    student = TwoTimeFlowMap(network, second_time_input=config["second_time"]["input"], adapter=adapter, io=io,
                             null_text=null_text,
                             guidance={"range": guidance["range"], "default": guidance["default"]} if guidance else None)
    if guidance:
        student.guidance_embed.load_state_dict(load_file(folder / "guidance_embed.safetensors"), strict=True)
    student.second_time.load_state_dict(load_file(folder / "second_time.safetensors"), strict=True)
    return student


def load_codec(path: str | Path):
    """The VAE saved beside a latent student (``None`` for pixel-space students)."""
    from .teachers.pipeline import load_vae

    folder = resolve_student_folder(path)
    if not (folder / "vae" / "config.json").exists():
        return None
    try:
        return load_vae(folder / "vae")
    except Exception as e:  # noqa: BLE001
        raise StudentLoadError(f"cannot load the VAE in {folder / 'vae'}: {str(e).splitlines()[0]}") from None
