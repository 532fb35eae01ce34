"""How much the features a velocity head could read vary with the time, on real teachers.

For each teacher folder: the RMS of the output norm's input (``pre``), the RMS of the features entering
``conv_out`` (``post``) and their per-channel spatial spread (``spread``), on 4 fixed noises at
t = 0.02 / 0.3 / 0.6 / 0.95 (docs/results.md, the diffusers-script DDPM).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/head_features.py benchmarks/results/zoo-teachers/ddpm-script \
        benchmarks/results/ddpm-teacher
"""

import sys

import torch

from ttfm_distill.config import RunConfig
from ttfm_distill.teachers.loading import load_teacher
from ttfm_distill.factory import build_student


def main() -> None:
    for path in sys.argv[1:]:
        teacher = load_teacher(path)
        student = build_student(teacher, RunConfig(teacher=path, student_output="velocity"))
        net, seen = student.network, {}
        net.conv_norm_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", a[0].detach()))
        net.conv_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("post", a[0].detach()))
        torch.manual_seed(0)
        x = torch.randn(4, *teacher.data_shape)
        rows = {}
        for t in (0.02, 0.3, 0.6, 0.95):
            with torch.no_grad():
                student(x, torch.full((4,), t), torch.full((4,), t))
            rows[t] = {"pre": round(seen["pre"].pow(2).mean().sqrt().item(), 3),
                       "post": round(seen["post"].pow(2).mean().sqrt().item(), 3),
                       "spread": round(seen["post"].std(dim=(2, 3)).mean().item(), 3)}
        print(path, "norm groups", net.config.norm_num_groups, rows)


if __name__ == "__main__":
    main()
