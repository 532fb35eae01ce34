"""A diffusers flow-matching network seen as a package-convention teacher."""

from __future__ import annotations

from torch import nn

from .base import Teacher
from .families import FamilyAdapter, adapter_for


class DiffusersFlowTeacher(Teacher):
    """Wraps a frozen diffusers denoiser that predicts ``noise - data``.

    ``source``: where it came from (hub id, folder or ``builtin:NAME``),
    recorded in exported configs.  ``scheduler_config``: the teacher's
    scheduler config (dict) or ``None``.
    """

    def __init__(self, network: nn.Module, source: str, scheduler_config: dict | None = None,
                 adapter: FamilyAdapter | None = None, subfolder: str | None = None):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.adapter = adapter or adapter_for(network)
        self.units = self.adapter.units(network)
        self.name = source
        self.source = source
        self.subfolder = subfolder if subfolder is not None else self.adapter.subfolder
        self.scheduler_config = dict(scheduler_config or {})
        self.data_shape = self.adapter.data_shape(network)
        self.shift = float(self.scheduler_config.get("shift", 1.0)) if not self.scheduler_config.get(
            "use_dynamic_shifting", False) else 1.0
        self.kind = "image"

    def velocity(self, x, t, cond=None):
        timestep = self.units.model_timestep(t.to(x.dtype))
        return self.units.velocity(self.adapter.call(self.network, x, timestep, cond))

    def describe(self) -> dict:
        return {
            "source": self.source,
            "class_name": type(self.network).__name__,
            "subfolder": self.subfolder,
            "data_shape": list(self.data_shape),
            "timestep_scale": self.units.scale,
            "reversed_time": self.units.reversed,
            "shift": self.shift,
            "parameters": sum(p.numel() for p in self.network.parameters()),
        }
