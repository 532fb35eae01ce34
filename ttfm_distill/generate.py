"""Sampling from an exported student, and saving what it made."""

from __future__ import annotations

from pathlib import Path

import torch

from .evaluate import student_sampler
from .sampling import sample_flow_map, uniform_time_grid


@torch.no_grad()
def generate(student, meta: dict, steps: int, num: int, seed: int = 0, batch_size: int = 256, device="cpu") -> torch.Tensor:
    """``num`` samples in ``steps`` jumps on the uniform (teacher-shifted) grid; ``(num, *data_shape)``."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(meta["data_shape"])
    x0 = float(meta.get("sigma0", 1.0)) * torch.randn((num, *shape), generator=g)
    grid = uniform_time_grid(steps, float(meta.get("shift", 1.0))).to(device)
    sampler = student_sampler(student)
    return torch.cat([sample_flow_map(sampler, c.to(device), grid).cpu() for c in x0.split(batch_size)])


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
