"""The run's schedules: the learning rate (warm-up, then constant or a cosine) and the EMA decay."""

from __future__ import annotations

import torch

from .config import EMA_OFFSET_OTHER, RunConfig


def lr_factor(k: int, cfg: RunConfig, total_steps: int) -> float:
    """The learning-rate multiplier at step ``k`` of a run that trains ``total_steps`` (``runstate.RunState``):
    linear warm-up, then constant or a cosine to the final fraction. With a distribution-matching stage
    (``dm_stage_steps``) the schedule ends where the stage starts, and the same shape restarts there over the
    stage's steps, scaled to ``dm_stage_lr``: a finished run, then a warm start."""
    stage = cfg.dm_stage_start(total_steps)
    if stage is not None and k >= stage:
        length = total_steps - stage
        return cfg.dm_stage_lr / cfg.lr * _shape(k - stage, length, max(1, min(cfg.warmup_steps, length)), cfg)
    return _shape(k, total_steps if stage is None else stage, max(1, cfg.warmup_steps), cfg)


def _shape(k: int, total: int, warm: int, cfg: RunConfig) -> float:
    """Linear warm-up over ``warm`` steps, then 1 or a cosine to the final fraction at ``total``."""
    import math

    factor = min(1.0, (k + 1) / warm)
    if cfg.lr_schedule_name() == "cosine" and k + 1 > warm:
        progress = min(1.0, (k + 1 - warm) / max(1, total - warm))
        low = cfg.lr_final_value()
        factor = low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def ema_decay_at(step: int, decay: float, warmup: bool, offset: float = EMA_OFFSET_OTHER) -> float:
    """The EMA decay used after step ``step`` (0-based): ``decay``, or with warm-up
    ``min(decay, (1 + k) / (offset + k))``."""
    return min(decay, (1.0 + step) / (offset + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    """One EMA step (the student protocol's ``follow``)."""
    ema.follow(model, decay)  # (a LoRA student's EMA covers its trained tensors only)
