"""Image-set metrics over feature tensors (N x D), whatever extractor produced them.

Every function returns a plain dict (YAML-ready numbers) with `metric`, `value`, the size of each
set and the provenance the caller passes in (`extractor_id`, `weights_sha256`), so a number is never
reported without its extractor and N (see vgen.evaluate.features).

- Fréchet distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
  Local Nash Equilibrium"): FID when the features are Inception's, FD[clip] in CLIP space.
- Kernel Inception distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): unbiased MMD^2 with
  the cubic polynomial kernel, averaged over random subsets.
- Precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models"): k-NN balls around each set as its manifold.
- CLIP score (Hessel et al. 2021, "CLIPScore"): mean of max(100 cos, 0) over image-caption pairs.
- Nearest training distance: how close generated samples sit to training samples, relative to how
  close training samples sit to each other (a memorisation check, in the spirit of the
  authenticity test of Alaa et al. 2022, "How Faithful is your Synthetic Data?").

All arithmetic that accumulates (means, covariances, kernels, matrix square roots) is float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from vgen.errors import UsageError

_DISTANCE_CHUNK = 1024  # rows of a distance matrix computed at once (memory: chunk x N floats)


class FeatureStatistics(NamedTuple):
    """The Gaussian fitted to a feature set: float64 mean [D], unbiased covariance [D, D], N."""

    mean: torch.Tensor
    covariance: torch.Tensor
    count: int


def _check_features(features: torch.Tensor, name: str, minimum: int = 2) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise UsageError(f"{name}: expected a feature matrix N x D, got {shape}")
    if features.shape[0] < minimum:
        raise UsageError(f"{name}: {features.shape[0]} samples; this metric needs at least {minimum}")
    if not torch.isfinite(features).all():
        raise UsageError(f"{name}: features contain NaN or infinite values")
    return features.detach()


def _provenance(extractor_id: str | None, weights_sha256: str | None) -> dict[str, Any]:
    return {"extractor_id": extractor_id, "weights_sha256": weights_sha256}


def feature_statistics(features: torch.Tensor) -> FeatureStatistics:
    """Mean and unbiased covariance (float64) of N x D features."""
    x = _check_features(features, "features").to(torch.float64)
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / (x.shape[0] - 1)
    return FeatureStatistics(mean, covariance, int(x.shape[0]))


def _psd_eigenvalues(values: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with those below its rounding noise (d * eps * largest) set to 0,
    so that the square root does not turn 1e-16 of noise into 1e-8 per dimension."""
    tolerance = values.shape[0] * torch.finfo(values.dtype).eps * values.abs().max()
    return torch.where(values > tolerance, values, torch.zeros_like(values))


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * _psd_eigenvalues(values).sqrt()) @ vectors.T


def frechet_distance_from_statistics(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the Fréchet (2-Wasserstein) distance
    between two Gaussians (Dowson & Landau 1982; Heusel et al. 2017, eq. 6).

    Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b. That product
    is not symmetric, so scipy.linalg.sqrtm (pytorch-fid) can return complex values and needs an
    epsilon offset when S_a is singular (fewer samples than dimensions), and torchmetrics takes
    torch.linalg.eigvals of it. We use the symmetric PSD matrix M = S_a^(1/2) S_b S_a^(1/2) instead:
    XY and YX have the same eigenvalues, so with X = S_a^(1/2), Y = S_a^(1/2) S_b, M has those of
    S_a S_b, and `eigh` of a symmetric matrix is real and stable. Eigenvalues within rounding noise
    of 0 (negative ones included) count as 0. All in float64.
    """
    if a.mean.shape != b.mean.shape:
        raise UsageError(f"feature dimensions differ: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    mean_a, mean_b = a.mean.to(torch.float64), b.mean.to(torch.float64)
    cov_a, cov_b = a.covariance.to(torch.float64), b.covariance.to(torch.float64)
    sqrt_a = _symmetric_sqrt(cov_a)
    m = sqrt_a @ cov_b @ sqrt_a
    m = (m + m.T) / 2  # exact symmetry for eigh, removing rounding asymmetry
    trace_sqrt = _psd_eigenvalues(torch.linalg.eigvalsh(m)).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(distance)


def frechet_distance(
    real: torch.Tensor | FeatureStatistics,
    generated: torch.Tensor | FeatureStatistics,
    *,
    extractor_id: str | None = None,
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """Fréchet distance between two feature sets (or their cached statistics).

    FID is biased upwards for small N (Chong & Forsyth 2020): compare values only at equal N.
    """
    a = real if isinstance(real, FeatureStatistics) else feature_statistics(real)
    b = generated if isinstance(generated, FeatureStatistics) else feature_statistics(generated)
    return {
        "metric": "frechet_distance",
        "value": frechet_distance_from_statistics(a, b),
        "n_real": a.count,
        "n_generated": b.count,
        **_provenance(extractor_id, weights_sha256),
    }


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int, coef: float) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + coef) ** degree  # k(x, y) = (x.y / d + 1)^3


def _unbiased_mmd2(x: torch.Tensor, y: torch.Tensor, degree: int, coef: float) -> torch.Tensor:
    """Unbiased MMD^2 of two samples of equal size m (Bińkowski et al. 2018, eq. 2; Gretton et al.
    2012): the within-set sums leave out the diagonal k(x_i, x_i)."""
    m = x.shape[0]
    k_xx = _polynomial_kernel(x, x, degree, coef)
    k_yy = _polynomial_kernel(y, y, degree, coef)
    k_xy = _polynomial_kernel(x, y, degree, coef)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(
    real: torch.Tensor,
    generated: torch.Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    *,
    degree: int = 3,
    coef: float = 1.0,
    seed: int = 0,
    extractor_id: str | None = None,
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """KID: the unbiased MMD^2 between the sets under k(x, y) = (x.y / d + 1)^3, averaged over
    `subsets` random subsets of `subset_size` samples of each set (drawn without replacement,
    seeded, so a value is reproducible). `subset_size` is capped at the smaller set, as clean-fid
    does. Unbiased: about 0 for two samples of one distribution, and may then be slightly negative.
    """
    x = _check_features(real, "real").to(torch.float64)
    y = _check_features(generated, "generated").to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise UsageError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise UsageError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        xs = x[torch.randperm(x.shape[0], generator=generator)[:m].to(x.device)]
        ys = y[torch.randperm(y.shape[0], generator=generator)[:m].to(y.device)]
        values.append(_unbiased_mmd2(xs, ys, degree, coef))
    scores = torch.stack(values)
    return {
        "metric": "kernel_inception_distance",
        "value": float(scores.mean()),
        "std": float(scores.std(unbiased=False)),
        "subsets": subsets,
        "subset_size": m,
        "n_real": int(x.shape[0]),
        "n_generated": int(y.shape[0]),
        **_provenance(extractor_id, weights_sha256),
    }


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp(min=0)


def _nearest(queries: torch.Tensor, points: torch.Tensor, k: int, exclude_self: bool):
    """Squared distance and index of the k-th nearest of `points` for each query, in row chunks.
    With `exclude_self` (queries is points), each point's zero distance to itself is skipped."""
    values, indices = [], []
    for start in range(0, queries.shape[0], _DISTANCE_CHUNK):
        d = _squared_distances(queries[start : start + _DISTANCE_CHUNK], points)
        if exclude_self:
            rows = torch.arange(d.shape[0], device=d.device)
            d[rows, rows + start] = float("inf")
        value, index = d.kthvalue(k, dim=1)
        values.append(value)
        indices.append(index)
    return torch.cat(values), torch.cat(indices)


def _share_inside(queries: torch.Tensor, centres: torch.Tensor, radii2: torch.Tensor) -> float:
    """Share of queries inside at least one ball (centre, squared radius)."""
    inside = []
    for start in range(0, queries.shape[0], _DISTANCE_CHUNK):
        d = _squared_distances(queries[start : start + _DISTANCE_CHUNK], centres)
        inside.append((d <= radii2[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: torch.Tensor,
    generated: torch.Tensor,
    k: int = 3,
    *,
    extractor_id: str | None = None,
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of
    balls around its samples with radius the distance to the sample's k-th nearest neighbour (k = 3
    in the paper). Precision: share of generated samples inside the real manifold (fidelity).
    Recall: share of real samples inside the generated manifold (diversity). The paper uses VGG-16
    features; any extractor works, and the one used is recorded.
    """
    x = _check_features(real, "real", minimum=k + 1).to(torch.float64)
    y = _check_features(generated, "generated", minimum=k + 1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise UsageError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    centre = x.mean(dim=0)  # centring reduces cancellation in |a|^2 + |b|^2 - 2ab
    x, y = x - centre, y - centre
    real_radii2, _ = _nearest(x, x, k, exclude_self=True)
    generated_radii2, _ = _nearest(y, y, k, exclude_self=True)
    precision = _share_inside(y, x, real_radii2)
    recall = _share_inside(x, y, generated_radii2)
    return {
        "metric": "precision_recall",
        "value": {"precision": precision, "recall": recall},
        "k": k,
        "n_real": int(x.shape[0]),
        "n_generated": int(y.shape[0]),
        **_provenance(extractor_id, weights_sha256),
    }


def clip_score(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    extractor_id: str | None = None,
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """CLIP score (Hessel et al. 2021): the mean over image-caption pairs (row i with row i) of
    max(100 * cos(image, text), 0). The paper scales by w = 2.5; 100 is torchmetrics' convention.
    Features need not be normalised (they are here)."""
    images = _check_features(image_features, "image features", minimum=1).to(torch.float64)
    texts = _check_features(text_features, "text features", minimum=1).to(torch.float64)
    if images.shape != texts.shape:
        raise UsageError(
            f"image and text features must pair up row by row: {tuple(images.shape)} vs {tuple(texts.shape)}"
        )
    cosine = torch.nn.functional.cosine_similarity(images, texts, dim=1)
    scores = (100.0 * cosine).clamp(min=0)
    return {
        "metric": "clip_score",
        "value": float(scores.mean()),
        "std": float(scores.std(unbiased=False)),
        "n": int(scores.shape[0]),
        **_provenance(extractor_id, weights_sha256),
    }


def nearest_train_distance(
    generated: torch.Tensor,
    train: torch.Tensor,
    threshold_ratio: float = 0.5,
    closest: int = 8,
    *,
    extractor_id: str | None = None,
    weights_sha256: str | None = None,
) -> dict[str, Any]:
    """How close each generated sample is to its nearest training sample (L2 in feature space).

    A distance means little on its own, so each is divided by the nearest-neighbour distance of
    that training sample among the other training samples (its local spacing): a ratio well below 1
    says the sample sits much closer to one training image than training images sit to each other,
    i.e. a likely copy. `value` is the share of generated samples with ratio < `threshold_ratio`.
    For a baseline, call it with held-out real features as `generated`: a model that does not copy
    should score about the same. Also reported: the distribution of distances and ratios, the
    median spacing of the training samples found, and the `closest` pairs (by ratio) to look at.
    """
    g = _check_features(generated, "generated", minimum=1).to(torch.float64)
    t = _check_features(train, "train", minimum=2).to(torch.float64)
    if g.shape[1] != t.shape[1]:
        raise UsageError(f"feature dimensions differ: {g.shape[1]} vs {t.shape[1]}")
    if threshold_ratio <= 0:
        raise UsageError(f"threshold_ratio must be positive, got {threshold_ratio}")
    centre = t.mean(dim=0)
    g, t = g - centre, t - centre
    distance2, nearest = _nearest(g, t, 1, exclude_self=False)
    distance = distance2.sqrt()
    # The spacing of only the training samples that are someone's nearest (O(N_gen N_train), not
    # O(N_train^2)): the 2nd nearest among all training samples is the nearest other one.
    used, where = torch.unique(nearest, return_inverse=True)
    spacing = _nearest(t[used], t, 2, exclude_self=False)[0].sqrt()[where]
    ratio = torch.where(spacing > 0, distance / spacing.clamp(min=1e-300),
                        torch.where(distance > 0, float("inf"), 0.0))
    order = torch.argsort(ratio)[:closest]
    return {
        "metric": "nearest_train_distance",
        "value": float((ratio < threshold_ratio).double().mean()),
        "threshold_ratio": threshold_ratio,
        "distance": {"min": float(distance.min()), "median": float(distance.median()),
                     "mean": float(distance.mean())},
        "ratio": {"min": float(ratio.min()), "median": float(ratio.median())},
        "train_spacing_median": float(spacing.median()),  # of the nearest training samples
        "closest": [{"generated": int(i), "train": int(nearest[i]), "distance": float(distance[i]),
                     "ratio": float(ratio[i])} for i in order],
        "n_generated": int(g.shape[0]),
        "n_train": int(t.shape[0]),
        **_provenance(extractor_id, weights_sha256),
    }
