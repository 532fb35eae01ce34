"""Sampling from an exported student, and saving what it made."""

from __future__ import annotations

from pathlib import Path

import torch

from .evaluate import student_sampler
from .sampling import sample_flow_map, uniform_time_grid


def sample_cond_for(meta: dict, num: int, generator: torch.Generator, class_label: int | None = None) -> dict | None:
    """Conditioning for ``num`` samples of an exported student: class labels (given or random) for
    class-conditional students; ``None`` (the empty prompt) for the others."""
    teacher = meta.get("teacher", {})
    if teacher.get("conditioning") != "class":
        if class_label is not None:
            raise ValueError("--class-label is only for class-conditional students; this one is "
                             f"{teacher.get('conditioning') or 'unconditional'}")
        return None
    n_classes = int(teacher.get("num_classes", 0))
    if class_label is not None:
        if not 0 <= class_label < n_classes:
            raise ValueError(f"--class-label must be in [0, {n_classes}), got {class_label}")
        return {"class_labels": torch.full((num,), int(class_label), dtype=torch.long)}
    return {"class_labels": torch.randint(0, n_classes, (num,), generator=generator)}


@torch.no_grad()
def generate(student, meta: dict, steps: int, num: int, seed: int = 0, batch_size: int = 256, device="cpu",
             cond: dict | None = None, class_label: int | None = None) -> torch.Tensor:
    """``num`` samples in ``steps`` jumps on the uniform (teacher-shifted) grid; ``(num, *data_shape)``.

    ``cond``: batch-first conditioning for all ``num`` samples (default: see :func:`sample_cond_for`).
    """
    from .evaluate import split_cond

    g = torch.Generator().manual_seed(seed)
    shape = tuple(meta["data_shape"])
    x0 = float(meta.get("sigma0", 1.0)) * torch.randn((num, *shape), generator=g)
    cond = {**(sample_cond_for(meta, num, g, class_label) or {}), **(cond or {})} or None
    grid = uniform_time_grid(steps, float(meta.get("shift", 1.0))).to(device)
    conds = split_cond(cond, batch_size, num, device)
    return torch.cat([sample_flow_map(student_sampler(student, c), x.to(device), grid).cpu()
                      for x, c in zip(x0.split(batch_size), conds)])


def save_samples(x: torch.Tensor, meta: dict, png: Path, raw: Path | None = None) -> None:
    from .fileio import atomic_path, save_tensors
    from .plots import save_comparison, save_image_grid

    if meta.get("kind") == "points":
        save_comparison({f"{len(x)} samples": x}, png, kind="points")
    else:
        save_image_grid(x, png)
    if raw is not None:
        if raw.suffix == ".npy":
            import numpy as np

            with atomic_path(raw) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, x.numpy())
        else:
            save_tensors(raw, {"samples": x})
