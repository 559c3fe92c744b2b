"""Distribution and agreement metrics on features (numpy, float64): FD, KID, CLIP score, nearest neighbours.

frechet_distance(generated, real)         FD between Gaussians fitted to two feature sets (FID in Inception
                                          space; "FD_<extractor>" in any other)
fd_interval(generated, real)              the FD's bootstrap interval over the generated images, and its
                                          small-sample bias (FD at n is biased upwards by about slope / n)
kernel_inception_distance(generated, real)  KID: unbiased MMD^2 with the cubic polynomial kernel, over subsets
clip_score(image_embeds, text_embeds)     100 * max(cos, 0) per pair, as torchmetrics and the CLIP-score paper
nearest(generated, train)                 cosine similarity of each generated image to its nearest training one
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _moments(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"metrics: need a (n >= 2, dim) feature array, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(sigma)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance_gaussians(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, sqrt_sigma2: np.ndarray | None = None
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Dowson and Landau, 1982).

    The trace of the square root is the sum of the square roots of the eigenvalues of S1 S2, which are those of
    the symmetric S2^1/2 S1 S2^1/2 (a symmetric eigensolver: fast and real). `sqrt_sigma2` saves recomputing
    S2^1/2 when one reference set meets many others (bootstrap, subsets)."""
    root = _psd_sqrt(sigma2) if sqrt_sigma2 is None else sqrt_sigma2
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma1 @ root), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def frechet_distance(generated: np.ndarray, real: np.ndarray) -> float:
    return frechet_distance_gaussians(*_moments(generated), *_moments(real))


@dataclass(frozen=True)
class FDEstimate:
    value: float  # FD of all generated images against all real ones
    low: float  # value - 1.96 standard errors (bootstrap over the generated images), at least 0
    high: float  # value + 1.96 standard errors
    bias_per_n: float  # the slope of FD against 1/n: FD(n) ~ FD_infinity + bias_per_n / n
    infinity: float  # FD extrapolated to infinitely many generated images (Chong and Forsyth, 2020)
    n: int


def fd_interval(
    generated: np.ndarray, real: np.ndarray, resamples: int = 100, seed: int = 0, fractions: int = 5
) -> FDEstimate:
    """FD with a 95% interval and its small-sample bias.

    The interval is the normal one, value +- 1.96 x the standard deviation of FD over bootstrap resamples of the
    generated images: percentiles of those resamples would sit above the value (a resample repeats images, which
    is a smaller sample, and FD's bias grows as samples shrink).

    FD's estimate from n samples is biased upwards, by roughly a constant over n: a fit of FD at n/5 ... n
    against 1/n gives the slope and the value at 1/n = 0 (FD_infinity). With a few hundred images the bias
    dominates differences between checkpoints; compare FDs only at equal n."""
    rng = np.random.default_rng(seed)
    n = len(generated)
    mu_r, sigma_r = _moments(real)
    root = _psd_sqrt(sigma_r)

    def fd(subset: np.ndarray) -> float:
        return frechet_distance_gaussians(*_moments(subset), mu_r, sigma_r, root)

    value = fd(generated)
    boot = [fd(generated[rng.integers(0, n, n)]) for _ in range(resamples)]
    sizes = sorted({max(2, round(n * (k + 1) / fractions)) for k in range(fractions)})
    at_size = [np.mean([fd(generated[rng.permutation(n)[:m]]) for _ in range(4)]) for m in sizes]
    if len(sizes) > 1:
        slope, intercept = np.polyfit(1.0 / np.asarray(sizes, dtype=np.float64), np.asarray(at_size), 1)
    else:
        slope, intercept = 0.0, value
    error = 1.96 * float(np.std(boot))
    return FDEstimate(value, max(value - error, 0.0), value + error, float(slope), float(intercept), n)


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (Binkowski et al., 2018)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    m = len(x)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


@dataclass(frozen=True)
class KIDEstimate:
    mean: float
    std: float
    subset_size: int
    subsets: int


def kernel_inception_distance(
    generated: np.ndarray, real: np.ndarray, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> KIDEstimate:
    """KID's mean and std over `subsets` random subsets; the subset size shrinks to the smaller set's size, so
    30 generated images still get an estimate (a noisier one: report its std)."""
    x, y = np.asarray(generated, dtype=np.float64), np.asarray(real, dtype=np.float64)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 images on each side, got {len(x)} generated and {len(y)} real")
    rng = np.random.default_rng(seed)
    values = [
        _poly_mmd2(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(subsets)
    ]
    return KIDEstimate(float(np.mean(values)), float(np.std(values)), size, subsets)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """Per pair: 100 * max(cos(image, text), 0) (Hessel et al., 2021, without their 2.5 weight; as torchmetrics)."""
    cos = (_normalise(image_embeds) * _normalise(text_embeds)).sum(axis=1)
    return 100.0 * np.maximum(cos, 0.0)


def nearest(generated: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each generated feature: (cosine similarity to its nearest training feature, that feature's index)."""
    similarity = _normalise(generated) @ _normalise(train).T
    index = similarity.argmax(axis=1)
    return similarity[np.arange(len(generated)), index], index


@dataclass(frozen=True)
class MeanEstimate:
    value: float
    low: float  # 2.5th percentile of the mean over bootstrap resamples of the images
    high: float  # 97.5th percentile


def mean_interval(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> MeanEstimate:
    """The mean of per-image values (a checker hit, a CLIP score, a nearest-neighbour similarity) with a 95%
    percentile bootstrap interval over the images: the error bar of a score from a few dozen images."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if len(x) == 0:
        raise ValueError("metrics: mean_interval of no values")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return MeanEstimate(float(x.mean()), float(low), float(high))
