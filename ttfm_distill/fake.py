"""The distribution-matching term's "fake" velocity network (objectives/dm.py).

For a diffusers teacher it starts as an exact, trainable copy of the teacher's network, read
through the teacher's own input/output conversion (``NetworkIO``), so at step 0 ``v_F == v_T``
(unguided). It models the student's conditional distribution, so it never applies guidance:
``cond["cfg_scale"]`` is dropped. An exact (2-D) teacher has no network to copy; its fake is a
fresh MLP read at ``s == t`` (an instantaneous velocity).

It is run state like the student: its weights and optimiser are in every checkpoint
(``fake.safetensors``, ``fake_optimizer.pt``) and never in an export.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from .convention import interpolate
from .objectives.adversarial import generator_loss, through
from .objectives.dm import draw_times
from .teachers.base import Teacher


class FakeVelocity(nn.Module):
    """``velocity(x, t, cond)`` of a trainable network in package time (0 = noise)."""

    def __init__(self, network: nn.Module, io=None, adapter=None, null_text: dict | None = None):
        super().__init__()
        self.network = network
        self.io, self.adapter, self.null_text = io, adapter, null_text
        #: the adversarial term's discriminator head and the tap it reads (:meth:`attach_discriminator`), or None
        self.head: nn.Module | None = None
        self.tap: FeatureTap | None = None

    @classmethod
    def from_teacher(cls, teacher: Teacher, mlp_width: int = 256, mlp_depth: int = 4,
                     exact: str = "residual", student=None, seed: int = 0) -> "FakeVelocity":
        """The fake network of ``teacher`` as ``student`` holds it (``FlowMapStudent.fake_network``; None: as a
        full student does): a trainable copy of its network, for a LoRA student a second set of adapters on the
        shared base (``lora.FakeAdapters``, drawn from ``seed``), or for an exact teacher (no network)
        ``exact="residual"``, its velocity plus a zero-started MLP (:class:`ExactResidual`), or ``"mlp"``, an MLP
        from random weights."""
        network = teacher.trainable_copy() if student is None else student.fake_network(teacher, seed)
        if network is None:  # an exact teacher: nothing to copy
            from .mlp import MlpFlowMap

            mlp = MlpFlowMap(dim=teacher.data_shape[0], width=mlp_width, depth=mlp_depth)
            return cls(mlp if exact == "mlp" else ExactResidual(teacher.velocity, mlp))
        return cls(network, teacher.io, teacher.adapter, teacher.null_text)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        cond = {k: v for k, v in (cond or {}).items() if k != "cfg_scale"} or None
        if self.io is None:  # the MLP: its average velocity at s == t
            return self.network(x, t, t, cond)
        null = {k: v.to(x.device, x.dtype) for k, v in self.null_text.items()} if self.null_text else None
        full = self.adapter.complete_cond(self.network, cond, x.shape[0], x.device, x.dtype, null_text=null)
        x_in, timestep = self.io.network_input(x, t)
        return self.io.velocity(self.adapter.call(self.network, x_in, timestep, full), x, t)

    def attach_discriminator(self, example: torch.Tensor, seed: int = 0) -> None:
        """Give the network a discriminator head on its middle features (:func:`feature_module`), sized by one
        forward of ``example`` (noise of the teacher's shape, on the network's device) and initialised from
        ``seed`` without touching torch's global random state."""
        from .errors import InputError
        from .objectives.adversarial import DiscriminatorHead, pool_features

        if self.io is None:
            raise InputError("the adversarial term needs a teacher network to read features from; an exact 2-D "
                             "teacher has none: set dm_gan_weight=0")
        self.tap = FeatureTap(feature_module(self.network))
        with torch.no_grad():
            self(example, torch.full((example.shape[0],), 0.5, device=example.device))
        channels = pool_features(self.tap.take()).shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = DiscriminatorHead(channels).to(example.device)

    def discriminate(self) -> torch.Tensor:
        """``(B,)`` logits of the head on the features of the network's last forward (real: positive)."""
        return self.head(self.tap.take())

    def time_embedders(self) -> list[nn.Module]:
        """The copied network's timestep embedders (kept fp32 in bf16 runs); none for the MLP."""
        return list(self.adapter.time_embedders(self.network)) if self.adapter is not None else []

    def output_gain(self, t: torch.Tensor) -> torch.Tensor:
        """``|d velocity / d output|`` of the network's conversion (1 for flow networks and the MLP)."""
        return torch.ones_like(t, dtype=torch.float64) if self.io is None else self.io.output_gain(t)


class ExactResidual(nn.Module):
    """An exact teacher's velocity plus a trainable MLP residual whose last layer starts at zero: at step 0 it is
    the teacher, as a copied network is, and training fits only the student's difference (a fresh MLP's fitting
    error would enter the term's gradient whole). Read as the MLP is, ``forward(x, t, t)``; its state is the MLP's."""

    def __init__(self, velocity, mlp: nn.Module):
        super().__init__()
        self.velocity, self.mlp = velocity, mlp
        last = mlp.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        with torch.no_grad():
            exact = self.velocity(x, t).to(x.dtype)
        return exact + self.mlp(x, s, t, cond)


def feature_module(network: nn.Module) -> nn.Module:
    """The module whose output the discriminator head reads: a diffusers UNet's ``mid_block``, else the middle
    block of the network's largest block list (a transformer's ``transformer_blocks``)."""
    from .errors import InputError

    mid = getattr(network, "mid_block", None)  # (a diffusers attribute, None when the config has no mid block)
    if isinstance(mid, nn.Module):
        return mid
    lists = [m for m in network.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise InputError(f"no middle block found in {type(network).__name__} for the discriminator head; set "
                         "dm_gan_weight=0")
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return blocks[len(blocks) // 2]


class FeatureTap:
    """Keeps the output of one module's last forward (the largest tensor of a tuple output)."""

    def __init__(self, module: nn.Module):
        self.features: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self.keep)

    def keep(self, module, args, output) -> None:
        tensors = [o for o in (output if isinstance(output, (tuple, list)) else (output,)) if torch.is_tensor(o)]
        self.features = max(tensors, key=lambda o: o.numel())

    def take(self) -> torch.Tensor:
        """The features kept, handed over once (a second take without a forward between is a bug)."""
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("no features: the tapped module did not run since the last take")
        return features


def copy_network(network: nn.Module) -> nn.Module:
    """A trainable deep copy of a frozen network."""
    return copy.deepcopy(network).train().requires_grad_(True)


class DmTerm:
    """The distribution-matching term of one run: the fake network, its optimiser and the two updates of a step.

    ``student_step`` adds the term's gradient to the student's (from ``start_step`` on) and returns the
    detached samples; ``fake_step`` trains the fake network on them. Every draw comes from the step's
    generator, after the objective's, so a resumed run repeats them exactly.
    """

    def __init__(self, settings, teacher, fake: FakeVelocity, optimizer, accelerator, grad_clip: float,
                 stage: Callable[[], int | None] = lambda: None):
        from .objectives.dm import DistributionMatching

        self.settings, self.teacher, self.fake, self.optimizer = settings, teacher, fake, optimizer
        self.accelerator, self.grad_clip = accelerator, grad_clip
        #: the first step of a distribution-matching stage (``RunConfig.dm_stage_start``), None: every step; read
        #: when asked, as a time budget may fit the run's step count after the term is made
        self.stage = stage
        self.maths = DistributionMatching(settings)
        #: the fake network as the step calls it (DDP-wrapped under several processes, sharded under FSDP)
        self.wrapped = fake
        #: whether it is sharded like the student (FSDP): its state is then gathered and scattered collectively
        from . import scale

        self.sharded = scale.is_sharded(accelerator)

    @classmethod
    def for_run(cls, cfg, state, teacher: Teacher, device, accelerator, student=None) -> "DmTerm":
        """The run's term (``state``: the run's ``runstate.RunState``, whose step count places a stage): the fake
        network as ``student``'s kind holds it (a copy of the teacher's network, made before the teacher is held in
        the training precision; a LoRA student's: adapters on the shared base), its time embedders kept fp32 in a
        mixed-precision run, and its own AdamW."""
        from . import scale
        from .objectives.dm import DmSettings

        settings = DmSettings.from_run(cfg)
        fake = FakeVelocity.from_teacher(teacher, cfg.mlp_width, cfg.mlp_depth, cfg.dm_exact_fake, student,
                                         seed=cfg.seed).to(device)
        if settings.gan_weight > 0:
            fake.attach_discriminator(teacher.sample_noise(2, generator=torch.Generator().manual_seed(0)).to(device),
                                      seed=cfg.seed)
        if cfg.mixed_precision != "no":
            scale.keep_time_embedders_fp32(fake)
        optimizer = torch.optim.AdamW(fake.parameters(), lr=settings.fake_lr or cfg.lr, weight_decay=cfg.weight_decay)
        return cls(settings, teacher, fake, optimizer, accelerator, cfg.grad_clip,
                   lambda: cfg.dm_stage_start(state.total_steps))

    def runs_at(self, step: int) -> bool:
        """Whether the term works at ``step`` (0-based): from its stage on, or every step without one. (Inside
        it, ``dm_start_step`` holds the student's part back while the fake network already learns.)"""
        stage = self.stage()
        return stage is None or step >= stage

    def prepare(self) -> None:
        """Wrap the fake network and its optimiser for Accelerate: data parallel (gradients averaged) or, when the
        student is sharded (FSDP), sharded the same way, its fp32 time embedders in units of their own."""
        from . import scale

        if self.sharded:
            scale.shard_fp32_modules(self.accelerator, self.fake, self.optimizer)  # FSDP2 + bf16/fp16 only
        self.wrapped, self.optimizer = self.accelerator.prepare(self.fake, self.optimizer)

    def restore(self, state: dict | None, start_step: int, log) -> None:
        """Load a checkpoint's fake network and optimiser (``state``; None: a new run, or a checkpoint written
        without the term, which ``log`` warns of) around :meth:`prepare`. Sharded: a collective; every process
        passes the full state and keeps its slice."""
        from . import scale

        if state is None and start_step > 0:
            log("[yellow]warning:[/] the checkpoint has no fake network (dm_weight was 0 when it was written): the "
                "fake network starts from the teacher")
        if state is not None and not self.sharded:
            self.fake.load_state_dict(state["fake"], strict=True)
        self.prepare()
        if state is None:
            return
        if self.sharded:
            scale.load_full_model_state(self.accelerator, self.wrapped, self.fake, state["fake"], sharded=True)
            scale.load_optimizer_state(self.accelerator, self.wrapped, self.optimizer, state["optimizer"], sharded=True)
        else:
            self.optimizer.load_state_dict(state["optimizer"])

    def student_step(self, model, step: int, cond: dict | None, generator: torch.Generator, device) -> tuple:
        """``((samples, cond), metrics)``: the student's samples (detached) with their conditioning rows and,
        once the term is on, its loss terms."""
        from .objectives.base import select_cond

        st = self.settings
        n = st.batch
        if cond:
            rows = next(v.shape[0] for v in cond.values() if torch.is_tensor(v))
            n = min(n, rows)
            cond = select_cond(cond, torch.arange(n))
        z = self.teacher.sample_noise(n, generator=generator).to(device)
        active = step >= st.start_step
        with self.accelerator.autocast(), torch.set_grad_enabled(active):
            x_hat, k = self.maths.student_sample(model, z, cond, generator)
        if not active:
            return (x_hat.detach(), cond), {}
        with self.accelerator.autocast():
            loss, metrics = self.maths.student_loss(x_hat, self.teacher.velocity, self.wrapped, cond, cond, generator)
        if torch.isfinite(loss):
            total = st.weight * loss
            if st.gan_weight > 0:
                grad, gan_metrics = self.generator_gradient(x_hat, cond, generator)
                total = total + st.gan_weight * through(x_hat, grad)
                metrics = {**metrics, **gan_metrics}
            self.accelerator.backward(total)
        return (x_hat.detach(), cond), {**metrics, "dm_rollout": k}

    def generator_gradient(self, x_hat: torch.Tensor, cond: dict | None, generator: torch.Generator) -> tuple:
        """``(d generator loss / d x_hat, metrics)``: the adversarial term's gradient on the student's samples,
        taken through the fake network and its head at a noising like the term's own, without adding to the fake
        network's gradients."""
        st = self.settings
        x = x_hat.detach().requires_grad_(True)
        tau = draw_times(x.shape[0], st.time_min, st.time_max, "uniform", generator).to(x.device)
        z = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        with self.accelerator.autocast():
            self.fake(interpolate(z, x, tau), tau, cond)
            loss = generator_loss(self.fake.discriminate())
        (grad,) = torch.autograd.grad(loss, x)
        return torch.nan_to_num(grad), {"gan_g_loss": loss.item()}

    def fake_step(self, drawn: tuple, generator: torch.Generator, real: torch.Tensor | None = None) -> dict:
        """``fake_updates`` flow-matching updates of the fake network on ``drawn``, the student's samples and
        their conditioning as :meth:`student_step` returned them; with the adversarial term, each also trains the
        discriminator on them against ``real``, the batch's data rows (their first rows share that conditioning)."""
        samples, cond = drawn
        losses, gan = [], []
        for _ in range(self.settings.fake_updates):
            with self.accelerator.autocast():
                if self.settings.gan_weight > 0:
                    loss, metrics = self.fake_and_discriminator_loss(samples, real, cond, generator)
                    gan.append(metrics)
                else:
                    loss = self.maths.fake_loss(self.wrapped, samples, self.fake.output_gain, cond, generator)
            if not torch.isfinite(loss):  # a bad update is skipped, never applied
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.accelerator.backward(loss)
            if self.grad_clip > 0:
                self.accelerator.clip_grad_norm_(self.wrapped.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        out = {"dm_fake_loss": sum(losses) / len(losses)} if losses else {}
        for key in (gan[0] if gan else {}):
            out[key] = sum(m[key] for m in gan) / len(gan)
        return out

    def fake_and_discriminator_loss(self, samples: torch.Tensor, real: torch.Tensor, cond: dict | None,
                                    generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The fake network's flow-matching loss on the student's samples plus ``gan_fake_weight`` times the
        discriminator loss, the first real rows (as many as there are samples, at most) noised at the samples'
        times (so time tells them nothing apart), in one forward of both."""
        from .objectives.adversarial import discriminator_loss
        from .objectives.base import cat_conds, select_cond
        from .objectives.dm import fake_flow_matching_loss

        st = self.settings
        n = samples.shape[0]
        m = min(n, real.shape[0])
        real = real[:m].to(samples.device, samples.dtype)
        tau, x_fake, target = self.maths.fake_noising(samples, generator)
        z_real = torch.randn(real.shape, generator=generator).to(samples.device, samples.dtype)
        x = torch.cat([x_fake, interpolate(z_real, real, tau[:m])])
        both = cat_conds(cond, select_cond(cond, torch.arange(m))) if cond else None
        v = self.wrapped(x, torch.cat([tau, tau[:m]]), both)
        logits = self.fake.discriminate()
        fm = fake_flow_matching_loss(v[:n], target, self.fake.output_gain(tau)).mean()
        d = discriminator_loss(logits[n:], logits[:n])
        return fm + st.gan_fake_weight * d, {"gan_d_loss": d.item(), "gan_real_logit": logits[n:].mean().item(),
                                             "gan_fake_logit": logits[:n].mean().item()}

    def state(self) -> dict:
        """The checkpoint's part: the fake network's weights and its optimiser. Sharded: a collective, gathered whole
        on rank 0 (the optimiser's state keyed by parameter name, as the student's); the other ranks get empty dicts."""
        from . import scale

        if self.sharded:
            return {"fake": scale.full_model_state(self.accelerator, self.wrapped, self.fake, sharded=True),
                    "optimizer": scale.optimizer_state(self.accelerator, self.wrapped, self.optimizer, sharded=True)}
        return {"fake": self.accelerator.unwrap_model(self.wrapped).state_dict(),
                "optimizer": self.optimizer.state_dict()}
