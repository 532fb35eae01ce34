"""One optimiser step's forward and backward: gradient accumulation over equal slices, with the non-finite check
every process takes together."""

from __future__ import annotations

import contextlib

import torch

from .objectives import TrainBatch


def backward_micro_batches(accelerator, model, objective, teacher, batch: TrainBatch, ema, n_micro: int):
    """Forward and backward over ``n_micro`` equal slices of ``batch`` (gradient accumulation).

    Each slice's loss is divided by ``n_micro``, so the summed gradients are those of the
    whole batch's mean loss (exactly, up to rounding, for objectives whose loss is a
    per-sample mean).  Gradients are all-reduced on the last slice only.  Returns
    ``(loss, metrics, finite)`` averaged over the slices; at the first non-finite slice loss
    (checked on every rank together) it stops before that slice's backward.
    """
    slices = batch.split(n_micro)
    losses, metrics = [], []
    for i, micro in enumerate(slices):
        sync = contextlib.nullcontext() if i == len(slices) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                result = objective(model, teacher, micro, ema)
            if not all_finite(result.loss, accelerator):
                return result.loss, result.metrics, False
            accelerator.backward(result.loss if len(slices) == 1 else result.loss / len(slices))
        losses.append(result.loss.detach())
        metrics.append(result.metrics)
    if len(slices) == 1:
        return losses[0], metrics[0], True
    mean = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
    return torch.stack(losses).mean(), mean, True


def all_finite(loss: torch.Tensor, accelerator) -> bool:
    """Whether the loss is finite on every process (all ranks take the same branch)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return bad.item() == 0


@torch.no_grad()
def begin_stage(student, ema, optimizer) -> None:
    """The first step of a distribution-matching stage (``dm_stage_steps``), as a warm start from the run so far
    would begin: the student takes its EMA's weights (and the EMA, equal to them, restarts its warm-up there) and
    the optimiser's moments are cleared (the lr schedule restarts in ``schedules.lr_factor``)."""
    if ema is not None:
        student.take_weights_from(ema)
    optimizer.state.clear()
