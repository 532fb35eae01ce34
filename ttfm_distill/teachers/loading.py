"""Resolve ``--teacher`` into a :class:`~ttfm_distill.teachers.base.Teacher`.

Accepted forms:

* ``None`` or ``builtin:fashion16``: the embedded Fashion-MNIST UNet teacher;
* ``builtin:<analytic name>``: an exact 2-D teacher (``builtin:checkerboard``, ...);
* a local folder: a diffusers pipeline folder (``model_index.json``), a folder
  with ``unet/``/``transformer/`` and ``scheduler/``, or a bare model folder
  (``config.json`` + weights);
* a Hugging Face hub id (``org/name``), loaded with diffusers' ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import Teacher
from .families import ADAPTERS, UnsupportedTeacher
from ..errors import TTFMError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_TEACHERS = {"fashion16": ASSETS / "fashion16"}
DEFAULT_TEACHER = "builtin:fashion16"
DENOISER_SUBFOLDERS = ("unet", "transformer")


class TeacherLoadError(TTFMError, ValueError):
    """The teacher could not be loaded; the message says why and what to do."""


def builtin_names() -> list[str]:
    from .analytic import ANALYTIC_TEACHERS

    return sorted([*EMBEDDED_TEACHERS, *ANALYTIC_TEACHERS])


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_teacher(spec: str | None = None, subfolder: str | None = None, revision: str | None = None,
                 allow_pickle: bool = False, sample_size: int | None = None, guidance_scale: float = 1.0,
                 negative_prompt: str = "", guided: bool = False) -> Teacher:
    """Load ``spec`` as a frozen flow teacher.

    Only safetensors weights are read unless ``allow_pickle`` (pickle files can
    run code when loaded; a warning is printed).  Model classes come from
    diffusers itself: custom or remote code is never imported.
    """
    spec = spec or DEFAULT_TEACHER
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name in EMBEDDED_TEACHERS:
            teacher = _load_folder(EMBEDDED_TEACHERS[name], subfolder=None)
            teacher.name = teacher.source = spec
            return teacher
        from .analytic import ANALYTIC_TEACHERS, get_analytic_teacher

        if name in ANALYTIC_TEACHERS:
            return get_analytic_teacher(name)
        raise _unknown_builtin(name)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherLoadError(f"teacher {spec!r} is a file; pass the diffusers folder that holds it")
        return _load_folder(path, subfolder, source=spec, allow_pickle=allow_pickle, sample_size=sample_size,
                            guidance_scale=guidance_scale, negative_prompt=negative_prompt, guided=guided)
    if _looks_like_hub_id(spec):
        return _load_hub(spec, subfolder, revision, allow_pickle, sample_size=sample_size,
                         guidance_scale=guidance_scale, negative_prompt=negative_prompt, guided=guided)
    raise _not_found(spec)


def check_teacher_spec(spec: str | None, subfolder: str | None = None) -> str:
    """Cheap check that ``spec`` names a usable teacher, without loading weights.

    Returns a short description; raises :class:`TeacherLoadError` or
    :class:`UnsupportedTeacher` like :func:`load_teacher` would.
    """
    spec = spec or DEFAULT_TEACHER
    if spec.startswith("builtin:"):
        if spec.split(":", 1)[1] not in builtin_names():
            raise _unknown_builtin(spec.split(":", 1)[1])
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        denoiser = _locate_denoiser(path, subfolder)
        _check_custom_code(path, denoiser, subfolder)
        class_name = _denoiser_class(denoiser)
        _check_scheduler(_scheduler_config(path, denoiser), path)
        return f"{class_name} in {denoiser}"
    if _looks_like_hub_id(spec):
        return f"hub id {spec} (not fetched in a dry run)"
    raise _not_found(spec)


def teacher_prediction_type(spec: str | None, subfolder: str | None = None, revision: str | None = None,
                            fetch: bool = False) -> str | None:
    """What the teacher predicts (``"flow"``, ``"epsilon"``, ``"v_prediction"`` or ``"sample"``), read from its
    configs as :func:`load_teacher` reads it, without loading weights. A hub id's configs are fetched (only
    the small JSON files) with ``fetch`` (a failed fetch is refused as the load would refuse it); ``None`` for
    a hub id without it. The automatic settings depend on it (``preflight.resolve_run``), so ``--dry-run`` can
    show them, and the run resolves every setting before the teacher's weights are loaded."""
    from .schedulers import prediction_type_of

    spec = spec or DEFAULT_TEACHER
    if spec.startswith("builtin:"):
        return "flow"  # the embedded teacher and the exact 2-D ones are flow models
    path = Path(spec).expanduser()
    if not path.exists():
        if not (fetch and _looks_like_hub_id(spec)):
            return None
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec, revision=revision, allow_patterns=[
                "model_index.json", "config.json", "*/config.json", "scheduler/*"]))
        except Exception as e:
            raise _fetch_failed(spec, e) from None
    denoiser = _locate_denoiser(path, subfolder)
    return prediction_type_of(_scheduler_config(path, denoiser) or ADAPTERS[_denoiser_class(denoiser)].default_scheduler)

def _not_found(spec: str) -> TeacherLoadError:
    return TeacherLoadError(
        f"teacher {spec!r} is neither a folder nor a hub id; pass a diffusers folder, an 'org/name' hub id, "
        f"or one of: {', '.join('builtin:' + n for n in builtin_names())}")


def _unknown_builtin(name: str) -> TeacherLoadError:
    return TeacherLoadError(f"unknown built-in teacher {name!r}; choose one of: {', '.join(builtin_names())}")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and os.sep not in spec.replace("/", "", 1)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TeacherLoadError(f"cannot read {path}: {e}") from None


def _locate_denoiser(root: Path, subfolder: str | None) -> Path:
    if subfolder:
        folder = root / subfolder
        if not (folder / "config.json").exists():
            raise TeacherLoadError(f"{folder} has no config.json; check --subfolder")
        return folder
    if (root / "config.json").exists():
        return root
    for name in DENOISER_SUBFOLDERS:
        if (root / name / "config.json").exists():
            return root / name
    raise TeacherLoadError(
        f"{root} holds no denoiser: expected config.json, or a 'unet/' or 'transformer/' subfolder with one"
    )


#: the libraries a pipeline's components may come from; any other name is code the folder brings
KNOWN_LIBRARIES = ("diffusers", "transformers", None)


def custom_code(root: Path) -> str | None:
    """The custom code ``root/model_index.json`` names (``module.Class``), or ``None``: a ``_class_name`` given
    as ``[module, class]`` or naming no diffusers pipeline, or a component from a library other than diffusers
    and transformers.  Loading such a pipeline would import that code; ttfm-distill never does."""
    import diffusers

    try:
        spec = json.loads((Path(root) / "model_index.json").read_text())
    except (OSError, ValueError):
        return None  # none, or unreadable: the loaders that need it report it
    if not isinstance(spec, dict):
        return None
    name = spec.get("_class_name")
    if isinstance(name, list) or (isinstance(name, str) and name not in dir(diffusers)):  # dir: imports nothing
        return ".".join(str(n) for n in name) if isinstance(name, list) else str(name)
    for part in spec.values():
        if isinstance(part, list) and len(part) == 2 and not _known_library(part[0]):
            return f"{part[0]}.{part[1]}"
    return None


def _known_library(name) -> bool:
    """diffusers, transformers, none, or a module of ``diffusers.pipelines`` (SD 1.5 names its safety checker's
    library ``stable_diffusion``)."""
    import importlib.util

    if name in KNOWN_LIBRARIES:
        return True
    if not isinstance(name, str) or not name.isidentifier():
        return False
    try:
        return importlib.util.find_spec(f"diffusers.pipelines.{name}") is not None
    except (ImportError, ValueError):
        return False


def _check_custom_code(root: Path, denoiser: Path, subfolder: str | None) -> bool:
    """Refuse a pipeline folder naming custom code, unless ``--subfolder`` asks for its denoiser alone (then the
    parts that need the pipeline's class, the text encoders, are left out); returns whether it names some."""
    if denoiser == root:
        return False
    code = custom_code(root)
    if code and not subfolder:
        raise TeacherLoadError(  # the folder last: a long path is what a cut line loses
            f"the pipeline names custom code ({code[:50]}) that ttfm-distill never runs; load its denoiser alone "
            f"with --subfolder {denoiser.relative_to(root).as_posix()} (--teacher {root})")
    return code is not None


def _denoiser_class(denoiser: Path) -> str:
    """The diffusers class named in ``denoiser/config.json``, if it is one we can distil."""
    config = _read_json(denoiser / "config.json")
    if not isinstance(config, dict):
        raise TeacherLoadError(f"{denoiser / 'config.json'} is not a model config (expected a JSON object)")
    class_name = config.get("_class_name")
    if not class_name:
        archs = config.get("architectures")
        what = f"is a transformers {str(archs[0])[:40]}" if isinstance(archs, list) and archs else "names no diffusers class"
        raise UnsupportedTeacher(f"{denoiser / 'config.json'} {what}, not a denoiser (classes: ttfm-distill inspect --help)")
    if not isinstance(class_name, str):
        raise TeacherLoadError(f"{denoiser / 'config.json'}: _class_name must be a class name, got {class_name!r:.40}")
    if class_name not in ADAPTERS:
        raise UnsupportedTeacher(
            f"{denoiser} holds a {class_name:.60}, not a supported denoiser (the supported classes: ttfm-distill "
            "inspect --help)")
    return class_name


def _scheduler_config(root: Path, denoiser: Path) -> dict | None:
    for cand in (root / "scheduler", denoiser.parent / "scheduler"):
        f = cand / "scheduler_config.json"
        if f.exists():
            return _read_json(f)
    return None


def _check_scheduler(cfg: dict | None, where: Path) -> None:
    """A flow-matching scheduler, or a diffusion one read through its probability-flow ODE."""
    from .schedulers import FLOW_SCHEDULERS, SchedulerError, scheduler_kind

    if cfg is not None and not isinstance(cfg, dict):
        raise TeacherLoadError(f"{where}: scheduler_config.json is not a JSON object")
    try:
        scheduler_kind(cfg)
    except SchedulerError as e:
        raise TeacherLoadError(
            f"{where} is not a flow-matching or diffusion teacher ({e}); supported: {', '.join(FLOW_SCHEDULERS)} "
            "or a diffusers diffusion scheduler with betas (DDPM, DDIM, Euler, DPM-Solver, ...)") from None


def _load_folder(root: Path, subfolder: str | None, source: str | None = None, allow_pickle: bool = False,
                 sample_size: int | None = None, guidance_scale: float = 1.0, negative_prompt: str = "",
                 guided: bool = False) -> Teacher:
    root = Path(root)
    denoiser = _locate_denoiser(root, subfolder)
    custom = _check_custom_code(root, denoiser, subfolder)
    class_name = _denoiser_class(denoiser)
    sched = _scheduler_config(root, denoiser)
    _check_scheduler(sched, root)
    weights = [p for p in denoiser.iterdir() if p.suffix == ".safetensors"]
    use_safetensors = True
    if not weights:
        pickles = sorted(p.name for p in denoiser.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise TeacherLoadError(f"{denoiser} has no weights (expected diffusion_pytorch_model.safetensors)")
        if not allow_pickle:
            raise TeacherLoadError(
                f"only pickle weights ({pickles[0][:40]}; they can run code): convert to safetensors or pass "
                f"--allow-pickle; in {denoiser}")  # the fix before the path: a long path is cut at 190 characters
        import sys

        print(f"warning: loading pickle weights {', '.join(pickles)} from {denoiser} (--allow-pickle); "
              "only do this for files you trust", file=sys.stderr)
        use_safetensors = False
    import diffusers

    from .diffusers_teacher import DiffusersFlowTeacher
    from .pipeline import IncompleteWeights, load_complete

    cls = getattr(diffusers, class_name)
    try:
        network = load_complete(cls, denoiser, use_safetensors=use_safetensors)
    except IncompleteWeights as e:
        raise TeacherLoadError(str(e)) from None
    except Exception as e:  # diffusers raises many types for bad files
        raise TeacherLoadError(f"cannot load {class_name} from {denoiser}: {_first_line(e)}") from None
    rel = denoiser.relative_to(root).as_posix() if denoiser != root else ""
    codec, prompts = _pipeline_parts(root, denoiser, class_name, use_safetensors, text=not custom)
    try:
        return DiffusersFlowTeacher(network, source or str(root), sched, subfolder=rel, sample_size=sample_size,
                                    codec=codec, prompts=prompts, guidance_scale=guidance_scale,
                                    negative_prompt=negative_prompt, guided=guided)
    except (ValueError, AttributeError, OSError) as e:
        raise TeacherLoadError(f"cannot use the {class_name} in {denoiser}: {_first_line(e)}") from None


def _pipeline_parts(root: Path, denoiser: Path, class_name: str, use_safetensors: bool, text: bool = True):
    """The VAE and the text encoders of a pipeline folder (``None`` for what it lacks); ``text=False``: no text
    encoders (they are read through the pipeline's class, which a custom-code pipeline brings itself)."""
    from .pipeline import PromptEncoder, load_vae, text_components

    if denoiser == root:
        return None, None
    codec = None
    if (root / "vae" / "config.json").exists():
        try:
            codec = load_vae(root / "vae", use_safetensors)
        except TTFMError:
            raise
        except Exception as e:  # noqa: BLE001
            raise TeacherLoadError(f"cannot load the VAE in {root / 'vae'}: {_first_line(e)}") from None
    prompts = None
    if text_components(root) and (root / "model_index.json").exists():
        if not text:
            import sys

            print(f"warning: {root}'s text encoders are not loaded (its pipeline names custom code); the teacher "
                  "sees the conditioning a bare denoiser folder gets", file=sys.stderr)
            return codec, None
        prompts = PromptEncoder(root, class_name, denoiser.name, use_safetensors)
    return codec, prompts


def _load_hub(repo_id: str, subfolder: str | None, revision: str | None, allow_pickle: bool = False,
              **options) -> Teacher:
    patterns = ["model_index.json", "*/config.json", "config.json", "scheduler/*", "*.safetensors", "*/*.safetensors",
                "tokenizer*/*", "*/*.json"]
    if allow_pickle:
        patterns += [f"*{suffix}" for suffix in PICKLE_SUFFIXES] + [f"*/*{suffix}" for suffix in PICKLE_SUFFIXES]
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:
        raise _fetch_failed(repo_id, e) from None
    teacher = _load_folder(Path(local), subfolder, source=repo_id, allow_pickle=allow_pickle, **options)
    return teacher


def _fetch_failed(repo_id: str, e: Exception) -> TeacherLoadError:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return TeacherLoadError(f"cannot fetch hub teacher {repo_id!r}: offline (HF_HUB_OFFLINE is set) and not in the "
                                "cache; unset HF_HUB_OFFLINE or pass a local diffusers folder")
    return TeacherLoadError(f"cannot fetch hub teacher {repo_id!r} ({_first_line(e, 50)}); check the id and your "
                            "network, or pass a local diffusers folder")


def _first_line(e: Exception, limit: int = 90) -> str:
    """``Type: first line`` of an error from a library, cut to ``limit`` characters (messages stay one short line)."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def prompt_encoder_for(teacher_info: dict):
    """The text encoders of the teacher a student was distilled from (its pipeline folder must still exist)."""
    from .pipeline import PromptEncoder, text_components

    source = str(teacher_info.get("source", ""))
    root = Path(source).expanduser()
    if root.is_dir() and custom_code(root):
        raise TeacherLoadError(f"--prompt needs the teacher's text encoders, but its pipeline {source!r} names custom "
                               "code that ttfm-distill never runs; sample without --prompt")
    if not (root.is_dir() and text_components(root)):
        raise TeacherLoadError(
            f"--prompt needs the teacher's text encoders, but the teacher {source!r} is not a local pipeline folder "
            "with text_encoder/ and tokenizer/; without --prompt the student samples the empty prompt")
    sub = teacher_info.get("subfolder") or "transformer"
    return PromptEncoder(root, teacher_info["class_name"], sub)
