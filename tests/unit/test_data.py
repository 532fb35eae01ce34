"""Training data sources (ttfm_distill.data): real data sets, caches, the data-free pool, bad sources.

All data is made here in tmp_path; nothing touches the network.  The fake
teachers count their encode calls, so the tests can tell a cache hit from a
rebuild.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import FakeTeacher, prompt_vector
from ttfm_distill.config import RunConfig
from ttfm_distill.data import DataError, build_data
from ttfm_distill.data.pool import POOL_CHUNK, build_pool


def config(tmp_path, **kw):
    return RunConfig(data_cache=str(tmp_path / "cache"), **kw)


def build(teacher, cfg, out=None):
    return build_data(teacher, cfg, out or cfg.data_cache, "cpu", log=lambda msg: None)


def draw(source, n=16, seed=0):
    return source.sample(n, torch.Generator().manual_seed(seed))


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------- data --
@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


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


@pytest.fixture
def parquet_file(tmp_path):
    return make_parquet(tmp_path / "train.parquet")


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


def test_image_folder_shapes_range_labels_and_cache(tmp_path, image_folder, monkeypatch):
    teacher = FakeTeacher((3, 8, 8), conditioning="class", num_classes=2)
    cfg = config(tmp_path, data=str(image_folder))
    source = build(teacher, cfg)
    assert len(source) == 6 and source.base.dtype == torch.uint8
    x, cond = draw(source, 64)
    assert x.shape == (64, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    labels = cond["class_labels"]
    assert labels.dtype == torch.long and set(labels.tolist()) == {0, 1}
    # class subfolders became labels: cat (0) images are bright, dog (1) images dark (greyscale made RGB)
    means = x.mean(dim=(1, 2, 3))
    assert (means[labels == 0] > 0.5).all() and (means[labels == 1] < -0.5).all()
    assert source.report["cache_hit"] is False and source.report["label_column"] == "label"

    import ttfm_distill.data.build as data_mod

    def no_decoding(*a, **k):
        raise AssertionError("the second run decoded an image")

    monkeypatch.setattr(data_mod, "prepare_image", no_decoding)
    again = build(FakeTeacher((3, 8, 8), conditioning="class", num_classes=2), cfg)
    assert again.report["cache_hit"] is True and torch.equal(again.base, source.base)


def test_image_folder_for_unconditioned_greyscale_teacher(tmp_path, image_folder):
    source = build(FakeTeacher((1, 8, 8)), config(tmp_path, data=str(image_folder)))
    x, cond = source.sample(5, torch.Generator().manual_seed(0))
    assert torch.is_tensor(x) and x.shape == (5, 1, 8, 8) and cond is None  # no conditioning


def test_parquet_latent_teacher_encodes_once(tmp_path, parquet_file):
    path, pixels = parquet_file
    cfg = config(tmp_path, data=str(path), data_image_column="picture", data_label_column="kind")
    teacher = FakeTeacher((3, 8, 8), latent=True, conditioning="class", num_classes=4)
    source = build(teacher, cfg)
    assert teacher.encode_calls > 0
    x, cond = draw(source, 32)
    assert x.shape == (32, 3, 4, 4)
    # the cached latents are the 'VAE' of exactly these pixels, in row order
    expect = F.avg_pool2d(torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1, 2)
    assert torch.allclose(source.base, expect, atol=1e-6)
    assert torch.equal(source.cond["class_labels"], torch.arange(8) % 4)
    cache_files = list((tmp_path / "cache").glob("latents-*.safetensors"))
    assert len(cache_files) == 1

    fresh = FakeTeacher((3, 8, 8), latent=True, conditioning="class", num_classes=4)
    again = build(fresh, cfg)
    assert fresh.encode_calls == 0 and again.report["cache_hit"] and torch.equal(again.base, source.base)
    # other weights: another cache entry, encoded anew
    other = FakeTeacher((3, 8, 8), latent=True, conditioning="class", num_classes=4)
    with torch.no_grad():
        other.weight.fill_(0.7)
    build(other, cfg)
    assert other.encode_calls > 0 and len(list((tmp_path / "cache").glob("latents-*.safetensors"))) == 2


def test_text_teacher_caption_column_and_prompt_cache(tmp_path, parquet_file):
    path, _ = parquet_file
    cfg = config(tmp_path, data=str(path))  # 'caption' is found by name
    teacher = FakeTeacher((3, 8, 8), conditioning="text")
    source = build(teacher, cfg)
    assert teacher.prompt_calls == 1  # 3 unique prompts, one batch
    g = torch.Generator().manual_seed(3)
    x, cond = source.sample(16, g)
    idx = torch.randint(0, 8, (16,), generator=torch.Generator().manual_seed(3))  # the rows drawn
    expect = torch.stack([prompt_vector(f"a photo of thing {i % 3}") for i in idx.tolist()])
    assert torch.equal(cond["prompt_embeds"], expect)
    fresh = FakeTeacher((3, 8, 8), conditioning="text")
    build(fresh, cfg)
    assert fresh.prompt_calls == 0


def test_saved_dataset_of_arrays_is_exact(tmp_path):
    from datasets import Dataset

    arrays = np.random.default_rng(2).integers(0, 256, (5, 8, 8), dtype=np.uint8)
    Dataset.from_dict({"pixels": arrays.tolist(), "label": [0, 1, 0, 1, 0]}).save_to_disk(str(tmp_path / "saved"))
    source = build(FakeTeacher((1, 8, 8)), config(tmp_path, data=str(tmp_path / "saved"), data_image_column="pixels"))
    assert torch.equal(source.base[:, 0], torch.from_numpy(arrays))
    x = draw(source, 8)[0]
    assert x.min() >= -1 and x.max() <= 1 and x.shape == (8, 1, 8, 8)


def test_fashion_mnist_with_labels():
    from ttfm_distill.data.fashion_mnist import load_fashion_mnist

    try:
        images, labels = load_fashion_mnist("train", resolution=16)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    teacher = FakeTeacher((1, 16, 16), conditioning="class", num_classes=10)
    source = build(teacher, RunConfig(data="fashion-mnist"))
    x, cond = draw(source, 32)
    idx = torch.randint(0, 60000, (32,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.from_numpy(images)[idx]) and torch.equal(cond["class_labels"], torch.from_numpy(labels)[idx])


def test_random_crop_windows(tmp_path, image_folder):
    cfg = config(tmp_path, data=str(image_folder), data_resolution=12, data_crop="random")
    source = build(FakeTeacher((3, 8, 8)), cfg)
    assert tuple(source.base.shape[-2:]) == (12, 12)
    (a, _), (b, _) = source.sample(32, torch.Generator().manual_seed(0)), source.sample(32, torch.Generator().manual_seed(0))
    assert a.shape == (32, 3, 8, 8) and torch.equal(a, b)  # random, but from the step's generator
    center = build(FakeTeacher((3, 8, 8)), config(tmp_path, data=str(image_folder), data_resolution=12))
    c, _ = center.sample(32, torch.Generator().manual_seed(0))
    assert not torch.equal(a, c)


def test_streaming_image_folder(tmp_path, image_folder):
    cfg = config(tmp_path, data=str(image_folder), data_streaming=True)
    source = build(FakeTeacher((3, 8, 8), conditioning="class", num_classes=2), cfg)
    try:
        for _ in range(3):  # more rows than one epoch
            x, cond = draw(source, 5)
            assert x.shape == (5, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
            means = x.mean(dim=(1, 2, 3))
            labels = cond["class_labels"]
            assert (means[labels == 0] > 0.5).all() and (means[labels == 1] < -0.5).all()
    finally:
        source.close()


def test_bad_sources_in_library(tmp_path, image_folder, parquet_file):
    with pytest.raises(DataError, match="no image column 'photo'; available columns: image, label"):
        build(FakeTeacher(), config(tmp_path, data=str(image_folder), data_image_column="photo"))
    with pytest.raises(DataError, match="available columns: picture, kind, caption"):
        build(FakeTeacher(conditioning="class", num_classes=4), config(tmp_path, data=str(parquet_file[0])))
    with pytest.raises(DataError, match=r"labels in \[0, 3\], but the teacher has 2 classes"):
        build(FakeTeacher(conditioning="class", num_classes=2),
              config(tmp_path, data=str(parquet_file[0]), data_label_column="kind"))
    with pytest.raises(DataError, match="did you mean 'teacher'"):
        build(FakeTeacher(), config(tmp_path, data="teachr"))


# -------------------------------------------------------------- data-free --
@pytest.mark.parametrize("settings", [dict(pool_solver="euler", trajectory_fraction=0.0), {}],
                         ids=["euler", "defaults-heun-trajectories"])
def test_pool_is_resumable_and_equals_uninterrupted(tmp_path, settings):
    cfg = RunConfig(pool_size=2 * POOL_CHUNK + 10, pool_steps=3, seed=4, **settings)
    first = FakeTeacher((1, 4, 4))
    whole = build_pool(first, cfg, tmp_path / "a", "cpu", lambda m: None)
    assert whole.report["cache"] == "built" and whole.report["samples"] == cfg.pool_size
    per_chunk = first.velocity_calls // 3  # three chunks
    assert per_chunk == 3 * (2 if cfg.pool_solver_name() == "heun" else 1)

    broken = FakeTeacher((1, 4, 4))
    broken.fail_after = per_chunk + 1  # dies inside the second chunk
    with pytest.raises(KeyboardInterrupt):
        build_pool(broken, cfg, tmp_path / "b", "cpu", lambda m: None)
    parts = list((tmp_path / "b").glob("*.parts/chunk-*.safetensors"))
    assert len(parts) == 1  # the finished chunk survived

    resumed_teacher = FakeTeacher((1, 4, 4))
    logs = []
    resumed = build_pool(resumed_teacher, cfg, tmp_path / "b", "cpu", logs.append)
    assert resumed_teacher.velocity_calls == 2 * per_chunk  # only the two missing chunks
    assert resumed.report["cache"] == "resumed" and any("resum" in m for m in logs)
    assert torch.equal(resumed.samples, whole.samples)
    if whole.trajectories is not None:  # the default keeps each solve's noise and sample
        assert whole.trajectories.shape[1] == 2 and torch.equal(resumed.trajectories, whole.trajectories)
    assert not list((tmp_path / "b").glob("*.parts"))

    cached_teacher = FakeTeacher((1, 4, 4))
    cached = build_pool(cached_teacher, cfg, tmp_path / "b", "cpu", lambda m: None)
    assert cached_teacher.velocity_calls == 0 and cached.report["cache"] == "hit"
    assert cached.report["generation_seconds"] is not None and torch.equal(cached.samples, whole.samples)


def test_pool_of_class_and_text_teachers(tmp_path):
    cfg = RunConfig(pool_size=POOL_CHUNK + 44, pool_steps=2, pool_solver="euler")  # the closed form below is Euler(2)
    teacher = FakeTeacher((1, 4, 4), conditioning="class", num_classes=3)
    pool = build_pool(teacher, cfg, tmp_path, "cpu", lambda m: None)
    x, cond = draw(pool, 40)
    labels = pool.cond["class_labels"]
    assert set(cond["class_labels"].tolist()) <= {0, 1, 2} and len(set(labels.tolist())) == 3
    # the labels are the teacher's sample_cond drawn right after the noise, as a one-shot pool draws them
    g = torch.Generator().manual_seed(cfg.seed + 7919)
    teacher.sample_noise(cfg.pool_size, generator=g)
    assert torch.equal(labels, teacher.sample_cond(cfg.pool_size, generator=g)["class_labels"])
    # each sample was generated with its own label: Euler(2) of v = 0.5 (1 + k) - x gives 0.25 x0 + 0.375 (1 + k)
    means = pool.samples.mean(dim=(1, 2, 3))
    assert torch.allclose(means, 0.375 * (1 + labels.float()), atol=0.3)
    cached = build_pool(FakeTeacher((1, 4, 4), conditioning="class", num_classes=3), cfg, tmp_path, "cpu",
                        lambda m: None)
    assert cached.report["cache"] == "hit" and torch.equal(cached.cond["class_labels"], labels)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red dress\n\nblue shoes\n")
    text = FakeTeacher((1, 4, 4), conditioning="text")
    cfg = config(tmp_path, pool_size=20, pool_steps=2, prompts=str(prompts))
    pool = build_pool(text, cfg, tmp_path / "pool", "cpu", lambda m: None, cache_dir=tmp_path / "cache")
    x, cond = draw(pool, 8)
    allowed = {tuple(prompt_vector(p).tolist()) for p in ("a red dress", "blue shoes")}
    assert {tuple(r.tolist()) for r in cond["prompt_embeds"]} <= allowed
    assert text.prompt_calls == 1 and all(c["prompt_embeds"].shape == (20, 4) for c in text.seen_cond)
    logs = []
    plain = build_pool(FakeTeacher((1, 4, 4), conditioning="text"), RunConfig(pool_size=4), tmp_path / "x", "cpu",
                       logs.append)
    assert plain.cond is None and any("empty prompt" in m for m in logs)


# ------------------------------------------------------ the real entry point --
def entry_many(cases, cwd=None):
    """Run ``ttfm-distill ARGS`` for each ARGS in ``cases`` through the CLI's entry point (``main``, what
    ``python -m ttfm_distill`` runs), one after another in ONE fresh process (saves the imports per case).
    Returns ``[(exit code, stderr lines)]``."""
    script = f"""
import sys
from ttfm_distill.cli import main
for i, args in enumerate({[[str(a) for a in case] for case in cases]!r}):
    sys.argv = ["ttfm-distill", *args]
    try:
        main()
    except SystemExit as e:
        print(f"@@ exit {{e.code}}", file=sys.stderr, flush=True)
"""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=e, cwd=cwd, timeout=900)
    assert "Traceback" not in r.stderr, r.stderr
    results, lines = [], []
    for line in r.stderr.splitlines():
        if line.startswith("@@ exit "):
            results.append((int(line.split()[-1]), lines))
            lines = []
        elif line.strip():
            lines.append(line)
    assert len(results) == len(cases), r.stderr
    return results


TINY = ["--max-steps", 3, "--batch-size", 4, "--set", "eval_samples=4", "--set", "reference_steps=4", "-q"]


@pytest.fixture(scope="module")
def cli_session(tiny_teacher_dir, tmp_path_factory):
    """Bad sources, then the acceptance runs, all through the CLI entry point in one process."""
    root = tmp_path_factory.mktemp("cli")
    bad = root / "bad"
    (bad / "empty").mkdir(parents=True)
    (bad / "corrupt" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "corrupt" / "a" / "ok.png")
    (bad / "corrupt" / "a" / "broken.png").write_bytes(b"this is not a png")
    from datasets import Dataset

    Dataset.from_dict({"pixels": np.zeros((3, 2, 8, 8), np.uint8).tolist()}).to_parquet(str(bad / "twochannel.parquet"))
    Dataset.from_dict({"img": [{"bytes": png_bytes(np.zeros((8, 8), np.uint8)), "path": None}]}).to_parquet(
        str(bad / "nolabel.parquet"))
    images = make_image_folder(root / "images")
    parquet, _ = make_parquet(root / "train.parquet")

    cache = root / "cache"
    common = ["--teacher", tiny_teacher_dir, *TINY, "--set", f"data_cache={cache}"]
    err = ["run", "--output", root / "err", "--overwrite", *common]
    cases = {
        "empty": [*err, "--data", bad / "empty"],
        "corrupt": [*err, "--data", bad / "corrupt"],
        "channels": [*err, "--data", bad / "twochannel.parquet"],
        "column": [*err, "--data", bad / "nolabel.parquet", "--image-column", "image"],
        "hub": [*err, "--data", "someone/some-dataset"],
        "size": [*err, "--data", bad / "corrupt", "--resolution", 4],
        "folder": ["run", "--data", images, "--output", root / "a", *common],
        "folder again": ["run", "--data", images, "--output", root / "b", *common],
        "parquet": ["run", "--data", parquet, "--image-column", "picture", "--output", root / "c", *common],
        "data-free": ["run", "--output", root / "d", "--set", "pool_size=32", "--set", "pool_steps=2", *TINY],
    }
    results = dict(zip(cases, entry_many(list(cases.values()), cwd=root)))
    return root, results


def one_line_error(result, *needles):
    code, lines = result
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("case, needles", [
    ("empty", ["empty"]),
    ("corrupt", ["broken.png", "not a usable image"]),  # an unreadable image is named
    ("channels", ["(2, 8, 8)", "1-, 3- or 4-channel"]),  # a channel count that cannot be fixed
    ("column", ["no image column 'image'", "available columns: img"]),
    ("hub", ["someone/some-dataset", "hub", "offline"]),
    ("size", ["data_resolution 4", "8x8"]),  # a size that cannot be reached by cropping
])
def test_bad_source_is_one_line_error(cli_session, case, needles):
    one_line_error(cli_session[1][case], *needles)


def test_run_on_image_folder_and_parquet_then_caches_hit(cli_session):
    """Acceptance: `run` on a local image folder and a local parquet file; a second run hits the caches."""
    root, results = cli_session
    for case in ("folder", "folder again", "parquet"):
        assert results[case][0] == 0, results[case]
    first = json.loads((root / "a" / "metrics.json").read_text())["data"]
    assert first["rows"] == 6 and first["kind"] == "imagefolder" and first["cache_hit"] is False
    again = json.loads((root / "b" / "metrics.json").read_text())["data"]
    assert again["cache_hit"] is True and again["cache"] == first["cache"]
    data = json.loads((root / "c" / "metrics.json").read_text())["data"]
    assert data["rows"] == 8 and data["kind"] == "parquet" and data["image_column"] == "picture"
    assert (root / "c" / "student" / "flow_map" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_data_free_run_on_embedded_teacher_reports_pool(cli_session):
    root, results = cli_session
    assert results["data-free"][0] == 0, results["data-free"]
    data = json.loads((root / "d" / "metrics.json").read_text())["data"]
    assert data["source"] == "teacher" and data["samples"] == 32 and data["cache"] == "built"
    assert data["seconds"] > 0 and data["generation_seconds"] >= data["seconds"]
    # the defaults: a Heun pool keeping each solve's noise and sample for the 1-step trajectory rows
    assert data["solver"].startswith("heun") and data["trajectories"]["states"] == 2
    # in bf16 exactly when the run trains in bf16 (the hardware decides the automatic value), under a name of its own
    cfg = json.loads((root / "d" / "config.json").read_text())
    bf16 = cfg["mixed_precision"] == "bf16"
    assert cfg["pool_precision"] == ("bf16" if bf16 else "no") and data["precision"] == ("bf16" if bf16 else "fp32")
    tag = "-bf16" if bf16 else ""
    assert len(list((root / "d" / "cache").glob(f"pool-n32-heun2-traj2{tag}-seed0-t*.safetensors"))) == 1  # keyed on the weights
