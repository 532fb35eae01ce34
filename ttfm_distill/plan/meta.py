"""Count a two-time student on the meta device: parameters, FLOPs and activation bytes, no memory used.

One forward (and, for FLOPs, one backward) of batch 1 through the real diffusers
network built on ``torch.device("meta")``:

* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode``, the counter the benchmarks use
  on real tensors.  Attention runs through the memory-efficient kernel (as on a GPU);
  its backward is counted as twice its forward (model FLOPs: the matmuls of the
  math, no recomputation), the same figure the counter gives on real tensors with
  the math kernel.
* **Activations**: the bytes of every tensor autograd saves for backward (a
  ``saved_tensors_hooks`` pack hook, each storage counted once, weights excluded).
  Gradient checkpointing is measured through diffusers' own checkpointing switch:
  the planner's checkpoint function records each block's inputs (kept) and its
  internal saved tensors (recomputed in backward, one block at a time).
* **bf16**: the trainer runs bf16 as autocast over fp32 weights.  Autocast does not
  act on meta tensors, so the planner casts the inputs of the ops autocast runs in
  bf16 (matmuls, convolutions, attention) and of those it runs in fp32 (norms,
  softmax); the bf16 copies of weights autograd keeps are counted apart
  (batch-independent).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

LOW_PRECISION_OPS = {"linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d", "matmul", "mm", "bmm", "baddbmm",
                     "addmm", "addbmm", "einsum", "scaled_dot_product_attention"}
#: ops CUDA autocast runs in fp32 (CPU autocast runs these in bf16: ``autocast_device="cpu"``)
FP32_OPS = {"layer_norm", "group_norm", "softmax", "log_softmax", "rms_norm"}
AUTOCAST_FP32_OPS = {"cuda": FP32_OPS, "cpu": set()}
# attention is a bf16 op under autocast; the planner's own kernel (below) stands for it
LOW_PRECISION_OPS.add("_scaled_dot_product_efficient_attention")


def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return st._cdata, st.nbytes()


class PlanMode(TorchFunctionMode):
    """bf16 autocast emulated for meta tensors (autocast does not act on them)."""

    def __init__(self, bf16: bool = False, autocast_device: str = "cuda"):
        super().__init__()
        self.bf16 = bf16
        self.fp32_ops = AUTOCAST_FP32_OPS[autocast_device]
        self.weight_copies: set = set()
        self.copy_order: list = []
        self._keep: list = []  # held so that no later tensor reuses a copy's storage address
        self._cache: dict = {}

    def _cast(self, a, dtype, track: bool):
        if not (torch.is_tensor(a) and a.is_floating_point()) or a.dtype == dtype:
            return a
        if isinstance(a, nn.Parameter):
            if id(a) in self._cache:
                return self._cache[id(a)]
            out = a.to(dtype)
            if a.requires_grad:  # autocast caches the casts of trained leaves for the whole region
                self._cache[id(a)] = out
            if track:
                self.weight_copies.add(_storage_key(out)[0])
                self.copy_order.append(_storage_key(out)[0])
                self._keep.append(out)
            return out
        return a.to(dtype)

    def _cast_all(self, args, kwargs, dtype, track):
        c = lambda a: self._cast(a, dtype, track)  # noqa: E731
        args = tuple(type(a)(map(c, a)) if isinstance(a, (list, tuple)) else c(a) for a in args)
        return args, {k: c(v) for k, v in kwargs.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if self.bf16 and name in LOW_PRECISION_OPS:
            args, kwargs = self._cast_all(args, kwargs, torch.bfloat16, True)
        elif self.bf16 and name in self.fp32_ops:
            args, kwargs = self._cast_all(args, kwargs, torch.float32, False)
        return func(*args, **kwargs)


def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    """``scaled_dot_product_attention`` through the memory-efficient kernel (what a GPU runs; it saves
    ``q, k, v``, the output and the log-sum-exp, never the attention matrix)."""
    q, k, v = query, key, value
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -1e4)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, attn_mask, grad, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def efficient_attention():
    """Route ``torch.nn.functional.scaled_dot_product_attention`` (looked up at call time by diffusers) to
    :func:`_efficient_attention`, also in the recomputation of checkpointed blocks during backward."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _efficient_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class SavedBytes:
    """Bytes of the distinct storages autograd saves, weights excluded."""

    def __init__(self, exclude: set):
        self.exclude = exclude
        self.seen: dict = {}

    def pack(self, t):
        key, nbytes = _storage_key(t)
        if key not in self.exclude:
            self.seen.setdefault(key, nbytes)
        return t

    @staticmethod
    def unpack(t):
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


@dataclass
class BlockRecord:
    inputs: dict = field(default_factory=dict)   # storage key -> bytes (kept under checkpointing)
    inner: dict = field(default_factory=dict)    # storage key -> bytes (recomputed)


class CheckpointProbe:
    """A ``gradient_checkpointing_func`` for diffusers that runs each block normally and records its saved tensors."""

    def __init__(self, exclude: set):
        self.exclude = exclude
        self.blocks: list[BlockRecord] = []
        self._keep: list = []  # a checkpoint keeps its inputs; held so that their addresses stay unique

    def __call__(self, module, *args):
        rec = BlockRecord()
        for a in args:
            if torch.is_tensor(a) and a.is_floating_point():
                key, nbytes = _storage_key(a)
                if key not in self.exclude:
                    rec.inputs[key] = nbytes
                    self._keep.append(a)
        inner = SavedBytes(self.exclude)
        with inner.hooks():
            out = module(*args)
        rec.inner = inner.seen
        self.blocks.append(rec)
        return out


class LiveTracker:
    """Live tensor bytes over a pass (a dispatch mode): the peak of what is neither a pre-existing tensor
    (``exclude``: weights) nor a weight's gradient (``params``' ``.grad``): the working set of activations,
    their gradients and temporaries."""

    def __init__(self, exclude: set, params=(), plan_mode=None):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self.mode = _Mode()
        self.exclude = exclude
        self.live: dict = {}
        self.cur = 0
        self.grad_keys: set = set()
        self.grad_bytes = 0
        self.plan_mode = plan_mode  # its bf16 weight copies are a term of their own, not working set
        self._copies_seen = 0
        self.peak = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._grad) for p in params if p.requires_grad]

    def _grad(self, p):
        if p.grad is None:
            return
        key = _storage_key(p.grad)[0]
        if key in self.live and key not in self.grad_keys:
            self.grad_keys.add(key)
            self.grad_bytes += self.live[key]

    def _release(self, key):
        n = self.live.pop(key, 0)
        self.cur -= n
        if key in self.grad_keys:
            self.grad_keys.discard(key)
            self.grad_bytes -= n

    def _take_copies(self):
        order = self.plan_mode.copy_order
        while self._copies_seen < len(order):
            key = order[self._copies_seen]
            self._copies_seen += 1
            if key in self.live and key not in self.grad_keys:
                self.grad_keys.add(key)  # held apart like a gradient
                self.grad_bytes += self.live[key]

    def _record(self, out):
        import weakref

        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st._cdata
                if key in self.live or key in self.exclude:
                    continue
                self.live[key] = st.nbytes()
                self.cur += st.nbytes()
                weakref.finalize(st, self._release, key)
        if self.plan_mode is not None:
            self._take_copies()
        self.peak = max(self.peak, self.cur - self.grad_bytes)

    def close(self):
        for h in self._handles:
            h.remove()


def working_set(student, inputs, checkpointing: bool, bf16: bool = False, autocast_device: str = "cuda") -> int:
    """Peak working bytes of one forward + backward of ``student(*inputs)`` on the meta device, with
    diffusers' own gradient checkpointing (real recomputation) when ``checkpointing``; ``bf16``: autocast
    emulated (not with checkpointing: the recomputation in backward runs outside the emulation)."""
    network = student.network
    on = checkpointing and bool(network._supports_gradient_checkpointing)
    if on:  # as the trainer: the student's own checkpoint function
        student.enable_gradient_checkpointing()
    plan_mode = PlanMode(bf16=bf16, autocast_device=autocast_device)
    tracker = LiveTracker(weight_storages(student), list(student.parameters()), plan_mode=plan_mode if bf16 else None)
    try:
        with efficient_attention(), plan_mode, tracker.mode:
            u = student(*inputs)
            u.float().pow(2).mean().backward()
            del u
    finally:
        tracker.close()
        if on:
            network.disable_gradient_checkpointing()
        student.zero_grad(set_to_none=True)
    return tracker.peak


def weight_storages(*modules) -> set:
    keys = set()
    for m in modules:
        if m is None:
            continue
        for t in list(m.parameters()) + list(m.buffers()):
            keys.add(_storage_key(t)[0])
    return keys


@dataclass
class PassResult:
    """One batch-1 pass of the student: FLOPs and saved bytes."""

    forward_flops: float = 0.0          # model FLOPs of the forward
    train_flops: float = 0.0            # forward + backward (model FLOPs: no recomputation)
    activations: int = 0                # bytes saved for backward without checkpointing, per sample
    activations_checkpointed: int = 0   # with gradient checkpointing: kept inputs + one block's recompute
    checkpoint_kept: int = 0            # of which: what stays saved across the forward
    largest_block: int = 0              # of which: the largest block's recomputed activations
    weight_copies: int = 0              # bf16 copies of weights autograd keeps (batch-independent)
    weight_copies_checkpointed: int = 0 # with checkpointing: autocast's cache of trained weights + one block's
    blocks: int = 0


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """Convolution backward as grad-input + grad-weight, each the forward's FLOPs (grouped convolutions too).

    torch's own formula computes grad-weight as a convolution over the batch that ignores
    ``groups``: for a depthwise 3x3 convolution over 64 channels it counts about 65 times too much.
    """
    from torch.utils.flop_counter import conv_flop_count

    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def flop_counter():
    """``FlopCounterMode`` with a grouped-convolution-correct backward; what the planner and its checks use."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops})


def _count(counter) -> float:
    return float(counter.get_total_flops())


def _eff_counts(counter) -> tuple[float, float]:
    table = counter.get_flop_counts().get("Global", {})
    fwd = sum(v for k, v in table.items() if "scaled_dot_product" in str(k) and "backward" not in str(k))
    bwd = sum(v for k, v in table.items() if "scaled_dot_product" in str(k) and "backward" in str(k))
    return float(fwd), float(bwd)


def measure_student(student, x, s, t, cond, bf16: bool, with_backward: bool, exclude_extra=(),
                    autocast_device: str = "cuda") -> PassResult:
    """Run ``student(x, s, t, cond)`` (batch 1, meta tensors) and measure it."""
    network = student.network
    exclude = weight_storages(student) | set(exclude_extra)
    probe = CheckpointProbe(exclude)
    supports = bool(getattr(network, "_supports_gradient_checkpointing", False))
    if supports:
        network.enable_gradient_checkpointing(probe)
    outer = SavedBytes(exclude)
    mode = PlanMode(bf16=bf16, autocast_device=autocast_device)
    res = PassResult()
    try:
        with flop_counter() as counter, mode, efficient_attention():
            with outer.hooks():
                u = student(x, s, t, cond)
            res.forward_flops = _count(counter)
            if with_backward:
                u.float().pow(2).mean().backward()
        if with_backward:
            eff_fwd, eff_bwd = _eff_counts(counter)
            # attention backward as model FLOPs (2x its forward), not the kernel's recomputation
            res.train_flops = _count(counter) - eff_bwd + 2 * eff_fwd
    finally:
        if supports:
            network.disable_gradient_checkpointing()
    copies = mode.weight_copies
    every = dict(outer.seen)
    for b in probe.blocks:
        every.update(b.inner)
    res.weight_copies = sum(v for k, v in every.items() if k in copies)
    res.activations = sum(v for k, v in every.items() if k not in copies)
    if probe.blocks:
        kept = dict(outer.seen)
        for b in probe.blocks:
            kept.update(b.inputs)
        res.checkpoint_kept = sum(v for k, v in kept.items() if k not in copies)
        res.largest_block = max(sum(v for k, v in b.inner.items() if k not in copies and k not in kept)
                                for b in probe.blocks)
        res.activations_checkpointed = res.checkpoint_kept + res.largest_block
        res.blocks = len(probe.blocks)
        # autocast caches the bf16 casts of trained weights for the whole forward; other casts inside a
        # checkpointed block are dropped and redone one block at a time in backward
        cached = {_storage_key(v)[0]: v.untyped_storage().nbytes() for v in mode._cache.values()}
        outer_copies = sum(v for k, v in outer.seen.items() if k in copies and k not in cached)
        block_copies = max(sum(v for k, v in b.inner.items() if k in copies and k not in cached) for b in probe.blocks)
        res.weight_copies_checkpointed = sum(cached.values()) + outer_copies + block_copies
    else:
        res.weight_copies_checkpointed = res.weight_copies
    return res


def count_fake_pass(student, teacher, x, t, cond) -> tuple[float, float]:
    """``(forward, forward + backward)`` model FLOPs (batch 1) of the distribution-matching fake network as
    ``student``'s kind holds it (``FlowMapStudent.fake_network``: a copy of ``teacher``'s network, or a LoRA
    student's second adapters), the backward that of its flow-matching update (to its trained tensors only)."""
    from ..fake import FakeVelocity

    fake = FakeVelocity.from_teacher(teacher, student=student)
    with flop_counter() as counter, PlanMode(), efficient_attention():
        v = fake(x, t, cond)
        forward = _count(counter)
        v.float().pow(2).mean().backward()
    eff_fwd, eff_bwd = _eff_counts(counter)
    return forward, _count(counter) - eff_bwd + 2 * eff_fwd


def count_teacher_forward(teacher, x, t, cond) -> float:
    """Model FLOPs of one no-grad teacher evaluation (batch 1)."""
    with torch.no_grad(), flop_counter() as counter, PlanMode(), efficient_attention():
        teacher.velocity(x, t, cond)
    return _count(counter)


@contextlib.contextmanager
def meta_device():
    with torch.device("meta"):
        yield
