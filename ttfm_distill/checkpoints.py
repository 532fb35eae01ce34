"""Checkpoints of a run: ``checkpoints/step-XXXXXXXX/``, each written whole or not at all.

A checkpoint holds the student (or a LoRA student's trained tensors), the
EMA if any, the optimizer and scheduler state, and ``trainer_state.json``
(step and recent history).  Resume picks the newest readable one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .errors import RunError
from .fileio import atomic_dir, save_tensors, save_torch, write_json


def list_checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())


def checkpoint_has_head(out: Path) -> bool | None:
    """Whether the newest readable checkpoint's student carries a velocity head (``None``: no checkpoint). A
    folder from before ``student_output=auto`` meant ``gated`` for epsilon teachers resumes with the output it
    trained with (``preflight.keep_student_output``)."""
    from safetensors import SafetensorError, safe_open

    for ckpt in reversed(list_checkpoints(out)):
        try:
            with safe_open(str(ckpt / "student.safetensors"), "pt") as f:
                return any(k.startswith("velocity_head.") for k in f.keys())
        except (OSError, SafetensorError):  # a damaged or missing file: the resume reports it, tries the one before
            continue
    return None


def save_checkpoint(out: Path, step: int, student_state: dict, ema, optimizer_state: dict, scheduler, keep: int,
                    history: list, dm_state: dict | None = None) -> Path:
    """Write one checkpoint atomically; ``student_state``/``optimizer_state`` are full (gathered) state dicts;
    ``dm_state`` (``{"fake": tensors, "optimizer": state}``) is the distribution-matching term's, if any."""
    final = out / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_tensors(tmp / "student.safetensors", student_state)
        if ema is not None:
            save_tensors(tmp / "ema.safetensors", ema.state_dict())
        save_torch(tmp / "optimizer.pt", {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()})
        if dm_state is not None:
            save_tensors(tmp / "fake.safetensors", dm_state["fake"])
            save_torch(tmp / "fake_optimizer.pt", dm_state["optimizer"])
        # written last: list_checkpoints counts a folder holding it as a checkpoint
        write_json(tmp / "trainer_state.json", {"step": step, "history": history[-1000:]})
    for old in list_checkpoints(out)[:-keep]:
        # renamed away first (one atomic step), so a kill mid-delete never leaves a half checkpoint that
        # still looks like one; the hidden leftover is swept at the next start
        trash = old.with_name(f".{old.name}.deleted.tmp")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def load_checkpoint(path: Path, student, ema, scheduler) -> tuple[int, list, dict]:
    """Load model, EMA and scheduler; return ``(step, history, optimizer_state)``.

    The optimizer state is applied after ``accelerator.prepare`` (FSDP re-creates the parameters).
    """
    from safetensors.torch import load_file

    try:
        weights = load_file(path / "student.safetensors")
        student.load_trainable_state_dict(weights)  # LoRA: adapters + second time only
        if ema is not None:
            ema.load_state_dict(load_file(path / "ema.safetensors"), strict=True)
        opt = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        scheduler.load_state_dict(opt["scheduler"])
        state = json.loads((path / "trainer_state.json").read_text())
    except Exception as e:
        raise RunError(f"checkpoint {path} is damaged ({type(e).__name__}); skipping it") from None
    return int(state["step"]), list(state.get("history", [])), opt["optimizer"]




def load_dm_state(path: Path) -> dict | None:
    """The distribution-matching state of checkpoint ``path`` (``{"fake", "optimizer"}``), or ``None`` when the
    checkpoint has none (a run that trained without the term until then)."""
    from safetensors.torch import load_file

    if not (path / "fake.safetensors").exists():
        return None
    try:
        return {"fake": load_file(path / "fake.safetensors"),
                "optimizer": torch.load(path / "fake_optimizer.pt", map_location="cpu", weights_only=True)}
    except Exception as e:
        raise RunError(f"checkpoint {path} is damaged ({type(e).__name__} in its fake network); skipping it") from None


def load_newest(out: Path, student, ema, scheduler, with_dm: bool, log) -> tuple[int, list, dict | None, dict | None]:
    """Load the newest readable checkpoint of ``out`` into ``student``, ``ema`` and ``scheduler`` (a damaged one
    is reported through ``log`` and the one before tried). Returns ``(step, history, optimizer state, the
    distribution-matching state)``: ``(0, [], None, None)`` for a new run; none readable is refused."""
    ckpts = list_checkpoints(out)
    for ckpt in reversed(ckpts):
        try:
            step, history, opt_state = load_checkpoint(ckpt, student, ema, scheduler)
            dm_state = load_dm_state(ckpt) if with_dm else None
        except RunError as e:
            log(f"[yellow]warning:[/] {e}")
            continue
        log(f"resuming from {ckpt} (step {step})")
        return step, history, opt_state, dm_state
    if ckpts:
        raise RunError(f"no checkpoint in {out / 'checkpoints'} could be read; pass --overwrite to start over")
    return 0, [], None, None
