"""`ttfm-distill eval`: every metric against a case with a known answer, and the command end to end."""

import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ExactGaussianMap, tiny_unet
from helpers import StandInInception

from ttfm_distill.evaluate import (Evaluation, Sampler, evaluate_student, parse_steps, student_flow_map_sampler,
                                   teacher_euler_sampler, teacher_heun_sampler)
from ttfm_distill.features import (CLASSIFIER_DIR, InceptionFormatError, inception_features, load_feature_classifier,
                                   load_inception)
from ttfm_distill.metrics import frechet_distance, frechet_distance_from_features, histogram_kl
from ttfm_distill.teachers.analytic import get_analytic_teacher

F64 = torch.float64


# ------------------------------------------------------------ Frechet ------
def test_fd_of_identical_image_sets_is_zero_in_classifier_features():
    clf = load_feature_classifier()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(300, 1, 16, 16, generator=g) * 2 - 1
    f = clf.features(images)
    assert f.shape == (300, clf.card["config"]["feature_dim"]) and f.dtype == F64
    assert frechet_distance_from_features(f, clf.features(images.clone())) == pytest.approx(0.0, abs=1e-8)
    # and a different set is not at distance 0
    assert frechet_distance_from_features(f, clf.features(images.flip(-2))) > 1e-3


def test_fd_two_gaussians_non_commuting_closed_form():
    # 2x2 covariances: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) with M = S1^1/2 S2 S1^1/2,
    # tr M = tr(S1 S2), det M = det S1 det S2.
    mu1, mu2 = torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([2.0, -1.0], dtype=F64)
    s1 = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=F64)
    s2 = torch.tensor([[1.0, -0.4], [-0.4, 1.5]], dtype=F64)
    cross = torch.sqrt(torch.trace(s1 @ s2) + 2 * torch.sqrt(torch.det(s1) * torch.det(s2)))
    expected = float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # the same distance estimated from samples of the two Gaussians
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200_000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(s1).T + mu1
    b = torch.randn(200_000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(s2).T + mu2
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, rel=0.02)


def test_shipped_classifier_card_and_size():
    card = json.loads((CLASSIFIER_DIR / "card.json").read_text())
    assert 0.85 < card["test_accuracy"] <= 1.0
    assert (CLASSIFIER_DIR / "model.safetensors").stat().st_size < 1_000_000
    clf = load_feature_classifier()
    f = card["config"]["feature_dim"]
    assert clf.test_mu.shape == (f,) and clf.test_sigma.shape == (f, f)
    assert torch.allclose(clf.test_sigma, clf.test_sigma.T)


def test_shipped_stats_are_those_of_the_real_test_images():
    from ttfm_distill.data.fashion_mnist import DatasetUnavailable, load_fashion_mnist
    from ttfm_distill.metrics import gaussian_stats

    try:
        images, labels = load_fashion_mnist("test", resolution=16)
    except DatasetUnavailable:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    clf = load_feature_classifier()
    x = torch.from_numpy(images)
    f = clf.features(x)
    mu, sigma = gaussian_stats(torch.cat([f, clf.features(x.flip(-1))]))  # the order of mirrored()
    assert torch.allclose(mu, clf.test_mu, atol=1e-4) and torch.allclose(sigma, clf.test_sigma, atol=1e-3)
    assert frechet_distance(mu, sigma, clf.test_mu, clf.test_sigma) < 1e-4
    with torch.no_grad():
        logits = clf.net.head(torch.relu(f.float()))  # forward() from the features
        accuracy = (logits.argmax(1) == torch.from_numpy(labels)).double().mean().item()
    assert accuracy == pytest.approx(clf.card["test_accuracy"], abs=1e-4)


# --------------------------------------------------------- flow map / KL ---
def test_exact_flow_map_scores_like_the_fine_solve():
    teacher = get_analytic_teacher("gaussian")  # N((1, -0.5), 0.5^2 I): closed-form flow map
    exact = ExactGaussianMap(teacher.mean, teacher.std)
    ev = Evaluation(teacher, num=16384, seed=0, reference_steps=32, batch_size=8192)
    student = ev.run(student_flow_map_sampler(exact), (1, 2))
    euler = ev.run(teacher_euler_sampler(teacher), (1, 2))
    heun = ev.run(teacher_heun_sampler(teacher), (1, 2))
    floors = ev.floors()
    for n in ("1", "2"):
        assert student[n]["flow_map_error"] < 1e-8
        assert student[n]["kl"] == pytest.approx(floors["teacher_fine"]["kl"], abs=1e-3)
    # the histogram floor: exact data samples, as many, score the same up to sampling noise
    exact_data = histogram_kl(teacher.sample_data(16384, generator=torch.Generator().manual_seed(1)), teacher)
    assert floors["teacher_fine"]["kl"] == pytest.approx(exact_data, abs=0.03)
    assert euler["1"]["flow_map_error"] > 1e-2 and euler["1"]["kl"] > 0.3
    assert heun["1"] is None and heun["2"]["nfe"] == 2
    assert heun["2"]["flow_map_error"] < euler["2"]["flow_map_error"]
    for row in (student["1"], euler["2"], heun["2"]):
        assert row["ms_per_sample"] > 0 and row["samples_per_second"] == pytest.approx(
            1000.0 / row["ms_per_sample"], rel=1e-9)
    assert "fd_test_images" in ev.not_computed and "fid_teacher_fine" in ev.not_computed


def test_non_finite_samples_are_reported_not_scored():
    teacher = get_analytic_teacher("gaussian")
    ev = Evaluation(teacher, num=64, reference_steps=4)
    out = ev.run(Sampler("broken", lambda x, n: x * float("nan")), (1,))
    assert out["1"]["nonfinite_samples"] == 64 and "flow_map_error" not in out["1"]


def test_parse_steps():
    assert parse_steps("4,1, 2,2") == (1, 2, 4)
    for bad in ("0,1", "a", ""):
        with pytest.raises(ValueError):
            parse_steps(bad)


# ------------------------------------------------------------ Inception ----
def test_inception_stand_in_loads_and_identical_sets_give_fid_zero(inception_file):
    model = load_inception(inception_file)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 1, 16, 16, generator=g) * 2 - 1
    f = inception_features(model, x, batch_size=16)
    assert f.shape == (50, 12)
    assert frechet_distance_from_features(f, inception_features(model, x.clone())) == pytest.approx(0.0, abs=1e-9)


def test_inception_refuses_other_formats(tmp_path):
    state = tmp_path / "weights.pt"
    torch.save(StandInInception().state_dict() | {"w": torch.zeros(3)}, state)
    junk = tmp_path / "inception.pkl"
    junk.write_bytes(b"\x80\x04not a torchscript archive")
    for path in (state, junk, tmp_path / "missing.pt"):
        with pytest.raises(InceptionFormatError) as e:
            load_inception(path)
        assert len(str(e.value).splitlines()) == 1


# ------------------------------------------------------------ end to end ---
def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory):
    """A few random IDX images in the Fashion-MNIST layout, so the test does not need the Debian package."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 30)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 16x16 tiny teacher (the classifier's image size) distilled for 2 steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ttfm_distill.config import RunConfig
    from ttfm_distill.trainer import run_distillation

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    net = tiny_unet(sample_size=16)
    net.save_pretrained(root / "teacher" / "unet")
    FlowMatchEulerDiscreteScheduler().save_pretrained(root / "teacher" / "scheduler")
    cfg = RunConfig(teacher=str(root / "teacher"), output=str(root / "run"), max_steps=2, batch_size=4, pool_size=8,
                    pool_steps=2, eval_samples=4, reference_steps=2)
    run_distillation(cfg, show_progress=False)
    return root / "run"


def cli(*args, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ttfm_distill", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=600)


def test_cli_eval_writes_report_and_plot(tiny_run, inception_file, fake_fashion, tmp_path):
    out = tmp_path / "report.json"
    r = cli("eval", "--model", tiny_run, "--steps", "1,2", "--teacher-steps", "1,2,4", "--num", 12,
            "--reference-steps", 4, "--output", out, "--inception", inception_file, "--batch-size", 8,
            env={"TTFM_FASHION_MNIST_DIR": str(fake_fashion)})
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"student", "teacher_euler", "teacher_heun"}
    assert set(report["results"]["student"]) == {"1", "2"}
    assert set(report["results"]["teacher_euler"]) == {"1", "2", "4"}
    assert report["results"]["teacher_heun"]["1"] is None
    row = report["results"]["student"]["2"]
    for key in ("flow_map_error", "fd_test_images", "fd_teacher_fine", "fid_test_images", "fid_teacher_fine",
                "ms_per_sample", "samples_per_second"):
        assert isinstance(row[key], float) and row[key] >= 0, key
    assert report["not_computed"] == {"kl": report["not_computed"]["kl"]}  # everything else was computed
    assert 0.85 < report["classifier"]["test_accuracy"] <= 1
    assert set(report["floors"]) == {"teacher_fine", "real_train_images"}
    assert report["settings"]["num"] == 12 and report["teacher"].endswith("teacher")
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "flow_map_error" in r.stdout


def test_eval_without_inception_says_why(tiny_run):
    from ttfm_distill.evaluate import load_student_and_teacher

    _, student, _, teacher = load_student_and_teacher(str(tiny_run))
    report = evaluate_student(student, teacher, steps=(1,), num=4, reference_steps=2)
    assert "inception" in report["not_computed"]["fid_test_images"]
    assert "fid_test_images" not in report["results"]["student"]["1"]
    assert report["results"]["student"]["1"]["fd_teacher_fine"] >= 0


@pytest.mark.parametrize("case", ["not_student", "bad_inception"])
def test_cli_eval_bad_input_is_one_line(case, tiny_run, tmp_path):
    if case == "not_student":
        (tmp_path / "something.txt").write_text("hello")
        args = ["--model", tmp_path]
        needle = "not an exported student"
    else:
        bad = tmp_path / "inception.pkl"
        bad.write_bytes(b"not torchscript")
        args = ["--model", tiny_run, "--inception", bad]
        needle = "not a TorchScript Inception"
    r = cli("eval", *args, "--output", tmp_path / "x.json")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert not (tmp_path / "x.json").exists()


def test_a_16x16_run_validates_with_fd_and_eval_redraws_its_curves(tiny_run, tmp_path):
    """The classifier's image size: each validation has FD at 1/2/4 steps; the card shows the curves; `eval --model
    RUN` draws them again from the training log."""
    rows = [json.loads(line) for line in (tiny_run / "train_log.jsonl").read_text().splitlines()]
    valid = [r for r in rows if r["kind"] == "validation"]
    assert [r["step"] for r in valid] == [2]  # the end (no checkpoint before it)
    for key in ("flow_map_error", "fd_test_images", "fd_teacher_fine"):
        assert set(valid[0][key]) == {"1", "2", "4"} and all(v >= 0 for v in valid[0][key].values()), key
        assert set(valid[0]["teacher_euler"][key]) == {"1", "2", "4"}
    assert valid[0]["validation_samples"] == 4 and (tiny_run / valid[0]["image"]).is_file()  # the report's noises
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("flow_map_error", "fd_test_images"):  # so the last validation is the report's own reading
        assert valid[0][key] == metrics[key]["student"] and valid[0]["teacher_euler"][key] == metrics[key]["teacher_euler"]
    card = (tiny_run / "student" / "README.md").read_text()
    assert "![training curves](training-curves.png)" in card
    assert (tiny_run / "student" / "training-curves.png").read_bytes() == (tiny_run / "training-curves.png").read_bytes()
    (tiny_run / "training-curves.png").unlink()
    r = cli("eval", "--model", tiny_run, "--steps", "1", "--num", 4, "--reference-steps", 2,
            "--output", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert (tiny_run / "training-curves.png").stat().st_size > 10_000 and "training-curves.png" in r.stdout
