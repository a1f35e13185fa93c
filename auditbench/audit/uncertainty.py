"""Patient-level (cluster) bootstrap confidence intervals.

Images of one patient are correlated, so resampling images treats them as independent and gives
intervals that are too narrow. Every function here resamples *patients* with replacement and keeps
all images of each drawn patient (the cluster bootstrap: Davison & Hinkley 1997, section 3.8;
Field & Welsh 2007, "Bootstrapping clustered data", JRSS B 69:369-390), and reports the percentile
interval of the replicates (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13).

The draws are shared by every function, so the same ``groups`` and ``seed`` give the same resamples
whichever function is called: patients are numbered in the sorted order of ``np.unique(groups)``
and replicate ``b`` draws patients ``default_rng(seed).integers(0, n_patients,
size=(n_boot, n_patients))[b]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

__all__ = [
    "PairedDifference", "bootstrap_ci", "cluster_resamples", "mean_ci", "mean_cis",
    "paired_bootstrap", "percentile_ci",
]


def _patients(groups: np.ndarray) -> tuple[np.ndarray, int]:
    """Patient code (0..n_patients-1, sorted order of the ids) of every image, and n_patients."""
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be one patient id per image (1-D), got shape {groups.shape}")
    if len(groups) == 0:
        raise ValueError("groups is empty: there are no images to resample")
    _, codes = np.unique(groups, return_inverse=True)
    codes = codes.ravel()
    return codes, int(codes.max()) + 1


def _draws(n_patients: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_patients) patient codes drawn with replacement; the one source of randomness."""
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n_patients, size=(n_boot, n_patients))


def _weights(draws: np.ndarray, n_patients: int) -> np.ndarray:
    """(n_boot, n_patients) float matrix: how many times each patient was drawn in each replicate."""
    n_boot = len(draws)
    flat = (np.arange(n_boot)[:, None] * n_patients + draws).ravel()
    return np.bincount(flat, minlength=n_boot * n_patients).reshape(n_boot, n_patients).astype(float)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def percentile_ci(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval (Efron & Tibshirani 1993, ch. 13) of bootstrap replicates.

    The (1 - level)/2 and (1 + level)/2 quantiles (numpy's linear interpolation) of the replicates,
    NaN replicates left out; (nan, nan) when no replicate is finite or there are none.
    """
    _check_level(level)
    reps = np.asarray(replicates, dtype=float).ravel()
    reps = reps[~np.isnan(reps)]
    if len(reps) == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(low), float(high)


def cluster_resamples(groups: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Cluster-bootstrap resamples (Davison & Hinkley 1997, s. 3.8; Field & Welsh 2007) as index arrays.

    ``groups`` holds one patient id per image. Each of the ``n_boot`` arrays indexes the images of
    ``n_patients`` patients drawn with replacement (see the module docstring for the exact draws),
    in draw order, each patient's images in ascending image order; a patient drawn twice contributes
    its images twice. Built with one vectorised gather, so 1000 resamples of 2,000 images are cheap.
    """
    codes, n_patients = _patients(groups)
    draws = _draws(n_patients, n_boot, seed)
    if n_boot == 0:
        return []
    order = np.argsort(codes, kind="stable")  # images grouped by patient, ascending within
    counts = np.bincount(codes, minlength=n_patients)
    starts = np.cumsum(counts) - counts  # where each patient's block starts in ``order``
    flat = draws.ravel()
    lengths = counts[flat]
    out_starts = np.cumsum(lengths) - lengths  # where each drawn block starts in the output
    position = np.arange(lengths.sum()) - np.repeat(out_starts - starts[flat], lengths)
    images = order[position]
    sizes = lengths.reshape(n_boot, n_patients).sum(axis=1)
    return np.split(images, np.cumsum(sizes)[:-1])


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    groups: np.ndarray,
    n_boot: int,
    seed: int,
    level: float = 0.95,
) -> tuple[float, float]:
    """Patient-level percentile bootstrap CI of ``statistic`` (Efron & Tibshirani 1993; Field & Welsh 2007).

    ``statistic`` maps an index array into the images (one :func:`cluster_resamples` resample) to a
    float; NaN replicates are left out. Returns (low, high); (nan, nan) when n_boot is 0 or every
    replicate is NaN.
    """
    _check_level(level)
    resamples = cluster_resamples(groups, n_boot, seed)
    replicates = np.array([float(statistic(index)) for index in resamples], dtype=float)
    return percentile_ci(replicates, level)


def _mean_replicates(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, k) replicate NaN-ignoring means of the k columns of ``values`` (n_images, k)."""
    codes, n_patients = _patients(groups)
    if values.shape[0] != len(codes):
        raise ValueError(f"values has {values.shape[0]} rows but groups has {len(codes)} images")
    defined = ~np.isnan(values)
    filled = np.where(defined, values, 0.0)
    sums = np.stack([np.bincount(codes, weights=filled[:, j], minlength=n_patients)
                     for j in range(values.shape[1])], axis=1)
    counts = np.stack([np.bincount(codes, weights=defined[:, j].astype(float), minlength=n_patients)
                       for j in range(values.shape[1])], axis=1)
    weights = _weights(_draws(n_patients, n_boot, seed), n_patients)
    numerator, denominator = weights @ sums, weights @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        means = numerator / denominator
    means[denominator == 0] = np.nan
    return means


def mean_cis(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> np.ndarray:
    """Patient-level percentile bootstrap CIs of NaN-ignoring means, for many columns at once.

    ``values`` is (n_images, k), e.g. one column per metric x model on the same images. Uses
    per-patient sums and counts and the (n_boot, n_patients) draw-count matrix, so a replicate mean is
    (W @ sums) / (W @ counts): the cluster bootstrap (Field & Welsh 2007) with the percentile
    interval (Efron & Tibshirani 1993). Returns a (k, 2) array of (low, high); a replicate with no
    defined value is NaN and left out; n_boot == 0 gives NaN.
    """
    _check_level(level)
    values = np.asarray(values, dtype=float)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D (n_images, k), got shape {values.shape}")
    replicates = _mean_replicates(values, groups, n_boot, seed)
    return np.array([percentile_ci(replicates[:, j], level) for j in range(values.shape[1])],
                    dtype=float).reshape(values.shape[1], 2)


def mean_ci(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Patient-level percentile bootstrap CI of the NaN-ignoring mean of per-image ``values``.

    Vectorised form of ``bootstrap_ci(lambda i: np.nanmean(values[i]), groups, n_boot, seed, level)``
    with the same resamples and (up to floating-point summation order) the same result; see
    :func:`mean_cis` (Field & Welsh 2007; Efron & Tibshirani 1993).
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D (one per image), got shape {values.shape}")
    low, high = mean_cis(values[:, None], groups, n_boot, seed, level)[0]
    return float(low), float(high)


@dataclass(frozen=True)
class PairedDifference:
    """stat(a) - stat(b) on the full data, its percentile CI, and whether the CI excludes 0."""

    difference: float
    ci_low: float
    ci_high: float
    distinguishable: bool


def paired_bootstrap(
    values_a: np.ndarray,
    values_b: np.ndarray,
    groups: np.ndarray,
    n_boot: int,
    seed: int,
    level: float = 0.95,
    statistic: Literal["mean"] | Callable[[np.ndarray], float] = "mean",
) -> PairedDifference:
    """Paired patient-level bootstrap of the difference between two models on the same images.

    ``values_a`` and ``values_b`` are aligned per-image values of models A and B (per-image
    correctness 0/1 for accuracy, or any per-image metric); only images where both are defined
    (not NaN) count. Both models are evaluated on the same cluster resamples (Field & Welsh 2007;
    Davison & Hinkley 1997, s. 3.8), which is what makes the comparison paired; the CI is the
    percentile interval (Efron & Tibshirani 1993) of stat(a) - stat(b) over the replicates.
    ``statistic`` is "mean" (vectorised, via :func:`mean_ci` of a - b) or a function of a 1-D
    values array. ``distinguishable`` = the CI excludes 0 (False when it is NaN).
    """
    a, b = np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)
    groups = np.asarray(groups)
    if a.shape != b.shape or a.ndim != 1 or len(a) != len(groups):
        raise ValueError(f"values_a {a.shape}, values_b {b.shape} and groups {groups.shape} must be "
                         "aligned 1-D arrays (one entry per image)")
    both = ~np.isnan(a) & ~np.isnan(b)
    if isinstance(statistic, str):
        if statistic != "mean":
            raise ValueError(f"statistic must be 'mean' or a callable, got {statistic!r}")
        d = np.where(both, a - b, np.nan)
        difference = float(np.mean(d[both])) if both.any() else float("nan")
        low, high = mean_ci(d, groups, n_boot, seed, level)
    else:
        def _difference(index: np.ndarray) -> float:
            keep = index[both[index]]
            return float(statistic(a[keep])) - float(statistic(b[keep])) if len(keep) else float("nan")

        difference = _difference(np.arange(len(a)))
        low, high = bootstrap_ci(_difference, groups, n_boot, seed, level)
    distinguishable = bool(low > 0 or high < 0)
    return PairedDifference(difference, low, high, distinguishable)
