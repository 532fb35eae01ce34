"""Training at scale: mixed precision, gradient checkpointing, sharded (FSDP) state.

Small helpers the trainer calls; each is a no-op in the default single-process
fp32 run, so that path stays bit-for-bit what it was.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .config import ConfigError


def check_mixed_precision(mode: str, device_type: str) -> None:
    """Refuse settings Accelerate would silently ignore.

    Accelerate runs ``mixed_precision="fp16"`` on a CPU as plain fp32 without a
    word (no autocast, no loss scaler), so a user would believe they trained in
    fp16.  bf16 autocast works on CPU.
    """
    if mode == "fp16" and device_type == "cpu":
        raise ConfigError("fp16 needs a GPU; use bf16 (--set mixed_precision=bf16)")


def dynamo_backend(compile) -> str | None:
    """``RunConfig.compile`` -> the ``torch.compile`` backend: False -> none, True -> inductor, or a backend name."""
    if compile is True:
        return "inductor"
    return compile or None


def make_accelerator(mixed_precision: str, compile, cpu: bool):
    """An ``Accelerator`` for one run, honouring this run's precision and compile settings.

    Accelerate keeps one process-wide ``AcceleratorState`` and refuses a second
    Accelerator with another precision; a process that runs several configs
    (tests, notebooks) drops the previous run's state first.  The process
    group (``PartialState``) is kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, dynamo_backend=dynamo_backend(compile))


def _fp32_forward(self, *args, **kwargs):
    """``forward`` of a module kept in fp32: autocast off, floating inputs upcast,
    output cast back to the dtype of the first floating input (the network's dtype)."""
    first = next((a for a in args if torch.is_tensor(a) and a.is_floating_point()), None)
    device_type = first.device.type if first is not None else "cpu"
    cast = lambda a: a.float() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
    with torch.autocast(device_type=device_type, enabled=False):
        out = type(self).forward(self, *map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return out.to(first.dtype) if first is not None and torch.is_tensor(out) else out


def keep_in_fp32(module: nn.Module) -> nn.Module:
    """Run ``module`` in fp32 even under autocast or with a bf16/fp16 network around it.

    The same idea as diffusers' ``_keep_in_fp32_modules`` (time embedders in
    fp32): a sinusoidal embedding of ``t * 1000`` and its MLP lose the small
    time differences the flow map needs if they run in 8 mantissa bits.  The
    forward is bound to the module itself, so ``deepcopy`` (the EMA) rebinds it
    to the copy; forward hooks (the second-time addition) still run.
    """
    module.float()
    module.forward = types.MethodType(_fp32_forward, module)
    return module


def keep_time_embedders_fp32(*models) -> None:
    """Keep the second-time embedding and the family's timestep embedder of every
    two-time student / diffusers teacher in ``models`` in fp32 (others are skipped)."""
    for model in models:
        network = getattr(model, "network", None)
        adapter = getattr(model, "adapter", None)
        if network is None or adapter is None:
            continue
        for embedder in adapter.time_embedders(network):
            keep_in_fp32(embedder)
        if hasattr(model, "second_time"):
            keep_in_fp32(model.second_time)
        if getattr(model, "guidance_embed", None) is not None:
            keep_in_fp32(model.guidance_embed)


def enable_gradient_checkpointing(student) -> None:
    """diffusers' activation checkpointing on the student's backbone (recompute block activations in backward).

    The second time is added at the timestep embedder, which runs outside the
    checkpointed blocks, so recomputation never needs it.
    """
    network = getattr(student, "network", None)
    if network is None or not getattr(network, "_supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing: {type(network or student).__name__} does not support it; "
                          "remove --set gradient_checkpointing=true")
    network.enable_gradient_checkpointing()


# ------------------------------------------------------ sharded state -------
def is_sharded(accelerator) -> bool:
    """Whether the student is sharded across processes (FSDP), so its state must be gathered."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def full_model_state(accelerator, wrapped, model, sharded: bool | None = None) -> dict:
    """The full, unsharded state dict of the student, on CPU.

    Under FSDP every process must call this (it is a collective); the full dict
    lands on rank 0 (others get ``{}``).  Otherwise it is ``model.state_dict()``
    (``model``: the unwrapped student), and a LoRA student gives only its
    trained tensors (``trainable_state_dict``).
    """
    sharded = is_sharded(accelerator) if sharded is None else sharded
    if sharded:
        return {k: v.detach().cpu() for k, v in accelerator.get_state_dict(wrapped).items()}
    if hasattr(model, "trainable_state_dict"):
        return model.trainable_state_dict()
    return model.state_dict()


def optimizer_state(accelerator, wrapped, optimizer, sharded: bool | None = None) -> dict:
    """The optimizer state to checkpoint: the full (gathered) state under FSDP, keyed by parameter name."""
    sharded = is_sharded(accelerator) if sharded is None else sharded
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    return get_optimizer_state_dict(wrapped, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(accelerator, wrapped, optimizer, state: dict, sharded: bool | None = None) -> None:
    sharded = is_sharded(accelerator) if sharded is None else sharded
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(wrapped, inner, state, options=StateDictOptions(full_state_dict=True))
