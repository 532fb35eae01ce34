"""Distribution matching beside any objective (docs/method.md, "Distribution matching").

A second, "fake" velocity network ``v_F`` learns the flow of the *student's* own samples by flow
matching; the student's samples ``x^`` are then pushed along the difference between the teacher's
and the fake's predictions of the data end at a noised ``x^``, as DMD/DMD2 do with scores:

* noise ``x^`` at package time ``tau`` (0 = noise, 1 = data): ``x_tau = (1 - tau) z + tau x^``;
* data estimates ``x1_T = x_tau + (1 - tau) v_T(x_tau, tau)`` and ``x1_F`` likewise with ``v_F``
  (``convention.data_estimate``), both without gradient;
* the direction ``g = (x1_F - x1_T) / mean|x^ - x1_T|`` (per sample, DMD2's normalisation);
* the loss ``0.5 * |x^ - sg[x^ - g]|^2`` averaged per sample, whose gradient on ``x^`` is ``g``:
  a step moves ``x^`` towards the teacher's estimate and away from the fake's.

``x^`` is the student's 1-step jump from noise, or an ``n``-step rollout (gradient through its
``n`` forwards) for ``n`` in ``rollout_steps``, drawn per step.  The fake network's own loss is
flow matching on detached student samples, ``|v_F(x_tau, tau) - (x^ - z)|^2``, divided by the
square of the teacher output's gain (``NetworkIO.output_gain``: 1 for a flow network; for an
epsilon network this is its noise-prediction loss, which keeps the near-noise times from
dominating through the conversion's 158x gain).

Everything here is pure maths on tensors and callables; the trainer owns the fake network's
weights, optimiser and checkpoints (``ttfm_distill/fake.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..convention import broadcast_time, data_estimate, interpolate
from .base import flow_map, per_sample_mse

FAKE_TIME_SAMPLINGS = ("uniform", "logit_normal")


@dataclass(frozen=True)
class DmSettings:
    """The distribution-matching term's settings, as a resolved run holds them (RunConfig ``dm_*``)."""

    #: weight of the term beside the objective's loss; 0 = off
    weight: float = 0.0
    #: the fake network's learning rate; None: the student's
    fake_lr: float | None = None
    #: fake-network updates per student step (the run's default: 5, ``RunConfig.dm_fake_updates``)
    fake_updates: int = 5
    #: the term's noising times, uniform in [time_min, time_max] (package time: 0 noise, 1 data)
    time_min: float = 0.02
    time_max: float = 0.98
    #: how the fake network's flow-matching times are drawn
    fake_time: str = "uniform"
    #: student rollouts the term is applied to (one drawn per step): 1 = the jump from noise to data
    rollout_steps: tuple = (1,)
    #: the student step from which the term's gradient is applied (the fake network trains from step 0)
    start_step: int = 0
    #: rows of each step's batch that get a generated sample (the term's own batch)
    batch: int = 16
    #: the adversarial term (objectives/adversarial.py): the student's generator loss weight (0 = off) and the
    #: discriminator loss weight in the fake network's updates
    gan_weight: float = 0.0
    gan_fake_weight: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    @classmethod
    def from_run(cls, cfg) -> "DmSettings":
        """The settings a run config's ``dm_*`` fields hold (validated by ``RunConfig.check_dm``)."""
        return cls(weight=float(cfg.dm_weight), fake_lr=cfg.dm_fake_lr, fake_updates=int(cfg.dm_fake_updates),
                   time_min=float(cfg.dm_time_min), time_max=float(cfg.dm_time_max), fake_time=cfg.dm_fake_time,
                   rollout_steps=tuple(int(k) for k in cfg.dm_rollout_steps), start_step=int(cfg.dm_start_step),
                   batch=int(cfg.dm_batch), gan_weight=float(cfg.dm_gan_weight),
                   gan_fake_weight=float(cfg.dm_gan_fake_weight))


def draw_times(n: int, lo: float, hi: float, mode: str, generator: torch.Generator) -> torch.Tensor:
    """``n`` package times in ``[lo, hi]``: uniform, or a standard logit-normal squeezed into the range."""
    u = torch.rand(n, generator=generator) if mode == "uniform" else torch.sigmoid(torch.randn(n, generator=generator))
    return lo + (hi - lo) * u


def rollout(student, z: torch.Tensor, steps: int, cond: dict | None) -> torch.Tensor:
    """The student's ``steps``-jump sample from noise ``z`` on the uniform grid, with gradients."""
    x = z
    edges = torch.linspace(0.0, 1.0, steps + 1, device=z.device)
    for a, b in zip(edges[:-1], edges[1:]):
        s = torch.full((z.shape[0],), float(a), device=z.device)
        t = torch.full((z.shape[0],), float(b), device=z.device)
        x = flow_map(student, x, s, t, cond)
    return x


def dm_direction(x_hat: torch.Tensor, x1_teacher: torch.Tensor, x1_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised direction ``(x1_F - x1_T) / mean|x^ - x1_T|`` (per sample; non-finite -> 0)."""
    scale = (x_hat.detach() - x1_teacher).abs().float().flatten(1).mean(1).clamp_min(1e-6)
    g = (x1_fake - x1_teacher).float() / broadcast_time(scale, x1_fake)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def dm_loss(x_hat: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``(B,)``: ``0.5 * mean |x^ - sg[x^ - g]|^2``, whose gradient on ``x^`` is ``g / numel`` per sample."""
    return 0.5 * per_sample_mse(x_hat, (x_hat - direction.to(x_hat.dtype)).detach())


def fake_flow_matching_loss(fake_velocity: torch.Tensor, target: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``(B,)``: the fake network's velocity error divided by the squared output gain (at least 1)."""
    w = 1.0 / gain.clamp_min(1.0).pow(2)
    return per_sample_mse(fake_velocity, target) * w.to(fake_velocity.device, torch.float32)


class DistributionMatching:
    """The term's two losses for one step; ``teacher`` and ``fake`` are velocity fields in package time."""

    def __init__(self, settings: DmSettings):
        self.settings = settings

    def student_sample(self, student, z: torch.Tensor, cond: dict | None, generator: torch.Generator
                       ) -> tuple[torch.Tensor, int]:
        """The student's sample (with gradients) and the rollout's step count, drawn from ``rollout_steps``."""
        options = self.settings.rollout_steps
        k = int(options[int(torch.randint(0, len(options), (1,), generator=generator))]) if len(options) > 1 \
            else int(options[0])
        return rollout(student, z, k, cond), k

    def student_loss(self, x_hat: torch.Tensor, teacher_velocity, fake_velocity, cond: dict | None,
                     fake_cond: dict | None, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The student's loss on its samples ``x_hat`` (scalar) and the term's metrics."""
        st = self.settings
        n = x_hat.shape[0]
        tau = draw_times(n, st.time_min, st.time_max, "uniform", generator).to(x_hat.device)
        z = torch.randn(x_hat.shape, generator=generator).to(x_hat.device, x_hat.dtype)
        with torch.no_grad():
            x_tau = interpolate(z, x_hat.detach(), tau)
            x1_t = data_estimate(x_tau, tau, teacher_velocity(x_tau, tau, cond))
            x1_f = data_estimate(x_tau, tau, fake_velocity(x_tau, tau, fake_cond))
            g = dm_direction(x_hat, x1_t, x1_f)
        per = dm_loss(x_hat, g)
        return per.mean(), {"dm_loss": per.mean().item(), "dm_direction": g.abs().mean().item()}

    def fake_loss(self, fake_velocity, x_hat: torch.Tensor, gain_fn, cond: dict | None,
                  generator: torch.Generator) -> torch.Tensor:
        """The fake network's flow-matching loss on detached student samples ``x_hat`` (scalar)."""
        tau, x_tau, target = self.fake_noising(x_hat, generator)
        per = fake_flow_matching_loss(fake_velocity(x_tau, tau, cond), target, gain_fn(tau))
        return per.mean()

    def fake_noising(self, x_hat: torch.Tensor, generator: torch.Generator) -> tuple:
        """``(tau, x_tau, target)``: the fake network's training points on detached samples ``x_hat``, its times
        drawn from ``fake_time``, then the noise, and the flow-matching target ``x_hat - z``."""
        tau = draw_times(x_hat.shape[0], 0.0, 1.0, self.settings.fake_time, generator).to(x_hat.device)
        z = torch.randn(x_hat.shape, generator=generator).to(x_hat.device, x_hat.dtype)
        x1 = x_hat.detach()
        return tau, interpolate(z, x1, tau), x1 - z
