"""Helpers that more than one test file uses (tests/unit and tests/integration both import from here).

The fixtures both layers share are in conftest.py; this module holds plain functions, classes and constants.
"""

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys

import torch
import numpy as np
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from tiny_models import build, class_name
from ttfm_distill.config import RunConfig
from ttfm_distill.lora import build_lora_student
from ttfm_distill.teachers.base import Teacher
from ttfm_distill.teachers.loading import load_teacher


# ---------------- the real entry point: a subprocess of the CLI -----------------------------------------------------
TINY = ["--set", "pool_size=32", "--set", "pool_steps=4", "--set", "eval_samples=12",
        "--set", "reference_steps=8", "--batch-size", "8", "-q"]


def cli(*args, cwd=None, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ttfm_distill", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=600)


def one_line_error(r, code=2, *needles):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------- configs of short runs (the tiny teacher's, a 2-D builtin's) ---------------------------------------
def tiny_cfg(teacher_dir, out, **kw):
    base = dict(teacher=str(teacher_dir), output=str(out), batch_size=8, pool_size=32, pool_steps=4,
                eval_samples=8, reference_steps=4, checkpoint_every=4, log_every=1)
    base.update(kw)
    return RunConfig(**base)


def budget_cfg(out, **kw):
    from ttfm_distill.config import RunConfig

    base = dict(teacher="builtin:gaussian-mixture", output=str(out), batch_size=64, lr=1e-3, mlp_width=32, mlp_depth=2,
                lr_schedule="cosine", warmup_steps=10, eval_samples=16, reference_steps=2, checkpoint_every=40,
                loss_options={"long_jump_span": 0.0})
    return RunConfig(**{**base, **kw})


# ---------------- several processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------- fake and tiny teachers and students ---------------------------------------------------------------
class FakeTeacher(Teacher):
    """A pixel or 'latent' teacher: the 'VAE' 2x2-average-pools; prompts hash to 4-vectors."""

    def __init__(self, image_shape=(3, 8, 8), latent=False, conditioning=None, num_classes=0):
        super().__init__()
        self.name = self.source = "fake-teacher"
        self._image_shape = tuple(image_shape)
        c, h, w = image_shape
        self.data_shape = (c, h // 2, w // 2) if latent else tuple(image_shape)
        self.latent, self.conditioning, self.num_classes = latent, conditioning, num_classes
        self.weight = torch.nn.Parameter(torch.tensor(0.5))
        self.encode_calls = self.prompt_calls = self.velocity_calls = 0
        self.fail_after = None  # raise KeyboardInterrupt after this many velocity calls
        self.seen_cond = []

    @property
    def image_shape(self):
        return self._image_shape

    @property
    def is_latent(self):
        return self.latent

    def encode_images(self, images):
        self.encode_calls += 1
        assert images.min() >= -1 and images.max() <= 1
        return F.avg_pool2d(images, 2)

    def encode_prompts(self, prompts):
        self.prompt_calls += 1
        return {"prompt_embeds": torch.stack([prompt_vector(p) for p in prompts])}

    def velocity(self, x, t, cond=None):
        self.velocity_calls += 1
        if self.fail_after is not None and self.velocity_calls > self.fail_after:
            raise KeyboardInterrupt
        self.seen_cond.append(cond)
        shift = 0.0 if not cond or "class_labels" not in cond else cond["class_labels"].float().view(-1, 1, 1, 1)
        return self.weight * (1.0 + shift) - x


def prompt_vector(text):
    digest = hashlib.sha256(text.encode()).digest()
    return torch.tensor(list(digest[:4]), dtype=torch.float32)


def save_family(key, root, pipeline=False, scheduler=None):
    net = build(key)
    with torch.no_grad():  # non-trivial outputs: the final projections of random tiny models are small
        for name, p in net.named_parameters():
            if "proj_out" in name or "conv_out" in name or "norm_out" in name:
                p.normal_(0, 0.2)
    if pipeline:
        sub = "unet" if class_name(key).startswith("UNet") else "transformer"
        net.save_pretrained(root / sub)
        (root / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline", sub: ["diffusers", class_name(key)]}))
        if scheduler:
            (root / "scheduler").mkdir()
            (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    else:
        net.save_pretrained(root)
    return net


def cond_for(teacher, n):
    g = torch.Generator().manual_seed(3)
    return teacher.sample_cond(n, generator=g)


def lora_inputs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    s = torch.rand(n, generator=g) * 0.5
    return x, s, s + torch.rand(n, generator=g) * 0.5


def lora_student(tiny_teacher_dir, **kw):
    return build_lora_student(load_teacher(str(tiny_teacher_dir)), RunConfig(lora_rank=4, **kw))


class StandInInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: uint8 (B, 3, H, W) -> (B, 12) features."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8 or img.shape[1] != 3:
            raise RuntimeError("expected uint8 RGB images")
        x = img.to(torch.float32) / 255.0
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


# ---------------- model folders -------------------------------------------------------------------------------------
def edit_weights(src, dst, weights, drop=None, add=None):
    """Copy the model folder ``src`` to ``dst`` with tensor ``drop`` removed from (or ``add`` put into) ``weights``."""
    shutil.copytree(src, dst)
    f = dst / weights
    w = {k: v.clone() for k, v in load_file(f).items()}
    if drop is not None:
        del w[next(k for k in w if k.endswith(drop))]
    if add is not None:
        w[add] = torch.zeros(3)
    save_file(w, str(f))
    return dst


# ------------------------------------------------------ data sets (test_data) --
def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_image_folder(root):
    """cat/: 3 bright RGB 12x10 images; dog/: 3 dark greyscale 8x8 images."""
    rng = np.random.default_rng(0)
    for cls, level in (("cat", 220), ("dog", 30)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            if cls == "cat":
                arr = np.clip(rng.normal(level, 10, (10, 12, 3)), 0, 255).astype(np.uint8)
            else:
                arr = np.clip(rng.normal(level, 10, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


def make_parquet(path):
    """8 RGB 8x8 images with labels 0..3, a caption per row, and the raw pixels to compare against."""
    from datasets import ClassLabel, Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    ds = Dataset.from_dict(
        {"picture": [{"bytes": png_bytes(p), "path": None} for p in pixels], "kind": [i % 4 for i in range(8)],
         "caption": [f"a photo of thing {i % 3}" for i in range(8)]},
        features=Features({"picture": ImageFeature(), "kind": ClassLabel(names=list("abcd")),
                           "caption": Value("string")}))
    ds.to_parquet(str(path))
    return path, pixels
