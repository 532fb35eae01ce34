"""Sampling from a student through :class:`~ttfm_distill.pipeline.TTFMPipeline`, and saving what it made."""

from __future__ import annotations

from pathlib import Path

import torch


def load_pipeline(path: str | Path, device="cpu"):
    """The pipeline of an export folder, a run folder holding ``student/``, or an older student folder."""
    from .export import resolve_student_folder
    from .pipeline import TTFMPipeline

    folder = resolve_student_folder(path)
    if (folder / "model_index.json").exists():
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
        pipe = TTFMPipeline.from_pretrained(folder)
    else:
        pipe = TTFMPipeline.from_student(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def generate(student, steps: int, num: int, seed: int = 0, batch_size: int = 256, device="cpu",
             class_label: int | None = None, guidance_scale: float | None = None) -> torch.Tensor:
    """``num`` samples of ``student`` (a model) in ``steps`` jumps on the teacher-shifted grid, in data space
    (latents for latent students); ``(num, *data_shape)``. The same draws as the pipeline's from ``seed``."""
    from .pipeline import TTFMPipeline

    pipe = TTFMPipeline.from_student(student)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)(num_inference_steps=steps, num_images_per_prompt=num, batch_size=batch_size,
                           generator=torch.Generator().manual_seed(seed), class_labels=class_label,
                           guidance_scale=guidance_scale, output_type="latent").images.cpu()


def save_samples(x: torch.Tensor, kind: str, png: Path, raw: Path | None = None) -> None:
    """A PNG grid (or a scatter of 2-D points) of ``x``; ``raw``: the tensors too (.safetensors or .npy)."""
    from .fileio import atomic_path, save_tensors
    from .plots import save_comparison, save_image_grid

    if kind == "points":
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
