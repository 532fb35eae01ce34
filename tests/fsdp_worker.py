"""One rank of the 2-process CPU FSDP2 test (``tests/integration/test_fsdp.py`` launches it under torchrun, gloo).

    torchrun --nproc-per-node 2 tests/fsdp_worker.py TEACHER_DIR OUT_DIR [shard,accelerate]

Part ``shard``: the UNet student of the tiny teacher sharded with ``fully_shard`` (FSDP2), trained
with ITVM through the trainer's ``backward_micro_batches``, each rank on its half of the batch.
Rank 0 writes the gathered states under ``OUT_DIR/shard``; the test compares them with an unsharded
single-process model trained on the whole batch.

Part ``accelerate``: the real ``run_distillation`` with Accelerate's own FSDP2 preparation. Accelerate
1.15 turns FSDP on only for GPU-class devices, so ``make_accelerator`` is wrapped to set the FSDP
distributed type and an FSDP2 plugin on the CPU accelerator; everything after that (``prepare``,
the optimizer swap, gathering, checkpoints, resume, export) is the unchanged code.  The same run is
repeated under plain data parallel (DDP) as the reference.

Every rank records the files it replaced into place (all project writes end in ``os.replace``) in
``OUT_DIR/writes-RANK.json``, and its checks in ``OUT_DIR/rank-RANK.json``.
"""

import json
import os
import sys
from pathlib import Path

import torch

from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ttfm_distill import scale
from ttfm_distill.config import RunConfig
from ttfm_distill.convention import interpolate
from ttfm_distill.objectives import TrainBatch, make_objective
from ttfm_distill.objectives.timesampling import sample_time_pairs
from ttfm_distill.teachers.loading import load_teacher
from ttfm_distill.step import backward_micro_batches

#: shared with the single-process reference in test_fsdp.py
from ttfm_distill.factory import build_student

#: shared with the single-process reference in test_fsdp.py
from ttfm_distill.checkpoints import save_checkpoint

#: shared with the single-process reference in test_fsdp.py
LR, STEPS, BATCH = 1e-3, 3, 8
TEACHER = OUT = None
WRITES = []


def full_batch(teacher, step: int) -> TrainBatch:
    """The whole batch of ``step`` (the same on every rank; each rank trains on its half)."""
    g = torch.Generator().manual_seed(100 + step)
    x1 = teacher.sample_noise(BATCH, generator=g) * 0.5
    x0 = teacher.sample_noise(BATCH, generator=g)
    s, t = sample_time_pairs(BATCH, "mixed", 0.25, generator=g)
    return TrainBatch(interpolate(x0, x1, s), s, t, None, g)


def fresh_student(teacher):
    """The student every test starts from: teacher init, second-time last layer moved off zero so
    every parameter gets a gradient."""
    student = build_student(teacher, RunConfig())
    with torch.no_grad():
        student.second_time.linear_2.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    return student


def train_step(accelerator, model, optimizer, objective, teacher, batch):
    loss, _, finite = backward_micro_batches(accelerator, model, objective, teacher, batch, model, 1)
    assert finite
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def shard_part(accelerator, rank, world, report):
    from safetensors.torch import load_file

    from ttfm_distill.fileio import save_tensors

    out = OUT / "shard"
    teacher = load_teacher(str(TEACHER))
    objective = make_objective("itvm")
    student = build_student(teacher, RunConfig())  # at init: exactly the teacher (zero last layer)
    for block in (*student.network.down_blocks, student.network.mid_block, *student.network.up_blocks):
        fully_shard(block)  # nested units, as an auto-wrap policy makes them
    fully_shard(student)
    assert isinstance(student, FSDPModule) and scale.module_is_sharded(student)
    assert scale.is_sharded(accelerator, student) and not scale.is_sharded(accelerator)

    # (a) each rank holds a slice of every parameter, together exactly the whole
    params = list(student.parameters())
    assert all(isinstance(p, DTensor) for p in params)
    report["local_numel"] = sum(p.to_local().numel() for p in params)
    report["full_numel"] = sum(p.numel() for p in params)

    # the second-time hook and the fp32 time embedders under sharding: the output is the teacher's
    g = torch.Generator().manual_seed(5)
    x = teacher.sample_noise(4, generator=g)
    s = torch.rand(4, generator=g) * 0.5
    t = s + 0.4
    with torch.no_grad():
        v = teacher.velocity(x, s)
        report["init_equal_fp32"] = bool(torch.equal(student(x, s, t), v))
        scale.keep_time_embedders_fp32(student, teacher)  # what a bf16 run does; autocast as the trainer's
        seen = {}
        hooks = [m.register_forward_hook(lambda m, a, o, k=k: seen.setdefault(k, str(o.dtype)) and None)
                 for k, m in (("time", student.network.time_embedding), ("second", student.second_time),
                              ("conv", student.network.conv_in))]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u_bf16 = student(x, s, t)
            v_bf16 = teacher.velocity(x, s)
        for h in hooks:
            h.remove()
        report["init_equal_bf16"] = bool(torch.equal(u_bf16, v_bf16))
        report["dtypes_bf16"] = seen
    del student

    # (b) training, each rank on its half of each batch, against the single-process run (in the test)
    student = fresh_student(teacher)
    fully_shard(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    losses = []
    for step in range(STEPS - 1):
        half = full_batch(teacher, step).split(world)[rank]
        losses.append(train_step(accelerator, student, optimizer, objective, teacher, half))
    state = scale.full_model_state(accelerator, student, student)
    opt = scale.optimizer_state(accelerator, student, optimizer)
    report["full_state_keys"] = len(state)
    report["optimizer_state_keys"] = len(opt)
    if rank == 0:  # (d) only rank 0 holds the full dicts, and writes: the trainer's own checkpoint writer
        save_checkpoint(out, STEPS - 1, state, None, opt, scheduler, keep=2, history=[])
    accelerator.wait_for_everyone()
    half = full_batch(teacher, STEPS - 1).split(world)[rank]
    losses.append(train_step(accelerator, student, optimizer, objective, teacher, half))
    after = scale.full_model_state(accelerator, student, student)
    if rank == 0:
        save_tensors(out / "trained.safetensors", after)
    report["losses"] = losses

    # (c) resume: the checkpoint on disk (read by every rank) into a freshly sharded student
    ckpt = out / "checkpoints" / f"step-{STEPS - 1:08d}"
    restored = fresh_student(teacher)
    fully_shard(restored)
    optimizer2 = torch.optim.AdamW(restored.parameters(), lr=LR)
    # as in the trainer, a scheduler on it before the load (the saved groups hold its ``initial_lr``)
    torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda k: 1.0)
    weights = load_file(ckpt / "student.safetensors")
    scale.load_full_model_state(accelerator, restored, restored, weights)
    opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)["optimizer"]
    scale.load_optimizer_state(accelerator, restored, optimizer2, opt_state)
    try:
        scale.load_full_model_state(accelerator, restored, restored, {})
        report["empty_load"] = "accepted"
    except ValueError:
        report["empty_load"] = "refused"
    train_step(accelerator, restored, optimizer2, objective, teacher, half)
    again = scale.full_model_state(accelerator, restored, restored)
    report["resumed_bit_for_bit"] = bool(rank != 0 or (again.keys() == after.keys() and all(
        torch.equal(again[k], after[k]) for k in after)))
    report["resumed_differs_from_checkpoint"] = bool(rank != 0 or any(
        not torch.equal(weights[k], after[k]) for k in after))


def force_accelerate_fsdp2(make):
    """``make_accelerator`` with Accelerate's FSDP2 switched on for CPU processes."""
    def make_fsdp(*args, **kwargs):
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator = make(*args, **kwargs)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT",
                                                reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["ResnetBlock2D"])
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        # as a real FSDP launch leaves it: in the process's state too, which every new AcceleratorState copies
        PartialState._shared_state["distributed_type"] = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        scale.adjust_fsdp_precision(accelerator)  # what make_accelerator does after Accelerate's own setup
        return accelerator
    return make_fsdp


def accelerate_part(accelerator, rank, world, report):
    from ttfm_distill import trainer

    def cfg(name, steps, **kw):
        base = dict(teacher=str(TEACHER), output=str(OUT / name), batch_size=8, pool_size=32, pool_steps=4,
                    eval_samples=8, reference_steps=4, checkpoint_every=2, log_every=1, ema_decay=0.9,
                    loss_options={"target_model": "ema"}, export_weights="raw", max_steps=steps,
                    mixed_precision="no")  # fp32: FSDP against data parallel to float rounding (bf16: below)
        base.update(kw)
        return RunConfig(**base)

    plain = scale.make_accelerator
    frozen = report.setdefault("frozen", {})
    prepare = scale.prepare_frozen

    def spy_frozen(accelerator, module, mixed_precision):  # the teacher as each run holds it
        whole = scale.frozen_bytes(module)
        out = prepare(accelerator, module, mixed_precision)
        conv = module.down_blocks[0].resnets[0].conv1.weight
        frozen[current["run"]] = {"whole_bytes": whole, "local_bytes": scale.frozen_bytes(module),
                                  "sharded": scale.module_is_sharded(module), "conv": str(conv.dtype)}
        return out

    current = {}

    def run(name, steps, **kw):
        current["run"] = name
        return trainer.run_distillation(cfg(name, steps, **kw), show_progress=False)

    scale.prepare_frozen = spy_frozen
    run("ddp", 4)  # the reference: data parallel
    # bf16 unsharded (data parallel): the reference of the bf16 FSDP run below, teacher held in bf16 whole
    run("bf16ddp", 2, mixed_precision="bf16", ema_decay=0.0, loss_options={})
    dm_part(run, report, sharded=False)  # the distribution-matching term's references
    from accelerate.state import PartialState

    process_type = PartialState._shared_state["distributed_type"]
    scale.make_accelerator = force_accelerate_fsdp2(plain)
    try:
        seen = {}

        def spy(accelerator, wrapped, model, sharded=None):
            seen["sharded"] = scale.is_sharded(accelerator, wrapped)
            seen["dtensor"] = any(isinstance(p, DTensor) for p in wrapped.parameters())
            return spy_next(accelerator, wrapped, model, sharded)

        spy_next, scale.full_model_state = scale.full_model_state, spy
        run("fsdp", 2)  # interrupted after step 2 ...
        res = run("fsdp", 4)  # ... and resumed to 4
        scale.full_model_state = spy_next
        report["accelerate_sharded"] = seen
        report["resumed_from"] = res.resumed_from
        # bf16 under FSDP2: time embedders kept in fp32 in their own units, times reach the student in fp32
        dtypes = {}
        from ttfm_distill.student import TwoTimeFlowMap

        forward = TwoTimeFlowMap.forward

        def spy_forward(self, x, s, t, cond=None):
            dtypes.setdefault("s", str(s.dtype))
            if not dtypes.get("hooked"):
                dtypes["hooked"] = True
                for k, m in (("time", self.network.time_embedding.linear_1), ("second", self.second_time.linear_2),
                             ("conv", self.network.conv_in)):
                    m.register_forward_hook(lambda m, a, o, k=k: dtypes.setdefault(k, str(o.dtype)) and None)
            return forward(self, x, s, t, cond)

        TwoTimeFlowMap.forward = spy_forward
        res = run("bf16", 2, mixed_precision="bf16", ema_decay=0.0, loss_options={})
        TwoTimeFlowMap.forward = forward
        dtypes.pop("hooked", None)
        report["bf16_dtypes"] = dtypes
        report["bf16_finished"] = res.steps
        dm_part(run, report, sharded=True)
    finally:
        scale.make_accelerator = plain
        scale.prepare_frozen = prepare
        PartialState._shared_state["distributed_type"] = accelerator.state.distributed_type = process_type


def dm_part(run, report, sharded: bool):
    """The distribution-matching term: a run interrupted at step 2 and resumed to 4 (under data parallel: one run of
    4 steps, the reference), and a run whose stage starts at step 1 (the student takes its EMA's weights). Under
    FSDP2 (``sharded``) the fake network is sharded like the student; each run records how it was held."""
    from ttfm_distill.fake import DmTerm

    held = report.setdefault("fake", {})
    prepare_dm = DmTerm.prepare
    current = None

    def spy_prepare(self):  # how each run holds its fake network once prepared
        whole = sum(p.numel() * p.element_size() for p in self.fake.parameters())
        prepare_dm(self)
        held[current] = {"whole_bytes": whole, "local_bytes": scale.frozen_bytes(self.wrapped),
                         "sharded": self.sharded and scale.module_is_sharded(self.wrapped)}

    dm = dict(dm_weight=0.3, dm_fake_updates=2, dm_batch=4, ema_decay=0.9)
    tag = "" if sharded else "ddp"
    DmTerm.prepare = spy_prepare
    try:
        current = "dm" + tag
        if sharded:
            run(current, 2, **dm)  # interrupted after step 2 ...
            report["dm_resumed_from"] = run(current, 4, **dm).resumed_from  # ... and resumed to 4
        else:
            run(current, 4, **dm)
        current = "dmstage" + tag
        run(current, 3, dm_stage_steps=2, **dm)
        if not sharded:  # a LoRA student's fake (adapters on the shared base) and the adversarial term, data parallel
            sums = report.setdefault("fake_sums", {})
            state_dm = DmTerm.state

            def spy_state(self):  # every rank's fake adapters at each checkpoint
                out = state_dm(self)
                sums[current] = float(sum(v.double().sum() for v in out["fake"].values()))
                return out

            DmTerm.state = spy_state
            try:
                current = "dmlora"
                run(current, 2, lora_rank=4, **dm)  # interrupted after step 2 ...
                report["dmlora_resumed_from"] = run(current, 4, lora_rank=4, **dm).resumed_from  # ... resumed to 4
                current = "dmloraref"
                run(current, 4, lora_rank=4, **dm)
                gan = dict(dm, dm_gan_weight=0.5, dm_gan_fake_weight=1.0)  # the adversarial term's head too
                current = "dmgan"
                run(current, 2, **gan)
                report["dmgan_resumed_from"] = run(current, 4, **gan).resumed_from
                current = "dmganref"
                run(current, 4, **gan)
            finally:
                DmTerm.state = state_dm
        if sharded:  # bf16: the fake network's fp32 time embedders in units of their own, as the student's
            current = "dmbf16"
            report["dm_bf16_finished"] = run(current, 2, **{**dm, "mixed_precision": "bf16", "loss_options": {}}).steps
    finally:
        DmTerm.prepare = prepare_dm


def _recording_replace(src, dst, *a, _replace=os.replace, **kw):
    WRITES.append(str(dst))
    return _replace(src, dst, *a, **kw)


def main():
    global TEACHER, OUT
    TEACHER, OUT = Path(sys.argv[1]), Path(sys.argv[2])
    parts = sys.argv[3].split(",") if len(sys.argv) > 3 else ["shard", "accelerate"]
    torch.set_num_threads(1)
    os.replace = _recording_replace
    accelerator = scale.make_accelerator("no", False, cpu=True)  # the process group (gloo), as the trainer's
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, world
    report = {"rank": rank}
    if "accelerate" in parts:  # first: the trainer's runs in a fresh process, as a user runs them
        accelerate_part(accelerator, rank, world, report)
        accelerator.wait_for_everyone()
    if "shard" in parts:
        shard_part(accelerator, rank, world, report)
    (OUT / f"rank-{rank}.json").write_text(json.dumps(report))
    (OUT / f"writes-{rank}.json").write_text(json.dumps(WRITES))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
