"""Reading a teacher's scheduler config: which of the two conventions of ``convention.py`` its network speaks
(a flow model, or a variance-preserving diffusion model read through its probability-flow ODE), and the reading
(``NetworkIO``) that converts its input and output. Only the conversions themselves live in ``convention.py``.
"""

from __future__ import annotations

from ..convention import DIFFUSION_PREDICTIONS, DiffusionIO, NetworkIO
from ..errors import TTFMError

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMapEulerDiscreteScheduler",
                   "FlowMatchLCMScheduler")


class SchedulerError(TTFMError, ValueError):
    """A scheduler that is neither flow matching nor a variance-preserving diffusion schedule."""


def network_io(adapter, network, scheduler_config: dict | None) -> NetworkIO:
    """How to read ``network`` (of the family ``adapter``): a flow model, or a diffusion model through its
    probability-flow ODE.  Used for the teacher and for a reloaded student alike, so both read the network's
    output the same way (the ``clip_sample`` clamp included).

    The scheduler decides (its class and ``prediction_type``); with no scheduler
    config the family's default is used (flow for flow families, the DDPM
    schedule for DiT and PixArt).
    """
    cfg = scheduler_config or adapter.default_scheduler
    prediction = prediction_type_of(cfg)
    if prediction == "flow":
        return NetworkIO(adapter.units(network))
    # the teacher's own scheduler decides the clip (diffusers' defaults included); a family default never clips
    clip = _clip_range(cfg) if scheduler_config else None
    return DiffusionIO(_alphas_cumprod(cfg), prediction, clip_sample=clip)


def prediction_type_of(scheduler_config: dict | None) -> str:
    """What a network with this scheduler predicts: ``"flow"``, or its diffusion ``prediction_type`` (``epsilon``
    when the config names none); :class:`SchedulerError` for a scheduler that is neither."""
    if scheduler_kind(scheduler_config) == "flow":
        return "flow"
    return scheduler_config.get("prediction_type", "epsilon")


def _clip_range(cfg: dict) -> float | None:
    """The scheduler's ``clip_sample_range`` if its ``clip_sample`` is on (as diffusers builds it), else ``None``."""
    import diffusers

    built = getattr(diffusers, str(cfg.get("_class_name"))).from_config(cfg).config
    return float(built.get("clip_sample_range", 1.0)) if built.get("clip_sample", False) else None


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
