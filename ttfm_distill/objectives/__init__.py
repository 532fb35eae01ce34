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
    if name not in OBJECTIVES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](**options)


__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "TrainBatch", "make_objective"]
