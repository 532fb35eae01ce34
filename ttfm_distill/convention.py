"""The one place that knows how time and velocity are written.

Inside ttfm-distill time runs from noise to data (docs/method.md, Time convention):

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
from .errors import InputError

#: Name recorded in exported configs.
TIME_CONVENTION = "t0_noise_t1_data_linear"


def sigma_from_t(t: torch.Tensor | float) -> torch.Tensor | float:
    """diffusers' sigma (1 = noise) for package time ``t`` (0 = noise)."""
    return 1.0 - t


def t_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """Package time ``t`` for diffusers' sigma; the inverse of :func:`sigma_from_t`."""
    return 1.0 - sigma


def t_from_scheduler_timestep(timestep, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Package time for a flow-matching scheduler's timestep (``sigma * num_train_timesteps``), float64."""
    return t_from_sigma(torch.as_tensor(timestep, dtype=torch.float64) / num_train_timesteps)


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


def data_estimate(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The data end ``x1`` a velocity field predicts from ``x_t`` at package time ``t``: ``x_t + (1 - t) * v``."""
    return x_t + broadcast_time(1.0 - t, x_t) * velocity


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
    at ``t = alpha / (alpha + sigma)`` (docs/teachers.md, Diffusion teachers).  Returns
    ``(x_lin, t)``.
    """
    denom = alpha + sigma
    return x / broadcast_time(denom, x), alpha / denom


class NetworkIO:
    """How a network's input and output relate to the package path, for flow-matching networks.

    ``network_input(x, t)`` gives the network's ``(sample, timestep)`` for a
    point ``x`` of the linear path at package time ``t``; ``velocity(out, x, t)``
    turns the network's output there into the package velocity ``x1 - x0``.
    """

    prediction_type = "flow"
    #: the network was trained on a discrete timestep schedule (``timestep_grid`` gives its grid)
    discrete_timesteps = False

    def __init__(self, units: TimestepUnits):
        self.units = units

    def network_input(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.units.model_timestep(t.to(x.dtype))

    def velocity(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.units.velocity(out)

    def output_gain(self, t: torch.Tensor) -> torch.Tensor:
        """``|d velocity / d output|`` at package time ``t`` (``(B,)``, float64): 1 for a flow network."""
        return torch.ones_like(t, dtype=torch.float64)

    def describe(self) -> dict:
        return {"prediction_type": "flow", "timestep_scale": self.units.scale, "reversed_time": self.units.reversed}


DIFFUSION_PREDICTIONS = ("epsilon", "v_prediction", "sample")


class DiffusionIO(NetworkIO):
    """A diffusion network (``x = alpha * data + sigma * eps``, variance preserving) seen on the linear path.

    Its probability-flow ODE is the linear path's ODE after the change of
    variables of :func:`diffusion_to_flow` (docs/teachers.md, Diffusion teachers): at package time
    ``t`` the signal-to-noise ratio is ``alpha / sigma = t / (1 - t)``.  The
    discrete schedule ``alphas_cumprod`` (index ``k``, the network's timestep)
    is interpolated in log-SNR, so the network sees fractional timesteps.
    Times beyond the schedule's ends (``t_min``, ``t_max``) are read at the
    nearest end: the network was never trained outside it.

    ``clip_sample``: the scheduler's ``clip_sample_range`` when its
    ``clip_sample`` is on (else ``None``).  The data estimate inside the
    velocity is then clamped to ``[-clip_sample, clip_sample]``, as diffusers'
    DDPM/DDIM schedulers clamp their predicted original sample; the noise
    estimate is left as the network made it.  Where the clamp does not act an
    Euler step on the linear path is exactly a DDIM step; where it acts it is
    not: DDIM re-mixes the clamped data estimate with the noise estimate
    (``x' = alpha' * data_c + sigma' * eps``), which moves the state by
    ``t * (data_c - data)`` beyond any velocity field's step (measured in
    docs/second-teacher.md: the field here gave the better FD).  Teacher and student read their
    output through the same clamp, so the student still equals the teacher at
    initialisation.
    """

    discrete_timesteps = True

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 clip_sample: float | None = None):
        if prediction_type not in DIFFUSION_PREDICTIONS:
            raise InputError(f"prediction_type must be one of {DIFFUSION_PREDICTIONS}, got {prediction_type!r}")
        if clip_sample is not None and not float(clip_sample) > 0:
            raise InputError(f"clip_sample must be a positive range or None, got {clip_sample!r}")
        self.clip_sample = None if clip_sample is None else float(clip_sample)
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(1e-10, 1 - 1e-10)
        self.prediction_type = prediction_type
        self.log_snr = torch.log(acp) - torch.log1p(-acp)  # decreasing in k
        if not bool((self.log_snr[1:] <= self.log_snr[:-1]).all()):
            raise InputError("alphas_cumprod must decrease with the timestep")
        self.units = TimestepUnits(scale=float(len(acp)))
        self.t_min = float(self._t_of_log_snr(self.log_snr[-1]))
        self.t_max = float(self._t_of_log_snr(self.log_snr[0]))

    @staticmethod
    def _t_of_log_snr(lam: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(lam / 2)  # alpha/sigma = t/(1-t) and SNR = (alpha/sigma)^2

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Fractional network timestep ``k`` whose log-SNR is that of package time ``t`` (clamped)."""
        t = t.double().clamp(self.t_min, self.t_max)
        lam = 2 * (torch.log(t) - torch.log1p(-t))
        table = self.log_snr.to(t.device)
        rev = table.flip(0)  # increasing
        idx = torch.searchsorted(rev, lam).clamp(1, len(rev) - 1)
        lo, hi = rev[idx - 1], rev[idx]
        frac = ((lam - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
        k_rev = (idx - 1).double() + frac
        return (len(rev) - 1) - k_rev

    def t_of_timestep(self, k: torch.Tensor) -> torch.Tensor:
        """Package time of the (fractional) network timestep ``k`` (log-SNR interpolated), float64.

        The inverse of :meth:`timestep` inside ``[t_min, t_max]``: a scheduler's discrete timesteps as package times.
        """
        k = torch.as_tensor(k, dtype=torch.float64).clamp(0, len(self.log_snr) - 1)
        lo = k.floor().long().clamp(max=len(self.log_snr) - 2)
        frac = k - lo.double()
        lam = self.log_snr[lo] * (1 - frac) + self.log_snr[lo + 1] * frac
        return self._t_of_log_snr(lam)

    def timestep_grid(self, steps: int) -> torch.Tensor:
        """``steps + 1`` package times, 0 to 1, uniform in the network's timesteps (float64; sampling.time_grid).

        The timesteps ``k_j = K (1 - j / steps) - 1`` for ``j < steps`` (DDIM's "trailing" spacing, unrounded)
        read as package times, then the data end ``t = 1``; the first point is the noise end ``t = 0``, which the
        network reads at its last timestep ``K - 1`` (the clamp to ``t_min``).
        """
        n = len(self.log_snr)
        k = n * (1.0 - torch.arange(steps, dtype=torch.float64) / steps) - 1
        one = torch.ones(1, dtype=torch.float64)
        return torch.cat([0 * one, self.t_of_timestep(k[1:]), one])

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` with ``alpha^2 + sigma^2 = 1`` and ``alpha / sigma = t / (1 - t)`` (clamped ``t``)."""
        t = t.double().clamp(self.t_min, self.t_max)
        norm = torch.sqrt(t**2 + (1 - t) ** 2)
        return t / norm, (1 - t) / norm

    def network_input(self, x, t):
        alpha, sigma = self.alpha_sigma(t)
        x_diff = x * broadcast_time((alpha + sigma).to(x.dtype), x)
        return x_diff, self.timestep(t).to(x.dtype)

    def velocity(self, out, x, t):
        alpha, sigma = self.alpha_sigma(t)
        a, s = broadcast_time(alpha.to(x.dtype), x), broadcast_time(sigma.to(x.dtype), x)
        x_diff = x * (a + s)
        data_hat, eps_hat = denoiser_estimates(x_diff, out, a, s, self.prediction_type)
        if self.clip_sample is not None:
            data_hat = data_hat.clamp(-self.clip_sample, self.clip_sample)
        return data_hat - eps_hat

    def output_gain(self, t: torch.Tensor) -> torch.Tensor:
        """``|d velocity / d output|`` per unit of network output at package time ``t`` (unclamped, float64).

        ``epsilon``: ``(alpha + sigma) / alpha`` (158.4 at the noise end of a linear-beta DDPM schedule);
        ``sample``: ``(alpha + sigma) / sigma``; ``v_prediction``: ``alpha + sigma`` (at most sqrt(2)).
        """
        alpha, sigma = self.alpha_sigma(t)
        if self.prediction_type == "epsilon":
            return (alpha + sigma) / alpha
        if self.prediction_type == "sample":
            return (alpha + sigma) / sigma
        return alpha + sigma

    def describe(self) -> dict:
        return {"prediction_type": self.prediction_type, "timesteps": len(self.log_snr),
                "t_min": round(self.t_min, 5), "t_max": round(self.t_max, 5), "clip_sample": self.clip_sample}


def denoiser_estimates(x: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                       prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(data_hat, eps_hat)`` from a VP diffusion network's output at ``x = alpha*data + sigma*eps``.

    On the linear path ``x_lin = t * data + (1 - t) * eps`` the velocity is
    ``data_hat - eps_hat`` (the posterior means are shared by both paths).
    """
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha, out
    if prediction_type == "v_prediction":  # v = alpha * eps - sigma * data
        return alpha * x - sigma * out, sigma * x + alpha * out
    if prediction_type == "sample":
        return out, (x - alpha * out) / sigma
    raise InputError(f"unknown prediction_type {prediction_type!r}")


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


def dynamic_shift(image_tokens: int, scheduler_config: dict) -> float:
    """The static ``shift`` equal to a dynamically shifted scheduler's at ``image_tokens`` tokens (Flux).

    diffusers computes ``mu`` linearly in the token count between
    ``(base_image_seq_len, base_shift)`` and ``(max_image_seq_len, max_shift)``
    and warps ``sigma' = e^mu / (e^mu + 1/sigma - 1)`` ("exponential") or
    ``mu / (mu + 1/sigma - 1)`` ("linear"): :func:`shift_time` with
    ``shift = e^mu`` (or ``mu``).
    """
    import math

    cfg = scheduler_config
    base_len, max_len = float(cfg.get("base_image_seq_len", 256)), float(cfg.get("max_image_seq_len", 4096))
    base, top = float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15))
    mu = base + (top - base) * (image_tokens - base_len) / (max_len - base_len)
    return math.exp(mu) if cfg.get("time_shift_type", "exponential") == "exponential" else mu
