"""Evaluation metrics as pure functions over feature arrays.

* Frechet distance (FID when the features are Inception-v3 pool features), in float64
  with a symmetric, always-real matrix square root.
* Precision and recall by k-nearest-neighbour manifolds (Kynkaanniemi et al. 2019, k = 3),
  on whatever features are passed (VGG-16 in the original work; see ``precision_recall``).
* CLIP score: mean cosine similarity of paired image and text embeddings, in [-1, 1].

Inputs may be numpy arrays or torch tensors of shape ``(N, D)``.
"""

from __future__ import annotations

import warnings

import numpy as np

# below this many samples the Frechet distance's upward bias is large (Chong & Forsyth 2020)
SMALL_SAMPLE = 2_000

__all__ = [
    "SMALL_SAMPLE",
    "warn_small_sample",
    "gaussian_stats",
    "frechet_distance_from_stats",
    "frechet_distance",
    "manifold_radii",
    "precision_recall",
    "clip_score",
]


def _as_float64(features, name: str = "features") -> np.ndarray:
    """Features as a float64 ``(N, D)`` numpy array; a clear error for anything else."""
    if hasattr(features, "detach"):  # torch tensor, without importing torch
        features = features.detach().float().cpu().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty: no samples to evaluate")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def warn_small_sample(n: int, what: str = "FID", minimum: int = SMALL_SAMPLE) -> str | None:
    """Warn (``UserWarning``) when a Frechet distance rests on fewer than ``minimum`` samples.

    The estimate is biased upward, the more so the fewer the samples, so such a value
    compares only with values from the same count.  Returns the message, or None.
    """
    if n >= minimum:
        return None
    message = (
        f"{what} from only {n} samples (fewer than {minimum:,}) is biased upward; "
        "compare it only with values computed from the same number of samples"
    )
    warnings.warn(message, UserWarning, stacklevel=2)
    return message


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features, in float64.

    Uses the N-1 normalisation like pytorch-fid and clean-fid (``np.cov``).
    """
    array = _as_float64(features)
    if array.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {array.shape[0]}")
    mu = array.mean(axis=0)
    centred = array - mu
    sigma = centred.T @ centred / (array.shape[0] - 1)
    return mu, sigma


def _clip_eigenvalues(eigvals: np.ndarray) -> np.ndarray:
    """Zero the eigenvalues that rounding explains (below ``D * eps * max``), keep the rest.

    ``eigh`` of a symmetric matrix is accurate to about ``eps * max|eig|`` per eigenvalue,
    so a smaller value (a singular covariance's null directions, or a negative one) cannot
    be told from zero; its square root would add ``sqrt(eps)``-sized noise to the trace.
    """
    tol = eigvals.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(eigvals).max()), 1e-300)
    return np.where(eigvals > tol, eigvals, 0.0)


def _psd_factor(matrix: np.ndarray) -> np.ndarray:
    """``F`` with ``F.T @ F == matrix`` for a symmetric PSD matrix, via ``eigh``.

    Rows of round-off eigenvalues are dropped, so ``F`` is real even for rank-deficient
    covariances (fewer samples than dimensions).
    """
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    eigvals = _clip_eigenvalues(eigvals)
    keep = eigvals > 0
    return np.sqrt(eigvals[keep])[:, None] * eigvecs[:, keep].T


def _trace_sqrt_product(factor1: np.ndarray, factor2: np.ndarray) -> float:
    """``tr((S1 S2)^(1/2))`` for ``S1 = F1.T F1`` and ``S2 = F2.T F2``: the nuclear norm of ``F1 F2.T``.

    The eigenvalues of ``S1 S2`` are those of ``M M.T`` with ``M = F1 F2.T``, so their square
    roots are the singular values of ``M``. Taking them from an SVD of ``M`` (accurate to
    ``eps * |M|``) instead of the eigenvalues of ``S1^(1/2) S2 S1^(1/2)`` (accurate to
    ``eps * |M|^2``, then square-rooted) keeps the small directions that appear when the
    sample count is close to the dimension; no eigenvalue needs cutting.
    """
    if factor1.shape[0] == 0 or factor2.shape[0] == 0:
        return 0.0
    return float(np.linalg.svd(factor1 @ factor2.T, compute_uv=False).sum())


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.  The trace term is the sum
    of the singular values of ``F1 F2.T`` where ``S = F.T F`` comes from ``eigh`` of each
    covariance: real and non-negative by construction, without the complex parts and the
    ``eps * I`` retries that ``scipy.linalg.sqrtm(S1 @ S2)`` needs on singular covariances.
    """
    mu1 = np.asarray(mu1, dtype=np.float64).reshape(-1)
    mu2 = np.asarray(mu2, dtype=np.float64).reshape(-1)
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape} (features of different extractors?)"
        )
    tr_covmean = _trace_sqrt_product(_psd_factor(sigma1), _psd_factor(sigma2))
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    # round-off can make identical distributions give -1e-12
    return float(max(value, 0.0))


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between the Gaussian fits of two ``(N, D)`` feature sets.

    Works from the samples, not the covariances: with ``A`` the centred samples of one
    side, ``S = A.T A / (n - 1) = R.T R`` for the ``R`` of a QR of ``A / sqrt(n - 1)``
    (``min(n, D) x D``), so the trace term is the nuclear norm of ``R1 R2.T``. No
    covariance is squared and none of its eigenvalues is cut, so the result stays accurate
    to float64 round-off also when the sample count is close to the dimension.
    """
    a = _as_float64(features_a, "features_a")
    b = _as_float64(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"statistics do not match: features of size {a.shape[1]} and {b.shape[1]} "
            "(features of different extractors?)"
        )
    factors, traces, means = [], [], []
    for x in (a, b):
        if x.shape[0] < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {x.shape[0]}")
        mu = x.mean(axis=0)
        centred = (x - mu) / np.sqrt(x.shape[0] - 1)
        factors.append(np.linalg.qr(centred, mode="r"))
        traces.append(float((centred * centred).sum()))
        means.append(mu)
    diff = means[0] - means[1]
    value = diff @ diff + traces[0] + traces[1] - 2.0 * _trace_sqrt_product(*factors)
    return float(max(value, 0.0))


def _pairwise_sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(len(a), len(b))``, clipped at zero."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.clip(sq, 0.0, None)


def manifold_radii(features, k: int = 3, batch_size: int = 1024) -> np.ndarray:
    """Distance of each sample to its k-th nearest neighbour in the same set (self excluded).

    These are the radii of the hyperspheres whose union estimates the manifold.
    """
    array = _as_float64(features)
    n = array.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got k={k}")
    radii = np.empty(n, dtype=np.float64)
    for start in range(0, n, batch_size):
        sq = _pairwise_sq_distances(array[start : start + batch_size], array)
        # column k of the partially sorted row: index 0 is the sample itself (distance 0)
        radii[start : start + batch_size] = np.sqrt(np.partition(sq, k, axis=1)[:, k])
    return radii


def precision_recall(
    real_features, fake_features, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Precision: fraction of generated samples inside the real manifold (union of balls
    around each real sample with radius = distance to its k-th nearest real neighbour).
    Recall: fraction of real samples inside the generated manifold, defined likewise.
    Both come from one pass over the generated-to-real distances, ``batch_size`` rows
    at a time (memory ~ ``batch_size * N_real * 8`` bytes).

    The values depend on the features: Kynkaanniemi et al. use VGG-16 fc2 features
    (4096-d). ``wadi eval score`` passes the FID extractor's features (Inception-v3 pool,
    2048-d, for the COCO protocol), so its numbers compare with papers that do the
    same, not directly with VGG-16 ones.
    """
    real = _as_float64(real_features, "real features")
    fake = _as_float64(fake_features, "generated features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, generated {fake.shape[1]}")
    sq_real_radii = manifold_radii(real, k, batch_size) ** 2
    sq_fake_radii = manifold_radii(fake, k, batch_size) ** 2
    fake_inside = 0
    real_covered = np.zeros(real.shape[0], dtype=bool)
    for start in range(0, fake.shape[0], batch_size):
        sq = _pairwise_sq_distances(fake[start : start + batch_size], real)  # (b, N_real)
        fake_inside += int(np.any(sq <= sq_real_radii[None, :], axis=1).sum())
        real_covered |= np.any(sq <= sq_fake_radii[start : start + batch_size, None], axis=0)
    return fake_inside / fake.shape[0], float(real_covered.mean())


def clip_score(image_embeds, text_embeds) -> float:
    """Mean cosine similarity of paired image/text embeddings (row i with row i).

    The raw cosine, averaged, unscaled: the convention of the COCO table in method.md
    §6 (0.31 for SD1.5), not multiplied by 100 or by w = 2.5 as in some papers. No pair
    is clipped at 0 (the ``w * max(cos, 0)`` of Hessel et al.'s CLIPScore): that clamp
    would lift the mean of a model whose images miss their captions.
    """
    img = _as_float64(image_embeds, "image embeddings")
    txt = _as_float64(text_embeds, "text embeddings")
    if img.shape != txt.shape:
        raise ValueError(f"image embeddings {img.shape} and text embeddings {txt.shape} differ")
    img = img / np.linalg.norm(img, axis=1, keepdims=True).clip(1e-12)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True).clip(1e-12)
    return float((img * txt).sum(axis=1).mean())
