"""Objectives, one file each, chosen by name (``--loss``)."""

from __future__ import annotations

from .base import Objective, ObjectiveOutput, TrainBatch
from .itvm import ItvmObjective
from .lfmd import LfmdObjective
from .lsd import LsdObjective
from .meanflow import MeanFlowObjective
from .progressive import ProgressiveObjective

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (ItvmObjective, LfmdObjective, LsdObjective, MeanFlowObjective, ProgressiveObjective)
}


def make_objective(name: str, **options) -> Objective:
    """Build an objective by registry name with its options."""
    from ..errors import ConfigError

    if not isinstance(name, str) or name not in OBJECTIVES:
        raise ConfigError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](**options)


def make_objective_from(loss: str, loss_options) -> Objective:
    """``make_objective`` for settings as a run config holds them (``loss_options`` checked to be a table)."""
    from ..errors import ConfigError

    if not isinstance(loss_options, dict):
        raise ConfigError(f"loss_options must be a table of KEY=VALUE (e.g. -L tau=0.1), got {loss_options!r}")
    return make_objective(loss, **loss_options)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "TrainBatch", "make_objective", "make_objective_from"]
