"""Training data sources (ttfm_distill.data): real data sets, caches, the data-free pool, bad sources.

All data is made here in tmp_path; nothing touches the network.  The fake
teachers count their encode calls, so the tests can tell a cache hit from a
rebuild.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import FakeTeacher, make_image_folder, make_parquet, prompt_vector
from ttfm_distill.config import RunConfig
from ttfm_distill.data import DataError, build_data
from ttfm_distill.data.pool import POOL_CHUNK, build_pool


def config(tmp_path, **kw):
    return RunConfig(data_cache=str(tmp_path / "cache"), **kw)


def build(teacher, cfg, out=None):
    return build_data(teacher, cfg, out or cfg.data_cache, "cpu", log=lambda msg: None)


def draw(source, n=16, seed=0):
    return source.sample(n, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- data --
@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


@pytest.fixture
def parquet_file(tmp_path):
    return make_parquet(tmp_path / "train.parquet")


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
