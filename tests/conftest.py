import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
#: under pytest-xdist (pyproject's addopts: a worker a core) every worker and the subprocesses it starts use one
#: thread: two workers of two threads each on two cores run several times slower than one thread each
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import pytest
import torch

if XDIST_WORKER:
    torch.set_num_threads(1)

from ttfm_distill.student import FlowMapStudent  # noqa: E402 - the test doubles are real students and teachers
from ttfm_distill.teachers.base import Teacher  # noqa: E402


def tiny_unet(sample_size=8, channels=(8, 16), in_channels=1):
    from diffusers import UNet2DModel

    n = len(channels)
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=channels,
        down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
        layers_per_block=1, norm_num_groups=4,
    )


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny random UNet2DModel flow teacher folder (unet/ + scheduler/)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    net = tiny_unet()
    # non-trivial output scale so the tests see real velocities
    with torch.no_grad():
        net.conv_out.weight.mul_(20.0)
    net.save_pretrained(root / "unet")
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(root / "scheduler")
    return root


class ExactGaussianMap(FlowMapStudent):
    """The exact average velocity of the Gaussian-to-Gaussian flow: a 'perfect student'."""

    def __init__(self, mean, std, sigma0=1.0, error=0.0):
        super().__init__()
        self.mean, self.std, self.sigma0, self.error = mean, std, sigma0, error
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 * self.sigma0**2 + t**2 * self.std**2)

    def forward(self, x, s, t, cond=None):
        s_, t_ = s[:, None], t[:, None]
        ss, st = self.sigma(s_), self.sigma(t_)
        gap = (t_ - s_)
        # phi = t m + st/ss (x - s m); u = (phi - x)/(t - s); at t == s use the derivative
        dsig = (-(1 - s_) * self.sigma0**2 + s_ * self.std**2) / ss
        v = self.mean + dsig / ss * (x - s_ * self.mean)
        safe = torch.where(gap > 0, gap, torch.ones_like(gap))
        phi = t_ * self.mean + st / ss * (x - s_ * self.mean)
        u = torch.where(gap > 0, (phi - x) / safe, v)
        return u + self.error * torch.sin(3 * x) * gap + 0 * self.dummy


class GaussianVelocity(Teacher):
    """Exact teacher for N(mean, std^2 I) data: v(x, t) = u_exact(x, t, t)."""

    def __init__(self, mean, std, sigma0=1.0):
        super().__init__()
        self.exact = ExactGaussianMap(mean, std, sigma0)
        self.sigma0 = sigma0
        self.data_shape = tuple(mean.shape)

    def velocity(self, x, t, cond=None):
        return self.exact(x, t, t)

    def sample_noise(self, n, generator=None, device=None):
        return self.sigma0 * torch.randn((n, *self.data_shape), generator=generator)


@pytest.fixture
def gaussian_case():
    mean = torch.tensor([1.5, -0.5], dtype=torch.float64)
    teacher = GaussianVelocity(mean, 0.4)
    return teacher, ExactGaussianMap(mean, 0.4)


def make_pair_batch(n=512, seed=0, diag=0.25, mode="uniform"):
    """A float64 batch of 2-D points with (s, t) pairs drawn like training draws them."""
    from ttfm_distill.objectives import TrainBatch
    from ttfm_distill.objectives.timesampling import sample_time_pairs

    g = torch.Generator().manual_seed(seed)
    s, t = sample_time_pairs(n, mode, diag, generator=g)
    s, t = s.double(), t.double()
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * 1.3
    return TrainBatch(x, s, t, None, g)


# ---------------------------------------------------------------- fixtures of both layers -------------------------
# module-scoped fixtures that a unit and an integration file of the same name both use (once per file)
@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from helpers import StandInInception

    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.script(StandInInception()).save(str(path))
    return path


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from tiny_models import tiny_sd3_pipeline

    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "pipe")


@pytest.fixture(scope="module")
def ddpm_teacher_dir(tmp_path_factory):
    """A tiny random epsilon UNet with diffusers' DDPMScheduler (linear betas, clip_sample on)."""
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("ddpm")
    torch.manual_seed(0)
    tiny_unet().save_pretrained(root / "unet")
    DDPMScheduler(beta_schedule="linear", clip_sample=True).save_pretrained(root / "scheduler")
    return root


# ---------------------------------------------------------------- layers -------------------------------------------
# Two layers, one folder each: tests/unit holds the fast tests of the maths and modules, tests/integration the tests
# that go through the real entry point (the CLI in a subprocess), the whole trainer, or several processes.  The
# marker comes from the folder: `pytest -m "not slow"` (or "not integration", or `pytest tests/unit`) is the quick
# check; CI runs both.  Helpers both layers use are in helpers.py (and the fixtures above).
TESTS = Path(__file__).resolve().parent
UNIT, INTEGRATION = TESTS / "unit", TESTS / "integration"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Every test starts with the session's torch thread count and leaves it as it found it: a test that pins
    one thread (for a timing or a bit-for-bit comparison) cannot leak it into the tests after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(item.path).resolve()
        if path.is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)  # so `-m "not slow"` is the quick check too
        elif path.is_relative_to(UNIT):
            item.add_marker(pytest.mark.unit)
