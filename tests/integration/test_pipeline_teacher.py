"""A whole tiny text-to-image pipeline folder (SD3: VAE, two CLIPs, T5, in-memory tokenizers) as a teacher."""

import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def test_pipeline_run_exports_vae_and_samples_images_from_a_prompt(sd3_dir, tmp_path):
    from PIL import Image

    from ttfm_distill.config import RunConfig
    from ttfm_distill.export import load_student
    from ttfm_distill.trainer import run_distillation

    cfg = RunConfig(teacher=str(sd3_dir), output=str(tmp_path / "run"), max_steps=2, batch_size=2, pool_size=4,
                    pool_steps=2, eval_samples=2, reference_steps=2, guidance_scale=2.0)
    result = run_distillation(cfg, show_progress=False)
    folder = result.output / "student"
    assert (folder / "vae" / "config.json").exists() and (folder / "flow_map" / "null_text.safetensors").exists()
    student, meta = load_student(folder)
    assert meta.teacher["guidance_scale"] == 2.0 and student.null_text is not None
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", "sample", "--model", str(result.output), "--steps", "2",
                        "--num", "2", "--prompt", "a big red house", "--output", str(tmp_path / "s.png")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "s.png") as im:  # decoded 16x16 RGB images, not 8x8 latents
        assert im.mode == "RGB" and im.size[0] >= 16
    r = subprocess.run([sys.executable, "-m", "ttfm_distill", "sample", "--model", str(result.output),
                        "--class-label", "1"], capture_output=True, text=True)
    assert r.returncode != 0 and "only for class-conditional" in r.stderr and "Traceback" not in r.stderr


def test_pipeline_teacher_on_captioned_images_encodes_once(sd3_dir, tmp_path):
    """Real data for a latent text teacher: images through its VAE and captions through its encoders, once."""
    import io
    import json

    import numpy as np
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature
    from PIL import Image

    from ttfm_distill.config import RunConfig
    from ttfm_distill.trainer import run_distillation

    def png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    pixels = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    Dataset.from_dict({"image": [{"bytes": png(p), "path": None} for p in pixels],
                       "caption": [f"a {c} house" for c in ("red", "blue", "green") * 2]},
                      features=Features({"image": ImageFeature(), "caption": Value("string")})
                      ).to_parquet(str(tmp_path / "d.parquet"))
    reports = []
    for name in ("a", "b"):
        cfg = RunConfig(teacher=str(sd3_dir), output=str(tmp_path / name), data=str(tmp_path / "d.parquet"),
                        data_cache=str(tmp_path / "cache"), max_steps=2, batch_size=2, eval_samples=2,
                        reference_steps=2)
        run_distillation(cfg, show_progress=False)
        reports.append(json.loads((tmp_path / name / "metrics.json").read_text())["data"])
    cached = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.safetensors"))
    assert "latents" in cached and "prompts" in cached, cached
    assert reports[1]["cache_hit"] and not reports[0]["cache_hit"], reports
