"""Metric math against independent float64 numpy/scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy.spatial.distance import cdist

from wadi.eval.metrics import (
    clip_score,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
    manifold_radii,
    precision_recall,
)


def _scipy_fd(a, b):
    """The classic pytorch-fid formula with scipy.linalg.sqrtm(S1 @ S2)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(covmean.imag).max() < 1e-6
    covmean = covmean.real
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_gaussian_stats_matches_numpy():
    x = np.random.default_rng(0).normal(size=(50, 7))
    mu, sigma = gaussian_stats(x.astype(np.float32))
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-5, atol=1e-6)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-8)


def test_frechet_distance_closed_form_diagonal():
    # for commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    got = frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_identical_and_rank_deficient():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 64))  # 10 samples in 64 dims: singular covariance
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = rng.normal(size=(12, 64))
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0
    # symmetric in its arguments even when singular
    assert frechet_distance(b, a) == pytest.approx(value, rel=1e-8)
    # the n x n shortcut used for n < D equals the D x D eigendecomposition route
    full = frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))
    assert value == pytest.approx(full, rel=1e-9)
    # one side low-rank, the other full rank: still the D x D answer
    c = rng.normal(size=(200, 64))
    full = frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(c))
    assert frechet_distance(a, c) == pytest.approx(full, rel=1e-9)
    assert frechet_distance(c, a) == pytest.approx(full, rel=1e-9)


def test_frechet_distance_rejects_mismatched_dims():
    with pytest.raises(ValueError, match="statistics do not match"):
        frechet_distance(np.ones((5, 3)) + np.eye(5, 3), np.eye(6, 4))


def _brute_precision_recall(real, fake, k):
    d_rr = cdist(real, real)
    d_ff = cdist(fake, fake)
    r_real = np.sort(d_rr, axis=1)[:, k]
    r_fake = np.sort(d_ff, axis=1)[:, k]
    d_fr = cdist(fake, real)
    precision = np.mean([(d_fr[i] <= r_real).any() for i in range(len(fake))])
    recall = np.mean([(d_fr[:, j] <= r_fake).any() for j in range(len(real))])
    return precision, recall


def test_manifold_radii_against_cdist():
    x = np.random.default_rng(3).normal(size=(40, 5))
    expected = np.sort(cdist(x, x), axis=1)[:, 3]
    np.testing.assert_allclose(manifold_radii(x, k=3, batch_size=7), expected, rtol=1e-9)


def test_precision_recall_against_brute_force():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(120, 8))
    fake = rng.normal(size=(90, 8)) * 1.6 + 0.5  # broader, shifted: prec and rec differ
    p, r = precision_recall(real, fake, k=3, batch_size=17)
    p_ref, r_ref = _brute_precision_recall(real, fake, 3)
    assert p == pytest.approx(p_ref) and r == pytest.approx(r_ref)
    assert 0 < p < 1 and 0 < r < 1 and p != r


def test_precision_recall_extremes():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(50, 4))
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)


def test_clip_score_is_mean_cosine():
    rng = np.random.default_rng(6)
    img = rng.normal(size=(20, 12)) + 1.0
    txt = rng.normal(size=(20, 12)) * 3 + 1.0
    cos = np.array([1 - scipy.spatial.distance.cosine(i, t) for i, t in zip(img, txt)])
    assert clip_score(img, txt) == pytest.approx(cos.mean(), rel=1e-10)
    assert clip_score(img, -img) == pytest.approx(-1.0)
    assert clip_score(img, img * 5) == pytest.approx(1.0)


def test_clip_score_keeps_negative_cosines():
    # pair 0: cos = +0.6, pair 1: cos = -0.8 -> raw mean -0.1 (a per-pair clamp gives 0.3)
    img = np.array([[1.0, 0.0], [0.0, 2.0]])
    txt = np.array([[0.6, 0.8], [0.6, -0.8]])
    cos = [float(np.dot(i, t) / np.linalg.norm(i) / np.linalg.norm(t)) for i, t in zip(img, txt)]
    assert cos == pytest.approx([0.6, -0.8], abs=1e-15)
    assert clip_score(img, txt) == pytest.approx(-0.1, abs=1e-12)


def test_metrics_accept_torch_and_reject_bad_shapes():
    torch = pytest.importorskip("torch")
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="empty"):
        clip_score(np.zeros((0, 3)), np.zeros((0, 3)))


def _near_square_samples(n=60, d=64, seed=0):
    """``n`` samples in ``d`` dims whose centred spectrum spans 8 decades of variance."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(n, n)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (u * np.logspace(0, -4, n)) @ v[:, :n].T + 0.01


def test_frechet_distance_keeps_small_directions_when_n_is_close_to_d():
    # exact construction: b = c * a gives S2 = c^2 S1, (S1 S2)^(1/2) = c S1, so
    # FD = (1 - c)^2 (|mu1|^2 + tr S1), all in float64 with no matrix function
    a = _near_square_samples()
    c = 2.0
    centred = a - a.mean(0)
    exact = (1 - c) ** 2 * (a.mean(0) @ a.mean(0) + (centred * centred).sum() / (len(a) - 1))
    # the old eigenvalue cut of S1^(1/2) S2 S1^(1/2) dropped the products below
    # n * eps * max and erred by 2.6e-7 relative here
    assert frechet_distance(a, c * a) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(c * a, a) == pytest.approx(exact, rel=1e-12)
    stats = frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(c * a))
    assert stats == pytest.approx(exact, rel=1e-12)
