import torch

from ttfm_distill import convention as C


def test_sigma_and_t_are_inverse_and_flip_direction():
    t = torch.rand(100)
    assert torch.allclose(C.t_from_sigma(C.sigma_from_t(t)), t)
    assert C.sigma_from_t(0.0) == 1.0 and C.sigma_from_t(1.0) == 0.0  # t = 0 is noise


def test_interpolant_matches_diffusers_forward_process():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    data, noise = torch.randn(4, 3), torch.randn(4, 3)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    ours = C.interpolate(noise, data, t)
    sigma = C.sigma_from_t(t)
    theirs = sched.scale_noise(data, sigma * 1000.0, noise) if False else sigma[:, None] * noise + (1 - sigma[:, None]) * data
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_velocity_sign_matches_diffusers_euler_step():
    """A diffusers Euler step with the model output must equal our Euler step with our velocity."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    data, noise = torch.randn(2, 5), torch.randn(2, 5)
    output = noise - data  # what a perfect diffusers flow model predicts
    x = noise.clone()
    x_next = sched.step(output, sched.timesteps[0], x).prev_sample
    sig0, sig1 = sched.sigmas[0], sched.sigmas[1]
    t0, t1 = C.t_from_sigma(sig0), C.t_from_sigma(sig1)
    ours = x + (t1 - t0) * C.velocity_from_diffusers(output)
    assert torch.allclose(x_next, ours, atol=1e-5)
    assert torch.allclose(C.velocity_from_diffusers(output), C.interpolant_velocity(noise, data))


def test_units_round_trip_and_scale():
    units = C.TimestepUnits(scale=1000.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    assert torch.allclose(units.model_timestep(t), torch.tensor([1000.0, 750.0, 0.0]))
    v = torch.randn(3, 2)
    assert torch.equal(units.velocity(units.output(v)), v)
    rev = C.TimestepUnits(scale=1.0, reversed=True)
    assert torch.allclose(rev.model_timestep(t), t)
    assert torch.equal(rev.velocity(v), v)


def test_shift_time_matches_diffusers_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    shift = 3.0
    sched = FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=1000)
    # diffusers shifts its unshifted training sigmas k / 1000; so must the package's time shift
    plain = torch.arange(1000, 0, -1, dtype=torch.float32) / 1000
    got = C.sigma_from_t(C.shift_time(C.t_from_sigma(plain), shift))
    assert torch.allclose(got, sched.sigmas.float(), atol=1e-6)
    sigmas = torch.linspace(1.0, 0.1, 7)
    assert torch.equal(C.shift_time(sigmas, 1.0), sigmas)


def test_diffusion_to_flow_change_of_variables_on_a_gaussian():
    """x = alpha*data + sigma*eps  ->  x / (alpha + sigma) is the linear path at t = alpha/(alpha+sigma)."""
    g = torch.Generator().manual_seed(0)
    data, eps = torch.randn(4000, 1, generator=g) * 0.5 + 2.0, torch.randn(4000, 1, generator=g)
    alpha, sigma = torch.tensor(0.6), torch.tensor(0.8)
    x = alpha * data + sigma * eps
    x_lin, t = C.diffusion_to_flow(x, alpha, sigma)
    assert torch.allclose(x_lin, C.interpolate(eps, data, t.expand(4000)), atol=1e-6)


def _exact_gaussian_diffusion_net(io, mean, std, prediction):
    """The exact network of a VP diffusion model for N(mean, std^2) data, on io's interpolated schedule."""

    def net(x, k):
        k = k.double()
        table = io.log_snr
        lo = k.floor().long().clamp(0, len(table) - 1)
        hi = (lo + 1).clamp(max=len(table) - 1)
        lam = table[lo] + (k - lo) * (table[hi] - table[lo])
        a = torch.sqrt(torch.sigmoid(lam))[:, None].float()
        s = torch.sqrt(torch.sigmoid(-lam))[:, None].float()
        var = a**2 * std**2 + s**2
        eps = s * (x - a * mean) / var
        data = mean + a * std**2 * (x - a * mean) / var
        return {"epsilon": eps, "v_prediction": a * eps - s * data, "sample": data}[prediction]

    return net


def test_diffusion_network_read_through_its_probability_flow_ode():
    """An exact epsilon / v / sample network of Gaussian data, converted, is the exact linear-path velocity."""
    import pytest
    from diffusers import DDPMScheduler

    from conftest import GaussianVelocity

    acp = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    mean, std = torch.tensor([1.5, -0.5]), 0.4
    exact = GaussianVelocity(mean.double(), std)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g)
    t = torch.rand(64, generator=g) * 0.9 + 0.05
    for prediction in ("epsilon", "v_prediction", "sample"):
        io = C.DiffusionIO(acp, prediction)
        net = _exact_gaussian_diffusion_net(io, mean, std, prediction)
        x_in, k = io.network_input(x, t)
        assert ((k >= 0) & (k <= 999)).all()
        v = io.velocity(net(x_in, k), x, t)
        torch.testing.assert_close(v.double(), exact.velocity(x.double(), t.double()), rtol=1e-3, atol=1e-3)
    assert io.t_min < 0.01 < 0.99 < io.t_max < 1
    with pytest.raises(ValueError, match="prediction_type"):
        C.DiffusionIO(acp, "flow")


def test_diffusion_timestep_follows_the_snr():
    from diffusers import DDPMScheduler

    acp = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    io = C.DiffusionIO(acp, "epsilon")
    k = torch.tensor([0, 250, 500, 999])
    snr = acp[k] / (1 - acp[k])
    t = torch.sqrt(snr) / (1 + torch.sqrt(snr))  # alpha/sigma = t/(1-t)
    torch.testing.assert_close(io.timestep(t).float(), k.float(), atol=1e-3, rtol=0)
    assert io.timestep(torch.tensor([0.0, 1.0])).tolist() == [999.0, 0.0]  # clamped at the schedule's ends
