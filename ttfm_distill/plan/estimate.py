"""``ttfm-distill plan``: parameters, memory per GPU, FLOPs and step time of a distillation, before launching it.

Everything is counted on the meta device (:mod:`.meta`): the teacher's diffusers
network is built from its config, the two-time student (full copy or LoRA) on top
of it, and one batch-1 pass measures FLOPs and saved activations.  The memory
model (per GPU, bytes)::

    static   = student weights + optimizer state + EMA + teacher (+ fake network) (+ DDP buckets | FSDP gathered blocks)
    forward  = static + bf16 weight copies + activations_per_sample * batch       (end of the forward)
    update   = static + gradients + optimizer-step temporaries                     (backward done, AdamW step)
    peak     = max(forward, update);   fits when peak <= gpu_memory * (1 - headroom)

Master weights, gradients and AdamW state are fp32 (the trainer's mixed precision is
bf16 autocast over fp32 weights).  The frozen teacher is held as the trainer holds it
(``scale.prepare_frozen``): with bf16 its linear and convolution weights in bf16, under
FSDP sharded.  With distribution matching (``dm``) a fake velocity network trains beside
the student: a full copy of the teacher (fp32 weights, gradients and AdamW state, sharded
like the student) or LoRA adapters on the teacher's frozen weights.  What is an
assumption, not a count, is named in :data:`ASSUMPTIONS` and printed with the plan.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import TTFMError
from .known_models import FAMILY_DEFAULT_LATENT, FAMILY_TEXT_TOKENS, KNOWN_MODELS, KnownModel, known_model

GB = 1e9
GIB = 2 ** 30

#: spec-sheet dense peaks (FLOP/s) and memory; fp32 = plain fp32 (torch's default matmul precision, no TF32)
GPUS = {
    "H100": {"bf16": 989e12, "fp32": 67e12, "memory": 80 * GB, "name": "H100 SXM (989 TFLOP/s bf16 dense)"},
    "H200": {"bf16": 989e12, "fp32": 67e12, "memory": 141 * GB, "name": "H200 SXM (989 TFLOP/s bf16 dense)"},
    "A100": {"bf16": 312e12, "fp32": 19.5e12, "memory": 80 * GB, "name": "A100 SXM (312 TFLOP/s bf16 dense)"},
}

ASSUMPTIONS = [
    "MFU (model FLOPs utilisation) is an assumption (--mfu), not a measurement; step time = FLOPs / (peak x MFU)",
    "GPU peak: spec-sheet dense figure; fp32 runs without TF32 (torch's default matmul precision)",
    "headroom (--headroom) of GPU memory is left for the CUDA context, NCCL buffers and allocator fragmentation",
    "no-grad target evaluations run before the student's forward; their transient activations are not counted",
    "communication time (all-reduce, FSDP gathers) is not modelled; FSDP is assumed to overlap it",
    "gradient checkpointing adds one student forward per trained row (counted in step time, not in MFU)",
    "the frozen teacher is held as the trainer holds it: bf16 linear/conv weights with bf16, sharded under FSDP; "
    "the block a sharded teacher gathers during its call is transient and not counted; an EMA is held whole",
    "distribution matching (--dm): one generated sample per training sample (a student row with grad, a teacher and "
    "a fake forward; as at batches up to dm_batch, 16) and --dm-fake-updates fake-network flow-matching updates on "
    "it (forward + backward; the run's default 5); the figures are a stage step's; the fake network's pass runs "
    "apart from the student's, so its activations are not added to the student's, but both gradients are held at "
    "the update",
]


class PlanError(TTFMError, ValueError):
    """Bad input to the planner; the message names the problem and the fix (one line, with ``error: `` at most
    200 characters)."""

    def __init__(self, message: str):
        message = " ".join(str(message).split())
        super().__init__(message if len(message) <= 192 else message[:189] + "...")


# ----------------------------------------------------------- the teacher -----
@dataclass
class TeacherSpec:
    name: str
    class_name: str
    config: dict
    vae_factor: int
    resolution: int
    text_tokens: int
    known: KnownModel | None = None


def resolve_teacher(spec: str, subfolder: str | None = None) -> TeacherSpec:
    """A built-in name, a ``config.json`` file, or a diffusers folder (pipeline or bare model)."""
    known = known_model(spec)
    if known is not None:
        return TeacherSpec(known.name, known.class_name, dict(known.config), known.vae_factor, known.resolution,
                           known.text_tokens, known)
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(n for n in KNOWN_MODELS if not n.startswith("tiny-"))
        raise PlanError(f"unknown teacher {spec!r}: give a diffusers folder, a config.json or a built-in name "
                        f"({names}, tiny-*)")
    vae_factor = 1  # no VAE config next to it: sizes are in latent cells (--resolution counts cells too)
    if path.is_dir():
        root = path
        if subfolder:
            path = path / subfolder
        elif not (path / "config.json").exists():
            path = next((path / s for s in ("transformer", "unet") if (path / s / "config.json").exists()), path)
        vae = root / "vae" / "config.json"
        if vae.exists():
            blocks = _read_json(vae).get("block_out_channels") or [0]
            vae_factor = 2 ** (len(blocks) - 1)
        path = path / "config.json"
    cfg = _read_json(path)
    class_name = cfg.get("_class_name")
    from ..teachers.families import ADAPTERS

    if class_name not in ADAPTERS:
        raise PlanError(f"{path}: _class_name {class_name!r} is not a supported denoiser; supported: "
                        f"{', '.join(sorted(ADAPTERS))}")
    config = {k: v for k, v in cfg.items() if not k.startswith("_")}
    latent = config.get("sample_size") or FAMILY_DEFAULT_LATENT.get(class_name, 64)
    latent = latent if isinstance(latent, int) else int(latent[0])
    return TeacherSpec(str(spec), class_name, config, vae_factor, latent * vae_factor,
                       FAMILY_TEXT_TOKENS.get(class_name, 0))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"{path} not found: point --teacher at a diffusers folder or its config.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{path} is not readable JSON ({type(e).__name__}); fix or replace the file") from None


# --------------------------------------------------------------- models -----
def build_network(spec: TeacherSpec, device="meta"):
    import diffusers
    import torch

    cls = getattr(diffusers, spec.class_name)
    with torch.device(device):
        try:
            return cls.from_config(spec.config)
        except Exception as e:  # noqa: BLE001 - a config diffusers cannot build
            raise PlanError(f"diffusers cannot build {spec.class_name} from this config: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def build_models(spec: TeacherSpec, lora_rank: int = 0, device="meta", seed: int = 0, teacher=None):
    """``(teacher, student, objective_teacher)`` as the trainer builds them (``build_student`` / ``build_lora_student``).

    ``teacher``: reuse one built before (a LoRA student puts its adapters into that teacher's network).
    """
    import torch

    from ..config import RunConfig
    from ..teachers.diffusers_teacher import DiffusersFlowTeacher
    from ..trainer import build_student

    torch.manual_seed(seed)
    latent = spec.resolution // spec.vae_factor
    with torch.device(device):
        if teacher is None:
            teacher = DiffusersFlowTeacher(build_network(spec, device), source=spec.name,
                                           scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler"},
                                           sample_size=latent)
        cfg = RunConfig(lora_rank=lora_rank, seed=seed)
        if lora_rank:
            from ..lora import build_lora_student

            student, view = build_lora_student(teacher, cfg)
        else:
            student, view = build_student(teacher, cfg), teacher
    return teacher, student.train(), view


def example_inputs(teacher, text_tokens: int, batch: int = 1, device="meta", generator=None):
    """``(x, s, t, cond)`` of the right shapes for ``teacher`` (text inputs with ``text_tokens`` tokens)."""
    import torch

    net, adapter = teacher.network, teacher.adapter
    kw = dict(device=device)
    rnd = (lambda *shape: torch.randn(*shape, generator=generator).to(device)) if device != "meta" else \
        (lambda *shape: torch.randn(*shape, **kw))
    x = rnd(batch, *teacher.data_shape)
    s = torch.full((batch,), 0.3, device=device)
    t = torch.full((batch,), 0.7, device=device)
    cond = {}
    for key, shape in adapter.text_inputs(net).items():
        cond[key] = rnd(batch, *(max(1, text_tokens) if d == -1 else d for d in shape))
    if adapter.conditioning(net) == "class":
        cond["class_labels"] = torch.zeros(batch, dtype=torch.long, device=device)
    return x, s, t, cond or None


# ----------------------------------------------- evaluations per sample -----
@dataclass
class Evaluations:
    """Network evaluations per training sample: rows through the student with gradient, without, teacher."""

    train: float
    student_nograd: float
    teacher: float
    note: str = ""
    #: distribution matching: fake-network forwards without grad, and its flow-matching updates (forward + backward)
    fake: float = 0.0
    fake_train: float = 0.0


def objective_evaluations(loss: str, options: dict, diagonal_fraction: float, guidance: bool = False) -> Evaluations:
    """Count, from the objective's code path, the evaluations of one sample (``d`` = diagonal fraction)."""
    from ..objectives import make_objective

    try:
        obj = make_objective(loss, **options)
    except (ValueError, TypeError) as e:
        raise PlanError(str(e).splitlines()[0]) from None
    o, d = obj.options, float(diagonal_fraction)
    off = 1.0 - d
    if obj.uses_jvp:
        raise PlanError(f"{loss}: derivative=jvp is not counted by the planner; plan with -L derivative=fd")
    if loss == "itvm":
        seg = 1 if o.teacher_solver == "euler" else 2
        if o.reading == "ema_only":
            ev = Evaluations(3, 1, 1, "3 student rows (s,t),(s,r),(s,s) with grad; EMA target; teacher at (x_s, s)")
        else:
            long = (0, o.teacher_target_steps * seg) if o.target_model == "teacher" else (1, 0)
            if o.intermediate == "uniform":
                n_s, n_t = 2 * long[0], 2 * long[1]
            else:
                n_s, n_t = long[0], long[1] + seg
            train, extra_teacher = (2, 1) if o.initial_on_all else (1, 0)
            ev = Evaluations(train, off * n_s, off * n_t + d + extra_teacher,
                             f"off-diagonal: {n_t} teacher + {n_s} no-grad student ({o.intermediate}, "
                             f"{o.teacher_solver}); diagonal: 1 teacher; {train} student row(s) with grad")
    elif loss == "lfmd":
        ev = Evaluations(2, 0, 1, "2 student rows (t +- h) with grad; teacher at phi")
    elif loss == "lsd":
        ev = Evaluations(2 * off + d, off, d, "off-diagonal: 2 rows with grad + 1 no-grad target; diagonal: 1 row + teacher")
    elif loss == "meanflow":
        ev = Evaluations(1, 2 * off, 1, "1 row with grad; finite-difference target: 2 no-grad student; teacher")
    elif loss == "progressive":
        ev = Evaluations(1, 2, 1, "1 row with grad; 2 no-grad EMA steps; teacher")
    else:
        raise PlanError(f"the planner does not count loss {loss!r}; choose itvm, lfmd, lsd, meanflow or progressive")
    if guidance:  # baked classifier-free guidance: each teacher evaluation is a conditional + negative pair
        ev.teacher *= 2
    return ev


def flow_matching_evaluations() -> Evaluations:
    return Evaluations(1, 0, 0, "plain flow matching: 1 row with grad")


def with_distribution_matching(ev: Evaluations, fake_updates: int = 5) -> Evaluations:
    """``ev`` plus the distribution-matching term, per training sample: the student's generated sample (one row
    with grad), one teacher and one fake forward at its noised copy, and ``fake_updates`` fake flow-matching
    updates on it (the run's ``dm_fake_updates``). One generated sample per training sample is what a step makes
    at batches up to ``dm_batch`` (16); a larger batch generates ``dm_batch`` of them."""
    k = int(fake_updates)
    return Evaluations(ev.train + 1, ev.student_nograd, ev.teacher + 1,
                       ev.note + f"; distribution matching: 1 generated row with grad, 1 teacher + 1 fake forward, "
                       f"{k} fake update{'s' if k != 1 else ''} (forward + backward)", fake=ev.fake + 1,
                       fake_train=ev.fake_train + k)


# ------------------------------------------------------------ counting -----
@dataclass
class StudentCounts:
    kind: str                 # "full" or "lora"
    student_parameters: int   # every parameter of the student module (LoRA: base included)
    trained: int
    added_embeddings: int     # second-time (and guidance) embeddings
    student_buffers: int      # bytes of the student's own buffers (full copy only)
    largest_block: int        # parameters of the largest block (an FSDP unit)
    forward_flops: float
    train_flops: float
    activations: dict         # {"fp32"|"bf16": {"plain": bytes, "checkpointed": bytes, "weight_copies": bytes}}
    #: the distribution-matching fake network as this kind of student holds it (a full student: a trainable copy of
    #: the teacher; a LoRA student: adapters on the shared base): its forward and its flow-matching update's FLOPs,
    #: counted only when asked (``count(..., dm=True)``; None: not counted)
    fake_forward_flops: float | None = None
    fake_train_flops: float | None = None


@dataclass
class Counts:
    teacher: str
    class_name: str
    data_shape: list
    image_tokens: int
    text_tokens: int
    resolution: int
    teacher_parameters: int
    teacher_buffer_bytes: int
    teacher_forward_flops: float
    full: StudentCounts
    lora: StudentCounts | None
    lora_rank: int
    published: dict | None = None
    #: bytes of the teacher's parameters as the trainer holds them frozen: {"fp32": ..., "bf16": ...}
    teacher_held_bytes: dict = field(default_factory=dict)


def _buffer_bytes(module) -> int:
    return sum(b.numel() * 4 for b in module.buffers())  # fp32, as the trainer holds them


def _largest_block(network) -> int:
    from torch import nn

    best = 0
    for _, child in network.named_children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                best = max(best, sum(p.numel() for p in block.parameters()))
    return best or sum(p.numel() for p in network.parameters())


def count_student(spec: TeacherSpec, lora_rank: int, text_tokens: int, autocast_device: str = "cuda",
                  teacher=None, dm: bool = False) -> StudentCounts:
    """FLOPs (batch 1), saved activations (fp32 and bf16, with and without checkpointing) and the working set.

    The working set (saved activations plus activation gradients and temporaries, at their peak over a
    forward and backward) is measured in fp32 at batch 1 and 2: per sample = the difference, the rest is
    batch-independent.  bf16 scales it by the ratio of bf16 to fp32 saved bytes.
    """
    from .meta import count_fake_pass, measure_student, working_set

    teacher, student, view = build_models(spec, lora_rank, teacher=teacher)
    x, s, t, cond = example_inputs(teacher, text_tokens)
    checkpoint_note = ""
    fp32 = measure_student(student, x, s, t, cond, bf16=False, with_backward=True)
    student.zero_grad(set_to_none=True)
    bf16 = measure_student(student, x, s, t, cond, bf16=True, with_backward=False, autocast_device=autocast_device)
    work = {}
    for ckpt in (False, True):
        try:
            one = working_set(student, (x, s, t, cond), ckpt)
            two = working_set(student, example_inputs(teacher, text_tokens, batch=2)[:4], ckpt)
        except RuntimeError:
            if not ckpt:
                raise
            # a recomputation that fails on the meta device: scale the plain working set by the saved-bytes ratio
            ratio = (fp32.activations_checkpointed or fp32.activations) / max(fp32.activations, 1)
            work[True] = (int(work[False][0] * ratio), int(work[False][1] * ratio))
            checkpoint_note = "gradient checkpointing fails in recomputation for this family (estimated)"
            continue
        per = max(two - one, 0)
        work[ckpt] = (per, max(one - per, 0))
    one = working_set(student, (x, s, t, cond), False, bf16=True, autocast_device=autocast_device)
    two = working_set(student, example_inputs(teacher, text_tokens, batch=2)[:4], False, bf16=True,
                      autocast_device=autocast_device)
    bf16_plain = (max(two - one, 0), max(one - max(two - one, 0), 0))
    acts = {}
    for key, r in (("fp32", fp32), ("bf16", bf16)):
        ratio_ckpt = (r.activations_checkpointed or r.activations) / max(fp32.activations_checkpointed
                                                                        or fp32.activations, 1)
        plain = work[False] if key == "fp32" else bf16_plain  # measured; checkpointed bf16 is scaled
        acts[key] = {"plain": int(plain[0]), "plain_fixed": int(plain[1]),
                     "checkpointed": int(work[True][0] * ratio_ckpt),
                     "checkpointed_fixed": int(work[True][1] * ratio_ckpt),
                     "saved": r.activations, "saved_checkpointed": r.activations_checkpointed or r.activations,
                     "weight_copies": r.weight_copies, "weight_copies_checkpointed": r.weight_copies_checkpointed,
                     "checkpoint_kept": r.checkpoint_kept, "largest_block_recompute": r.largest_block,
                     "blocks": r.blocks, "checkpoint_note": checkpoint_note}
    fake_forward, fake_train = count_fake_pass(student, view, x, t, cond) if dm else (None, None)
    added = sum(p.numel() for n, p in student.named_parameters() if n.startswith(("second_time.", "guidance_embed.")))
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return StudentCounts(
        kind="lora" if lora_rank else "full",
        student_parameters=sum(p.numel() for p in student.parameters()),
        trained=trained, added_embeddings=added,
        student_buffers=0 if lora_rank else _buffer_bytes(student),
        largest_block=_largest_block(student.network),
        forward_flops=fp32.forward_flops, train_flops=fp32.train_flops, activations=acts,
        fake_forward_flops=fake_forward, fake_train_flops=fake_train)


def count(spec: TeacherSpec, lora_rank: int = 16, text_tokens: int | None = None,
          resolution: int | None = None, autocast_device: str = "cuda", dm: bool = False) -> Counts:
    """Every count the plan needs, from meta-device models (``dm``: the distribution-matching fake network's passes
    too, one more forward and backward per student kind).

    ``autocast_device``: whose autocast op lists the bf16 activations follow (``cuda``, what the plan is
    for; ``cpu``, to check the planner against CPU runs, where norms and softmax stay in bf16).
    """
    from .meta import count_teacher_forward

    if resolution is not None:
        if resolution < 1 or resolution % spec.vae_factor:
            raise PlanError(f"--resolution {resolution} must be a positive multiple of the VAE factor {spec.vae_factor}")
        patch = int(spec.config.get("patch_size") or 1) * (2 if spec.class_name == "FluxTransformer2DModel" else 1)
        if (resolution // spec.vae_factor) % patch:
            step = patch * spec.vae_factor
            raise PlanError(f"--resolution {resolution} must be a multiple of {step} (VAE factor {spec.vae_factor} x "
                            f"patch {patch}); try {max(step, resolution // step * step)}")
        spec = TeacherSpec(**{**asdict_shallow(spec), "resolution": resolution})
    tokens = spec.text_tokens if text_tokens is None else int(text_tokens)
    from .. import trainer  # noqa: F401 - imported before the clock of the first build, not inside it

    teacher = build_models(spec, 0)[0]  # the full student is a deepcopy, so this teacher stays plain
    teacher_parameters = sum(p.numel() for p in teacher.network.parameters())
    held = held_teacher_bytes(teacher)
    teacher_buffers = _buffer_bytes(teacher.network)  # before a LoRA student adds adapters to this network
    x, s, t, cond = example_inputs(teacher, tokens)
    try:
        t_flops = count_teacher_forward(teacher, x, t, cond)
    except Exception as e:  # noqa: BLE001 - e.g. a latent size the config's position table cannot hold
        raise PlanError(f"{spec.class_name} cannot run at {spec.resolution} px ({tuple(teacher.data_shape)} latents): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    full = count_student(spec, 0, tokens, autocast_device, teacher=teacher, dm=dm)
    lora = None
    if lora_rank:
        try:
            lora = count_student(spec, lora_rank, tokens, autocast_device, teacher=teacher, dm=dm)
        except Exception as e:  # noqa: BLE001 - peft missing or no target layer
            from ..config import ConfigError

            if not isinstance(e, ConfigError):
                raise
    published = None
    if spec.known is not None and spec.known.published:
        published = {"parameters": spec.known.published, "step": spec.known.published_step,
                     "source": spec.known.published_source, "repo": spec.known.repo}
    return Counts(
        teacher=spec.name, class_name=spec.class_name, data_shape=list(teacher.data_shape),
        image_tokens=teacher.adapter.image_tokens(teacher.network, tuple(teacher.data_shape)),
        text_tokens=tokens if teacher.adapter.text_inputs(teacher.network) else 0, resolution=spec.resolution,
        teacher_parameters=teacher_parameters, teacher_buffer_bytes=teacher_buffers, teacher_forward_flops=t_flops,
        full=full, lora=lora, lora_rank=lora_rank, published=published, teacher_held_bytes=held)


def held_teacher_bytes(teacher) -> dict:
    """Bytes of the teacher network's parameters as a run holds it frozen: fp32, and in bf16 runs as
    ``scale.keep_time_embedders_fp32`` + ``scale.hold_frozen`` leave it (on a meta copy: no memory)."""
    import copy

    from .. import scale

    held = copy.deepcopy(teacher)
    scale.keep_time_embedders_fp32(held)
    scale.hold_frozen(held.network, "bf16")
    nbytes = lambda net: sum(p.numel() * p.element_size() for p in net.parameters())  # noqa: E731
    return {"fp32": sum(p.numel() * 4 for p in teacher.network.parameters()), "bf16": nbytes(held.network)}


def asdict_shallow(obj) -> dict:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


# -------------------------------------------------------------- layouts -----
@dataclass
class Layout:
    student: str          # full | lora
    parallel: str         # dp | fsdp
    precision: str        # bf16 | fp32
    checkpointing: bool
    supported: bool = True
    note: str = ""
    terms: dict = field(default_factory=dict)   # bytes per GPU
    activations_per_sample: int = 0
    largest_batch: int = 0
    batch: int = 0
    peak_bytes: int = 0
    flops_per_sample: float = 0.0               # model FLOPs (what MFU is measured against)
    hardware_flops_per_sample: float = 0.0      # + checkpoint recomputation
    step_seconds: float | None = None
    samples_per_second: float | None = None

    @property
    def label(self) -> str:
        return f"{self.student} {self.parallel.upper()} {self.precision}{' ckpt' if self.checkpointing else ''}"


def sample_flops(sc: StudentCounts, teacher_flops: float, ev: Evaluations) -> float:
    """Model FLOPs of one training sample; the fake network's passes (``ev.fake``, ``ev.fake_train``) as the
    student kind ``sc`` holds it, measured (``StudentCounts.fake_forward_flops`` / ``fake_train_flops``)."""
    flops = ev.train * sc.train_flops + ev.student_nograd * sc.forward_flops + ev.teacher * teacher_flops
    if ev.fake or ev.fake_train:
        flops += ev.fake * sc.fake_forward_flops + ev.fake_train * sc.fake_train_flops
    return flops


def memory_terms(c: Counts, sc: StudentCounts, parallel: str, precision: str, gpus: int, ema: bool,
                 checkpointing: bool = False, dm: bool = False) -> dict:
    """Bytes per GPU of everything but activations, term by term (see the module docstring).

    The frozen teacher of a full student as the trainer holds it (bf16: ``teacher_held_bytes["bf16"]``;
    FSDP: its parameters sharded, its buffers whole); a LoRA student's base is its own fp32 weights.
    ``dm``: the distribution-matching fake network as the student kind holds it (a full student: a trainable copy of
    the teacher, weights and buffers; a LoRA student: adapters of its rank on the shared base), trained and sharded
    like the student.
    """
    shard = gpus if parallel == "fsdp" else 1
    f32 = 4
    if sc.kind == "full":
        held = c.teacher_held_bytes.get(precision if precision == "bf16" else "fp32", c.teacher_parameters * f32)
        teacher = held / shard + c.teacher_buffer_bytes
    else:
        teacher = c.teacher_parameters * f32 + c.teacher_buffer_bytes
    if sc.kind == "full":
        weights = sc.student_parameters * f32 / shard + sc.student_buffers
        ema_bytes = (sc.student_parameters * f32 + sc.student_buffers) if ema else 0
    else:
        weights = sc.trained * f32
        ema_bytes = sc.trained * f32 if ema else 0
    terms = {
        "student weights": weights,
        "gradients": sc.trained * f32 / shard,
        "AdamW m, v": 2 * sc.trained * f32 / shard,
        "EMA": ema_bytes,
        "teacher (frozen)" if sc.kind == "full" else "teacher = LoRA base": teacher,
        "AdamW step temps": sc.trained * f32 / shard,
        "DDP buckets": sc.trained * f32 if (parallel == "dp" and gpus > 1) else 0,
        "FSDP gathered blocks": (
            sc.largest_block * (2 * (2 if precision == "bf16" else 4) + 4) if parallel == "fsdp" else 0),
        "bf16 weight copies": (
            sc.activations["bf16"]["weight_copies_checkpointed" if checkpointing else "weight_copies"]
            if (precision == "bf16" and parallel == "dp") else 0),
        "batch-independent tensors": sc.activations[precision]["checkpointed_fixed" if checkpointing else "plain_fixed"],
    }
    # trained like the student: fp32 weights, gradients and AdamW state, sharded alike
    full_fake = dm and sc.kind == "full"
    trained = 0 if not dm else c.teacher_parameters if full_fake else sc.trained - sc.added_embeddings
    terms.update({
        "fake network weights": trained * f32 / shard + (c.teacher_buffer_bytes if full_fake else 0),
        "fake gradients": trained * f32 / shard,
        "fake AdamW m, v": 2 * trained * f32 / shard,
        "fake AdamW step temps": trained * f32 / shard,
        "fake DDP buckets": trained * f32 if (parallel == "dp" and gpus > 1) else 0,
    })
    return {k: int(v) for k, v in terms.items()}


FORWARD_ONLY = ("bf16 weight copies", "batch-independent tensors")
UPDATE_ONLY = ("gradients", "AdamW step temps", "fake gradients", "fake AdamW step temps")


def peak_bytes(terms: dict, act_per_sample: int, batch: int) -> int:
    static = sum(v for k, v in terms.items() if k not in FORWARD_ONLY + UPDATE_ONLY)
    forward = static + sum(terms.get(k, 0) for k in FORWARD_ONLY) + act_per_sample * batch
    update = static + sum(terms.get(k, 0) for k in UPDATE_ONLY)
    return int(max(forward, update))


def largest_batch(terms: dict, act_per_sample: int, usable: float, cap: int = 1 << 20) -> int:
    """The largest per-GPU batch whose peak fits ``usable`` bytes (0: not even the model state fits)."""
    if peak_bytes(terms, act_per_sample, 0) > usable:
        return 0
    if act_per_sample <= 0:
        return cap
    lo, hi = 0, cap
    while lo < hi:  # peak is non-decreasing in the batch
        mid = (lo + hi + 1) // 2
        if peak_bytes(terms, act_per_sample, mid) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class Plan:
    counts: Counts
    evaluations: dict
    gpu: str
    gpus: int
    gpu_memory: float
    headroom: float
    mfu: float
    ema: bool
    batch_size: int | None
    layouts: list
    recommendation: str
    assumptions: list
    full_fsdp_min_gpus: int | None = None
    dm: bool = False

    def to_json(self) -> dict:
        out = asdict(self)
        return out


def make_plan(c: Counts, ev: Evaluations, gpus: int = 1, gpu: str = "H100", gpu_memory: float | None = None,
              mfu: float = 0.35, headroom: float = 0.10, ema: bool = False, batch_size: int | None = None,
              dm: bool = False, dm_fake_updates: int = 5) -> Plan:
    """``dm``: plan the distribution-matching term, each student with its fake network as the run holds it
    (:func:`memory_terms`); ``ev`` then gains the term's evaluations (:func:`with_distribution_matching`,
    ``dm_fake_updates`` fake updates a sample)."""
    if gpu not in GPUS:
        raise PlanError(f"unknown --gpu {gpu!r}; choose one of {', '.join(GPUS)}")
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    if not 0 <= headroom < 1:
        raise PlanError(f"--headroom must be in [0, 1), got {headroom}")
    memory = float(gpu_memory or GPUS[gpu]["memory"])
    usable = memory * (1 - headroom)
    if dm_fake_updates < 1:
        raise PlanError(f"--dm-fake-updates must be >= 1, got {dm_fake_updates}")
    if dm and c.full.fake_train_flops is None:
        raise ValueError("make_plan(dm=True) needs counts of the fake network: count(..., dm=True)")
    if dm and not ev.fake_train:
        ev = with_distribution_matching(ev, dm_fake_updates)
    layouts = []
    for sc in [c.full] + ([c.lora] if c.lora else []):
        for parallel in ("dp", "fsdp"):
            for precision in ("bf16", "fp32"):
                for ckpt in (False, True):
                    lay = Layout(sc.kind, parallel, precision, ckpt)
                    if parallel == "fsdp" and gpus == 1:
                        continue
                    if parallel == "fsdp" and sc.kind == "lora":
                        lay.supported, lay.note = False, "LoRA students are refused under FSDP; use DP"
                    acts = sc.activations[precision]
                    lay.activations_per_sample = int(ev.train * acts["checkpointed" if ckpt else "plain"])
                    lay.terms = memory_terms(c, sc, parallel, precision, gpus, ema, ckpt, dm)
                    lay.flops_per_sample = sample_flops(sc, c.teacher_forward_flops, ev)
                    lay.hardware_flops_per_sample = lay.flops_per_sample + (ev.train * sc.forward_flops if ckpt else 0)
                    if lay.supported:
                        lay.largest_batch = largest_batch(lay.terms, lay.activations_per_sample, usable)
                        lay.batch = min(lay.largest_batch, batch_size) if batch_size else lay.largest_batch
                        if lay.batch >= 1:
                            lay.peak_bytes = peak_bytes(lay.terms, lay.activations_per_sample, lay.batch)
                            rate = GPUS[gpu][precision] * mfu
                            lay.step_seconds = lay.batch * lay.hardware_flops_per_sample / rate
                            lay.samples_per_second = gpus * rate / lay.hardware_flops_per_sample
                        else:
                            lay.peak_bytes = peak_bytes(lay.terms, lay.activations_per_sample, 1)
                    layouts.append(lay)
    plan = Plan(c, asdict(ev), gpu, gpus, memory, headroom, mfu, ema, batch_size, layouts, "", list(ASSUMPTIONS),
                dm=dm)
    plan.full_fsdp_min_gpus = min_gpus_full_fsdp(c, ev, usable, ema, batch_size or 1, dm=dm)
    plan.recommendation = recommend(plan)
    return plan


def min_gpus_full_fsdp(c: Counts, ev: Evaluations, usable: float, ema: bool, need: int = 1,
                       limit: int = 4096, dm: bool = False) -> int | None:
    """The fewest GPUs on which the full student fits with FSDP (bf16, gradient checkpointing); None: never
    (the EMA, the teacher's buffers and activations alone exceed a GPU)."""
    act = int(ev.train * c.full.activations["bf16"]["checkpointed"])
    n = 2
    while n <= limit:
        if largest_batch(memory_terms(c, c.full, "fsdp", "bf16", n, ema, True, dm), act, usable) >= need:
            return n
        n += 1 if n < 64 else n // 8
    return None


def _cost_key(lay: Layout):
    # cheapest first: fewest seconds per sample, then data parallel (no gathers), then no checkpointing
    return (1.0 / lay.samples_per_second, lay.parallel != "dp", lay.checkpointing)


def recommend(plan: Plan) -> str:
    need = plan.batch_size or 1
    fits = [lay for lay in plan.layouts if lay.supported and lay.largest_batch >= need]
    lines = []
    for kind in ("full", "lora"):
        mine = sorted((lay for lay in fits if lay.student == kind), key=_cost_key)
        if mine:
            best = mine[0]
            lines.append(f"{kind}: {best.label} (batch {best.batch}/GPU, {best.samples_per_second:.3g} samples/s "
                         f"on {plan.gpus} GPU(s), predicted)")
        elif any(lay.student == kind for lay in plan.layouts):
            more = ""
            if kind == "full":
                n = plan.full_fsdp_min_gpus
                more = (f" (FSDP bf16 + checkpointing fits from {n} GPUs)" if n else
                        " (not on any number of these GPUs: what is not sharded, an EMA and the activations, exceeds one)")
            lines.append(f"{kind}: does not fit {plan.gpus} x {plan.gpu_memory / GB:.3g} GB at batch {need}/GPU{more}")
    return "; ".join(lines) if lines else "nothing fits"


def cheapest(plan: Plan) -> Layout | None:
    need = plan.batch_size or 1
    fits = [lay for lay in plan.layouts if lay.supported and lay.largest_batch >= need]
    return min(fits, key=_cost_key) if fits else None


def parse_memory(text: str) -> float:
    """``80GB``, ``80G``, ``141 GB``, ``24GiB``, ``80e9`` -> bytes."""
    s = str(text).strip().replace(" ", "")
    units = {"gib": GIB, "gb": GB, "g": GB, "mib": 2 ** 20, "mb": 1e6, "tb": 1e12}
    low = s.lower()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if low.endswith(unit):
            number = low[: -len(unit)]
            break
    else:
        number, factor = low, 1.0
    try:
        value = float(number) * factor
    except ValueError:
        raise PlanError(f"--gpu-memory {text!r} is not a size; write e.g. 80GB or 24GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise PlanError(f"--gpu-memory must be positive, got {text!r}")
    return value
