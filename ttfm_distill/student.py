"""The two-timed student: the teacher's own network with a second time input, and its saved format.

``TwoTimeFlowMap`` wraps a diffusers denoiser without editing it: a forward
hook on the family's timestep embedder adds the output of an extra,
zero-initialised embedding of the second time (``t - s`` by default, in the
network's own timestep units) to the conditioning vector ``temb``.  With the
last layer of that embedding at zero, ``u(x, s, t) == v_teacher(x, s)`` for
every ``(s, t)`` at step 0 (docs/pipeline.md, "the second time").

Parametrisation: ``phi(x, s, t) = x + (t - s) * u(x, s, t)`` ("average velocity").

Every student class owns its format: ``save_pretrained(folder)`` writes it and
``from_pretrained(folder)`` reads it back strictly; what the folder's
``ttfm_config.json`` holds is the typed :class:`StudentConfig`.
:func:`load_student` reads any student folder in one call, whatever the kind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import ModelMixin
from torch import nn

from .errors import ConfigError, InputError, TTFMError
from .convention import TIME_CONVENTION, NetworkIO, broadcast_time, diffusers_from_velocity, t_from_scheduler_timestep
from .teachers.schedulers import network_io
from .teachers.families import ADAPTERS, FamilyAdapter, ProjectionSpec, adapter_for

SECOND_TIME_INPUTS = ("delta", "t")
#: how the network's output becomes the average velocity (RunConfig.student_output, docs/second-teacher.md):
#: "native" reads it through the teacher's own conversion (``u = v_io(x, s, F)``); "velocity" adds a zero-initialised
#: gain-1 velocity head on the features entering the network's ``conv_out`` and scales the gradient through the
#: conversion down to :data:`VELOCITY_GAIN_CAP` where its gain is larger (an epsilon teacher near noise); "gated"
#: is the velocity head weighted by ``1 - min(1, cap / gain(s))``, so it acts only at start times where the
#: conversion is ill-conditioned (for an epsilon teacher, gain ``1/s``: fully at the noise end, not at all from
#: ``s = 1/2`` on) and the later jumps stay exactly native
STUDENT_OUTPUTS = ("native", "velocity", "gated")
VELOCITY_GAIN_CAP = 2.0
#: where the velocity head reads the backbone's features: "pre_norm", the input of the output GroupNorm
#: (``conv_norm_out``), whose per-channel scale still varies with the time; "conv_out", after that norm and its
#: activation. With as many groups as channels (diffusers' default 32 on a 32-channel UNet) that norm divides every
#: channel by its own spatial scale, so a head behind it sees nearly the same features at every time and its one
#: correction lands on every jump: it broke the 2- and 4-step students of such a teacher (docs/results.md)
VELOCITY_HEAD_INPUTS = ("pre_norm", "conv_out")
#: a guidance scale ``w`` enters its embedding as ``100 * w`` (the projection's frequencies suit 0..1000)
GUIDANCE_EMBED_SCALE = 100.0


def sinusoidal_embedding(value: torch.Tensor, spec: ProjectionSpec, max_period: float = 10000.0) -> torch.Tensor:
    """The sinusoidal projection diffusers' ``Timesteps`` computes, for ``(B,)`` values.

    Returns ``(B, spec.num_channels)`` in float32.
    """
    half = spec.num_channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=value.device)
    exponent = exponent / (half - spec.downscale_freq_shift)
    args = float(spec.scale) * value.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if spec.flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if spec.num_channels % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class SecondTimeEmbedding(nn.Module):
    """Sinusoidal projection + 2-layer MLP whose last layer starts at zero. Kept in fp32."""

    def __init__(self, spec: ProjectionSpec, embed_dim: int):
        super().__init__()
        self.spec = spec
        self.linear_1 = nn.Linear(spec.num_channels, embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        h = sinusoidal_embedding(value, self.spec).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(h)))


def disable_label_dropout(network: nn.Module, adapter: FamilyAdapter) -> None:
    """Turn off class-label dropout (DiT's ``LabelEmbedding``): in train mode it would replace labels at
    random, so the student would stop matching its teacher; the distilled guidance is the teacher's."""
    for table in adapter.label_embeddings(network):
        table.dropout_prob = 0.0



FORMAT = "ttfm-distill-student"
#: 1: the folder was the whole export (``ttfm_config.json`` beside ``unet/``); 2: the same files form the
#: ``flow_map/`` component of a diffusers pipeline folder, and ``student_class`` names the class to build
FORMAT_VERSION = 2
ADAPTER_FORMAT = "ttfm-distill-lora-adapters"
CONFIG_NAME = "ttfm_config.json"
#: the pipeline component (sub-folder of an export) that holds the two-time student
COMPONENT = "flow_map"
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


@dataclass
class StudentConfig:
    """What a student folder's ``ttfm_config.json`` holds.

    ``student_class`` picks the class that reads the folder (``TwoTimeFlowMap``,
    ``MlpFlowMap``, ``LoraFlowMap``).  ``data_shape``/``sigma0``/``shift`` define the
    sampler (noise ``sigma0 * N(0, I)`` of ``data_shape``, the teacher-shifted grid);
    ``second_time``, ``guidance_input`` and ``backbone`` define the network; ``teacher``,
    ``loss``, ``weights``, ``training`` and ``lora`` record where it came from.
    """

    student_class: str = "TwoTimeFlowMap"
    data_shape: list = field(default_factory=list)
    kind: str = "image"
    sigma0: float = 1.0
    shift: float = 1.0
    sample_size: int | None = None
    backbone: dict = field(default_factory=dict)
    second_time: dict = field(default_factory=lambda: {"input": "delta"})
    guidance_input: dict | None = None
    null_text: str | None = None
    teacher: dict = field(default_factory=dict)
    scheduler_config: dict | None = None
    #: the teacher's diffusers pipeline class: its ``encode_prompt`` encodes prompts (text students), its LoRA
    #: loader reads the adapters of LoRA students
    teacher_pipeline: str | None = None
    #: "native", "velocity" or "gated" (STUDENT_OUTPUTS; the last two carry velocity_head.safetensors)
    student_output: str = "native"
    #: what a velocity head reads (VELOCITY_HEAD_INPUTS): "pre_norm" (the features entering the network's output
    #: norm; every student since the teacher zoo), or "conv_out" (the normalised features entering ``conv_out``: a
    #: folder written before, which lacks the field)
    velocity_head_input: str = "conv_out"
    #: the time grid its sampler steps on (sampling.TIME_GRIDS)
    time_grid: str = "uniform"
    vae: dict | None = None
    loss: dict | None = None
    weights: str | None = None
    training: dict | None = None
    lora: dict | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    time_convention: str = TIME_CONVENTION
    parametrisation: str = PARAMETRISATION
    package_versions: dict = field(default_factory=package_versions)

    @property
    def second_time_input(self) -> str:
        return self.second_time.get("input", "delta")

    @property
    def conditioning(self) -> str | None:
        return self.teacher.get("conditioning")

    @property
    def num_classes(self) -> int:
        return int(self.teacher.get("num_classes", 0) or 0)

    @property
    def guidance(self) -> dict | None:
        """``{"range": [lo, hi], "default": w}`` for students that take the guidance scale as an input."""
        g = self.guidance_input
        return {"range": [float(v) for v in g["range"]], "default": float(g["default"])} if g else None

    def replace(self, **changes) -> "StudentConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, folder: str | Path) -> None:
        from .fileio import write_json

        write_json(Path(folder, CONFIG_NAME), self.to_dict(), default=str)

    @classmethod
    def from_dict(cls, data: dict, where: str = "ttfm_config.json") -> "StudentConfig":
        if not isinstance(data, dict) or data.get("format") not in (FORMAT, ADAPTER_FORMAT):
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise StudentLoadError(f"{where} is not a ttfm-distill student (format {got!r})")
        version = int(data.get("format_version", 1))
        if version > FORMAT_VERSION:
            raise StudentLoadError(f"{where} was written by a newer ttfm-distill (format {version}); upgrade it")
        data = dict(data)
        if "student_class" not in data:  # format 1 names no class: the format and the backbone decide
            backbone = (data.get("backbone") or {}).get("class_name")
            data["student_class"] = ("LoraFlowMap" if data["format"] == ADAPTER_FORMAT
                                     else "MlpFlowMap" if backbone == "MlpFlowMap" else "TwoTimeFlowMap")
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known)

    @classmethod
    def load(cls, folder: str | Path) -> "StudentConfig":
        path = Path(folder) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise StudentLoadError(f"{path} is not valid JSON: {e}") from None
        except OSError as e:
            raise StudentLoadError(f"{path} cannot be read ({e.strerror or e})") from None
        return cls.from_dict(data, str(path))


#: every student kind by class name (``ttfm_config.json``'s ``student_class``): filled by
#: :class:`FlowMapStudent` as each kind is defined
STUDENT_CLASSES: dict[str, type] = {}


#: what student_output=auto means, by how the teacher's network is read (NetworkIO.prediction_type), chosen on the
#: teacher zoo's two epsilon DDPMs (docs/results.md): the ungated velocity head broke the 2- and 4-step students of
#: diffusers' script layout; native left the project's DDPM 12x its teacher at one step; the gated head (the head
#: only where the conversion's gain passes the cap) cut the project's DDPM's flow-map error about 3x at 1/2/4 steps
#: and the script layout's 1.5x at one step, at 1.15x / 2x native's at 2 / 4 steps. Other readings have no
#: ill-conditioned end (a v-prediction network's gain stays below 1.5, a flow network's is 1): native
AUTO_STUDENT_OUTPUT = {"flow": "native", "epsilon": "gated"}


def resolve_student_output(kind: str, io=None, network: nn.Module | None = None) -> str:
    """The student output of the setting ``kind``: ``auto`` decides by the teacher's prediction type
    (:data:`AUTO_STUDENT_OUTPUT`), and picks a head only for a backbone with the UNet ``conv_out`` it reads."""
    if kind == "auto":
        kind = AUTO_STUDENT_OUTPUT.get(io.prediction_type if io is not None else "flow", "native")
        if network is not None and not isinstance(getattr(network, "conv_out", None), nn.Conv2d):
            kind = "native"
        return kind
    if kind not in STUDENT_OUTPUTS:
        raise InputError(f"student_output must be auto or one of {', '.join(STUDENT_OUTPUTS)}, got {kind!r}")
    return kind


def student_class(name: str) -> type:
    """The student kind saved as ``name``."""
    if name not in STUDENT_CLASSES:  # the kinds defined outside this module register when first imported
        from . import lora, mlp  # noqa: F401
    if name not in STUDENT_CLASSES:
        raise StudentLoadError(f"unknown student class {name!r}; this version reads {', '.join(STUDENT_CLASSES)}")
    return STUDENT_CLASSES[name]


def load_student(folder: str | Path, device="cpu", torch_dtype=None, **kwargs):
    """Any student folder (a ``flow_map/`` component, a format-1 export, a LoRA adapter folder), one call."""
    config = StudentConfig.load(folder)
    return student_class(config.student_class).from_pretrained(folder, device=device, torch_dtype=torch_dtype,
                                                                 **kwargs)


def damaged(folder, e: Exception) -> StudentLoadError:
    """One line for a student whose files do not load (truncated weights, missing tensors, wrong shapes)."""
    import re

    if isinstance(e, StudentLoadError):
        return e
    key = re.search(r'(Missing|Unexpected) key\(s\) in state_dict: "([^"]+)"|size mismatch for ([^:\s]+)', str(e))
    if key:  # torch's strict load_state_dict: name the first tensor before the (long) folder path
        what = {"Missing": "lack tensor", "Unexpected": "hold unexpected tensor"}.get(key.group(1), "have another shape for")
        return StudentLoadError(f"the student's weights {what} {(key.group(2) or key.group(3))[:60]!r}: the folder is "
                                f"damaged, export it again; in {folder}")
    msg = " ".join(line.strip() for line in str(e).strip().splitlines())[:300] or type(e).__name__
    return StudentLoadError(f"cannot load the student in {folder}: {msg}")


def scheduler_model_output(model, sample: torch.Tensor, timestep, r_timestep, cond: dict | None = None,
                           num_train_timesteps: int = 1000) -> torch.Tensor:
    """What diffusers' ``FlowMapEulerDiscreteScheduler.step`` expects from an average-velocity ``model``
    at the scheduler's ``timestep`` -> ``r_timestep`` (both ``sigma * num_train_timesteps``)."""
    b = sample.shape[0]
    as_t = lambda ts: t_from_scheduler_timestep(ts, num_train_timesteps).reshape(-1).expand(b).float()  # noqa: E731
    t_s, t_r = as_t(timestep).to(sample.device), as_t(r_timestep).to(sample.device)
    return diffusers_from_velocity(model(sample, t_s, t_r, cond))


def placed(model: nn.Module, device=None, dtype=None) -> nn.Module:
    """``model`` on ``device`` (and in ``dtype`` when one is given), in eval mode."""
    model = model.to(device) if dtype is None else model.to(device=device, dtype=dtype)
    return model.eval()


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if not path.exists():
        raise StudentLoadError(f"{path.parent} has no {path.name}")
    return load_file(path)


def save_tensors_plain(path: Path, tensors: dict) -> None:
    """A safetensors file with no metadata, written atomically."""
    from .fileio import save_tensors

    save_tensors(path, tensors)


class FlowMapStudent(ModelMixin):
    """What every student kind declares, so the trainer, checkpoints, EMA, precision and export read it without
    asking which kind it is: ``forward(x, s, t, cond)`` is the average velocity ``u(x, s, t)`` in package time.

    The defaults are a whole-network student (every parameter trained, saved and averaged); the LoRA student
    overrides the state and EMA methods, the diffusers-backed one the time embedders and checkpointing.
    """

    #: how the backbone's input and output map to package time (``convention.NetworkIO``); ``None``: the MLP
    #: reads package time directly
    io = None
    #: what the backbone's output means (STUDENT_OUTPUTS)
    student_output: str = "native"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        STUDENT_CLASSES[cls.__name__] = cls

    def time_embedders(self) -> list[nn.Module]:
        """The modules a bf16 run keeps in fp32 (the time embeddings: bf16 would round the times)."""
        return []

    def enable_gradient_checkpointing(self) -> None:
        raise ConfigError(f"gradient_checkpointing: {type(self).__name__} does not support it; "
                         "remove --set gradient_checkpointing=true")

    def trainable_state_dict(self) -> dict:
        """The trained tensors a checkpoint saves, by name."""
        return self.state_dict()

    def load_trainable_state_dict(self, state: dict) -> None:
        self.load_state_dict(state, strict=True)

    def make_ema(self) -> nn.Module:
        """The exponential moving average's holder: a frozen copy, moved by :meth:`follow`."""
        import copy

        return copy.deepcopy(self).requires_grad_(False).eval()

    @torch.no_grad()
    def follow(self, model: nn.Module, decay: float) -> None:
        """One EMA step of this copy towards ``model``'s parameters (an FSDP shard's full tensor)."""
        from .scale import full_tensor

        for pe, pm in zip(self.parameters(), model.parameters()):
            pe.lerp_(full_tensor(pm.detach()).to(pe.dtype), 1.0 - decay)

    @torch.no_grad()
    def take_weights_from(self, ema: nn.Module) -> None:
        """Set the trained tensors to those of ``ema`` (this student's :meth:`make_ema`; the EMA is whole on every
        rank, an FSDP shard keeps its slice)."""
        from .scale import set_full_tensor

        for p, e in zip(self.parameters(), ema.parameters()):
            set_full_tensor(p, e)

    def fake_network(self, teacher, seed: int = 0) -> nn.Module | None:
        """The distribution-matching term's fake velocity network as this kind of student holds it: a trainable
        copy of the teacher's network (``None`` for a teacher without one, the exact 2-D teachers)."""
        return teacher.trainable_copy()


class TwoTimeFlowMap(FlowMapStudent):
    """``phi(x, s, t)`` built on a diffusers denoiser.

    ``forward(x, s, t, cond)`` returns the average velocity ``u(x, s, t)``
    (package convention, shape of ``x``);
    :func:`ttfm_distill.objectives.base.flow_map` turns it into ``phi(x, s, t)``.  ``s``, ``t``: ``(B,)`` with ``s <= t``.
    """

    def __init__(self, network: nn.Module, second_time_input: str = "delta", adapter: FamilyAdapter | None = None,
                 io=None, null_text: dict | None = None, guidance: dict | None = None,
                 config: StudentConfig | None = None, student_output: str = "native",
                 velocity_head_input: str = "pre_norm"):
        super().__init__()
        if second_time_input not in SECOND_TIME_INPUTS:
            raise ValueError(f"second_time_input must be one of {SECOND_TIME_INPUTS}")
        if student_output not in STUDENT_OUTPUTS:
            raise InputError(f"student_output must be one of {', '.join(STUDENT_OUTPUTS)}, got {student_output!r}")
        self.network = network
        self.adapter = adapter or adapter_for(network)
        self.io = io if io is not None else NetworkIO(self.adapter.units(network))
        self.units = self.io.units
        self.second_time_input = second_time_input
        #: the empty prompt's embeddings (one row each) of text teachers with encoders; ``None``: zeros
        self.null_text = null_text
        self.second_time = SecondTimeEmbedding(self.adapter.projection(network), self.adapter.embed_dim(network))
        #: ``{"range": [lo, hi], "default": w}`` when the student takes the guidance scale as an input
        #: (``cond["cfg_scale"]``, ``(B,)``) through a second zero-initialised embedding; ``None`` otherwise
        self.guidance = dict(guidance) if guidance else None
        self.guidance_embed = (SecondTimeEmbedding(self.adapter.projection(network), self.adapter.embed_dim(network))
                               if guidance else None)
        self._pending: torch.Tensor | None = None
        #: what ``save_pretrained`` writes to ``ttfm_config.json`` (the exporter fills in the run's record)
        self.ttfm_config = config
        disable_label_dropout(network, self.adapter)
        for embedder in self.adapter.time_embedders(network):
            embedder.register_forward_hook(self._add_second_time)
        self.student_output = student_output
        self.velocity_head = None
        self._head: torch.Tensor | None = None
        if student_output in ("velocity", "gated"):
            conv = getattr(network, "conv_out", None)
            if not isinstance(conv, nn.Conv2d):
                raise InputError(f"student_output={student_output} needs a UNet backbone (a conv_out layer); "
                                 f"{type(network).__name__} has none: use student_output=native")
            if velocity_head_input not in VELOCITY_HEAD_INPUTS:
                raise InputError(f"velocity_head_input must be one of {', '.join(VELOCITY_HEAD_INPUTS)}, got "
                                 f"{velocity_head_input!r}")
            norm = getattr(network, "conv_norm_out", None)
            if velocity_head_input == "pre_norm" and not isinstance(norm, nn.GroupNorm):
                velocity_head_input = "conv_out"  # no output norm to read before: its input is the same features
            self.velocity_head = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
            nn.init.zeros_(self.velocity_head.weight)
            nn.init.zeros_(self.velocity_head.bias)
            (norm if velocity_head_input == "pre_norm" else conv).register_forward_hook(self._run_head)
        #: what the velocity head reads (VELOCITY_HEAD_INPUTS), recorded in the student's config
        self.velocity_head_input = velocity_head_input if self.velocity_head is not None else None

    def time_embedders(self) -> list[nn.Module]:
        extra = [self.guidance_embed] if self.guidance_embed is not None else []
        return [*self.adapter.time_embedders(self.network), self.second_time, *extra]

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' activation checkpointing on the backbone, each block through :meth:`checkpoint_block`."""
        if not self.network._supports_gradient_checkpointing:
            super().enable_gradient_checkpointing()
        self.network.enable_gradient_checkpointing(self.checkpoint_block)

    def _run_head(self, module, args, output):
        self._head = self.velocity_head(args[0].to(self.velocity_head.weight.dtype))

    def _add_second_time(self, module, args, output):
        if self._pending is None:
            raise RuntimeError("second time not set: call TwoTimeFlowMap, not its network")
        return output + self._pending.to(output.dtype)

    def checkpoint_block(self, block: nn.Module, *args):
        """The network's ``gradient_checkpointing_func`` (diffusers calls it for each block): torch's
        non-reentrant checkpoint, with this call's second time put back while backward recomputes the block.

        Families that embed the time inside each block (DiT's ``norm1.emb``) re-run the time embedder, and
        with it the second-time hook, in backward, after :meth:`forward` has cleared ``_pending``; and an
        objective may call the student several times, at other times, before one backward.  Each block
        call captures the embedding it ran with (``context_fn`` is called in the forward), so the
        recomputation sees exactly the forward's value.  Bound to the student, so a ``deepcopy`` (the EMA)
        captures its own.
        """
        import torch.utils.checkpoint as checkpoint

        recompute = self._call_state()

        def contexts():
            return contextlib.nullcontext(), recompute()

        return checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, context_fn=contexts)

    def _call_state(self):
        """A context factory that puts back, while backward recomputes a block, what this call ran with: its
        second time (a LoRA student adds the weights it ran with)."""
        pending = self._pending
        return lambda: self._second_time_as(pending)

    @contextlib.contextmanager
    def _second_time_as(self, pending: torch.Tensor | None):
        saved, self._pending = self._pending, pending
        try:
            yield
        finally:
            self._pending = saved

    def second_time_value(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.second_time_input == "delta":
            return self.units.model_duration(t - s)
        return self.units.model_timestep(t)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        s = s.to(torch.float32)
        t = t.to(torch.float32)
        self._pending = self.second_time(self.second_time_value(s, t))
        if self.guidance_embed is not None:
            w = (cond or {}).get("cfg_scale")
            w = torch.full_like(s, float(self.guidance["default"])) if w is None else w.to(s.device, torch.float32)
            self._pending = self._pending + self.guidance_embed(GUIDANCE_EMBED_SCALE * w)
        null = {k: v.to(x.device, x.dtype) for k, v in self.null_text.items()} if self.null_text else None
        cond = self.adapter.complete_cond(self.network, cond, x.shape[0], x.device, x.dtype, null_text=null)
        x_in, timestep = self.io.network_input(x, s)
        self._head = None
        try:
            out = self.adapter.call(self.network, x_in, timestep, cond)
            head = self._head
        finally:
            self._pending = self._head = None
        v = self.io.velocity(out, x, s)
        if self.velocity_head is None:
            return v
        head = head.to(v.dtype)
        if self.student_output == "gated":  # the head only where the conversion's gain passes the cap
            head = broadcast_time((1.0 - self._gain_scale(s)).to(v.dtype), head) * head
        return self._damped(v, s) + head

    def _gain_scale(self, s: torch.Tensor) -> torch.Tensor:
        """``min(1, cap / gain(s))``: 1 where the network's conversion is well conditioned (float64, ``(B,)``)."""
        return (VELOCITY_GAIN_CAP / self.io.output_gain(s)).clamp(max=1.0)

    def _damped(self, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``v`` unchanged in value; its gradient scaled by ``min(1, cap / gain(s))`` (the conversion's gain capped)."""
        scale = self._gain_scale(s)
        if bool((scale >= 1).all()):
            return v
        fixed = v.detach()
        return fixed + broadcast_time(scale.to(v.dtype), v) * (v - fixed)

    def diffusers_flow_map(self, sample: torch.Tensor, timestep, r_timestep, cond: dict | None = None,
                           num_train_timesteps: int = 1000) -> torch.Tensor:
        """The model output diffusers' ``FlowMapEulerDiscreteScheduler.step`` expects.

        ``timestep`` and ``r_timestep`` are the scheduler's (``sigma * num_train_timesteps``); the result is
        ``u`` in its convention (``x_r = x_t - (sigma_t - sigma_r) * u``), i.e. minus the package's average velocity.
        """
        return scheduler_model_output(self, sample, timestep, r_timestep, cond, num_train_timesteps)

    # ------------------------------------------------------------ format -------
    def student_config(self) -> StudentConfig:
        """The config describing this student now (network facts from the student, the record from ``ttfm_config``)."""
        base = self.ttfm_config or StudentConfig(data_shape=list(self.adapter.data_shape(self.network)))
        return base.replace(
            student_class="TwoTimeFlowMap",
            backbone={"class_name": type(self.network).__name__, "subfolder": self.adapter.subfolder},
            second_time={"recipe": "additive_zero_init", "input": self.second_time_input,
                         "injected_at": "output of the family's timestep embedder (temb)",
                         "units": {"scale": self.units.scale, "reversed": self.units.reversed},
                         "network_io": self.io.describe(), "projection": vars(self.second_time.spec)},
            guidance_input=({**self.guidance, "key": "cfg_scale",
                             "weights": "guidance_embed.safetensors (additive, zero-initialised)"}
                            if self.guidance else None),
            null_text=("null_text.safetensors: the empty prompt's embeddings, used when no prompt is given"
                       if self.null_text else None),
            student_output=self.student_output,
            velocity_head_input=self.velocity_head_input or "conv_out",
            format=FORMAT, format_version=FORMAT_VERSION, package_versions=package_versions())

    def save_pretrained(self, save_directory: str | Path, config: StudentConfig | None = None) -> Path:
        """Write the backbone (diffusers ``save_pretrained``), the added embeddings and ``ttfm_config.json``."""
        if any(".lora_" in name for name, _ in self.network.named_parameters()):
            raise ValueError("this student's network carries unmerged LoRA adapters; save the merged student "
                             "(lora_export=merged) or its adapter folder (lora_export=adapters) instead")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = (config or self.student_config()).replace(package_versions=package_versions())
        self.network.save_pretrained(folder / self.adapter.subfolder, safe_serialization=True)
        save_tensors_plain(folder / "second_time.safetensors", self.second_time.state_dict())
        if self.guidance_embed is not None:
            save_tensors_plain(folder / "guidance_embed.safetensors", self.guidance_embed.state_dict())
        if self.null_text:
            save_tensors_plain(folder / "null_text.safetensors", self.null_text)
        if self.velocity_head is not None:
            save_tensors_plain(folder / "velocity_head.safetensors", self.velocity_head.state_dict())
        cfg.save(folder)
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, device="cpu", torch_dtype=None,
                        **kwargs) -> "TwoTimeFlowMap":
        """Rebuild a saved student strictly: every tensor must be there, with its shape."""
        import diffusers

        folder = Path(pretrained_model_name_or_path)
        if kwargs.get("subfolder"):
            folder = folder / kwargs["subfolder"]
        config = StudentConfig.load(folder)
        name = config.backbone.get("class_name")
        if name not in ADAPTERS:
            raise StudentLoadError(f"{folder}: backbone class {name} is not supported by this version")
        try:
            sub = folder / config.backbone["subfolder"]
            net_cls = getattr(diffusers, name)
            network = net_cls.from_config(net_cls.load_config(sub))
            network.load_state_dict(load_tensors(sub / "diffusion_pytorch_model.safetensors"), strict=True)
            adapter = ADAPTERS[name]
            io = network_io(adapter, network, config.scheduler_config)
            null = folder / "null_text.safetensors"
            student = cls(network, second_time_input=config.second_time_input, adapter=adapter, io=io,
                          null_text=load_tensors(null) if null.exists() else None, guidance=config.guidance,
                          config=config, student_output=config.student_output,
                          velocity_head_input=config.velocity_head_input)
            student.second_time.load_state_dict(load_tensors(folder / "second_time.safetensors"), strict=True)
            if student.velocity_head is not None:
                student.velocity_head.load_state_dict(load_tensors(folder / "velocity_head.safetensors"), strict=True)
            if student.guidance_embed is not None:
                student.guidance_embed.load_state_dict(load_tensors(folder / "guidance_embed.safetensors"), strict=True)
        except Exception as e:  # noqa: BLE001 - safetensors, OSError, shape mismatches: one line each
            raise damaged(folder, e) from None
        return placed(student, device, torch_dtype or kwargs.get("dtype"))

    def for_export(self, lora_export: str = "merged", config: StudentConfig | None = None) -> "TwoTimeFlowMap":
        """What an export saves for this student (itself; LoRA students may merge first), with ``config``'s record."""
        if config is not None:
            self.ttfm_config = config
        return self
