"""Real FSDP2 sharding on CPU: two processes under torchrun (gloo) run ``tests/fsdp_worker.py``.

One launch serves every test here (module fixture): the student of the tiny teacher sharded with
``fully_shard`` and trained through ``backward_micro_batches``, and the real ``run_distillation`` with
Accelerate's FSDP2 preparation (switched on for CPU processes; see the worker's docstring).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fsdp_worker as worker
from helpers import free_port
from ttfm_distill import scale
from ttfm_distill.export import load_student
from ttfm_distill.objectives import make_objective
from ttfm_distill.teachers.loading import load_teacher


@pytest.fixture(scope="module")
def run(tiny_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(Path(worker.__file__)), str(tiny_teacher_dir), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out, env=env)
    if r.returncode != 0:
        pytest.fail(f"the 2-process run failed:\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}", pytrace=False)
    ranks = [json.loads((out / f"rank-{i}.json").read_text()) for i in range(2)]
    writes = [json.loads((out / f"writes-{i}.json").read_text()) for i in range(2)]
    return out, ranks, writes


#: the attention key bias: its gradient is zero in exact arithmetic (softmax ignores a shift shared by all
#: keys), so Adam turns rounding noise of either reduction order into steps of up to ``lr``
ZERO_GRADIENT = "network.mid_block.attentions.0.to_k.bias"


def max_diff(a: dict, b: dict, skip=()) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if k not in skip)


# ------------------------------------------------- fully_shard directly ----
def test_each_rank_holds_half_of_every_parameter(run):
    _, ranks, _ = run
    full = ranks[0]["full_numel"]
    assert ranks[1]["full_numel"] == full
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == full  # slices, together the whole
    assert all(0.45 * full < r["local_numel"] < 0.55 * full for r in ranks)


def test_sharded_student_is_the_teacher_at_init_with_fp32_time_embedders(run):
    _, ranks, _ = run
    for r in ranks:
        assert r["init_equal_fp32"]  # the second-time hook adds exactly zero at init, under sharding
        assert r["init_equal_bf16"]  # also under bf16 autocast with the time embedders kept in fp32
        assert r["dtypes_bf16"] == {"time": "torch.float32", "second": "torch.float32", "conv": "torch.bfloat16"}


def _reference(teacher_dir, steps, half=None):
    """The unsharded student in one process, trained on the whole batch of each step (or one half)."""
    teacher = load_teacher(str(teacher_dir))
    accelerator = scale.make_accelerator("no", False, cpu=True)
    objective = make_objective("itvm")
    student = worker.fresh_student(teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=worker.LR)
    states, losses = [], []
    for step in range(steps):
        batch = worker.full_batch(teacher, step)
        if half is not None:
            batch = batch.split(2)[half]
        losses.append(worker.train_step(accelerator, student, optimizer, objective, teacher, batch))
        states.append({k: v.clone() for k, v in student.state_dict().items()})
    return states, losses


def test_sharded_training_equals_one_process_on_the_whole_batch(run, tiny_teacher_dir):
    out, ranks, _ = run
    ref, ref_losses = _reference(tiny_teacher_dir, worker.STEPS)
    sharded = load_file(out / "shard" / "trained.safetensors")
    at_checkpoint = load_file(out / "shard" / "checkpoints" / f"step-{worker.STEPS - 1:08d}" / "student.safetensors")
    diff = max_diff(sharded, ref[-1], skip=[ZERO_GRADIENT])
    assert max_diff(at_checkpoint, ref[-2], skip=[ZERO_GRADIENT]) < 1e-6 and diff < 1e-6, diff  # reduction order
    noise = (sharded[ZERO_GRADIENT] - ref[-1][ZERO_GRADIENT]).abs().max().item()
    assert noise <= worker.STEPS * worker.LR * 1.01
    other, _ = _reference(tiny_teacher_dir, worker.STEPS, half=0)  # not vacuous: half the batch is another update
    assert max_diff(other[-1], ref[-1], skip=[ZERO_GRADIENT]) > 1e-4
    for step, loss in enumerate(ref_losses):  # each rank's loss is its half's mean
        assert (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2 == pytest.approx(loss, rel=1e-5)


def test_gathered_state_lands_on_rank0_only_and_only_rank0_writes(run):
    out, ranks, writes = run
    assert ranks[0]["full_state_keys"] == 118 and ranks[1]["full_state_keys"] == 0
    assert ranks[0]["optimizer_state_keys"] == 2 and ranks[1]["optimizer_state_keys"] == 0
    assert writes[1] == []  # rank 1 replaced no file into place, in either part
    assert str(out / "shard" / "trained.safetensors") in writes[0]
    assert str(out / "shard" / "checkpoints" / f"step-{worker.STEPS - 1:08d}") in writes[0]


def test_sharded_resume_from_the_checkpoint_is_exact(run):
    out, ranks, _ = run
    ckpt = out / "shard" / "checkpoints" / f"step-{worker.STEPS - 1:08d}"
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    names = set(load_file(ckpt / "student.safetensors"))
    assert opt["state"] and set(opt["state"]) <= names  # gathered optimizer state, keyed by parameter name
    assert all(torch.is_tensor(v) and not hasattr(v, "to_local") for s in opt["state"].values() for v in s.values())
    for r in ranks:
        assert r["resumed_differs_from_checkpoint"]  # the step moved the weights ...
        assert r["resumed_bit_for_bit"]  # ... and the restored model + optimizer re-took it exactly
        assert r["empty_load"] == "refused"  # a rank without the state fails instead of keeping old weights


# ------------------------------------ the trainer under Accelerate's FSDP2 ----
def test_accelerate_fsdp2_run_with_resume_matches_data_parallel(run):
    out, ranks, _ = run
    assert all(r["accelerate_sharded"] == {"sharded": True, "dtensor": True} for r in ranks)
    assert ranks[0]["resumed_from"] == 2  # the second call resumed the first's checkpoint under FSDP2
    step = out / "{}" / "checkpoints" / "step-00000004"
    for name in ("student.safetensors", "ema.safetensors"):
        fsdp = load_file(str(step / name).format("fsdp"))
        ddp = load_file(str(step / name).format("ddp"))
        moved = max_diff(load_file(str(out / "ddp" / "checkpoints" / "step-00000002" / name)), ddp)
        diff = max_diff(fsdp, ddp)  # the warm-up keeps lr tiny here: no Adam-amplified noise
        assert diff < 1e-6 and moved > 100 * diff, (name, moved, diff)
    opt = torch.load(str(step / "optimizer.pt").format("fsdp"), weights_only=True)["optimizer"]
    assert set(opt["state"]) <= set(fsdp)  # name-keyed under Accelerate's FSDP2 too
    dist = json.loads((out / "fsdp" / "metrics.json").read_text())["distributed"]
    assert dist["processes"] == 2 and dist["ranks_in_sync"]
    from ttfm_distill.tracking import read_log

    for name, validated in (("fsdp", [2, 4]), ("bf16", [2])):  # the sharded raw student, validated by all ranks
        rows = read_log(out / name / "train_log.jsonl")
        assert [r["step"] for r in rows if r["kind"] == "validation"] == validated, name
        assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, validated[-1] + 1)), name
    last = [r for r in read_log(out / "fsdp" / "train_log.jsonl") if r["kind"] == "validation"][-1]
    report = json.loads((out / "fsdp" / "metrics.json").read_text())["flow_map_error"]["student"]
    assert last["flow_map_error"] == pytest.approx(report, rel=1e-5)  # the same weights, gathered for the report


def test_accelerate_fsdp2_export_reloads_as_the_gathered_weights(run):
    out, _, _ = run
    student, config = load_student(out / "fsdp")
    reference, _ = load_student(out / "ddp")
    final = load_file(out / "fsdp" / "checkpoints" / "step-00000004" / "student.safetensors")
    exported = student.state_dict()
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
    assert max_diff(exported, reference.state_dict()) < 1e-6  # and the data-parallel run's, to float rounding
    assert config.weights == "raw"  # the trained (sharded) student, not the unsharded EMA, was exported


def test_accelerate_fsdp2_bf16_keeps_times_and_time_embedders_fp32(run):
    out, ranks, _ = run
    for r in ranks:
        assert r["bf16_finished"] == 2
        # s reaches the student unrounded, the embedders run on fp32 weights, the rest in bf16
        assert r["bf16_dtypes"] == {"s": "torch.float32", "time": "torch.float32", "second": "torch.float32",
                                    "conv": "torch.bfloat16"}
    weights = load_file(out / "bf16" / "student" / "flow_map" / "second_time.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_accelerate_fsdp2_shards_the_frozen_teacher_and_bf16_holds_it_in_bf16(run):
    """Under FSDP the frozen teacher is sharded (half of it on each rank), with bf16 also held in bf16; the bf16
    sharded run's losses are the bf16 data-parallel run's (teacher whole) to bf16 rounding, and it evaluates."""
    out, ranks, _ = run
    for r in ranks:
        f = r["frozen"]
        assert not f["ddp"]["sharded"] and f["ddp"]["local_bytes"] == f["ddp"]["whole_bytes"]
        assert not f["bf16ddp"]["sharded"] and f["bf16ddp"]["conv"] == "torch.bfloat16"
        assert f["ddp"]["conv"] == f["fsdp"]["conv"] == "torch.float32"
        assert f["fsdp"]["sharded"] and f["bf16"]["sharded"] and f["bf16"]["conv"] == "torch.bfloat16"
        assert 0.45 < f["fsdp"]["local_bytes"] / f["ddp"]["local_bytes"] < 0.55  # half of the fp32 teacher
        assert 0.45 < f["bf16"]["local_bytes"] / f["bf16ddp"]["local_bytes"] < 0.55  # half of the bf16 one
    for name, unsharded in (("fsdp", "ddp"), ("bf16", "bf16ddp")):  # the slices add up to the whole teacher
        assert sum(r["frozen"][name]["local_bytes"] for r in ranks) == ranks[0]["frozen"][unsharded]["local_bytes"]

    def losses(name):
        state = json.loads((out / name / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
        return [h["loss"] for h in state["history"]]

    sharded, whole = losses("bf16"), losses("bf16ddp")
    assert len(sharded) == len(whole) == 2
    assert sharded == pytest.approx(whole, rel=2e-2)  # bf16 rounding of the student's gathered weights
    assert json.loads((out / "bf16" / "metrics.json").read_text())["flow_map_error"]  # rank 0 evaluated alone


def test_accelerate_fsdp2_shards_the_fake_network_and_its_run_resumes_as_data_parallel(run):
    """The distribution-matching term under FSDP: the fake network is sharded like the student (half on each rank),
    its checkpoint holds the gathered whole, a run interrupted at step 2 and resumed to 4 ends where the data-parallel
    run ends (student, EMA, fake network and its optimiser), and a stage that starts mid-run (the sharded student
    takes its EMA's weights) gives the data-parallel stage's student."""
    out, ranks, _ = run
    for r in ranks:
        f = r["fake"]
        assert f["dm"]["sharded"] and f["dmstage"]["sharded"] and f["dmbf16"]["sharded"] and not f["dmddp"]["sharded"]
        assert r["dm_bf16_finished"] == 2
        assert 0.45 < f["dm"]["local_bytes"] / f["dmddp"]["local_bytes"] < 0.55
        assert f["dmddp"]["local_bytes"] == f["dmddp"]["whole_bytes"] == f["dm"]["whole_bytes"]
    assert ranks[0]["dm_resumed_from"] == 2
    step = out / "{}" / "checkpoints" / "step-00000004"
    for name in ("student.safetensors", "ema.safetensors", "fake.safetensors"):
        fsdp, ddp = load_file(str(step / name).format("dm")), load_file(str(step / name).format("dmddp"))
        moved = max_diff(load_file(str(out / "dmddp" / "checkpoints" / "step-00000002" / name)), ddp, skip=[ZERO_GRADIENT])
        diff = max_diff(fsdp, ddp, skip=[ZERO_GRADIENT])
        assert diff < 1e-6 and moved > 100 * diff, (name, moved, diff)
    fake_opt = torch.load(str(step / "fake_optimizer.pt").format("dm"), weights_only=True)
    assert fake_opt["state"] and set(fake_opt["state"]) <= set(load_file(str(step / "fake.safetensors").format("dm")))
    stage = out / "{}" / "checkpoints" / "step-00000003" / "student.safetensors"
    assert max_diff(load_file(str(stage).format("dmstage")), load_file(str(stage).format("dmstageddp")),
                    skip=[ZERO_GRADIENT]) < 1e-6


def test_a_lora_students_fake_adapters_stay_in_step_across_ranks_and_resume_bit_for_bit(run):
    """Data parallel with a LoRA student and the term: the fake adapters' gradients are averaged (both ranks hold
    the same fake at every checkpoint), and a run interrupted at step 2 and resumed to 4 ends where the straight
    run ends, student, EMA and fake."""
    out, ranks, _ = run
    a, b = (r["fake_sums"] for r in ranks)
    assert a == b and a["dmlora"] != 0.0
    assert ranks[0]["dmlora_resumed_from"] == 2
    step = out / "{}" / "checkpoints" / "step-00000004"
    for name in ("student.safetensors", "ema.safetensors", "fake.safetensors"):
        x, y = load_file(str(step / name).format("dmlora")), load_file(str(step / name).format("dmloraref"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    fake2 = load_file(str(out / "dmlora" / "checkpoints" / "step-00000002" / "fake.safetensors"))
    assert max_diff(fake2, load_file(str(step / "fake.safetensors").format("dmlora"))) > 0  # it trained


def test_the_adversarial_term_under_data_parallel_keeps_ranks_in_step_and_resumes_bit_for_bit(run):
    """The discriminator head rides in the fake network: its gradients are averaged with the fake's (both ranks hold
    the same fake and head at every checkpoint), and an interrupted run resumes to the straight run's weights."""
    out, ranks, _ = run
    a, b = (r["fake_sums"] for r in ranks)
    assert a["dmgan"] == b["dmgan"] and a["dmganref"] == b["dmganref"]
    assert ranks[0]["dmgan_resumed_from"] == 2
    step = out / "{}" / "checkpoints" / "step-00000004"
    for name in ("student.safetensors", "ema.safetensors", "fake.safetensors"):
        x, y = load_file(str(step / name).format("dmgan")), load_file(str(step / name).format("dmganref"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    fake = load_file(str(step / "fake.safetensors").format("dmgan"))
    head2 = load_file(str(out / "dmgan" / "checkpoints" / "step-00000002" / "fake.safetensors"))
    head = [k for k in fake if k.startswith("head.")]
    assert head and any(not torch.equal(fake[k], head2[k]) for k in head)  # the head is state, and it learns
