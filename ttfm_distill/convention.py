"""The one place that knows how time and velocity are written.

Inside ttfm-distill time runs from noise to data (MATH.md section 1):

* ``t = 0`` is noise, ``t = 1`` is data;
* ``x_t = (1 - t) * x0 + t * x1`` with ``x0`` noise and ``x1`` data;
* the velocity is ``v = d x_t / dt = x1 - x0``.

diffusers' flow-matching models and schedulers use ``sigma`` with ``sigma = 1``
as noise (``x = sigma * noise + (1 - sigma) * data``) and predict
``noise - data``.  Their timesteps are ``sigma`` in some unit (``sigma * 1000``
for most families).  Every conversion between the two lives here; no other
module flips a sign or rescales a timestep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Name recorded in exported configs.
TIME_CONVENTION = "t0_noise_t1_data_linear"


def sigma_from_t(t: torch.Tensor | float) -> torch.Tensor | float:
    """diffusers' sigma (1 = noise) for package time ``t`` (0 = noise)."""
    return 1.0 - t


def t_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """Package time ``t`` for diffusers' sigma; the inverse of :func:`sigma_from_t`."""
    return 1.0 - sigma


def velocity_from_diffusers(output: torch.Tensor) -> torch.Tensor:
    """Package velocity ``x1 - x0`` from a diffusers flow output ``noise - data``."""
    return -output


def diffusers_from_velocity(velocity: torch.Tensor) -> torch.Tensor:
    """diffusers flow output (``noise - data``) for a package velocity."""
    return -velocity


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Point of the linear interpolant at time ``t``.

    ``x0``: noise, ``x1``: data, both ``(B, *shape)``; ``t``: ``(B,)``.
    """
    tb = broadcast_time(t, x0)
    return (1.0 - tb) * x0 + tb * x1


def interpolant_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """``d x_t / dt`` of the linear interpolant: ``x1 - x0``."""
    return x1 - x0


def broadcast_time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Reshape a ``(B,)`` (or scalar) time so it broadcasts against ``like``."""
    if torch.is_tensor(t) and t.dtype == torch.bool:
        t = t.to(like.device)
    else:
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class TimestepUnits:
    """How a diffusers network expects its timestep argument.

    ``scale``: the network's timestep is ``scale * sigma`` (``1000`` for most
    families, ``1`` for Flux which multiplies inside).  ``reversed``: the
    family counts ``1 = clean`` (Lumina2), so its timestep is ``scale * t``
    and its output is ``data - noise``.
    """

    scale: float = 1000.0
    reversed: bool = False

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Network timestep for package time ``t`` (``(B,)``)."""
        return self.scale * (t if self.reversed else sigma_from_t(t))

    def model_duration(self, dt: torch.Tensor) -> torch.Tensor:
        """A time *difference* ``dt = t - s`` in the network's units (always >= 0)."""
        return self.scale * dt

    def velocity(self, output: torch.Tensor) -> torch.Tensor:
        """Package velocity from the network's raw output."""
        return output if self.reversed else velocity_from_diffusers(output)

    def output(self, velocity: torch.Tensor) -> torch.Tensor:
        """The network's raw output that means package velocity ``velocity``."""
        return velocity if self.reversed else diffusers_from_velocity(velocity)


def flow_matching_training_pair(
    x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, units: TimestepUnits
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a diffusers flow model is trained on at package time ``t``.

    Returns ``(x_t, model_timestep, model_target)`` in the network's own
    convention, used to train teachers in the diffusers format.
    """
    x_t = interpolate(noise, x1, t)
    return x_t, units.model_timestep(t), units.output(interpolant_velocity(noise, x1))


def diffusion_to_flow(
    x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Change of variables from a diffusion state to the linear path.

    ``x = alpha * data + sigma * eps`` becomes ``x_lin = x / (alpha + sigma)``
    at ``t = alpha / (alpha + sigma)`` (MATH.md section 1).  Returns
    ``(x_lin, t)``.
    """
    denom = alpha + sigma
    return x / broadcast_time(denom, x), alpha / denom


def flow_to_diffusion(
    x_lin: torch.Tensor, t: torch.Tensor, alpha_of_ratio
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`diffusion_to_flow` for a schedule given as a callable.

    ``alpha_of_ratio(r)`` returns ``(alpha, sigma)`` with ``sigma / alpha = r``.
    Returns ``(x, alpha, sigma)``.
    """
    ratio = (1.0 - t) / t.clamp_min(1e-12)
    alpha, sigma = alpha_of_ratio(ratio)
    return x_lin * broadcast_time(alpha + sigma, x_lin), alpha, sigma


def velocity_from_denoiser(
    x_lin: torch.Tensor, t: torch.Tensor, data_hat: torch.Tensor, eps_hat: torch.Tensor
) -> torch.Tensor:
    """Velocity of the linear path from a diffusion model's data/noise estimates.

    On the linear path ``x_lin = t * data + (1 - t) * eps``, so its
    velocity is ``data - eps`` given the (posterior mean) estimates.
    """
    del x_lin, t
    return data_hat - eps_hat


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Apply a diffusers scheduler ``shift`` (defined on sigma) to package times.

    diffusers warps ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``;
    ``shift = 1`` is the identity.  Used to build the sampling grid of
    teachers trained with a shift.
    """
    if shift == 1.0:
        return t
    sigma = sigma_from_t(t)
    return t_from_sigma(shift * sigma / (1.0 + (shift - 1.0) * sigma))
