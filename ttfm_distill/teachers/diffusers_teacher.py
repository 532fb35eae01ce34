"""A diffusers denoiser (flow-matching or diffusion) seen as a package-convention teacher."""

from __future__ import annotations

import torch
from torch import nn

from ..convention import broadcast_time
from .schedulers import FLOW_SCHEDULERS, SchedulerError, network_io, scheduler_kind  # noqa: F401 - re-exported
from .base import Teacher
from .families import FamilyAdapter, adapter_for
from ..errors import InputError

class DiffusersFlowTeacher(Teacher):
    """Wraps a frozen diffusers denoiser; its velocity is in the package convention.

    ``source``: where it came from (hub id, folder or ``builtin:NAME``),
    recorded in exported configs.  ``scheduler_config``: the teacher's
    scheduler config (dict) or ``None``.  ``sample_size``: latent/pixel size for
    families whose config does not fix it (Flux).  ``codec``: the VAE of a latent
    teacher.  ``prompts``: the pipeline's text encoders (:class:`PromptEncoder`).
    ``guidance_scale``: classifier-free guidance baked into the velocity
    (``v_neg + w * (v_cond - v_neg)``; 1 = none), against ``negative_prompt``
    (text) or the null class (class-conditional models trained with label dropout).
    """

    def __init__(self, network: nn.Module, source: str, scheduler_config: dict | None = None,
                 adapter: FamilyAdapter | None = None, subfolder: str | None = None, sample_size: int | None = None,
                 codec=None, prompts=None, guidance_scale: float = 1.0, negative_prompt: str = "", guided: bool = False):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.adapter = adapter or adapter_for(network)
        self.scheduler_config = dict(scheduler_config or {})
        self.io = network_io(self.adapter, network, self.scheduler_config)
        self.units = self.io.units
        self.name = source
        self.source = source
        self.subfolder = subfolder if subfolder is not None else self.adapter.subfolder
        self.data_shape = self.adapter.data_shape(network, sample_size)
        self.shift = self._grid_shift()
        self.kind = "image"
        self.conditioning = self.adapter.conditioning(network)
        self.num_classes = self.adapter.num_classes(network)
        self.codec = codec
        if codec is not None and codec.latent_channels != self.data_shape[0]:
            raise InputError(f"the VAE makes {codec.latent_channels}-channel latents but the denoiser takes "
                             f"{self.data_shape[0]} channels")
        self.prompts = prompts
        self.null_text = prompts([""]) if prompts is not None and self.conditioning == "text" else None
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self._negative = None
        if self.guidance_scale != 1.0 or guided:
            self._negative = self._negative_cond()

    def _grid_shift(self) -> float:
        """The scheduler's shift at this data shape (static, or dynamic as the pipeline computes it)."""
        cfg = self.scheduler_config
        if self.io.prediction_type != "flow":
            return 1.0
        if cfg.get("use_dynamic_shifting", False):
            from ..convention import dynamic_shift

            return dynamic_shift(self.adapter.image_tokens(self.network, self.data_shape), cfg)
        return float(cfg.get("shift", 1.0))

    # ---- latents ----
    @property
    def is_latent(self) -> bool:
        return self.codec is not None

    @property
    def image_shape(self) -> tuple[int, ...]:
        if self.codec is None:
            return tuple(self.data_shape)
        _, h, w = self.data_shape
        return (self.codec.image_channels, h * self.codec.factor, w * self.codec.factor)

    def encode_images(self, images):
        return images if self.codec is None else self.codec.encode(images)

    def decode(self, x):
        return x if self.codec is None else self.codec.decode(x)

    # ---- conditioning ----
    def encode_prompts(self, prompts: list[str]) -> dict:
        if self.conditioning != "text":
            return super().encode_prompts(prompts)
        if self.prompts is None:
            raise InputError(f"teacher {self.source} has no text encoders: pass a pipeline folder (model_index.json "
                             "with text_encoder/ and tokenizer/) to use prompts")
        return self.prompts(prompts)

    def _negative_cond(self) -> dict:
        if self.conditioning == "text":
            if self.prompts is None:
                raise InputError("guidance_scale needs the teacher's text encoders (a pipeline folder) for the "
                                 "negative prompt")
            return self.prompts([self.negative_prompt])
        if self.conditioning == "class":
            if not self.adapter.has_null_class(self.network):
                raise InputError("guidance_scale needs a null class; this class-conditional teacher has none")
            return {"class_labels": torch.tensor([self.num_classes])}
        raise InputError("guidance_scale needs a conditional teacher (class labels or text)")

    def _raw_velocity(self, x, t, cond):
        x_in, timestep = self.io.network_input(x, t)
        cond = self.adapter.complete_cond(self.network, cond, x.shape[0], x.device, x.dtype, null_text=self.null_text)
        return self.io.velocity(self.adapter.call(self.network, x_in, timestep, cond), x, t)

    def velocity(self, x, t, cond=None):
        """``cond["cfg_scale"]`` (``(B,)``), when present, is each sample's guidance scale (default: ``guidance_scale``)."""
        cond = dict(cond or {})
        w = cond.pop("cfg_scale", None)
        if self._negative is None:
            if w is not None:
                raise InputError("cfg_scale given to a teacher loaded without guidance (guided=False)")
            return self._raw_velocity(x, t, cond or None)
        n = x.shape[0]
        w = torch.full((n,), self.guidance_scale, device=x.device) if w is None else w.to(x.device)
        full = self.adapter.complete_cond(self.network, cond, n, x.device, x.dtype, null_text=self.null_text)
        neg = {**full, **{k: v.to(x.device).expand(n, *v.shape[1:]) for k, v in self._negative.items()}}
        both = {k: torch.cat([full[k], neg[k]]) if torch.is_tensor(full[k]) else full[k] for k in full}
        v = self._raw_velocity(torch.cat([x, x]), torch.cat([t, t]), both)
        v_cond, v_neg = v[:n], v[n:]
        return v_neg + broadcast_time(w.to(v.dtype), v) * (v_cond - v_neg)

    def trainable_copy(self) -> nn.Module:
        """The network, copied and trainable, with class-label dropout off (it would replace labels at random)."""
        from ..fake import copy_network
        from ..student import disable_label_dropout

        network = copy_network(self.network)
        disable_label_dropout(network, self.adapter)
        return network

    def describe(self) -> dict:
        cfg = self.scheduler_config
        return {
            "source": self.source,
            "class_name": type(self.network).__name__,
            "subfolder": self.subfolder,
            "data_shape": list(self.data_shape),
            "parameters": sum(p.numel() for p in self.network.parameters()),
            **self.io.describe(),
            "scheduler": cfg.get("_class_name") or f"none (family default: {self.io.prediction_type})",
            "shift": self.shift,
            "dynamic_shift": bool(cfg.get("use_dynamic_shifting", False)),
            "conditioning": self.conditioning,
            "conditioning_inputs": self.adapter.cond_inputs(self.network),
            **({"num_classes": self.num_classes} if self.num_classes else {}),
            "text_encoders": self.prompts is not None,
            "guidance_scale": self.guidance_scale,
            **({"negative_prompt": self.negative_prompt} if self.guidance_scale != 1 and self.conditioning == "text" else {}),
            "latent": self.is_latent,
            "image_shape": list(self.image_shape),
            **({"vae": self.codec.describe()} if self.codec is not None else {}),
        }
