"""Students made from a teacher: the one place a run's student is constructed (a diffusers teacher's network
with the second time added, a LoRA student on the teacher's own network, or a fresh MLP for the exact 2-D teachers).
"""

from __future__ import annotations

import torch

from .config import ConfigError, RunConfig


def build_student(teacher, cfg: RunConfig):
    """The student initialised from the teacher (diffusers) or fresh (analytic), seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    if teacher.has_network:
        from .scale import trainable_copy
        from .student import TwoTimeFlowMap, resolve_student_output

        network = trainable_copy(teacher.network).train().requires_grad_(True)
        guidance = None
        if cfg.guidance_range is not None:
            guidance = {"range": [float(v) for v in cfg.guidance_range], "default": cfg.default_guidance()}
        return TwoTimeFlowMap(network, second_time_input=cfg.second_time_input, adapter=teacher.adapter, io=teacher.io,
                              null_text=teacher.null_text, guidance=guidance,
                              student_output=resolve_student_output(cfg.student_output, teacher.io, network))
    if cfg.student_output not in ("auto", "native"):
        raise ConfigError(f"student_output={cfg.student_output} is for diffusers teachers; {teacher.name} trains an "
                          "MLP student: use student_output=native")
    from .mlp import MlpFlowMap

    return MlpFlowMap(dim=teacher.data_shape[0], width=cfg.mlp_width, depth=cfg.mlp_depth)


def student_for_run(teacher, cfg: RunConfig):
    """``(student, teacher as the objectives see it)``: a LoRA student's teacher is the base-weights view of the
    one shared network (``lora.BaseWeightsTeacher``); otherwise the teacher itself."""
    if cfg.lora_rank > 0:
        from .lora import build_lora_student

        return build_lora_student(teacher, cfg)
    return build_student(teacher, cfg), teacher
