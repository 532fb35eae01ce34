"""The model card (``README.md``) of an exported pipeline folder, in the Hub's format.

A YAML header (``base_model`` for teachers from the Hub, ``library_name: diffusers``, ``pipeline_tag``,
``tags``, ``license`` when the teacher's card states one), then how to load it,
the run's evaluation (student against the teacher at equal NFE), the sample
grid, and the command that made it.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from .student import StudentConfig

PIPELINE_TAGS = {"text": "text-to-image", "class": "unconditional-image-generation",
                 None: "unconditional-image-generation"}
TAGS = ["ttfm-distill", "flow-map", "few-step", "distillation", "diffusers"]
#: the licence of the teachers shipped with the package
BUILTIN_LICENSE = "apache-2.0"


def teacher_license(source: str) -> str | None:
    """The ``license:`` of the teacher's own model card (a local folder's README.md, or the Hub cache), if any."""
    if source.startswith("builtin:"):
        return BUILTIN_LICENSE
    card = Path(source).expanduser() / "README.md"
    if not card.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, "README.md")
            card = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - not a hub id, or no cache
            card = None
    if card is None or not card.exists():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    for line in text.split("---", 2)[1].splitlines():
        if line.strip().startswith("license:"):
            return line.split(":", 1)[1].strip().strip("'\"") or None
    return None


def run_command(run_config: dict | None, prediction_type: str = "flow") -> str:
    """The ``ttfm-distill run`` command that reproduces ``run_config`` (settings that differ from the defaults);
    ``prediction_type`` is the teacher's (the automatic settings resolve by it)."""
    if not run_config:
        return "ttfm-distill run"
    from .config import RunConfig
    from .runstate import LEGACY_KEYS  # run state, never a setting of the command

    defaults = RunConfig().to_dict()
    # a setting or objective option holding what the run would fill in by itself is not part of the command
    from .machine import native_bf16

    automatic, automatic_options = RunConfig.automatic_defaults(run_config, prediction_type, native_bf16())
    options = {k: v for k, v in (run_config.get("loss_options") or {}).items()
               if not (k in automatic_options and automatic_options[k] == v)}
    run_config = {**run_config, "loss_options": options}
    defaults.update(automatic)
    try:  # likewise a setting the run filled in from its objective's own default
        from .objectives import make_objective_from

        objective = make_objective_from(run_config.get("loss", "itvm"), options)
        defaults["diagonal_fraction"] = float(objective.default_diagonal_fraction)
    except Exception:  # noqa: BLE001 - an unknown objective (an older run): show every setting
        pass
    flags = {"teacher": "--teacher", "max_steps": "--max-steps", "loss": "--loss", "seed": "--seed"}
    parts = ["ttfm-distill run"]
    unset = RunConfig().to_dict()
    for key, value in run_config.items():
        if key in ("output", *LEGACY_KEYS) or value in (defaults.get(key), unset.get(key)):
            continue
        if key == "loss_options" and isinstance(value, dict):  # -L KEY=VALUE, as the command is written
            parts += [f"-L {shlex.quote(f'{k}={_text(v)}')}" for k, v in value.items()]
            continue
        text = _text(value)
        parts.append(f"{flags[key]} {shlex.quote(text)}" if key in flags else f"--set {shlex.quote(f'{key}={text}')}")
    return " ".join(parts)


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _is_hub_id(source: str) -> bool:
    import re

    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not Path(source).expanduser().exists()


def _yaml_value(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ":#{}[],&*!|>'\"%@`") or value != value.strip() else value


def card_text(config: StudentConfig, metrics: dict | None = None, run_config: dict | None = None,
              has_samples: bool = False, standalone: bool = False, has_curves: bool = False) -> str:
    teacher = config.teacher or {}
    source = str(teacher.get("source") or teacher.get("name") or "unknown")
    conditioning = teacher.get("conditioning")
    header = ["---"]
    if _is_hub_id(source):  # the Hub accepts only model ids here; a local teacher is named in the text
        header.append(f"base_model: {source}")
    header.append("library_name: diffusers")
    if config.kind != "points":
        header.append(f"pipeline_tag: {PIPELINE_TAGS.get(conditioning, 'unconditional-image-generation')}")
    header.append("tags:")
    header += [f"- {t}" for t in TAGS]
    license_ = teacher_license(source)
    if license_:
        header.append(f"license: {_yaml_value(license_)}")
    header.append("---")

    loss = (config.loss or {}).get("name", "itvm")
    steps = (config.training or {}).get("steps")
    lines = [
        "", f"# A few-step flow map distilled from {source}", "",
        f"A two-time flow map `phi(x, s, t)` distilled with ttfm-distill ({loss} objective"
        + (f", {steps} steps" if steps else "") + f") from the {teacher.get('class_name', 'teacher')} teacher "
        f"`{source}`. It samples in any number of steps; each step is one network evaluation.", "",
        "## Use", "", "```python", "import torch", "from ttfm_distill import TTFMPipeline", "",
        'pipe = TTFMPipeline.from_pretrained("PATH_OR_HUB_ID")',
    ]
    call = "num_inference_steps=2, generator=torch.Generator().manual_seed(0)"
    if conditioning == "text":
        call = 'prompt="a photo of a cat", ' + call
    elif conditioning == "class":
        call = "class_labels=1, " + call
    if config.guidance:
        call += f", guidance_scale={config.guidance['default']:g}"
    output = ', output_type="pt"' if config.kind == "points" else ""
    lines += [f"images = pipe({call}{output}).images", "```", ""]
    if standalone:
        lines += ["Without ttfm-distill installed, diffusers loads the module files shipped in this folder:", "",
                  "```python", "from diffusers import DiffusionPipeline", "",
                  'pipe = DiffusionPipeline.from_pretrained("PATH_OR_HUB_ID", trust_remote_code=True)', "```", ""]
    if config.guidance:
        lo, hi = config.guidance["range"]
        lines += [f"The guidance scale is an input of the student: any value in [{lo:g}, {hi:g}].", ""]
    fme = (metrics or {}).get("flow_map_error")
    if fme:
        lines += ["## Evaluation", "",
                  "Flow-map error (mean squared distance to the teacher's fine ODE solution from the same noise, "
                  "relative; lower is better) at equal numbers of network evaluations (NFE):", "",
                  "| NFE | student | teacher (Euler) |", "|---:|---:|---:|"]
        for n in fme.get("student", {}):
            lines.append(f"| {n} | {fme['student'][n]:.4f} | {fme.get('teacher_euler', {}).get(n, float('nan')):.4f} |")
        settings = (metrics or {}).get("settings", {})
        if settings:
            lines += ["", f"{settings.get('eval_samples', '?')} samples, reference: {settings.get('reference', '?')}."]
        lines.append("")
    if has_curves:
        lines += ["Training: the loss terms and the validation scores at 1, 2 and 4 steps (the teacher's Euler dashed) "
                  "against training samples:", "", "![training curves](training-curves.png)", ""]
    if has_samples:
        lines += ["## Samples", "", "Student at 1, 2 and 4 steps against the teacher's Euler sampler, same noise:", "",
                  "![samples](samples.png)", ""]
    lines += ["## How it was made", "", "```bash", run_command(run_config, teacher.get("prediction_type", "flow")), "```", "",
              "Upload this folder with the Hub's own CLI: `hf upload YOUR_NAME/REPO_NAME .` from inside it.", ""]
    return "\n".join(header + lines)


def write_model_card(folder: str | Path, metrics: dict | None = None, run_config: dict | None = None,
                     samples: str | Path | None = None, standalone: bool | None = None,
                     curves: str | Path | None = None) -> Path | None:
    """Write ``folder/README.md`` (and copy the sample grid and the training curves beside it) for the pipeline
    export in ``folder``."""
    from .layout import student_folder
    from .fileio import atomic_path

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        return None  # a LoRA adapter folder is not a pipeline: no card
    config = StudentConfig.load(student_folder(folder))
    for source, name in ((samples, "samples.png"), (curves, "training-curves.png")):
        if source is not None and Path(source).exists():
            with atomic_path(folder / name) as tmp:
                shutil.copyfile(source, tmp)
    if standalone is None:
        from .standalone import MODULE

        standalone = (folder / f"{MODULE}.py").exists()
    text = card_text(config, metrics, run_config, has_samples=(folder / "samples.png").exists(), standalone=standalone,
                     has_curves=(folder / "training-curves.png").exists())
    with atomic_path(folder / "README.md") as tmp:
        tmp.write_text(text)
    return folder / "README.md"
