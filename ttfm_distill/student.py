"""The two-timed student: the teacher's own network with a second time input.

``TwoTimeFlowMap`` wraps a diffusers denoiser without editing it: a forward
hook on the family's timestep embedder adds the output of an extra,
zero-initialised embedding of the second time (``t - s`` by default, in the
network's own timestep units) to the conditioning vector ``temb``.  With the
last layer of that embedding at zero, ``u(x, s, t) == v_teacher(x, s)`` for
every ``(s, t)`` at step 0 (docs/teachers.md, "How the second time is added").

Parametrisation (docs/method.md, "The student"):
``phi(x, s, t) = x + (t - s) * u(x, s, t)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .convention import NetworkIO, diffusers_from_velocity, t_from_scheduler_timestep
from .teachers.families import FamilyAdapter, ProjectionSpec, adapter_for

SECOND_TIME_INPUTS = ("delta", "t")
#: a guidance scale ``w`` enters its embedding as ``100 * w`` (the projection's frequencies suit 0..1000)
GUIDANCE_EMBED_SCALE = 100.0


def sinusoidal_embedding(value: torch.Tensor, spec: ProjectionSpec, max_period: float = 10000.0) -> torch.Tensor:
    """The sinusoidal projection diffusers' ``Timesteps`` computes, for ``(B,)`` values.

    Returns ``(B, spec.num_channels)`` in float32.
    """
    half = spec.num_channels // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=value.device)
    exponent = exponent / (half - spec.downscale_freq_shift)
    args = float(getattr(spec, "scale", 1.0)) * value.float()[:, None] * torch.exp(exponent)[None, :]
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


class TwoTimeFlowMap(nn.Module):
    """``phi(x, s, t)`` built on a diffusers denoiser.

    ``forward(x, s, t, cond)`` returns the average velocity ``u(x, s, t)``
    (package convention, shape of ``x``);
    :func:`ttfm_distill.objectives.base.flow_map` turns it into ``phi(x, s, t)``.  ``s``, ``t``: ``(B,)`` with ``s <= t``.
    """

    def __init__(self, network: nn.Module, second_time_input: str = "delta", adapter: FamilyAdapter | None = None,
                 io=None, null_text: dict | None = None, guidance: dict | None = None):
        super().__init__()
        if second_time_input not in SECOND_TIME_INPUTS:
            raise ValueError(f"second_time_input must be one of {SECOND_TIME_INPUTS}")
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
        disable_label_dropout(network, self.adapter)
        for embedder in self.adapter.time_embedders(network):
            embedder.register_forward_hook(self._add_second_time)

    def _add_second_time(self, module, args, output):
        if self._pending is None:
            raise RuntimeError("second time not set: call TwoTimeFlowMap, not its network")
        return output + self._pending.to(output.dtype)

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
        cond = self.adapter.complete_cond(self.network, cond, x.shape[0], x.device, x.dtype, null_text=self.null_text)
        x_in, timestep = self.io.network_input(x, s)
        try:
            out = self.adapter.call(self.network, x_in, timestep, cond)
        finally:
            self._pending = None
        return self.io.velocity(out, x, s)

    def diffusers_flow_map(self, sample: torch.Tensor, timestep, r_timestep, cond: dict | None = None,
                           num_train_timesteps: int = 1000) -> torch.Tensor:
        """The model output diffusers' ``FlowMapEulerDiscreteScheduler.step`` expects.

        ``timestep`` and ``r_timestep`` are the scheduler's (``sigma * num_train_timesteps``); the result is
        ``u`` in its convention (``x_r = x_t - (sigma_t - sigma_r) * u``), i.e. minus the package's average velocity.
        """
        b = sample.shape[0]
        as_t = lambda ts: t_from_scheduler_timestep(ts, num_train_timesteps).reshape(-1).expand(b).float()  # noqa: E731
        return diffusers_from_velocity(self(sample, as_t(timestep), as_t(r_timestep), cond))

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]
