"""The adversarial term beside distribution matching (docs/method.md, "The adversarial term").

A small discriminator head reads the fake velocity network's middle features (objectives/dm.py's
"fake" network, ``fake.FeatureTap``) at noised samples and tells the batch's data rows (real images
with ``--data``; the teacher's own pool samples without) from the student's samples, as DMD2 does:

* both are noised the same way as the distribution-matching term's samples: ``x_tau = (1 - tau) z + tau x``
  with ``tau`` uniform in the term's time range (package time: 0 noise, 1 data);
* the head pools the features over space or tokens and maps them to one logit;
* the fake network's update adds the non-saturating discriminator loss
  ``softplus(-D(real)) + softplus(D(student))`` (weight ``gan_fake_weight``; its gradient reaches the
  fake network's layers under the tap as well as the head);
* the student gets the generator loss ``softplus(-D(student))`` (weight ``gan_weight``), whose gradient on
  its samples is taken through the fake network without touching the fake network's own gradients.

Everything here is pure maths on tensors; the trainer owns the head (inside the fake network's state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: width of the head's hidden layer
HEAD_HIDDEN = 256


def pool_features(features: torch.Tensor) -> torch.Tensor:
    """``(B, C)``: a feature map ``(B, C, H, W)`` averaged over space, tokens ``(B, N, C)`` over tokens, ``(B, C)``
    as it is."""
    if features.ndim == 4:
        return features.float().mean(dim=(2, 3))
    if features.ndim == 3:
        return features.float().mean(dim=1)
    if features.ndim == 2:
        return features.float()
    raise ValueError(f"cannot pool features of shape {tuple(features.shape)}")


class DiscriminatorHead(nn.Module):
    """Pooled features -> one logit (real: positive)."""

    def __init__(self, channels: int, hidden: int = HEAD_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = pool_features(features)
        return self.net(pooled.to(self.net[0].weight.dtype)).squeeze(-1).float()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating discriminator loss (scalar): real rows pushed up, the student's down."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The student's non-saturating generator loss (scalar): its samples made to look real."""
    return F.softplus(-fake_logits).mean()


def through(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient on ``x`` is ``grad`` (detached): how a gradient taken elsewhere reaches the student."""
    return (x.float() * grad.detach().float()).sum()
