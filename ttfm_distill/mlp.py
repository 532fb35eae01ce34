"""A two-timed MLP for 2-D (vector) teachers, which have no network to copy.

``u(x, s, t)`` from ``x``, ``s`` and ``t - s`` through Fourier features and a
SiLU MLP; the same average-velocity parametrisation as the image student.
Analytic teachers have no weights, so this student starts from random
weights rather than from the teacher.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers import ModelMixin  # noqa: F401 - diffusers looks a component's base class up in its module
from torch import nn

from .student import (FlowMapStudent, StudentConfig, damaged, load_tensors, package_versions, placed, save_tensors_plain,
                      scheduler_model_output)

WEIGHTS = "model.safetensors"


class MlpFlowMap(FlowMapStudent):
    """``forward(x (B, D), s (B,), t (B,), cond=None) -> u (B, D)``.

    Saved as ``model.safetensors`` + ``ttfm_config.json`` (``backbone.config``: the sizes).
    """

    def __init__(self, dim: int = 2, width: int = 256, depth: int = 4, time_features: int = 16,
                 config: StudentConfig | None = None):
        super().__init__()
        self.mlp_config = {"dim": dim, "width": width, "depth": depth, "time_features": time_features}
        self.ttfm_config = config
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), time_features // 2)), persistent=False)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * time_features, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def _features(self, v: torch.Tensor) -> torch.Tensor:
        a = v.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        h = torch.cat([x, self._features(s), self._features(t - s)], dim=-1)
        return self.net(h)

    def diffusers_flow_map(self, sample, timestep, r_timestep, cond=None, num_train_timesteps: int = 1000):
        """The model output diffusers' ``FlowMapEulerDiscreteScheduler.step`` expects (see ``TwoTimeFlowMap``)."""
        return scheduler_model_output(self, sample, timestep, r_timestep, cond, num_train_timesteps)

    # ------------------------------------------------------------ format -------
    def student_config(self) -> StudentConfig:
        base = self.ttfm_config or StudentConfig(data_shape=[self.mlp_config["dim"]], kind="points")
        return base.replace(student_class="MlpFlowMap", backbone={"class_name": "MlpFlowMap", "config": self.mlp_config},
                            second_time={"input": "delta", "recipe": "fourier features of s and t - s"},
                            package_versions=package_versions())

    def save_pretrained(self, save_directory, config: StudentConfig | None = None) -> Path:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors_plain(folder / WEIGHTS, self.state_dict())
        (config or self.student_config()).save(folder)
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, device="cpu", torch_dtype=None, **kwargs) -> "MlpFlowMap":
        folder = Path(pretrained_model_name_or_path)
        config = StudentConfig.load(folder)
        try:
            model = cls(**config.backbone["config"], config=config)
            model.load_state_dict(load_tensors(folder / WEIGHTS), strict=True)
        except Exception as e:  # noqa: BLE001
            raise damaged(folder, e) from None
        return placed(model, device, torch_dtype or kwargs.get("dtype"))

    def for_export(self, lora_export: str = "merged", config: StudentConfig | None = None) -> "MlpFlowMap":
        if config is not None:
            self.ttfm_config = config
        return self
