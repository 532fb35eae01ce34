"""One rank of the 2-process frozen-teacher sharding test (``tests/integration/test_plan.py``,
test_frozen_teacher_sharded_gives_the_same_velocity, launches it under torchrun, gloo).

    torchrun --nproc-per-node 2 tests/shard_teacher_worker.py OUT_DIR

Each rank writes its readings to ``OUT_DIR/teacher-rank-RANK.json``.
"""

import json
import sys
from pathlib import Path

import torch

import tiny_models
from ttfm_distill.plan.estimate import example_inputs


def _shard_teacher_worker(out):
    """Run under torchrun: the tiny SD3 teacher sharded with ``scale.shard_frozen`` gives the unsharded velocity."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ttfm_distill import scale
    from ttfm_distill.teachers.diffusers_teacher import DiffusersFlowTeacher

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    teacher = DiffusersFlowTeacher(tiny_models.build("SD3Transformer2DModel", seed=0), source="tiny", sample_size=8)
    g = torch.Generator().manual_seed(3)
    x, _, t, cond = example_inputs(teacher, 8, batch=4, device="cpu", generator=g)
    with torch.no_grad():
        ref = teacher.velocity(x, t, cond)
        full = sum(p.numel() for p in teacher.network.parameters())
        units = scale.shard_frozen(teacher.network)
        local = sum(p.to_local().numel() for p in teacher.network.parameters() if isinstance(p, DTensor))
        v = teacher.velocity(x, t, cond)
        v2 = teacher.velocity(x, t, cond)  # a second call: the blocks were freed and are gathered again
    report = {"rank": rank, "units": units, "full": full, "local": local,
              "max_diff": (v - ref).abs().max().item(), "repeat_diff": (v2 - ref).abs().max().item()}
    (out / f"teacher-rank-{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _shard_teacher_worker(Path(sys.argv[1]))
