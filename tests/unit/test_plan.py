"""`ttfm-distill plan`: counts equal the real models', FLOPs equal a real step's, memory terms add up."""

import pytest
import torch

import tiny_models
from ttfm_distill.config import RunConfig
from ttfm_distill.objectives import TrainBatch, make_objective
from ttfm_distill.plan import count, make_plan, objective_evaluations, parse_memory, resolve_teacher
from ttfm_distill.plan.estimate import (GB, PlanError, build_models, example_inputs, largest_batch, peak_bytes, FORWARD_ONLY, UPDATE_ONLY)
from ttfm_distill.plan.known_models import PUBLIC, TINY, TINY_NAMES, known_model
from ttfm_distill.plan.meta import LiveTracker, flop_counter

RANK = 4


@pytest.fixture(scope="module")
def sd3_counts():
    return count(resolve_teacher("tiny-sd3"), lora_rank=RANK, dm=True)


def test_tiny_builtins_are_the_test_configs():
    for cls, cfg in TINY.items():
        assert tiny_models.TINY_CONFIGS[cls] == cfg, cls
        assert known_model(TINY_NAMES[cls]).class_name == cls


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux", "tiny-unet-cond", "tiny-dit", "fashion16"])
def test_counts_equal_the_real_models_numel(name):
    from ttfm_distill.lora import build_lora_student
    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.factory import build_student

    spec = resolve_teacher(name)
    c = count(spec, lora_rank=RANK)
    # real tensors, built the way a run builds them (not through the planner)
    teacher = (load_teacher("builtin:fashion16") if name == "fashion16" else
               DiffusersFlowTeacher(tiny_models.build(spec.class_name), source=name, sample_size=8))
    student = build_student(teacher, RunConfig())
    assert c.teacher_parameters == sum(p.numel() for p in teacher.network.parameters())
    assert c.teacher_buffer_bytes == 4 * sum(b.numel() for b in teacher.network.buffers())
    assert c.full.student_parameters == sum(p.numel() for p in student.parameters())
    assert c.full.trained == sum(p.numel() for p in student.parameters() if p.requires_grad)
    assert c.full.added_embeddings == sum(p.numel() for p in student.second_time.parameters())
    assert c.full.trained == c.teacher_parameters + c.full.added_embeddings
    lora, _ = build_lora_student(teacher, RunConfig(lora_rank=RANK))
    assert c.lora.trained == sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert c.lora.trained < c.full.trained


def test_public_builtins_match_published_counts():
    """Within 1% of the published figure, or within its rounding where it is given to two digits."""
    from ttfm_distill.plan.estimate import build_network

    report = {}
    for m in PUBLIC:
        net = build_network(resolve_teacher(m.name))
        params = sum(p.numel() for p in net.parameters())
        stored = params + sum(b.numel() for b in net.buffers())  # what the checkpoint holds (SD3's position table)
        best = min(abs(params - m.published), abs(stored - m.published))
        report[m.name] = best / m.published
        assert best <= max(0.01 * m.published, m.published_step / 2), (m.name, params, stored, m.published)
    within_1pct = {k for k, v in report.items() if v <= 0.01}
    assert {"flux.1-dev", "sd3.5-large", "sana-1.6b"} <= within_1pct, report


def test_grouped_convolution_backward_is_twice_the_forward():
    for groups in (1, 8):
        conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)
        x = torch.randn(2, 8, 6, 6, requires_grad=True)
        with flop_counter() as fc:
            conv(x).sum().backward()
        table = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
        assert table["aten.convolution_backward"] == 2 * table["aten.convolution"]
        assert table["aten.convolution"] == 2 * 2 * 8 * (8 // groups) * 9 * 36


def _real_step_flops(name, rank, batch, diagonal, loss="itvm", options=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ttfm_distill.objectives.timesampling import sample_time_pairs

    spec = resolve_teacher(name)
    teacher, student, view = build_models(spec, rank, device="cpu")
    g = torch.Generator().manual_seed(0)
    x, _, _, cond = example_inputs(teacher, spec.text_tokens, batch=batch, device="cpu", generator=g)
    s, t = sample_time_pairs(batch, "mixed", diagonal, generator=g)
    objective = make_objective(loss, **(options or {}))
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as fc:
        objective(student, view, TrainBatch(x, s, t, cond, g)).loss.backward()
    return float(fc.get_total_flops())


@pytest.mark.parametrize("name, rank, diagonal, options", [
    ("tiny-sd3", 0, 0.0, {}), ("tiny-sd3", RANK, 0.5, {}), ("tiny-flux", 0, 0.25, {"teacher_solver": "euler"}),
    ("fashion16", 0, 0.0, {"intermediate": "uniform"}),
])
def test_flops_per_sample_equal_a_real_step(name, rank, diagonal, options):
    batch = 8
    c = count(resolve_teacher(name), lora_rank=RANK)
    ev = objective_evaluations("itvm", options, diagonal)
    plan = make_plan(c, ev, gpus=1, batch_size=batch)
    kind = "lora" if rank else "full"
    predicted = next(lay for lay in plan.layouts if lay.student == kind).flops_per_sample * batch
    assert predicted == pytest.approx(_real_step_flops(name, rank, batch, diagonal, options=options), rel=1e-9)


@pytest.mark.parametrize("loss, options, diagonal", [
    ("itvm", {}, 0.5), ("itvm", {"reading": "ema_only"}, 0.0), ("lfmd", {}, 0.0), ("lsd", {}, 0.5),
    ("meanflow", {"derivative": "fd"}, 0.5), ("progressive", {}, 0.5),
])
def test_evaluation_counts_match_the_objectives_calls(loss, options, diagonal):
    """Rows through the student (with / without grad) and the teacher, counted on real calls."""
    from ttfm_distill.objectives.timesampling import sample_time_pairs

    spec = resolve_teacher("tiny-sd3")
    teacher, student, _ = build_models(spec, 0, device="cpu")
    rows = {"train": 0, "student_nograd": 0, "teacher": 0}
    forward = student.forward

    def counted_student(x, s, t, cond=None):
        rows["train" if torch.is_grad_enabled() else "student_nograd"] += x.shape[0]
        return forward(x, s, t, cond)

    velocity = teacher.velocity

    def counted_teacher(x, t, cond=None):
        rows["teacher"] += x.shape[0]
        return velocity(x, t, cond)

    student.forward, teacher.velocity = counted_student, counted_teacher
    batch = 8
    g = torch.Generator().manual_seed(0)
    x, _, _, cond = example_inputs(teacher, spec.text_tokens, batch=batch, device="cpu", generator=g)
    s, t = sample_time_pairs(batch, "mixed", diagonal, generator=g)
    make_objective(loss, **options)(student, teacher, TrainBatch(x, s, t, cond, g), ema=student).loss.backward()
    ev = objective_evaluations(loss, options, diagonal)
    assert {k: v / batch for k, v in rows.items()} == {"train": ev.train, "student_nograd": ev.student_nograd,
                                                       "teacher": ev.teacher}


@pytest.mark.parametrize("loss,options,jvp", [("itvm", {}, False), ("lfmd", {}, False),
                                              ("lfmd", {"derivative": "jvp"}, True), ("lsd", {"derivative": "jvp"}, True),
                                              ("meanflow", {}, True), ("meanflow", {"derivative": "fd"}, False)])
def test_the_planner_refuses_only_objectives_that_declare_a_jvp(loss, options, jvp):
    assert make_objective(loss, **options).uses_jvp is jvp
    if jvp:
        with pytest.raises(PlanError, match="derivative=jvp is not counted"):
            objective_evaluations(loss, options, 0.25)
    else:
        assert objective_evaluations(loss, options, 0.25).train >= 1


def test_memory_terms_add_up(sd3_counts):
    c = sd3_counts
    ev = objective_evaluations("itvm", {}, 0.0)
    plan = make_plan(c, ev, gpus=4, gpu_memory=1 * GB, ema=True)
    f32 = 4
    for lay in plan.layouts:
        sc = c.full if lay.student == "full" else c.lora
        terms = lay.terms
        shard = 4 if lay.parallel == "fsdp" else 1
        assert terms["gradients"] == int(sc.trained * f32 / shard)
        assert terms["AdamW m, v"] == int(2 * sc.trained * f32 / shard)
        if lay.student == "full":  # the frozen teacher as the trainer holds it: bf16 weights with bf16, FSDP-sharded
            held = c.teacher_held_bytes["bf16" if lay.precision == "bf16" else "fp32"]
            assert terms["teacher (frozen)"] == int(held / shard + c.teacher_buffer_bytes)
        else:  # a LoRA student's base: its own fp32 weights (LoRA is refused under FSDP)
            assert terms["teacher = LoRA base"] == c.teacher_parameters * f32 + c.teacher_buffer_bytes
        if lay.student == "full":
            assert terms["student weights"] == int(sc.student_parameters * f32 / shard + sc.student_buffers)
            assert terms["EMA"] == sc.student_parameters * f32 + sc.student_buffers
        else:
            assert terms["student weights"] == terms["EMA"] == sc.trained * f32
        static = sum(v for k, v in terms.items() if k not in FORWARD_ONLY + UPDATE_ONLY)
        for b in (1, 7):
            forward = static + sum(terms[k] for k in FORWARD_ONLY) + lay.activations_per_sample * b
            update = static + sum(terms[k] for k in UPDATE_ONLY)
            assert peak_bytes(terms, lay.activations_per_sample, b) == max(forward, update)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-unet-cond", "tiny-dit", "fashion16"])
def test_held_teacher_bytes_equal_a_teacher_held_by_the_trainer(name):
    """The planned bf16 teacher bytes are those of a real teacher after the trainer's keep_time_embedders_fp32 +
    prepare_frozen; fp32: 4 bytes a parameter."""
    from ttfm_distill import scale
    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher
    from ttfm_distill.teachers.loading import load_teacher

    spec = resolve_teacher(name)
    c = count(spec, lora_rank=0)
    teacher = (load_teacher("builtin:fashion16") if name == "fashion16" else
               DiffusersFlowTeacher(tiny_models.build(spec.class_name), source=name, sample_size=8))
    scale.keep_time_embedders_fp32(teacher)
    scale.prepare_frozen(scale.make_accelerator("no", False, cpu=True), teacher.network, "bf16")
    assert c.teacher_held_bytes["fp32"] == 4 * c.teacher_parameters
    assert c.teacher_held_bytes["bf16"] == sum(p.numel() * p.element_size() for p in teacher.network.parameters())
    assert c.teacher_held_bytes["bf16"] < 0.9 * c.teacher_held_bytes["fp32"]


def test_distribution_matching_adds_the_fake_network_and_its_evaluations(sd3_counts):
    """--dm: each student with its fake network as the run holds it, trained and sharded like the student: for the
    full student a trainable copy of the teacher, for the LoRA student adapters of its rank on the shared base; per
    sample one more student row with grad, a teacher and a fake forward, and --dm-fake-updates fake updates."""
    c, f32 = sd3_counts, 4
    ev = objective_evaluations("itvm", {}, 0.0)
    plain = make_plan(c, ev, gpus=4, gpu_memory=1 * GB, batch_size=1)
    dm = make_plan(c, ev, gpus=4, gpu_memory=1 * GB, batch_size=1, dm=True)
    assert dm.evaluations["train"] == ev.train + 1 and dm.evaluations["teacher"] == ev.teacher + 1
    assert dm.evaluations["fake"] == 1 and dm.evaluations["fake_train"] == 5  # the run's 5 fake updates
    assert make_plan(c, ev, gpus=4, batch_size=1, dm=True, dm_fake_updates=2).evaluations["fake_train"] == 2
    assert {a.student for a in plain.layouts} == {"full", "lora"}
    for a, b in zip(plain.layouts, dm.layouts):
        shard = 4 if a.parallel == "fsdp" else 1
        sc = c.full if a.student == "full" else c.lora
        trained = c.teacher_parameters if a.student == "full" else c.lora.trained - c.lora.added_embeddings
        assert 0 < c.lora.trained - c.lora.added_embeddings < c.teacher_parameters
        assert b.terms["fake gradients"] == int(trained * f32 / shard)
        assert b.terms["fake AdamW m, v"] == int(2 * trained * f32 / shard)
        assert all(b.terms[k] == a.terms[k] for k in a.terms if not k.startswith("fake"))  # the rest is unchanged
        assert not any(v for k, v in a.terms.items() if k.startswith("fake"))
        assert b.activations_per_sample == int((ev.train + 1) * sc.activations[a.precision][
            "checkpointed" if a.checkpointing else "plain"])
        extra = sc.train_flops + c.teacher_forward_flops + sc.fake_forward_flops + 5 * sc.fake_train_flops
        assert b.flops_per_sample == pytest.approx(a.flops_per_sample + extra)
        assert b.peak_bytes >= a.peak_bytes
    # the fake's own passes: a full copy's forward is the teacher's; LoRA adapters cost more forward, less update
    assert c.full.fake_forward_flops == pytest.approx(c.teacher_forward_flops, rel=1e-9)
    assert c.lora.fake_forward_flops > c.teacher_forward_flops
    assert c.lora.fake_train_flops < c.full.fake_train_flops < c.full.train_flops
    with pytest.raises(PlanError, match="--dm-fake-updates"):
        make_plan(c, ev, gpus=2, dm=True, dm_fake_updates=0)


@pytest.mark.parametrize("rank", [0, RANK])
def test_distribution_matching_flops_equal_a_real_stage_step(rank):
    """What --dm adds per sample (full copy or LoRA adapters, --dm-fake-updates) against the FLOPs of the term's own
    step on real tensors: DmTerm.student_step (the generated rows with grad, a teacher and a fake forward, the
    backward into the student) and DmTerm.fake_step (dm_fake_updates fake forward + backward passes)."""
    from accelerate import Accelerator
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ttfm_distill.config import RunConfig
    from ttfm_distill.fake import DmTerm
    from ttfm_distill.runstate import RunState

    batch, updates = 4, 3
    spec = resolve_teacher("tiny-sd3")
    teacher, student, view = build_models(spec, rank, device="cpu")
    cfg = RunConfig(max_steps=10, lr=1e-4, dm_weight=0.3, dm_batch=batch, dm_fake_updates=updates, lora_rank=rank)
    term = DmTerm.for_run(cfg, RunState(10), view, "cpu", Accelerator(cpu=True), student)
    g = torch.Generator().manual_seed(0)
    cond = example_inputs(teacher, spec.text_tokens, batch=batch, device="cpu", generator=g)[3]
    with sdpa_kernel(SDPBackend.MATH), flop_counter() as fc:
        drawn, metrics = term.student_step(student, 0, cond, g, "cpu")
        term.fake_step(drawn, g)
    assert "dm_loss" in metrics and drawn[0].shape[0] == batch
    c = count(spec, lora_rank=RANK, dm=True)
    ev = objective_evaluations("itvm", {}, 0.0)
    kind = "lora" if rank else "full"
    plain, dm = (next(lay for lay in make_plan(c, ev, gpus=1, batch_size=batch, dm=d, dm_fake_updates=updates).layouts
                      if lay.student == kind) for d in (False, True))
    added = (dm.flops_per_sample - plain.flops_per_sample) * batch
    assert added == pytest.approx(float(fc.get_total_flops()), rel=1e-9)


def test_checkpointed_working_set_is_measured_for_dit():
    """DiT's time embedder sits inside each checkpointed block: the planner recomputes it with the student's own
    checkpoint function, as the trainer does, instead of estimating."""
    c = count(resolve_teacher("tiny-dit"), lora_rank=0)
    acts = c.full.activations["fp32"]
    assert acts["checkpoint_note"] == "" and acts["checkpointed"] > 0


def test_largest_batch_fits_and_one_more_does_not(sd3_counts):
    ev = objective_evaluations("itvm", {}, 0.0)
    for memory in (2e6, 3e7):
        plan = make_plan(sd3_counts, ev, gpus=2, gpu_memory=memory, headroom=0.1)
        usable = memory * 0.9
        checked = 0
        for lay in plan.layouts:
            if not lay.supported:
                continue
            b = lay.largest_batch
            assert b == largest_batch(lay.terms, lay.activations_per_sample, usable)
            if b >= 1:
                assert peak_bytes(lay.terms, lay.activations_per_sample, b) <= usable
                checked += 1
            assert peak_bytes(lay.terms, lay.activations_per_sample, b + 1) > usable
        assert checked


def test_fsdp_shards_the_student_and_the_frozen_teacher(sd3_counts):
    ev = objective_evaluations("itvm", {}, 0.0)
    one = make_plan(sd3_counts, ev, gpus=2)
    many = make_plan(sd3_counts, ev, gpus=8)
    pick = lambda p: next(lay for lay in p.layouts if lay.parallel == "fsdp" and lay.precision == "bf16")  # noqa: E731
    assert pick(many).terms["AdamW m, v"] * 4 == pytest.approx(pick(one).terms["AdamW m, v"], abs=4)
    buffers = sd3_counts.teacher_buffer_bytes  # FSDP shards parameters; buffers stay whole on every GPU
    assert (pick(many).terms["teacher (frozen)"] - buffers) * 4 == pytest.approx(
        pick(one).terms["teacher (frozen)"] - buffers, abs=4)
    assert not any(lay.supported for lay in many.layouts if lay.student == "lora" and lay.parallel == "fsdp")


def test_step_time_is_flops_over_peak_times_mfu(sd3_counts):
    ev = objective_evaluations("itvm", {}, 0.0)
    plan = make_plan(sd3_counts, ev, gpus=2, gpu="A100", mfu=0.5, batch_size=3)
    lay = next(lay for lay in plan.layouts if lay.precision == "bf16" and not lay.checkpointing)
    assert lay.step_seconds == pytest.approx(3 * lay.flops_per_sample / (312e12 * 0.5))
    ck = next(lay for lay in plan.layouts if lay.precision == "bf16" and lay.checkpointing and lay.parallel == "dp")
    assert ck.hardware_flops_per_sample == pytest.approx(ck.flops_per_sample + sd3_counts.full.forward_flops)


def test_working_set_matches_a_real_step_tensor_peak():
    """The planned peak (fp32, one GPU) against the live-tensor peak of a real ITVM step on CPU."""
    from ttfm_distill.objectives.timesampling import sample_time_pairs

    name, batch = "fashion16", 16
    spec = resolve_teacher(name)
    c = count(spec, lora_rank=0)
    plan = make_plan(c, objective_evaluations("itvm", {}, 0.0), gpus=1, gpu_memory=1e12, headroom=0.0,
                     batch_size=batch)
    lay = next(lay for lay in plan.layouts if lay.precision == "fp32" and not lay.checkpointing)
    teacher, student, _ = build_models(spec, 0, device="cpu")
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, foreach=False)
    objective = make_objective("itvm")

    def step(k):
        g = torch.Generator().manual_seed(k)
        x = teacher.sample_noise(batch, generator=g)
        s, t = sample_time_pairs(batch, "mixed", 0.0, generator=g)
        objective(student, teacher, TrainBatch(x, s, t, None, g)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)
    held = [*student.parameters(), *student.buffers(), *teacher.network.parameters(), *teacher.network.buffers(),
            *(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v))]
    keys = {v.untyped_storage()._cdata: v.untyped_storage().nbytes() for v in held}
    tracker = LiveTracker(set(keys))
    with tracker.mode:
        step(1)
    measured = sum(keys.values()) + tracker.peak
    assert lay.peak_bytes == pytest.approx(measured, rel=0.10)


def test_parse_memory():
    assert parse_memory("80GB") == 80e9
    assert parse_memory("24GiB") == 24 * 2 ** 30
    assert parse_memory("141 GB") == 141e9
    with pytest.raises(PlanError):
        parse_memory("lots")


# ------------------------------------------- the frozen teacher, sharded (2 processes, gloo) ----
def test_shard_frozen_refuses_a_trainable_module():
    from ttfm_distill import scale

    with pytest.raises(ValueError, match="trainable"):
        scale.shard_frozen(torch.nn.Linear(2, 2))
