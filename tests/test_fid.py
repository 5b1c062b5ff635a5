"""Frechet distance, KID and precision/recall against independent references."""

import numpy as np
import pytest
import scipy.linalg
import torch

from sumie.metrics.fid import (NotEnoughSamples, frechet_distance, gaussian_stats, kid, knn_radii, min_samples,
                               mmd2_unbiased, precision_recall)


def reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's recipe: scipy.linalg.sqrtm of the covariance product, real part."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off).dot(s2 + off))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as explicit loops over pairs."""
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def reference_precision_recall(real: np.ndarray, gen: np.ndarray, k: int) -> tuple[float, float]:
    def radii(s):
        out = []
        for i in range(len(s)):
            d = sorted(np.linalg.norm(s[j] - s[i]) for j in range(len(s)) if j != i)
            out.append(d[k - 1])
        return np.asarray(out)

    def coverage(ref, rad, q):
        return np.mean([any(np.linalg.norm(qq - ref[j]) <= rad[j] for j in range(len(ref))) for qq in q])

    return coverage(real, radii(real), gen), coverage(gen, radii(gen), real)


def _features(seed, n, d, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(d).normal(size=(d, d)) / np.sqrt(d)  # correlated features, like a network's
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


@pytest.mark.parametrize("n,d,shift,scale", [(500, 16, 0.0, 1.0), (400, 64, 0.3, 1.5), (300, 128, 1.0, 0.7),
                                             (100, 64, 0.2, 1.0)])  # the last: n < d, singular covariances
def test_frechet_distance_matches_scipy_sqrtm(n, d, shift, scale):
    a, b = _features(1, n, d), _features(2, n + 37, d, shift, scale)
    ours, ref = frechet_distance(a, b), reference_fd(a, b)
    assert ours == pytest.approx(ref, abs=1e-4, rel=1e-6)
    assert ours > 0


def test_frechet_distance_zero_for_identical_sets_and_symmetric():
    a, b = _features(3, 200, 32), _features(4, 250, 32, 0.5)
    assert abs(frechet_distance(a, a)) < 1e-8
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), abs=1e-8)


def test_frechet_distance_of_known_gaussians():
    # N(0, I) vs N(m, 4I) in D dims: |m|^2 + D (1 + 4 - 2 * 2) = |m|^2 + D
    d = 8
    mu = np.full(d, 0.5)
    a = gaussian_stats(np.random.default_rng(0).normal(size=(200_000, d)))
    b = gaussian_stats(np.random.default_rng(1).normal(size=(200_000, d)) * 2 + mu)
    from sumie.metrics.fid import frechet_distance_from_stats

    assert frechet_distance_from_stats(a, b) == pytest.approx(float(mu @ mu) + d, rel=0.02)


def test_mmd2_matches_explicit_loops():
    x, y = _features(5, 40, 12), _features(6, 33, 12, 0.4)
    assert mmd2_unbiased(x, y) == pytest.approx(reference_mmd2(x, y), abs=1e-10, rel=1e-10)


def test_kid_with_one_full_subset_is_the_mmd_and_subsets_average():
    x, y = _features(7, 50, 8), _features(8, 50, 8, 0.3)
    r = kid(x, y, subset_size=1000)
    assert (r.subsets, r.subset_size) == (1, 50)  # reduced to the set size, said so
    assert r.mean == pytest.approx(reference_mmd2(x, y), abs=1e-4)
    # subsets: the mean over random subsets estimates the same quantity
    x, y = _features(9, 400, 8), _features(10, 400, 8, 0.3)
    sub = kid(x, y, subsets=50, subset_size=100, seed=0)
    full = reference_mmd2(x[:200], y[:200])  # not exact: same population quantity
    assert sub.subsets == 50 and sub.subset_size == 100 and sub.std > 0
    assert sub.mean == pytest.approx(full, rel=0.5)
    # the subsets are those a direct implementation draws with the same generator
    rng = np.random.default_rng(0)
    vals = []
    for _ in range(50):
        ia, ib = rng.choice(400, 100, replace=False), rng.choice(400, 100, replace=False)
        vals.append(mmd2_unbiased(x[ia], y[ib]))
    assert sub.mean == pytest.approx(np.mean(vals), abs=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_otherwise():
    same = kid(_features(11, 600, 16), _features(12, 600, 16), subsets=20, subset_size=300)
    other = kid(_features(11, 600, 16), _features(12, 600, 16, 0.5), subsets=20, subset_size=300)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert other.mean > 10 * max(same.std, 1e-4)


def test_precision_recall_matches_loops():
    real, gen = _features(13, 60, 5), _features(14, 45, 5, 0.6, 0.5)
    pr = precision_recall(real, gen, k=3)
    p_ref, r_ref = reference_precision_recall(real, gen, 3)
    assert (pr.precision, pr.recall) == (pytest.approx(p_ref, abs=1e-12), pytest.approx(r_ref, abs=1e-12))
    assert 0 < pr.precision <= 1 and 0 <= pr.recall < 1  # the narrow generated set misses part of the real one


def test_knn_radius_excludes_self():
    f = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    assert knn_radii(f, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(f, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_precision_recall_of_disjoint_and_identical_sets():
    a = _features(15, 50, 4)
    assert precision_recall(a, a + 100.0).precision == 0.0
    same = precision_recall(a, a.copy())
    assert same.precision == 1.0 and same.recall == 1.0


def test_minimum_sample_errors_name_the_minimum():
    one, many = _features(16, 1, 4), _features(17, 10, 4)
    with pytest.raises(NotEnoughSamples, match="at least 2 images"):
        frechet_distance(one, many)
    with pytest.raises(NotEnoughSamples, match="at least 2 images"):
        kid(many, one)
    with pytest.raises(NotEnoughSamples, match=r"k=3 needs at least 4 images per set; the generated set has 3"):
        precision_recall(many, many[:3])
    assert min_samples(5) == {"fd": 2, "kid": 2, "precision_recall": 6}


def test_bad_features_rejected():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(_features(0, 10, 4), _features(1, 10, 5))
    bad = _features(0, 10, 4)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kid(bad, bad)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(np.zeros(10), np.zeros(10))


def test_kid_of_whole_sets_reports_its_spread_and_scatters_around_zero():
    # sumie-feature-like scale (128-d, post-ReLU, norm ~15): one distribution, 256 images per set, as
    # `sumie eval` does; the unbiased estimate is negative about half the time, within its reported std
    rng = np.random.default_rng(0)

    def draw(n, shift=0.0):
        return np.maximum(rng.normal(0.8 + shift, 1.1, (n, 128)), 0)

    results = [kid(draw(256), draw(256)) for _ in range(12)]
    assert all(r.subsets == 1 and r.subset_size == 256 and r.std > 0 for r in results)
    means = np.array([r.mean for r in results])
    std = float(np.mean([r.std for r in results]))
    assert (means < 0).any() and (means > 0).any()
    assert abs(means.mean()) < 3 * std / np.sqrt(len(means))  # unbiased: centred on 0
    assert np.std(means) == pytest.approx(std, rel=0.6)  # the reported std is the actual spread
    other = kid(draw(256), draw(256, shift=0.3))
    assert other.mean > 3 * other.std
