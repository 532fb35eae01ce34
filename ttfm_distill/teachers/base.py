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
    #: how the network's input and output map to the package convention (``convention.NetworkIO``: prediction
    #: type, timestep units, scheduler grid); ``None``: ``velocity`` is in the convention already (exact teachers)
    io = None
    #: the diffusers family adapter (``families.FamilyAdapter``) of ``network``; ``None`` without a network
    adapter = None
    #: the key of the teacher's description and weights (``data.cache.teacher_fingerprint`` fills it once)
    fingerprint: str | None = None

    def __init__(self) -> None:
        super().__init__()
        # modules (``nn.Module`` registers them on assignment), so they are declared here and not as class
        # attributes, which would shadow the registered submodules
        #: the frozen diffusers denoiser behind ``velocity``; ``None`` for a teacher without one (the exact ones)
        self.network: nn.Module | None = None
        #: the VAE of a latent teacher (``teachers.pipeline.LatentCodec``); ``None`` in pixel space
        self.codec = None
        #: the pipeline's text encoders (``teachers.pipeline.PromptEncoder``); ``None`` without them
        self.prompts = None

    @property
    def prediction_type(self) -> str:
        """What the network predicts (``"flow"``, ``"epsilon"``, ``"v_prediction"``, ``"sample"``); ``"flow"``
        for a teacher whose ``velocity`` needs no conversion."""
        return self.io.prediction_type if self.io is not None else "flow"

    def time_embedders(self) -> list[nn.Module]:
        """The network's timestep embedders, which a bf16 run keeps in fp32 (none without a network)."""
        return list(self.adapter.time_embedders(self.network)) if self.has_network else []

    @property
    def has_network(self) -> bool:
        """A diffusers denoiser stands behind ``velocity`` (a student can be made from it, held, sharded)."""
        return self.network is not None

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
