"""The run's schedules: the learning rate (warm-up, then constant or a cosine) and the EMA decay."""

from __future__ import annotations

import torch

from .config import EMA_OFFSET_OTHER, RunConfig


def lr_factor(k: int, cfg: RunConfig) -> float:
    """The learning-rate multiplier at step ``k``: linear warm-up, then constant or a cosine to the final fraction."""
    import math

    warm = max(1, cfg.warmup_steps)
    factor = min(1.0, (k + 1) / warm)
    if cfg.lr_schedule_name() == "cosine" and k + 1 > warm:
        progress = min(1.0, (k + 1 - warm) / max(1, cfg.total_steps() - warm))
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
