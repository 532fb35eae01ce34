"""Training at scale: mixed precision, gradient checkpointing, sharded (FSDP) state.

Small helpers the trainer calls; each is a no-op in the default single-process
fp32 run, so that path stays bit-for-bit what it was.
"""

from __future__ import annotations

import copy
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


def make_accelerator(mixed_precision: str, compile, cpu: bool, **trackers):
    """An ``Accelerator`` for one run, honouring this run's precision and compile settings.

    Accelerate keeps one process-wide ``AcceleratorState`` and refuses a second
    Accelerator with another precision; a process that runs several configs
    (tests, notebooks) drops the previous run's state first.  The process
    group (``PartialState``) is kept.  ``trackers``: ``log_with`` and ``project_dir``
    (tracking.accelerator_trackers).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, dynamo_backend=dynamo_backend(compile),
                              **trackers)
    adjust_fsdp_precision(accelerator)
    return accelerator


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
    module._ttfm_keep_fp32 = True  # FSDP2 gives it its own fp32 unit (shard_fp32_modules)
    return module


def keep_time_embedders_fp32(*models) -> None:
    """Keep the time embedders of every student, teacher or fake network in ``models`` in fp32 (their own
    ``time_embedders()``: the family's timestep embedder, the second time, the guidance embedding)."""
    for model in models:
        for embedder in model.time_embedders():
            keep_in_fp32(embedder)


def enable_gradient_checkpointing(student) -> None:
    """diffusers' activation checkpointing on the student's backbone (recompute block activations in backward).

    The blocks are checkpointed by the student's own ``checkpoint_block`` (torch's non-reentrant
    checkpoint with the call's second time restored during recomputation), so families whose time
    embedder sits inside each block (DiT) recompute with the second time they ran with.
    """
    student.enable_gradient_checkpointing()


# ------------------------------------------------------ sharded state -------
# Under FSDP (Accelerate's or a plain ``torch.distributed.fsdp.fully_shard``) every
# process holds a slice of each parameter (a DTensor).  Checkpoints and exports hold
# the full tensors, gathered with torch's ``torch.distributed.checkpoint.state_dict``
# functions, which serve FSDP1, FSDP2 and unsharded modules alike; every function
# here that gathers or scatters is a collective that every process must call.
def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole of ``value``: an FSDP2 shard (a DTensor) gathered (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def set_full_tensor(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole ``value`` into ``param``: an FSDP2 shard (a DTensor) keeps its own slice of it (a
    collective; every process passes the same whole tensor), any other tensor takes it as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.detach().to(param.dtype)
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    param.copy_(value)


def module_is_sharded(module) -> bool:
    """Whether ``module`` (or a submodule) is FSDP-sharded: FSDP2 ``FSDPModule``, FSDP1, or DTensor parameters."""
    if module is None:
        return False
    from torch.distributed.tensor import DTensor

    if type(module).__name__ == "FullyShardedDataParallel":  # FSDP1 wrapper
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()
    return any(isinstance(m, FSDPModule) for m in module.modules()) or \
        any(isinstance(p, DTensor) for p in module.parameters())


def is_sharded(accelerator, wrapped=None) -> bool:
    """Whether the student is sharded across processes (FSDP), so its state must be gathered.

    True when Accelerate runs FSDP, or when ``wrapped`` itself is sharded (``fully_shard``
    applied outside Accelerate).
    """
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or module_is_sharded(wrapped)


def _is_main_rank() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_model_state(accelerator, wrapped, model, sharded: bool | None = None) -> dict:
    """The full, unsharded state dict of the student, on CPU.

    Sharded: every process must call this (it is a collective); the full dict lands on
    rank 0, the others get ``{}``.  The keys are those of the unwrapped student
    (``get_model_state_dict`` drops FSDP1/DDP/compile prefixes).  Otherwise it is
    ``model.state_dict()`` (``model``: the unwrapped student), and a LoRA student gives
    only its trained tensors (``trainable_state_dict``).
    """
    sharded = is_sharded(accelerator, wrapped) if sharded is None else sharded
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in full.items()} if _is_main_rank() else {}
    return model.trainable_state_dict()


def load_full_model_state(accelerator, wrapped, model, state: dict, sharded: bool | None = None) -> None:
    """Load a full state dict (a checkpoint's ``student.safetensors``) into the student, strictly.

    Sharded: a collective; **every** process passes the full dict (each reads the
    checkpoint from disk, as the trainer's resume does) and keeps its own slice of each
    tensor.  (torch's ``broadcast_from_rank0`` would let only rank 0 read it; not used,
    so that a rank handed ``{}`` by mistake fails here instead of silently keeping its
    old weights.)  Unsharded: ``load_state_dict`` (LoRA: ``load_trainable_state_dict``).

    The trainer itself loads before ``accelerator.prepare`` shards the student; this is
    for a student that is already sharded.
    """
    sharded = is_sharded(accelerator, wrapped) if sharded is None else sharded
    if not sharded:
        model.load_trainable_state_dict(state)
        return
    if not state:
        raise ValueError("load_full_model_state: every process must pass the full state dict")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(wrapped, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state(accelerator, wrapped, optimizer, sharded: bool | None = None) -> dict:
    """The optimizer state to checkpoint: the full (gathered) state when sharded, keyed by parameter name.

    Sharded: a collective; rank 0 gets the dict, the others ``{}``.
    """
    sharded = is_sharded(accelerator, wrapped) if sharded is None else sharded
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    state = get_optimizer_state_dict(wrapped, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if _is_main_rank() else {}


def load_optimizer_state(accelerator, wrapped, optimizer, state: dict, sharded: bool | None = None) -> None:
    """Load a checkpoint's optimizer state; sharded: a collective, every process passes the full (name-keyed) state."""
    sharded = is_sharded(accelerator, wrapped) if sharded is None else sharded
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(wrapped, inner, state, options=StateDictOptions(full_state_dict=True))


def unsharded_copy(accelerator, wrapped, model, build):
    """The student to export: ``model`` itself, or, when sharded, a fresh unsharded student
    made by ``build()`` holding the gathered weights on rank 0 (``None`` on the other ranks;
    a collective)."""
    if not is_sharded(accelerator, wrapped):
        return model
    full = full_model_state(accelerator, wrapped, model, sharded=True)
    if not _is_main_rank():
        return None
    twin = build()
    twin.load_state_dict(full, strict=True)
    return twin


# ------------------------------------------- FSDP2 with bf16/fp16 params ----
def _low_precision_fsdp2_policy(accelerator):
    """Accelerate's FSDP2 ``MixedPrecisionPolicy`` when it gathers parameters in bf16/fp16, else ``None``."""
    state = accelerator.state
    if not getattr(state, "is_fsdp2", False):
        return None
    policy = getattr(state.fsdp_plugin, "mixed_precision_policy", None)
    if policy is None or getattr(policy, "param_dtype", None) in (None, torch.float32):
        return None
    return policy


def adjust_fsdp_precision(accelerator) -> None:
    """Under FSDP2 with bf16/fp16 parameters, leave the student's inputs alone.

    Accelerate's policy keeps FSDP2's default ``cast_forward_inputs=True``, which would
    round ``s`` and ``t`` to bf16 (steps of 1/256 near 1) before the student sees them.
    Autocast (on in these runs) already casts what the network's layers need, as in the
    unsharded bf16 run.
    """
    import dataclasses

    policy = _low_precision_fsdp2_policy(accelerator)
    if policy is not None and policy.cast_forward_inputs:
        accelerator.state.fsdp_plugin.mixed_precision_policy = dataclasses.replace(policy, cast_forward_inputs=False)


def shard_fp32_modules(accelerator, student, optimizer) -> int:
    """Give every module kept in fp32 (:func:`keep_in_fp32`) its own FSDP2 unit with fp32 parameters.

    Under FSDP2 with bf16/fp16 parameters every unit is all-gathered in that dtype, so the
    fp32 time embedders would get bf16 weights (and fail: fp32 activations, bf16 weights).
    Call before ``accelerator.prepare`` (which then shards the rest, skipping these units);
    ``optimizer``'s references to the modules' parameters are switched to the sharded ones.
    Returns the number of units made (0 when not needed).
    """
    policy = _low_precision_fsdp2_policy(accelerator)
    if policy is None:
        return 0
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    kwargs = {"mp_policy": fp32, "reshard_after_forward": plugin.reshard_after_forward,
              "offload_policy": plugin.cpu_offload}
    mesh = getattr(accelerator, "torch_device_mesh", None)  # the mesh Accelerate shards the rest on
    if mesh is not None:
        kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    made = 0
    for module in [m for m in student.modules() if getattr(m, "_ttfm_keep_fp32", False)]:
        old = list(module.parameters())
        fully_shard(module, **kwargs)
        swap = {id(o): n for o, n in zip(old, module.parameters())}
        for group in optimizer.param_groups:
            group["params"] = [swap.get(id(p), p) for p in group["params"]]
        made += 1
    return made


# ------------------------------------------------------- frozen networks ----
# A frozen network (the teacher's, a distribution-matching "fake" network's frozen base) is never
# trained: it needs no fp32 master copy, no gradients, no optimizer state.  With mixed precision on it
# is held in the training precision, and under FSDP it is sharded like the student.  The helpers take
# any frozen ``nn.Module``.

#: layers whose forward is one op that autocast runs in the low precision (weight and bias included), so
#: holding their weights in bf16/fp16 changes nothing under autocast: autocast would make that very cast
LOW_PRECISION_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
LOW_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _held_forward(self, x, *args, **kwargs):
    """``forward`` of a layer held in bf16/fp16: as the layer's own under autocast (which casts the input to
    the weights' dtype); outside autocast an input of another dtype (an fp32 evaluation) is computed in its
    own dtype from the held weights, upcast for this call only."""
    if x.dtype == self.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x, *args, **kwargs)
    w = self.weight.to(x.dtype)
    b = None if self.bias is None else self.bias.to(x.dtype)
    return nn.functional.linear(x, w, b) if isinstance(self, nn.Linear) else self._conv_forward(x, w, b)


def _check_frozen(module: nn.Module, what: str) -> None:
    if any(p.requires_grad for p in module.parameters()):
        raise ValueError(f"{what}: the module has trainable parameters; freeze it (requires_grad_(False))")


def hold_frozen(module: nn.Module, mixed_precision: str) -> int:
    """Hold a frozen module in the training precision (``"bf16"``/``"fp16"``; ``"no"``: unchanged).

    The weights and biases of its linear and convolution layers (nearly all of a diffusion network's
    bytes) become bf16/fp16; every other parameter and buffer (norms, embedding tables, positional
    tables) stays fp32, and so does every module kept in fp32 (:func:`keep_in_fp32`: the time embedders;
    apply that first).  Under the run's autocast the module then computes exactly what it computed with
    fp32 weights, since autocast casts those layers' weights to that dtype anyway; outside autocast
    (evaluation) those layers compute in the caller's precision from the held weights.  Returns the
    number of layers cast.
    """
    dtype = LOW_PRECISION_DTYPES.get(mixed_precision)
    if dtype is None:
        if mixed_precision != "no":
            raise ValueError(f"hold_frozen: mixed_precision must be no, bf16 or fp16, got {mixed_precision!r}")
        return 0
    _check_frozen(module, "hold_frozen")
    kept = {id(m) for k in module.modules() if getattr(k, "_ttfm_keep_fp32", False) for m in k.modules()}
    layers = [m for m in module.modules() if isinstance(m, LOW_PRECISION_LAYERS) and id(m) not in kept
              and m.weight.dtype != dtype]
    owner = {id(p): m for m in layers for p in m.parameters(recurse=False)}
    # a diffusers network's ``dtype`` is its first floating parameter's (outside ``_keep_in_fp32_modules``), and
    # some cast inputs to it (UNet2DModel rounds its sinusoidal time projection to ``self.dtype`` before the fp32
    # embedder): the layer diffusers reads it from stays fp32 (a small input layer: ``conv_in``, a patch embedding)
    skip = getattr(module, "_keep_in_fp32_modules", None) or ()
    anchor = next((p for n, p in module.named_parameters() if p.is_floating_point()
                   and not any(k in n for k in skip)), None) if hasattr(module, "dtype") else None
    if anchor is not None and id(anchor) in owner:
        layers.remove(owner[id(anchor)])
        owner = {k: v for k, v in owner.items() if v in layers}
    for layer in layers:
        layer.to(dtype)
    # should diffusers read its dtype elsewhere, put that layer back (its weights then rounded once to ``dtype``)
    while isinstance(getattr(module, "dtype", None), torch.dtype) and module.dtype != torch.float32:
        first = next((p for p in module.parameters() if p.dtype == module.dtype and id(p) in owner), None)
        if first is None:
            break
        layer = owner[id(first)]
        layer.float()
        layers.remove(layer)
        owner = {k: v for k, v in owner.items() if v is not layer}
    for layer in layers:
        layer.forward = types.MethodType(_held_forward, layer)
    _mark_frozen(module)
    module._ttfm_frozen_dtype = dtype
    return len(layers)


def _mark_frozen(module: nn.Module) -> None:
    """Record that ``module`` no longer holds its loaded fp32 weights (:func:`trainable_copy` reads it)."""
    if not hasattr(module, "_ttfm_frozen_class"):
        module._ttfm_frozen_class = type(module)


def frozen_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers ``module`` holds on this process (a sharded one: its shards)."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    return sum(local(t) for t in (*module.parameters(), *module.buffers()))


def trainable_copy(network: nn.Module) -> nn.Module:
    """A copy of a teacher's network to train: its ``deepcopy`` (fp32 weights, as loaded).

    A network held frozen (:func:`hold_frozen`, :func:`shard_frozen`) no longer has its fp32 weights on
    this process: its copy is a fresh network of the same class and config (diffusers ``from_config``),
    for callers that load a full state into it (the export of a sharded student).
    """
    frozen_class = getattr(network, "_ttfm_frozen_class", None)
    if frozen_class is None:
        return copy.deepcopy(network)
    if not hasattr(frozen_class, "from_config"):
        raise ValueError(f"trainable_copy: {frozen_class.__name__} is held frozen and has no config to rebuild it")
    return frozen_class.from_config(network.config)


def shard_frozen(module: nn.Module, mesh=None) -> int:
    """Shard a frozen module with FSDP2, so each process holds 1/N of it.

    One unit per block of the module's top-level ``ModuleList``s, then the root; under ``no_grad`` a
    forward gathers one block at a time and frees it after, and a forward hook frees the root's own
    parameters after each no-grad call (FSDP2 keeps the root gathered for a backward that never comes).
    Each call of the module is then a collective: every process must evaluate it the same number of
    times, in the same order (the objectives do, since every rank draws the same number of diagonal
    pairs; evaluation on one process calls :func:`unshard_frozen` first).  Parameters keep their dtype
    (no mixed-precision policy), so fp32 time embedders stay fp32 beside bf16 layers.  Returns the number
    of units made.
    """
    from torch.distributed.fsdp import fully_shard

    _check_frozen(module, "shard_frozen")
    _mark_frozen(module)
    kwargs = {"mesh": mesh} if mesh is not None else {}
    units = 0
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block, **kwargs)
                units += 1
    fully_shard(module, **kwargs)
    module.register_forward_hook(_reshard_after_no_grad_call)
    return units + 1


def _reshard_after_no_grad_call(module, args, output):
    if not torch.is_grad_enabled() and not getattr(module, "_ttfm_whole", False):
        module.reshard()


def unshard_frozen(module: nn.Module) -> None:
    """Gather a module sharded by :func:`shard_frozen` whole on every process, and keep it whole: after this
    collective its forwards are local, so one process alone may evaluate it (the run's final evaluation)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return
    module._ttfm_whole = True
    for unit in [m for m in module.modules() if isinstance(m, FSDPModule)]:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()


def prepare_frozen(accelerator, module: nn.Module, mixed_precision: str) -> nn.Module:
    """A frozen network as a training run holds it: in the training precision (:func:`hold_frozen`) and,
    when the student is sharded (FSDP), sharded over the same processes (:func:`shard_frozen`).

    Any frozen module (the teacher's network; a distribution-matching fake network's frozen base);
    call it after the student has been copied from it.
    """
    hold_frozen(module, mixed_precision)
    if is_sharded(accelerator):
        mesh = getattr(accelerator, "torch_device_mesh", None)
        if mesh is not None and getattr(accelerator, "parallelism_config", None) is not None:
            mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
        shard_frozen(module, mesh)
    return module
