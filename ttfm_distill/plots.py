"""Pictures people would rather look at than read: sample grids and scatters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .fileio import atomic_path


def viewable(x: torch.Tensor) -> torch.Tensor:
    """Images with 1 or 3 channels as they are; other channel counts (latents with no VAE to decode them)
    shown as their first three channels, each scaled to [-1, 1] over the batch."""
    x = x.detach().float()
    if x.shape[1] in (1, 3):
        return x
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    lo = x.amin(dim=(0, 2, 3), keepdim=True)
    hi = x.amax(dim=(0, 2, 3), keepdim=True)
    return 2 * (x - lo) / (hi - lo).clamp_min(1e-8) - 1


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` in [-1, 1] -> ``(N, H, W, C)`` uint8 (see :func:`viewable` for other channel counts)."""
    x = ((viewable(x).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(x: torch.Tensor, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images into one ``(H', W', C)`` uint8 array."""
    imgs = to_uint8_images(x)
    n, h, w, c = imgs.shape
    ncol = ncol or int(np.ceil(np.sqrt(n)))
    nrow = int(np.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = imgs[i]
    return grid


def save_image_grid(x: torch.Tensor, path: str | Path, ncol: int | None = None, scale: int = 4) -> None:
    from PIL import Image

    grid = image_grid(x, ncol)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def save_comparison(rows: dict[str, torch.Tensor], path: str | Path, kind: str = "image", title: str = "",
                    errors: dict[str, float] | None = None) -> None:
    """One labelled row per sampler, same noise in every column (images), or one scatter each (points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    errors = errors or {}
    labels = list(rows)
    if kind == "image":
        fig, axes = plt.subplots(len(labels), 1, figsize=(1.0 + 0.9 * rows[labels[0]].shape[0], 1.05 * len(labels)))
        axes = np.atleast_1d(axes)
        for ax, label in zip(axes, labels):
            grid = image_grid(rows[label], ncol=rows[label].shape[0])
            ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([]), ax.set_yticks([])
            err = f"\nerr {errors[label]:.3f}" if label in errors else ""
            ax.set_ylabel(label + err, rotation=0, ha="right", va="center", fontsize=9)
    else:
        fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels), 2.9))
        axes = np.atleast_1d(axes)
        for ax, label in zip(axes, labels):
            pts = rows[label].float().cpu().numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=0.3, alpha=0.4, color="k")
            ax.set_title(label + (f"\nerr {errors[label]:.3f}" if label in errors else ""), fontsize=9)
            ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
