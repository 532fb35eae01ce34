"""One small adapter per diffusers model family.

An adapter knows, for one model class: how to call the network, which
submodule produces the time-conditioning vector (where the second time is
injected), the sinusoidal projection that feeds it, and the timestep units.
Only this module and :mod:`ttfm_distill.teachers.loading` import diffusers
model classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..convention import TimestepUnits


@dataclass(frozen=True)
class ProjectionSpec:
    """The sinusoidal projection a family feeds its timestep embedder."""

    num_channels: int
    flip_sin_to_cos: bool
    downscale_freq_shift: float


class FamilyAdapter:
    """Base adapter; subclasses fill in one diffusers class."""

    class_name: str = ""
    #: subfolder under which a pipeline folder keeps this denoiser
    subfolder: str = "unet"

    def units(self, network: nn.Module) -> TimestepUnits:
        return TimestepUnits(scale=1000.0)

    def time_embedder(self, network: nn.Module) -> nn.Module:
        """The module whose output is the conditioning vector ``temb``."""
        raise NotImplementedError

    def projection(self, network: nn.Module) -> ProjectionSpec:
        raise NotImplementedError

    def embed_dim(self, network: nn.Module) -> int:
        return self.time_embedder(network).linear_2.out_features

    def data_shape(self, network: nn.Module) -> tuple[int, ...]:
        raise NotImplementedError

    def call(self, network: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: dict | None) -> torch.Tensor:
        raise NotImplementedError


class UNet2DAdapter(FamilyAdapter):
    class_name = "UNet2DModel"
    subfolder = "unet"

    def time_embedder(self, network):
        return network.time_embedding

    def projection(self, network):
        cfg = network.config
        if cfg.time_embedding_type != "positional":
            raise ValueError(
                f"UNet2DModel with time_embedding_type={cfg.time_embedding_type!r} is not supported "
                "(only 'positional')"
            )
        return ProjectionSpec(cfg.block_out_channels[0], bool(cfg.flip_sin_to_cos), float(cfg.freq_shift))

    def data_shape(self, network):
        cfg = network.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (cfg.in_channels, h, w)

    def call(self, network, x, timestep, cond):
        class_labels = (cond or {}).get("class_labels")
        return network(x, timestep, class_labels=class_labels, return_dict=False)[0]


ADAPTERS: dict[str, FamilyAdapter] = {a.class_name: a for a in (UNet2DAdapter(),)}


def adapter_for(network: nn.Module) -> FamilyAdapter:
    name = type(network).__name__
    if name not in ADAPTERS:
        raise UnsupportedTeacher(
            f"unsupported model class {name}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[name]


class UnsupportedTeacher(ValueError):
    """A model this tool cannot use as a teacher; the message names the supported ones."""
