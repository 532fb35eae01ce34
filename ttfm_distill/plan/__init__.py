"""``ttfm-distill plan``: will a distillation fit, and how long will it take (counted on the meta device)."""

from .estimate import (ASSUMPTIONS, GPUS, Counts, Evaluations, Layout, Plan, PlanError, count, make_plan,
                       objective_evaluations, parse_memory, resolve_teacher)
from .known_models import KNOWN_MODELS, known_model

__all__ = ["ASSUMPTIONS", "GPUS", "KNOWN_MODELS", "Counts", "Evaluations", "Layout", "Plan", "PlanError", "count",
           "known_model", "make_plan", "objective_evaluations", "parse_memory", "resolve_teacher"]
