"""Every supported family through the real CLI: ``run --max-steps 2`` then ``sample --steps 2``.

The configs here differ from the test suite's (other patch sizes, depths,
guidance embeddings, PixArt's resolution conditioning, diffusion schedulers with
v-prediction, class-conditional UNets), so this checks more than the tests do.
Each teacher is saved as a folder first, so loading goes through the same path
as a user's download.

    python examples/families_smoke.py --out /tmp/families [--only DiT]

Prints one line per family (shapes, student == teacher at init, seconds) and
writes ``summary.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

FAMILIES = {
    "UNet2DModel-class": ("UNet2DModel", dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1,
        down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=8, num_class_embeds=5), {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 2.0}),
    "UNet2DCondition-vpred-ddim": ("UNet2DConditionModel", dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
        {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
         "prediction_type": "v_prediction", "num_train_timesteps": 1000}),
    "SD3-patch1": ("SD3Transformer2DModel", dict(
        sample_size=16, patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
        pos_embed_max_size=32), {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}),
    "Flux-dev-dynamic": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=32, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6]), {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
                                    "base_shift": 0.5, "max_shift": 1.15, "shift": 3.0}),
    "Sana-guidance": ("SanaTransformer2DModel", dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=16,
        mlp_ratio=2.5, sample_size=16, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
        guidance_embeds=True, timestep_scale=1.0), {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0}),
    "PixArt-resolution-cond": ("PixArtTransformer2DModel", dict(
        num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=48, caption_channels=16, sample_size=16, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=True), None),
    "DiT-patch4": ("DiTTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3, sample_size=16,
        patch_size=4, num_embeds_ada_norm=20, norm_type="ada_norm_zero"), None),
    "Lumina2": ("Lumina2Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=8, out_channels=8, hidden_size=48, num_layers=2,
        num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=16, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=[4, 6, 6], axes_lens=[64, 64, 64], cap_feat_dim=16),
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 6.0}),
    "AuraFlow": ("AuraFlowTransformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        pos_embed_max_size=64), {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.73}),
}


def save_teacher(name: str, root: Path) -> None:
    import diffusers

    cls_name, config, scheduler = FAMILIES[name]
    torch.manual_seed(0)
    net = getattr(diffusers, cls_name).from_config(config)
    sub = "unet" if cls_name.startswith("UNet") else "transformer"
    net.save_pretrained(root / sub)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline", sub: ["diffusers", cls_name]}))
    if scheduler:
        (root / "scheduler").mkdir(exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))


def identity_at_init(root: Path, sample_size) -> float:
    from ttfm_distill.config import RunConfig
    from ttfm_distill.teachers.loading import load_teacher
    from ttfm_distill.trainer import build_student

    teacher = load_teacher(str(root), sample_size=sample_size)
    student = build_student(teacher, RunConfig())
    x = torch.randn(3, *teacher.data_shape)
    s, t = torch.tensor([0.0, 0.3, 0.8]), torch.tensor([1.0, 0.6, 0.9])
    cond = teacher.sample_cond(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((student(x, s, t, cond) - teacher.velocity(x, s, cond)).abs().max())


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ttfm_distill", *map(str, args)], capture_output=True, text=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="families-smoke")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in FAMILIES:
        if args.only and args.only not in name:
            continue
        start = time.time()
        root = out / name / "teacher"
        save_teacher(name, root)
        size = 16 if FAMILIES[name][0] == "FluxTransformer2DModel" else None
        err = identity_at_init(root, size)
        extra = ["--sample-size", size] if size else []
        r = cli("run", "--teacher", root, "--output", out / name / "run", "--max-steps", 2, "--batch-size", 4,
                "--set", "pool_size=8", "--set", "pool_steps=2", "--set", "eval_samples=4", "--set",
                "reference_steps=2", "--quiet", "--overwrite", *extra)
        ok = r.returncode == 0
        shape = None
        if ok:
            r = cli("sample", "--model", out / name / "run", "--steps", 2, "--num", 4,
                    "--save-raw", out / name / "s.safetensors", "--output", out / name / "s.png")
            ok = r.returncode == 0
            if ok:
                from safetensors.torch import load_file

                shape = list(load_file(out / name / "s.safetensors")["samples"].shape)
        info = json.loads((out / name / "run" / "student" / "flow_map" / "ttfm_config.json").read_text())["teacher"] if ok else {}
        summary[name] = {"ok": ok, "identity_error_at_init": err, "sample_shape": shape,
                         "prediction_type": info.get("prediction_type"), "shift": info.get("shift"),
                         "seconds": round(time.time() - start, 1), **({} if ok else {"error": r.stderr.strip()[-300:]})}
        print(f"{name:28s} ok={ok} init|u-v|={err:.1e} samples={shape} prediction={info.get('prediction_type')} "
              f"shift={info.get('shift')} {summary[name]['seconds']}s", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
