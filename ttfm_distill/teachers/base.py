"""The teacher interface every objective and sampler sees."""

from __future__ import annotations

import torch
from torch import nn
from ..errors import InputError


class Teacher(nn.Module):
    """A frozen velocity field in the package convention (docs/method.md, Time convention).

    ``velocity(x, t, cond)``: ``x`` ``(B, *data_shape)``, ``t`` ``(B,)`` in
    [0, 1] with 0 = noise; returns ``E[x1 - x0 | x_t = x]`` of shape ``x``.
    """

    name: str = "teacher"
    data_shape: tuple[int, ...] = ()
    sigma0: float = 1.0
    #: ``sigma`` shift of the teacher's scheduler (1.0 = none); the sampling grid follows it
    shift: float = 1.0
    #: "image" (sample grids) or "points" (2-D scatter)
    kind: str = "image"
    #: where the teacher came from (hub id or folder); ``None`` for built-in analytic teachers
    source: str | None = None
    #: the diffusers scheduler config the teacher was trained with (``None``: none)
    scheduler_config: dict | None = None
    #: the empty prompt's embeddings (one row each) of text teachers with encoders; ``None`` otherwise
    null_text: dict | None = None
    # ``codec`` (the VAE of latent teachers) is an ``nn.Module``: a class default would shadow the submodule,
    # so callers read it with ``getattr(teacher, "codec", None)``

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        raise NotImplementedError

    def sample_noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return self.sigma0 * torch.randn((n, *self.data_shape), generator=generator, device=device)

    # ---- data-space hooks (latent and conditioned teachers override them) ----
    #: what the teacher is conditioned on: None, "class" (``cond["class_labels"]``) or "text"
    conditioning: str | None = None
    #: number of classes when ``conditioning == "class"``
    num_classes: int = 0

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape ``(C, H, W)`` of one training image in pixel space (``data_shape`` unless latent)."""
        return tuple(self.data_shape)

    @property
    def is_latent(self) -> bool:
        return False

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel images ``(B, *image_shape)`` in [-1, 1] -> teacher data ``(B, *data_shape)`` (VAE for latent teachers)."""
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher data ``(B, *data_shape)`` -> pixel images in [-1, 1] (identity unless latent)."""
        return x

    def sample_cond(self, n: int, generator: torch.Generator | None = None) -> dict | None:
        """Conditioning for ``n`` unlabelled draws (data-free pools, evaluation): random class labels
        for class-conditional teachers, ``None`` (the empty prompt) otherwise."""
        if self.conditioning == "class" and self.num_classes > 0:
            return {"class_labels": torch.randint(0, self.num_classes, (n,), generator=generator)}
        return None

    def encode_prompts(self, prompts: list[str]) -> dict:
        """Per-sample conditioning tensors (batch first) for ``prompts``; text teachers only."""
        raise InputError(f"teacher {self.name} is not text-conditioned")

    def trainable_copy(self) -> nn.Module | None:
        """A trainable copy of the teacher's network (the distribution-matching term's fake network starts as
        one), or ``None`` for a teacher without one (the exact 2-D teachers)."""
        return None

    def describe(self) -> dict:
        return {"name": self.name, "data_shape": list(self.data_shape), "shift": self.shift}
