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
    save_figure(fig, path, title, fontsize=10, dpi=110)


#: metrics drawn by :func:`save_metric_curves`, with their axis labels
CURVE_METRICS = {
    "flow_map_error": "flow-map error",
    "fd_test_images": "FD to real test images",
    "fd_teacher_fine": "FD to teacher fine solve",
    "kl": "KL (2-D histogram)",
    "fid_test_images": "FID to real test images",
    "fid_teacher_fine": "FID to teacher fine solve",
    "ms_per_sample": "ms per sample",
}


def save_metric_curves(results: dict, floors: dict | None, path: str | Path, title: str = "") -> None:
    """One panel per metric against NFE (log-log), one line per sampler, floors as dotted lines.

    ``results``: ``{sampler: {str(nfe): {metric: value} or None}}`` (the
    ``eval`` report's ``results``); ``floors``: ``{name: {metric: value}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floors = floors or {}

    def points(rows, key):
        pts = [(int(n), r[key]) for n, r in rows.items() if r is not None and r.get(key) is not None]
        return sorted(pts)

    keys = [k for k in CURVE_METRICS if any(points(rows, k) for rows in results.values())]
    ncol = min(3, max(1, len(keys)))
    nrow = int(np.ceil(len(keys) / ncol)) or 1
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, keys):
        nfes = set()
        for name, rows in results.items():
            pts = points(rows, key)
            if not pts:
                continue
            nfes.update(n for n, _ in pts)
            teacher = name.startswith("teacher")
            ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", ms=3, lw=1.3, label=name,
                    ls="--" if teacher else "-")
        for j, (name, values) in enumerate(floors.items()):
            if isinstance(values, dict) and values.get(key) is not None:
                ax.axhline(values[key], color=f"C{7 + j}", ls=":", lw=1.0, label=f"{name} (floor)")
        ax.set_xscale("log", base=2)
        if all(v > 0 for rows in results.values() for _, v in points(rows, key)):
            ax.set_yscale("log")
        ticks = sorted(nfes)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set_xlabel("steps (network evaluations)")
        ax.set_title(CURVE_METRICS[key], fontsize=9)
        ax.grid(alpha=0.3, which="both")
    handles = {}
    for ax in axes.flat[: len(keys)]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:  # one legend for every panel: in a spare cell when there is one
        spare = axes.flat[len(keys)] if len(keys) < axes.size else None
        if spare is not None:
            spare.set_visible(True), spare.axis("off")
            spare.legend(handles.values(), handles.keys(), fontsize=7, loc="center")
        else:
            axes.flat[0].legend(handles.values(), handles.keys(), fontsize=6)
    save_figure(fig, path, title, fontsize=9, dpi=100)


def save_figure(fig, path: str | Path, title: str = "", fontsize: int = 10, dpi: int = 110) -> None:
    """Title, tight layout, an atomic PNG write, and the figure closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def save_training_curves(rows: list[dict], path: str | Path, title: str = "") -> None:
    """The training log (tracking.read_log) as one figure against training samples: the loss and each objective
    term, the gradient norm, and each validation measure at 1, 2 and 4 steps (the teacher's Euler dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tracking import TRAIN_KEYS, VALIDATION_MEASURES

    train = [r for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    valid = [r for r in rows if r.get("kind") == "validation"]
    terms = ["loss"] + sorted({k for r in train for k, v in r.items()
                               if k not in TRAIN_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)})
    measures = [m for m in VALIDATION_MEASURES if any(isinstance(r.get(m), dict) for r in valid)]
    panels = ["terms", "grad_norm", *measures]
    ncol = 2
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)

    def line(ax, data, key, **kw):
        pts = [(r["samples"], r[key]) for r in data if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        return pts

    ax = axes.flat[0]
    positive, zero = True, []
    for i, key in enumerate(terms):
        if train and all(r.get(key) in (0, 0.0, None) for r in train):  # a term this run does not use (ITVM's
            zero.append(key)  # initial term with no diagonal pairs): named, not drawn, so the axis can be log
            continue
        pts = line(ax, train, key, lw=1.6 if key == "loss" else 1.0, color=f"C{i}", label=key)
        positive &= all(v > 0 for _, v in pts)
    if positive and train:
        ax.set_yscale("log")
    ax.set_title("training loss and objective terms" + (f" ({', '.join(zero)}: 0)" if zero else ""), fontsize=9)
    ax.legend(fontsize=7)
    ax = axes.flat[1]
    if line(ax, train, "grad_norm", lw=1.0, color="C0", label="gradient norm"):
        ax.set_yscale("log")
    ax.set_title("gradient norm (before clipping)", fontsize=9)
    for ax, measure in zip(axes.flat[2:], measures):
        for i, n in enumerate(("1", "2", "4")):
            pts = [(r["samples"], r[measure][n]) for r in valid
                   if isinstance(r.get(measure), dict) and r[measure].get(n) is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=f"C{i}", label=f"student {n}")
            teacher = ((valid[-1].get("teacher_euler") or {}).get(measure) or {}).get(n)
            if teacher is not None:
                ax.axhline(teacher, color=f"C{i}", ls="--", lw=0.9, label=f"teacher Euler {n}")
        if all(v > 0 for r in valid for v in (r.get(measure) or {}).values() if v is not None):
            ax.set_yscale("log")
        ax.set_title(f"validation: {CURVE_METRICS.get(measure, measure)} (steps)", fontsize=9)
        ax.legend(fontsize=6)
    for ax in axes.flat[: len(panels)]:
        ax.set_xlabel("training samples")
        ax.grid(alpha=0.3, which="both")
    save_figure(fig, path, title, fontsize=10, dpi=100)
