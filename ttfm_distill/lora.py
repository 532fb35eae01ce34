"""LoRA students: adapters on the teacher's own network, so one copy of the base weights is held.

The student is the teacher's network with LoRA adapters (injected with peft's
``inject_adapter_in_model``, which works on every diffusers model, including
the ones without diffusers' ``PeftAdapterMixin`` such as ``UNet2DModel``) plus the usual zero-initialised second-time
embedding.  LoRA's ``B`` matrices start at zero, so the student equals the
teacher exactly at step 0.  The teacher is the *same* network evaluated with
the adapters disabled and without the second-time addition
(:class:`BaseWeightsTeacher`).  Only the adapters and the second-time
embedding are trained; the EMA (:class:`AdapterEma`) and the checkpoints hold
only those tensors.

Export (``lora_export``): ``merged`` saves a plain :class:`TwoTimeFlowMap`
(adapters folded into the base weights, :meth:`LoraFlowMap.merged`);
``adapters`` is :meth:`LoraFlowMap.save_pretrained`: the adapter weights
(peft's state-dict keys, the config in ``adapter_config.json``), the
second-time embedding and ``ttfm_config.json``; :meth:`LoraFlowMap.from_pretrained`
reads it back onto the teacher named there.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .teachers.base import Teacher
from .student import (ADAPTER_FORMAT, StudentConfig, StudentLoadError, TwoTimeFlowMap, damaged, package_versions,
                      placed)

ADAPTER_NAME = "default"
ADAPTER_SUBFOLDER = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file name
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name

#: module-name suffixes adapted by default, when present: attention projections (UNets and
#: transformers, joint-attention context projections included) and, for UNets, the resnet convolutions
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "conv1", "conv2")


def require_peft():
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError("LoRA students need peft: pip install 'ttfm-distill[lora]' (or set lora_rank=0)") from None
    return peft


def parse_targets(targets) -> list[str]:
    if isinstance(targets, str):
        return [t.strip() for t in targets.split(",") if t.strip()]
    return [str(t) for t in targets or []]


def default_lora_targets(network: nn.Module, time_embedders=()) -> list[str]:
    """The :data:`DEFAULT_TARGETS` suffixes that name Linear/Conv2d layers of ``network``
    (never inside a timestep embedder)."""
    skip = {id(m) for e in time_embedders for m in e.modules()}
    found = set()
    for name, module in network.named_modules():
        if id(module) in skip or not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        found.update(t for t in DEFAULT_TARGETS if name == t or name.endswith("." + t))
    return [t for t in DEFAULT_TARGETS if t in found]


class LoraFlowMap(TwoTimeFlowMap):
    """A :class:`TwoTimeFlowMap` whose network carries LoRA adapters.

    Inside :meth:`base_weights` the network is the teacher: adapters off and
    no second-time addition (the hook passes the embedder's output through).
    """

    def __init__(self, network: nn.Module, second_time_input: str = "delta", **kwargs):
        super().__init__(network, second_time_input=second_time_input, **kwargs)
        self._teacher_mode = False
        #: the adapter tensors swapped in for this call (:meth:`swapped_adapters`), None: the student's own
        self._swap: dict | None = None
        #: the layer names the adapters were put on (``add_lora``)
        self.lora_targets: list[str] = []

    def _add_second_time(self, module, args, output):
        if self._teacher_mode:
            return output
        return super()._add_second_time(module, args, output)

    @contextlib.contextmanager
    def base_weights(self):
        """Evaluate ``self.network`` as the teacher: adapters disabled, no second time.

        (peft's ``enable_adapters`` also switches the adapters' ``requires_grad``
        off and back on; both happen before any backward.)
        """
        set_adapters_enabled(self.network, False)
        self._teacher_mode = True
        try:
            yield self.network
        finally:
            self._teacher_mode = False
            set_adapters_enabled(self.network, True)

    @contextlib.contextmanager
    def swapped_adapters(self, tensors: dict | None):
        """Evaluate ``self.network`` as a velocity network with ``tensors`` (adapter tensors by name, same shapes)
        in place of the student's adapters and no second time: the fake network (:class:`FakeAdapters`). The
        tensors are swapped in, not copied, so the student's graph of the step stays valid and their gradients
        reach them. ``None``: the student's own adapters. Checkpointed blocks recompute with what the call ran
        with (:meth:`_call_state`)."""
        modules = dict(self.network.named_modules())
        saved = []
        for name, value in (tensors or {}).items():
            owner, _, leaf = name.rpartition(".")
            saved.append((modules[owner], leaf, modules[owner]._parameters[leaf]))
            modules[owner]._parameters[leaf] = value
        mode, swap = self._teacher_mode, self._swap
        self._teacher_mode, self._swap = tensors is not None, tensors
        try:
            yield self.network
        finally:
            self._teacher_mode, self._swap = mode, swap
            for module, leaf, value in reversed(saved):
                module._parameters[leaf] = value

    def _call_state(self):
        recompute_second_time = super()._call_state()
        swap = self._swap

        @contextlib.contextmanager
        def state():
            with recompute_second_time(), self.swapped_adapters(swap):
                yield

        return state

    def adapter_tensors(self) -> dict:
        """The adapters' own tensors (``lora_A``/``lora_B`` of every adapted layer), by name in ``self.network``."""
        return {n: p for n, p in self.network.named_parameters() if ".lora_" in n}

    def fake_network(self, teacher, seed: int = 0) -> nn.Module:
        """The distribution-matching fake network of a LoRA student: a second set of adapters on the one frozen
        base (:class:`FakeAdapters`), so the base is held once; at step 0 it is the teacher."""
        return FakeAdapters(self, seed)

    def take_weights_from(self, ema: nn.Module) -> None:
        self.load_trainable_state_dict(ema.state_dict())

    def trainable_state_dict(self) -> dict:
        """The trained tensors only (adapters and second-time embedding), detached, by parameter name."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict) -> None:
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise RuntimeError(f"LoRA state does not match the student (missing {missing}, unexpected {extra})")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def make_ema(self) -> "AdapterEma":
        return AdapterEma(self)

    @contextlib.contextmanager
    def values_swapped_in(self, values: dict):
        """Temporarily copy ``values`` into the trained tensors (for exporting EMA weights; no graph may be alive)."""
        saved = self.trainable_state_dict()
        self.load_trainable_state_dict(values)
        try:
            yield self
        finally:
            self.load_trainable_state_dict(saved)

    # ------------------------------------------------------------ format -------
    def lora_record(self) -> dict:
        peft_cfg = self.network.peft_config[ADAPTER_NAME]
        return {"rank": int(peft_cfg.r), "alpha": float(peft_cfg.lora_alpha),
                "targets": list(self.lora_targets), "export": "adapters"}

    def merged(self) -> TwoTimeFlowMap:
        """A plain two-time student with every adapter folded into its base layer (a new network)."""
        network = type(self.network).from_config(self.network.config)
        network.load_state_dict(_merged_network_state(self), strict=True)
        plain = TwoTimeFlowMap(network.to(next(self.parameters()).device), second_time_input=self.second_time_input,
                               adapter=self.adapter, io=self.io, null_text=self.null_text, guidance=self.guidance,
                               config=self.ttfm_config)
        plain.second_time.load_state_dict(self.second_time.state_dict(), strict=True)
        if self.guidance_embed is not None:
            plain.guidance_embed.load_state_dict(self.guidance_embed.state_dict(), strict=True)
        record = {**self.lora_record(), "export": "merged"}
        plain.ttfm_config = plain.student_config().replace(lora=record)
        return plain.eval()

    def for_export(self, lora_export: str = "merged", config: StudentConfig | None = None):
        if config is not None:
            self.ttfm_config = config
        if lora_export == "merged":
            return self.merged()
        if lora_export != "adapters":
            raise ConfigError(f"lora_export must be 'merged' or 'adapters', got {lora_export!r}")
        return self

    def student_config(self) -> StudentConfig:
        base = super().student_config()
        return base.replace(student_class="LoraFlowMap", format=ADAPTER_FORMAT, lora=self.lora_record())

    def save_pretrained(self, save_directory, config: StudentConfig | None = None) -> Path:
        """The adapters (peft's keys and ``adapter_config.json``), the added embeddings and ``ttfm_config.json``;
        the base weights are the teacher's, named in the config."""
        from peft import get_peft_model_state_dict

        from .fileio import write_text
        from .student import save_tensors_plain

        folder = Path(save_directory)
        (folder / ADAPTER_SUBFOLDER).mkdir(parents=True, exist_ok=True)
        weights = get_peft_model_state_dict(self.network, adapter_name=ADAPTER_NAME)
        save_tensors_plain(folder / ADAPTER_SUBFOLDER / ADAPTER_WEIGHTS, weights)
        peft_cfg = self.network.peft_config[ADAPTER_NAME].to_dict()
        write_text(folder / ADAPTER_SUBFOLDER / "adapter_config.json", json.dumps(peft_cfg, indent=2, default=list))
        save_tensors_plain(folder / "second_time.safetensors", self.second_time.state_dict())
        if self.guidance_embed is not None:
            save_tensors_plain(folder / "guidance_embed.safetensors", self.guidance_embed.state_dict())
        if self.null_text:
            save_tensors_plain(folder / "null_text.safetensors", self.null_text)
        config = (config or self.student_config()).replace(package_versions=package_versions())
        if save_diffusers_lora(folder, config.teacher_pipeline, self.adapter.subfolder, weights, peft_cfg):
            config = config.replace(lora={**config.lora, "diffusers_weights": DIFFUSERS_WEIGHTS,
                                          "loaded_by": f"{config.teacher_pipeline}.load_lora_weights"})
        config.save(folder)
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, device="cpu", torch_dtype=None, base=None,
                        **kwargs) -> "LoraFlowMap":
        """Read an ``adapters`` export onto ``base`` (a teacher; default: the one its config names).

        The teacher view (adapters off) is ``BaseWeightsTeacher(base, student)``.
        """
        from peft import set_peft_model_state_dict

        from .student import load_tensors
        from .teachers.loading import load_teacher

        folder = Path(pretrained_model_name_or_path)
        config = StudentConfig.load(folder)
        if config.format != ADAPTER_FORMAT:
            raise StudentLoadError(f"{folder} is not a LoRA adapter export (format {config.format!r})")
        require_peft()
        teacher = base if base is not None else load_teacher(config.teacher["source"], config.teacher.get("subfolder"))
        lora = config.lora
        torch.manual_seed(0)
        student = cls(teacher.network, **_student_kwargs(teacher, config.second_time_input), guidance=config.guidance,
                      config=config)
        student.lora_targets = add_lora(teacher.network, lora["rank"], lora["alpha"], lora["targets"],
                                        student.adapter.time_embedders(teacher.network))
        try:
            weights = load_tensors(folder / ADAPTER_SUBFOLDER / ADAPTER_WEIGHTS)
            result = set_peft_model_state_dict(teacher.network, weights, adapter_name=ADAPTER_NAME)
            if getattr(result, "unexpected_keys", None):
                raise StudentLoadError(f"{folder}: adapter weights do not fit the base ({result.unexpected_keys[:3]})")
            # the base's own tensors are missing by design (they are the teacher's); an adapter's never are
            missing = sorted(k for k in getattr(result, "missing_keys", None) or () if ".lora_" in k)
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise StudentLoadError(f"the adapter weights lack tensor {missing[0][:70]!r}{more}: the folder is "
                                       f"damaged, export it again; in {folder}")
            student.second_time.load_state_dict(load_tensors(folder / "second_time.safetensors"), strict=True)
            if student.guidance_embed is not None:
                student.guidance_embed.load_state_dict(load_tensors(folder / "guidance_embed.safetensors"), strict=True)
        except Exception as e:  # noqa: BLE001
            raise damaged(folder, e) from None
        student.teacher_view = BaseWeightsTeacher(teacher, student)
        return placed(student, device, torch_dtype or kwargs.get("dtype"))


class FakeAdapters(nn.Module):
    """A second set of LoRA adapters on a LoRA student's network, evaluated as a velocity network: the student's
    adapter tensors are swapped for these (``LoraFlowMap.swapped_adapters``: nothing is modified in place, so the
    student's graph of the step stays valid, and a checkpointed block recomputes with them) and the second time is
    off. The ``B`` matrices start at zero, so at step 0 it is the teacher; ``A`` is drawn as peft draws it, from
    ``seed`` alone. Only these tensors are trained and saved: the base weights stay the teacher's, held once. Reads
    as the diffusers network it wraps (``config`` and the rest), so a family adapter calls it as it calls the
    network."""

    def __init__(self, student: LoraFlowMap, seed: int = 0):
        super().__init__()
        object.__setattr__(self, "student", student)  # not a submodule: the base and the student's adapters are not ours
        generator = torch.Generator().manual_seed(int(seed))
        #: by the student's adapter names with "/" for "." (a parameter name has no dots)
        self.weights = nn.ParameterDict()
        for name, like in student.adapter_tensors().items():
            value = torch.zeros(like.shape, dtype=like.dtype)
            if ".lora_A." in name:  # (peft's init: kaiming-uniform with a = sqrt(5), i.e. bound 1 / sqrt(fan_in))
                bound = 1.0 / float(like[0].numel()) ** 0.5
                value.uniform_(-bound, bound, generator=generator)
            self.weights[name.replace(".", "/")] = nn.Parameter(value.to(like.device))

    def tensors(self) -> dict:
        """The fake's tensors by their names in the student's network."""
        return {key.replace("/", "."): value for key, value in self.weights.items()}

    def forward(self, *args, **kwargs):
        with self.student.swapped_adapters(self.tensors()) as network:
            return network(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "student" or "student" not in self.__dict__:
                raise
            return getattr(self.student.network, name)


class AdapterEma(nn.Module):
    """EMA of a LoRA student's trained tensors only; evaluated on the shared network.

    ``forward`` runs the student with the EMA tensors substituted through
    ``torch.func.functional_call`` (no parameter is modified in place, so a
    student graph built earlier in the step stays valid).
    """

    def __init__(self, student: LoraFlowMap):
        super().__init__()
        object.__setattr__(self, "student", student)  # not a submodule: the base is not ours to save
        self.shadow = student.trainable_state_dict()

    def forward(self, x, s, t, cond=None):
        return torch.func.functional_call(self.student, self.shadow, (x, s, t, cond), strict=False)

    @property
    def io(self):
        """The student's (the samplers read it as they read a student's)."""
        return self.student.io

    @property
    def student_output(self) -> str:
        return self.student.student_output

    @torch.no_grad()
    def follow(self, model: LoraFlowMap, decay: float) -> None:
        params = dict(model.named_parameters())
        for name, value in self.shadow.items():
            value.lerp_(params[name].detach().to(value.dtype), 1.0 - decay)

    def state_dict(self, *args, **kwargs) -> dict:  # noqa: D102 - the shadow tensors by parameter name
        return {k: v.detach().clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        if set(state) != set(self.shadow):
            raise RuntimeError("EMA state does not match the LoRA student")
        with torch.no_grad():
            for name, value in state.items():
                self.shadow[name].copy_(value)

    def for_export(self, lora_export: str = "merged", config: StudentConfig | None = None):
        """The student with the EMA tensors: merged (a new plain student), or an adapter view that saves them."""
        self.student.for_export(lora_export if lora_export != "merged" else "adapters", config)  # checks the mode
        if lora_export == "merged":
            with self.student.values_swapped_in(self.shadow):
                return self.student.merged()
        return _EmaAdapters(self)


class _EmaAdapters:
    """Saves a LoRA student's adapters with the EMA values swapped in."""

    def __init__(self, ema: AdapterEma):
        self.ema = ema
        self.ttfm_config = ema.student.ttfm_config

    def student_config(self) -> StudentConfig:
        return self.ema.student.student_config()

    def save_pretrained(self, save_directory, config: StudentConfig | None = None) -> Path:
        self.ema.student.ttfm_config = self.ttfm_config
        with self.ema.student.values_swapped_in(self.ema.shadow):
            return self.ema.student.save_pretrained(save_directory, config)


class BaseWeightsTeacher(Teacher):
    """The teacher as seen by the objectives when the student is a LoRA student: a :class:`Teacher` whose
    ``velocity`` evaluates the one shared network with the adapters off and no second time.

    Its declared attributes are the wrapped teacher's, and its modules (network, VAE, text encoders) are the same
    objects, not copies; the data-space hooks go to the wrapped teacher.
    """

    _SHARED = ("name", "data_shape", "sigma0", "shift", "kind", "source", "scheduler_config", "null_text", "io",
               "adapter", "fingerprint", "conditioning", "num_classes")

    def __init__(self, teacher: Teacher, student: LoraFlowMap):
        super().__init__()
        for name in self._SHARED:
            setattr(self, name, getattr(teacher, name))
        self.network, self.codec, self.prompts = teacher.network, teacher.codec, teacher.prompts
        # plain references (a bound method and a list), so neither is registered as a submodule of this view
        self._base_weights = student.base_weights
        self._wrapped = [teacher]

    @property
    def wrapped(self) -> Teacher:
        return self._wrapped[0]

    def velocity(self, x, t, cond=None):
        with self._base_weights():
            return self.wrapped.velocity(x, t, cond)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.wrapped.image_shape

    @property
    def is_latent(self) -> bool:
        return self.wrapped.is_latent

    def encode_images(self, images):
        return self.wrapped.encode_images(images)

    def decode(self, x):
        return self.wrapped.decode(x)

    def sample_cond(self, n, generator=None):
        return self.wrapped.sample_cond(n, generator)

    def encode_prompts(self, prompts):
        return self.wrapped.encode_prompts(prompts)

    def describe(self) -> dict:
        return self.wrapped.describe()


def set_adapters_enabled(network: nn.Module, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in network.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


def lora_config(rank: int, alpha: float, targets: list[str]):
    peft = require_peft()
    return peft.LoraConfig(r=int(rank), lora_alpha=float(alpha or rank), target_modules=list(targets),
                           init_lora_weights=True)


def add_lora(network: nn.Module, rank: int, alpha: float, targets, time_embedders=()) -> list[str]:
    """Add a LoRA adapter to ``network`` (frozen base); returns the target suffixes used."""
    targets = parse_targets(targets) or default_lora_targets(network, time_embedders)
    if not targets:
        raise ConfigError(f"no layer of {type(network).__name__} matches the default LoRA targets; "
                          "name some with --set lora_targets=NAME,NAME")
    from peft import inject_adapter_in_model

    network.requires_grad_(False)
    try:
        inject_adapter_in_model(lora_config(rank, alpha, targets), network, adapter_name=ADAPTER_NAME)
    except ValueError as e:  # peft: no module matched
        raise ConfigError(f"LoRA targets {targets} do not fit {type(network).__name__}: {str(e).splitlines()[0]}") from None
    return targets


def build_lora_student(teacher, cfg: RunConfig):
    """``(student, teacher_view)``: a LoRA student on ``teacher.network`` and the teacher evaluated on its base."""
    if not teacher.has_network:
        raise ConfigError(f"LoRA students need a diffusers teacher; {teacher.name} has no network (use lora_rank=0)")
    require_peft()
    torch.manual_seed(cfg.seed)
    network = teacher.network
    student = LoraFlowMap(network, **_student_kwargs(teacher, cfg.second_time_input))
    targets = add_lora(network, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                       student.adapter.time_embedders(network))
    student.lora_targets = targets
    student.train()
    return student, BaseWeightsTeacher(teacher, student)


def _student_kwargs(teacher, second_time_input: str) -> dict:
    """What :func:`ttfm_distill.trainer.build_student` passes to the student, taken from the teacher."""
    return dict(second_time_input=second_time_input, adapter=teacher.adapter, io=teacher.io,
                null_text=teacher.null_text)


# ------------------------------------------------------------- export -------
def _merged_network_state(student: LoraFlowMap) -> dict:
    """The network's state dict with every adapter folded into its base layer (plain diffusers keys)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    network = student.network
    merged = {}
    with torch.no_grad():
        for name, module in network.named_modules():
            if isinstance(module, BaseTunerLayer):
                base = module.get_base_layer()
                merged[f"{name}.weight"] = base.weight + module.get_delta_weight(ADAPTER_NAME).to(base.weight.dtype)
        state = {}
        for key, value in network.state_dict().items():
            if ".lora_" in key:
                continue
            plain = key.replace(".base_layer.", ".")
            state[plain] = merged.get(plain, value).detach().clone()
    return state


def save_diffusers_lora(folder: Path, pipeline_class: str | None, component: str, weights: dict,
                        peft_config: dict) -> bool:
    """Write the adapters in diffusers' LoRA format (``pytorch_lora_weights.safetensors``, keys prefixed by the
    denoiser's component name, the LoRA config as metadata) with the teacher pipeline's own ``save_lora_weights``,
    so that its ``load_lora_weights`` reads them. ``False`` when that pipeline class has no LoRA loader for
    ``component`` (``UNet2DModel`` pipelines, DiT, ...)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, pipeline_class or "", None)
    saver = getattr(cls, "save_lora_weights", None)
    if saver is None or component not in getattr(cls, "_lora_loadable_modules", ()):
        return False
    params = inspect.signature(saver).parameters
    layers, meta = f"{component}_lora_layers", f"{component}_lora_adapter_metadata"
    if layers not in params:
        return False
    kwargs = {layers: {k: v.detach().contiguous().cpu() for k, v in weights.items()}}
    if meta in params:
        kwargs[meta] = json.loads(json.dumps(peft_config, default=list))
    saver(str(folder), weight_name=DIFFUSERS_WEIGHTS, **kwargs)
    return True


def load_lora_student(folder, base=None, device="cpu"):
    """Read an ``adapters`` export: ``(student, teacher_view, config)`` (see :meth:`LoraFlowMap.from_pretrained`)."""
    student = LoraFlowMap.from_pretrained(folder, device=device, base=base)
    return student, student.teacher_view, student.ttfm_config
