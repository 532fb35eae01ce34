"""`ttfm-distill eval`: every metric against a case with a known answer, and the command end to end."""

import json

import pytest
import torch
from conftest import ExactGaussianMap
from helpers import StandInInception

from ttfm_distill.cli import parse_steps
from ttfm_distill.evaluate import (Evaluation, Sampler, student_flow_map_sampler, teacher_euler_sampler,
                                   teacher_heun_sampler)
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
