"""Distances between two sets of image features: Frechet distance, KID, precision and recall.

* Frechet distance between Gaussians fitted to the features (Heusel et al. 2017, "GANs
  Trained by a Two Time-Scale Update Rule ...", eq. 6; Dowson & Landau 1982). With the
  Inception-v3 pool features this is FID; with any other network it is *not* FID and is
  reported under the network's name (``FD_sumie`` for sumie's own features).
* Kernel Inception Distance: the unbiased estimator of the squared MMD (Gretton et al. 2012,
  eq. 3) with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over random
  subsets (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 4).
* Improved precision and recall (Kynkaanniemi et al. 2019, sec. 3): each sample's k-NN
  radius approximates the manifold of its set; precision is the share of generated
  samples inside the real manifold, recall the share of real samples inside the generated one.

All arithmetic is in float64. Features are (N, D) arrays or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
import torch

MIN_SAMPLES_FD = 2  # a covariance needs two samples
MIN_SAMPLES_KID = 2  # the unbiased MMD estimator divides by m (m - 1)
DEFAULT_K = 3  # Kynkaanniemi et al. 2019 use k = 3


class NotEnoughSamples(ValueError):
    """Fewer samples than a metric needs; the message names the minimum."""


def _as_f64(features, name: str) -> np.ndarray:
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} features must be (N, D), got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"{name} features contain NaN or inf")
    return f


def _need(n: int, minimum: int, metric: str, name: str) -> None:
    if n < minimum:
        raise NotEnoughSamples(f"{metric} needs at least {minimum} images per set; the {name} set has {n}")


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}; use the same feature network")


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, and how many samples they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def gaussian_stats(features) -> GaussianStats:
    """Sample mean and unbiased sample covariance (ddof = 1, as pytorch-fid and clean-fid)."""
    f = _as_f64(features, "the")
    _need(len(f), MIN_SAMPLES_FD, "the Frechet distance", "given")
    return GaussianStats(f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1]), len(f))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), Dowson & Landau 1982.

    Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): the inner matrix is symmetric PSD,
    so its eigenvalues give the trace without a general (possibly complex) matrix square root.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    ra = _psd_sqrt(a.sigma)
    m = ra @ b.sigma @ ra
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    a, b = _as_f64(features_a, "first"), _as_f64(features_b, "second")
    _same_dim(a, b)
    _need(len(a), MIN_SAMPLES_FD, "the Frechet distance", "first")
    _need(len(b), MIN_SAMPLES_FD, "the Frechet distance", "second")
    return frechet_distance_from_stats(gaussian_stats(a), gaussian_stats(b))


# ---------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------

def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> torch.Tensor:
    """k(x, y) = (gamma x.y + coef0)^degree with gamma = 1/D by default: (N, M)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x, y, degree: int = 3) -> float:
    """Unbiased squared MMD with the polynomial kernel (Gretton et al. 2012, eq. 3); x: (m, D), y: (n, D)."""
    x = torch.as_tensor(_as_f64(x, "first"))
    y = torch.as_tensor(_as_f64(y, "second"))
    m, n = len(x), len(y)
    _need(m, MIN_SAMPLES_KID, "KID", "first")
    _need(n, MIN_SAMPLES_KID, "KID", "second")
    kxx, kyy, kxy = polynomial_kernel(x, x, degree), polynomial_kernel(y, y, degree), polynomial_kernel(x, y, degree)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))  # off-diagonal means: no self-similarity
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float
    subsets: int
    subset_size: int


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        degree: int = 3) -> KIDResult:
    """KID: mean and std of the unbiased MMD^2 over ``subsets`` random subsets of ``subset_size``
    drawn without replacement from each set (Binkowski et al. 2018). A subset size larger than a
    set is reduced to the smaller set's size (as clean-fid does); the result says which was used.
    When the one subset is both whole sets, the std is estimated from half-size subsets.

    The estimator is unbiased, so for two samples of one distribution it scatters around 0 and
    goes negative about half the time; its spread grows with the kernel's values, hence with the
    feature scale (sumie's 128-d features: ~0.17 at 256 images, against a shipped model's 0.30)."""
    a, b = _as_f64(features_a, "first"), _as_f64(features_b, "second")
    _same_dim(a, b)
    _need(len(a), MIN_SAMPLES_KID, "KID", "first")
    _need(len(b), MIN_SAMPLES_KID, "KID", "second")
    if subsets < 1 or subset_size < MIN_SAMPLES_KID:
        raise ValueError(f"need subsets >= 1 and subset_size >= {MIN_SAMPLES_KID}, got {subsets}, {subset_size}")
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    full = m == len(a) == len(b)
    vals = []
    for _ in range(1 if full else subsets):  # with every sample in the one subset, all draws are equal
        ia = rng.choice(len(a), m, replace=False)
        ib = rng.choice(len(b), m, replace=False)
        vals.append(mmd2_unbiased(a[ia], b[ib], degree))
    v = np.asarray(vals)
    std = float(v.std()) if not full else _full_set_std(a, b, subsets, rng, degree)
    return KIDResult(float(v.mean()), std, len(vals), m)


def _full_set_std(a: np.ndarray, b: np.ndarray, subsets: int, rng: np.random.Generator, degree: int) -> float:
    """The spread of KID when its one subset is both whole sets (where the spread over subsets is 0 and
    says nothing): the std over ``subsets`` random half-size subsets, divided by sqrt(2), as the
    U-statistic's variance falls as 1/m (Gretton et al. 2012, lemma 6)."""
    h = len(a) // 2
    if h < MIN_SAMPLES_KID:
        return float("nan")
    vals = [mmd2_unbiased(a[rng.choice(len(a), h, replace=False)], b[rng.choice(len(b), h, replace=False)], degree)
            for _ in range(max(2, min(subsets, 50)))]
    return float(np.std(vals) / math.sqrt(2))


# ---------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------

def _pairwise_dist(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Euclidean distances (N, M) in float64, computed in row chunks."""
    return torch.cat([torch.cdist(a[i:i + chunk], b) for i in range(0, len(a), chunk)]) if len(a) else \
        torch.zeros(0, len(b), dtype=a.dtype)


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K) -> torch.Tensor:
    """Distance of each sample to its k-th nearest neighbour in its own set, itself excluded: (N,)."""
    d = _pairwise_dist(features, features)
    return d.kthvalue(k + 1, dim=1).values  # the smallest distance is the sample itself (0)


def manifold_coverage(radius_set: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """Share of ``queries`` inside at least one ball B(radius_set[j], radii[j])."""
    inside = (_pairwise_dist(queries, radius_set) <= radii[None, :]).any(dim=1)
    return float(inside.double().mean())


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int


def precision_recall(real, generated, k: int = DEFAULT_K) -> PrecisionRecall:
    """Improved precision and recall with k-NN radii (Kynkaanniemi et al. 2019, eq. 1-3)."""
    r = torch.as_tensor(_as_f64(real, "reference"))
    g = torch.as_tensor(_as_f64(generated, "generated"))
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"feature dimensions differ: {r.shape[1]} vs {g.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _need(len(r), k + 1, f"precision/recall with k={k}", "reference")
    _need(len(g), k + 1, f"precision/recall with k={k}", "generated")
    return PrecisionRecall(manifold_coverage(r, knn_radii(r, k), g), manifold_coverage(g, knn_radii(g, k), r), k)


def min_samples(k: int = DEFAULT_K) -> dict[str, int]:
    """The fewest images per set each metric accepts."""
    return {"fd": MIN_SAMPLES_FD, "kid": MIN_SAMPLES_KID, "precision_recall": k + 1}
