"""One small adapter per diffusers model family.

An adapter knows, for one model class: how to call the network, where its
timestep embedders are (the second time is added to their output), the
sinusoidal projection that feeds them, the timestep units, the data shape, and
what conditioning inputs the network takes.  Only this module and
:mod:`ttfm_distill.teachers.loading` name diffusers model classes.

Conditioning dictionaries (``cond``) hold batch-first tensors under the
network's own argument names (``encoder_hidden_states``, ``pooled_projections``,
``class_labels``, ``guidance``, ...).  Inputs a network needs but ``cond`` lacks
are filled by :meth:`FamilyAdapter.complete_cond`: zeros for text embeddings
(an "empty prompt"; a pipeline folder's text encoders give real ones) and the
teacher's default for a guidance input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..convention import TimestepUnits
from ..errors import InputError, TTFMError


@dataclass(frozen=True)
class ProjectionSpec:
    """The sinusoidal projection a family feeds its timestep embedder.

    ``scale`` multiplies the projection's argument (diffusers ``Timesteps.scale``
    times any factor the model applies to its timestep before projecting).
    """

    num_channels: int
    flip_sin_to_cos: bool
    downscale_freq_shift: float
    scale: float = 1.0


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


class FamilyAdapter:
    """Base adapter; subclasses fill in one diffusers class."""

    class_name: str = ""
    #: subfolder under which a pipeline folder keeps this denoiser
    subfolder: str = "transformer"
    #: (projection, embedder) attribute paths; the second time is added to each embedder's output
    time_paths: tuple[tuple[str, str], ...] = ()
    #: factor the model applies to its timestep argument before the projection (Flux: 1000)
    inner_scale: float = 1.0
    #: default token count of the empty prompt used when no text embeddings are given
    null_tokens: int = 1
    #: scheduler assumed when a folder has none (None: a flow-matching model)
    default_scheduler: dict | None = None
    #: value of the network's own guidance input when the data gives none (FLUX.1-dev's pipeline default)
    default_guidance: float = 3.5

    # ---- time ----
    def units(self, network: nn.Module) -> TimestepUnits:
        return TimestepUnits(scale=1000.0)

    def time_modules(self, network: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
        return [(get_submodule(network, p), get_submodule(network, e)) for p, e in self._time_paths(network)]

    def _time_paths(self, network: nn.Module) -> tuple[tuple[str, str], ...]:
        return self.time_paths

    def time_embedders(self, network: nn.Module) -> list[nn.Module]:
        """The modules whose outputs are the conditioning vector ``temb`` (one per embedder)."""
        return [e for _, e in self.time_modules(network)]

    def projection(self, network: nn.Module) -> ProjectionSpec:
        proj = self.time_modules(network)[0][0]
        return ProjectionSpec(int(proj.num_channels), bool(proj.flip_sin_to_cos), float(proj.downscale_freq_shift),
                              float(getattr(proj, "scale", 1.0)) * self.inner_scale)

    def embed_dim(self, network: nn.Module) -> int:
        return self.time_embedders(network)[0].linear_2.out_features

    # ---- data ----
    def data_shape(self, network: nn.Module, sample_size: int | None = None) -> tuple[int, ...]:
        cfg = network.config
        size = sample_size or cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    def image_tokens(self, network: nn.Module, data_shape: tuple[int, ...]) -> int:
        """Tokens one sample makes (what a dynamic scheduler shift depends on)."""
        p = int(getattr(network.config, "patch_size", None) or 1)
        return (data_shape[1] // p) * (data_shape[2] // p)

    def split_output(self, network: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Drop a learned-variance half (DiT, PixArt: ``out_channels = 2 * in_channels``)."""
        if out.shape[1] == 2 * x.shape[1]:
            return out[:, : x.shape[1]]
        return out

    # ---- conditioning ----
    #: None, "class" or "text"
    def conditioning(self, network: nn.Module) -> str | None:
        return None

    def num_classes(self, network: nn.Module) -> int:
        return 0

    def label_embeddings(self, network: nn.Module) -> list[nn.Module]:
        """The network's class-label tables (diffusers ``LabelEmbedding``: DiT); one extra row = the null class."""
        return [m for m in network.modules() if type(m).__name__ == "LabelEmbedding"]

    def has_null_class(self, network: nn.Module) -> bool:
        tables = self.label_embeddings(network)
        return bool(tables) and tables[0].embedding_table.num_embeddings > self.num_classes(network)

    def text_inputs(self, network: nn.Module) -> dict[str, tuple[int, ...]]:
        """Text-embedding inputs and their per-sample shapes (``-1`` = any token count)."""
        return {}

    def guidance_input(self, network: nn.Module) -> bool:
        """Whether the network takes a guidance-scale input of its own (guidance-distilled teachers)."""
        return False

    def cond_inputs(self, network: nn.Module) -> dict[str, str]:
        """Every conditioning input, described (for ``inspect``)."""
        out = {k: f"float {tuple('L' if d == -1 else d for d in v)}" for k, v in self.text_inputs(network).items()}
        if self.conditioning(network) == "class":
            out["class_labels"] = f"int in [0, {self.num_classes(network)})"
        if self.guidance_input(network):
            out["guidance"] = "float guidance scale (the teacher's own input)"
        return out

    def complete_cond(self, network: nn.Module, cond: dict | None, batch: int, device, dtype,
                      null_text: dict | None = None) -> dict:
        """``cond`` with every input the network needs. Missing text embeddings become the empty prompt:
        ``null_text`` (one row from the pipeline's encoders) when given, zeros otherwise."""
        cond = dict(cond or {})
        text_keys = self.text_inputs(network)
        if text_keys and not any(k in cond for k in text_keys) and null_text:
            for key, row in null_text.items():
                cond[key] = row.to(device).expand(batch, *row.shape[1:])
        for key, shape in text_keys.items():
            if key not in cond:
                shape = tuple(self.null_tokens if d == -1 else d for d in shape)
                cond[key] = torch.zeros((batch, *shape), device=device, dtype=dtype)
        if self.conditioning(network) == "class" and "class_labels" not in cond:
            raise InputError(f"{self.class_name} is class-conditional: pass class_labels")
        if self.guidance_input(network) and "guidance" not in cond:
            cond["guidance"] = torch.full((batch,), self.default_guidance, device=device, dtype=torch.float32)
        return cond

    def call(self, network: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------- UNets ------
class UNet2DAdapter(FamilyAdapter):
    class_name = "UNet2DModel"
    subfolder = "unet"
    time_paths = (("time_proj", "time_embedding"),)

    def projection(self, network):
        if network.config.time_embedding_type != "positional":
            # 'fourier' UNets are score-SDE (variance-exploding) models fed sigma, and 'learned' ones index a
            # table by integer timestep: neither takes the continuous second time a flow map needs
            raise UnsupportedTeacher(
                f"UNet2DModel with time_embedding_type={network.config.time_embedding_type!r} is not supported "
                "(only 'positional'); refused before any work")
        return super().projection(network)

    def conditioning(self, network):
        return "class" if network.config.num_class_embeds else None

    def num_classes(self, network):
        return int(network.config.num_class_embeds or 0)

    def call(self, network, x, timestep, cond):
        out = network(x, timestep, class_labels=cond.get("class_labels"), return_dict=False)[0]
        return self.split_output(network, x, out)


class UNet2DConditionAdapter(UNet2DAdapter):
    class_name = "UNet2DConditionModel"
    null_tokens = 77

    def conditioning(self, network):
        return "text"

    def text_inputs(self, network):
        cad = network.config.cross_attention_dim
        return {"encoder_hidden_states": (-1, cad if isinstance(cad, int) else cad[0])}

    def call(self, network, x, timestep, cond):
        extra = {k: v for k, v in cond.items() if k in ("class_labels", "added_cond_kwargs", "timestep_cond")}
        out = network(x, timestep, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False, **extra)[0]
        return self.split_output(network, x, out)


# --------------------------------------------------------- transformers ------
class SD3Adapter(FamilyAdapter):
    class_name = "SD3Transformer2DModel"
    time_paths = (("time_text_embed.time_proj", "time_text_embed.timestep_embedder"),)
    null_tokens = 77

    def conditioning(self, network):
        return "text"

    def text_inputs(self, network):
        cfg = network.config
        return {"encoder_hidden_states": (-1, cfg.joint_attention_dim), "pooled_projections": (cfg.pooled_projection_dim,)}

    def call(self, network, x, timestep, cond):
        return network(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled_projections"], return_dict=False)[0]


class AuraFlowAdapter(FamilyAdapter):
    class_name = "AuraFlowTransformer2DModel"
    time_paths = (("time_step_embed", "time_step_proj"),)
    null_tokens = 8

    def units(self, network):
        return TimestepUnits(scale=1.0)  # sigma in [0, 1]; its projection multiplies by 1000

    def conditioning(self, network):
        return "text"

    def text_inputs(self, network):
        return {"encoder_hidden_states": (-1, network.config.joint_attention_dim)}

    def call(self, network, x, timestep, cond):
        return network(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timestep,
                       return_dict=False)[0]


class FluxAdapter(FamilyAdapter):
    """Flux: packed 2x2 latents with position ids; the data shape is the unpacked latent ``(C, H, W)``."""

    class_name = "FluxTransformer2DModel"
    time_paths = (("time_text_embed.time_proj", "time_text_embed.timestep_embedder"),)
    inner_scale = 1000.0  # forward() multiplies the timestep by 1000 before the projection
    null_tokens = 8
    #: the pipeline's default latent size (1024 px / 8)
    default_sample_size = 128

    def units(self, network):
        return TimestepUnits(scale=1.0)

    def data_shape(self, network, sample_size=None):
        size = sample_size or self.default_sample_size
        if size % 2:
            raise InputError(f"Flux latents need an even size, got {size}")
        return (network.config.in_channels // 4, size, size)

    def conditioning(self, network):
        return "text"

    def text_inputs(self, network):
        cfg = network.config
        return {"encoder_hidden_states": (-1, cfg.joint_attention_dim), "pooled_projections": (cfg.pooled_projection_dim,)}

    def guidance_input(self, network):
        return bool(network.config.guidance_embeds)

    def image_tokens(self, network, data_shape):
        return (data_shape[1] // 2) * (data_shape[2] // 2)

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
        b = tokens.shape[0]
        return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    @staticmethod
    def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
        ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
        ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
        ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
        return ids.reshape(-1, 3)

    def call(self, network, x, timestep, cond):
        b, c, h, w = x.shape
        text = cond["encoder_hidden_states"]
        out = network(
            hidden_states=self.pack(x), timestep=timestep, encoder_hidden_states=text,
            pooled_projections=cond["pooled_projections"],
            img_ids=self.image_ids(h, w, x.device, x.dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype),
            guidance=cond.get("guidance") if self.guidance_input(network) else None,
            return_dict=False,
        )[0]
        return self.unpack(out, c, h, w)


class SanaAdapter(FamilyAdapter):
    class_name = "SanaTransformer2DModel"
    null_tokens = 8

    def _time_paths(self, network):
        if network.config.guidance_embeds:
            return (("time_embed.time_proj", "time_embed.timestep_embedder"),)
        return (("time_embed.emb.time_proj", "time_embed.emb.timestep_embedder"),)

    def units(self, network):
        return TimestepUnits(scale=1000.0 * float(network.config.timestep_scale))

    def conditioning(self, network):
        return "text"

    def text_inputs(self, network):
        return {"encoder_hidden_states": (-1, network.config.caption_channels)}

    def guidance_input(self, network):
        return bool(network.config.guidance_embeds)

    def call(self, network, x, timestep, cond):
        guidance = cond.get("guidance") if self.guidance_input(network) else None
        if guidance is not None:
            guidance = guidance * float(network.config.guidance_embeds_scale)
        return network(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timestep,
                       guidance=guidance, encoder_attention_mask=cond.get("encoder_attention_mask"),
                       return_dict=False)[0]


#: the schedule DiT and PixArt-alpha were trained with
DDPM_LINEAR = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
               "beta_schedule": "linear", "prediction_type": "epsilon"}


class PixArtAdapter(FamilyAdapter):
    class_name = "PixArtTransformer2DModel"
    default_scheduler = DDPM_LINEAR
    time_paths = (("adaln_single.emb.time_proj", "adaln_single.emb.timestep_embedder"),)
    null_tokens = 8

    def conditioning(self, network):
        return "text"

    def text_inputs(self, network):
        return {"encoder_hidden_states": (-1, network.config.caption_channels)}

    def call(self, network, x, timestep, cond):
        added = {"resolution": None, "aspect_ratio": None}
        if network.adaln_single.emb.use_additional_conditions:
            b, _, h, w = x.shape
            added = {"resolution": torch.tensor([[h * 8.0, w * 8.0]], device=x.device, dtype=x.dtype).repeat(b, 1),
                     "aspect_ratio": torch.tensor([[h / w]], device=x.device, dtype=x.dtype).repeat(b, 1)}
        out = network(x, encoder_hidden_states=cond["encoder_hidden_states"], timestep=timestep,
                      added_cond_kwargs=added, encoder_attention_mask=cond.get("encoder_attention_mask"),
                      return_dict=False)[0]
        return self.split_output(network, x, out)


class DiTAdapter(FamilyAdapter):
    """DiT: one timestep embedder per block (``norm1.emb``); the second time is added to each."""

    class_name = "DiTTransformer2DModel"
    default_scheduler = DDPM_LINEAR

    def _time_paths(self, network):
        return tuple((f"transformer_blocks.{i}.norm1.emb.time_proj", f"transformer_blocks.{i}.norm1.emb.timestep_embedder")
                     for i in range(len(network.transformer_blocks)))

    def conditioning(self, network):
        return "class"

    def num_classes(self, network):
        return int(network.config.num_embeds_ada_norm)

    def call(self, network, x, timestep, cond):
        out = network(x, timestep=timestep, class_labels=cond["class_labels"], return_dict=False)[0]
        return self.split_output(network, x, out)


class Lumina2Adapter(FamilyAdapter):
    """Lumina2 counts time the other way (1 = clean) in [0, 1] and predicts ``data - noise``."""

    class_name = "Lumina2Transformer2DModel"
    time_paths = (("time_caption_embed.time_proj", "time_caption_embed.timestep_embedder"),)
    null_tokens = 8

    def units(self, network):
        return TimestepUnits(scale=1.0, reversed=True)

    def conditioning(self, network):
        return "text"

    def text_inputs(self, network):
        return {"encoder_hidden_states": (-1, network.config.cap_feat_dim)}

    def call(self, network, x, timestep, cond):
        text = cond["encoder_hidden_states"]
        mask = cond.get("encoder_attention_mask")
        if mask is None:
            mask = torch.ones(text.shape[:2], dtype=torch.bool, device=x.device)
        return network(x, timestep, text, mask.bool(), return_dict=False)[0]


ADAPTERS: dict[str, FamilyAdapter] = {a.class_name: a for a in (
    UNet2DAdapter(), UNet2DConditionAdapter(), SD3Adapter(), FluxAdapter(), SanaAdapter(), PixArtAdapter(),
    DiTAdapter(), Lumina2Adapter(), AuraFlowAdapter(),
)}


def adapter_for(network: nn.Module) -> FamilyAdapter:
    name = type(network).__name__
    if name not in ADAPTERS:
        raise UnsupportedTeacher(
            f"unsupported model class {name}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[name]


class UnsupportedTeacher(TTFMError, ValueError):
    """A model this tool cannot use as a teacher; the message names the supported ones."""
