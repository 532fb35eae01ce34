"""A diffusers denoiser (flow-matching or diffusion) seen as a package-convention teacher."""

from __future__ import annotations

from torch import nn

from ..convention import DIFFUSION_PREDICTIONS, DiffusionIO, NetworkIO
from .base import Teacher
from .families import FamilyAdapter, adapter_for

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMapEulerDiscreteScheduler",
                   "FlowMatchLCMScheduler")


class SchedulerError(ValueError):
    """A scheduler that is neither flow matching nor a variance-preserving diffusion schedule."""


def network_io(adapter: FamilyAdapter, network: nn.Module, scheduler_config: dict | None) -> NetworkIO:
    """How to read ``network``: a flow model, or a diffusion model through its probability-flow ODE.

    The scheduler decides (its class and ``prediction_type``); with no scheduler
    config the family's default is used (flow for flow families, the DDPM
    schedule for DiT and PixArt).
    """
    cfg = scheduler_config or adapter.default_scheduler
    if scheduler_kind(cfg) == "flow":
        return NetworkIO(adapter.units(network))
    return DiffusionIO(_alphas_cumprod(cfg), cfg.get("prediction_type", "epsilon"))


def scheduler_kind(cfg: dict | None) -> str:
    """``"flow"`` or ``"diffusion"`` for a scheduler config; :class:`SchedulerError` for anything else."""
    name = (cfg or {}).get("_class_name")
    if not cfg or name in FLOW_SCHEDULERS:
        return "flow"
    _alphas_cumprod(cfg)
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in DIFFUSION_PREDICTIONS:
        raise SchedulerError(f"scheduler {name} has prediction_type {prediction!r}; supported: "
                             f"{', '.join(DIFFUSION_PREDICTIONS)}")
    return "diffusion"


def _alphas_cumprod(cfg: dict):
    import diffusers

    name = cfg.get("_class_name")

    cls = getattr(diffusers, str(name), None) if str(name).endswith("Scheduler") else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise SchedulerError(f"unknown scheduler {name!r}: neither flow matching nor a diffusers diffusion scheduler")
    try:
        scheduler = cls.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for bad configs
        raise SchedulerError(f"cannot build scheduler {name}: {e}") from None
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None:
        raise SchedulerError(f"scheduler {name} has no alphas_cumprod: neither flow matching nor a VP diffusion schedule")
    return acp


class DiffusersFlowTeacher(Teacher):
    """Wraps a frozen diffusers denoiser; its velocity is in the package convention.

    ``source``: where it came from (hub id, folder or ``builtin:NAME``),
    recorded in exported configs.  ``scheduler_config``: the teacher's
    scheduler config (dict) or ``None``.  ``sample_size``: latent/pixel size for
    families whose config does not fix it (Flux).
    """

    def __init__(self, network: nn.Module, source: str, scheduler_config: dict | None = None,
                 adapter: FamilyAdapter | None = None, subfolder: str | None = None, sample_size: int | None = None):
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
        dynamic = self.scheduler_config.get("use_dynamic_shifting", False)
        self.shift = 1.0 if dynamic or self.io.prediction_type != "flow" else float(self.scheduler_config.get("shift", 1.0))
        self.kind = "image"
        self.conditioning = self.adapter.conditioning(network)
        self.num_classes = self.adapter.num_classes(network)

    def velocity(self, x, t, cond=None):
        x_in, timestep = self.io.network_input(x, t)
        cond = self.adapter.complete_cond(self.network, cond, x.shape[0], x.device, x.dtype)
        return self.io.velocity(self.adapter.call(self.network, x_in, timestep, cond), x, t)

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
        }
