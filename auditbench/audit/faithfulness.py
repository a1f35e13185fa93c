"""Faithfulness of saliency maps by removing pixels in the map's order: deletion, insertion and ROAD.

- **Deletion / insertion** (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
  Black-box Models", BMVC 2018): pixels are removed (replaced by a substrate) or inserted (into a substrate) in
  decreasing order of the map, and p is recorded after each step. A faithful map makes p fall fast on deletion
  (low AUC is better) and rise fast on insertion (high AUC is better).
- **ROAD** (Rong, Leemann, Borisov, Kasneci & Kasneci, "A Consistent and Efficient Evaluation Strategy for
  Attribution Methods", ICML 2022): the removed pixels are filled by *noisy linear imputation*, so the
  removal leaves no sharp mask shape for the model to react to. MoRF removes the most relevant fraction
  first (low is better), LeRF the least relevant (high is better); combined = mean(LeRF - MoRF) / 2.

Conventions (one for every curve): pixels are ordered by the map with a stable sort, ties in row-major order;
a fraction f removes round(f x H x W) pixels (halves up); a pixel is removed in all channels. The AUC is the
trapezoid rule over the fraction axis divided by its span (f_last - f_first): the mean height of the
piecewise-linear curve, in p's units, so deletion (fractions 0..1) and ROAD (0.2..0.8) read alike. A constant
map has no order: its AUCs are NaN.

``predict(images (n, C, H, W) float32) -> p (n,)`` is any batched model output (e.g. p(positive)), for any
number of channels C (3 for RGB; the run passes its greyscale frames as C = 1, pipeline/faithfulness_pass.py);
images are in whatever space ``predict`` takes, and substrates and noise are in that space too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np
from scipy import ndimage, sparse
from scipy.integrate import trapezoid
from scipy.sparse.linalg import splu

__all__ = [
    "NEIGHBOUR_WEIGHTS", "DeletionInsertion", "Predict", "Road", "deletion_insertion", "faithfulness_scores",
    "noisy_linear_impute", "normalised_auc", "pixel_order", "road",
]

Predict = Callable[[np.ndarray], np.ndarray]
Substrate = Union[float, np.ndarray, str]

# ROAD's reference implementation (github.com/tleemann/road_evaluation, imputations.py; copied into
# pytorch-grad-cam's metrics/road.py): a removed pixel is the weighted mean of its 8 neighbours, 1/6 for the
# 4 edge neighbours and 1/12 for the 4 diagonal ones (they sum to 1). (row offset, column offset, weight).
NEIGHBOUR_WEIGHTS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6),
                     (0, 1, 1 / 6), (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


def noisy_linear_impute(image: np.ndarray, removed: np.ndarray, noise: float = 0.01,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """``image`` (C, H, W) with the ``removed`` (H, W) pixels filled by ROAD's noisy linear imputation.

    Each removed pixel x_i satisfies x_i = sum_n w_n x_n / sum_n w_n over its in-image neighbours n
    (:data:`NEIGHBOUR_WEIGHTS`; neighbours outside the image drop out, as in the reference code), where a
    removed neighbour is itself unknown: one sparse linear system per image for all channels (LU, scipy),
    then Gaussian noise of standard deviation ``noise`` (absolute, the reference default 0.01) is added to
    every filled value. Linear functions are reproduced exactly (noise 0) wherever no removed pixel lies on
    the image edge. Raises when every pixel is removed (nothing to interpolate from).
    """
    image = np.asarray(image)
    removed = np.asarray(removed, dtype=bool)
    if image.ndim != 3 or removed.shape != image.shape[1:]:
        raise ValueError(f"expected image (C, H, W) and mask (H, W), got {image.shape} and {removed.shape}")
    out = np.array(image, dtype=np.float32, copy=True)
    index = np.flatnonzero(removed)
    if len(index) == 0:
        return out
    if len(index) == removed.size:
        raise ValueError("every pixel is removed: there is nothing to impute from")
    channels, height, width = image.shape
    flat = image.reshape(channels, -1).astype(np.float64)
    row_of = np.full(height * width, -1)
    row_of[index] = np.arange(len(index))
    r, c = np.divmod(index, width)
    diagonal = np.zeros(len(index))
    rows, cols, values = [np.arange(len(index))], [np.arange(len(index))], []
    rhs = np.zeros((len(index), channels))
    for dr, dc, weight in NEIGHBOUR_WEIGHTS:
        rr, cc = r + dr, c + dc
        inside = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        diagonal += weight * inside
        source = np.flatnonzero(inside)
        neighbour = rr[inside] * width + cc[inside]
        unknown = row_of[neighbour] >= 0
        rows.append(source[unknown])
        cols.append(row_of[neighbour[unknown]])
        values.append(np.full(int(unknown.sum()), -weight))
        rhs[source[~unknown]] += weight * flat[:, neighbour[~unknown]].T  # one neighbour per row per offset
    matrix = sparse.csc_matrix((np.concatenate([diagonal, *values]), (np.concatenate(rows), np.concatenate(cols))),
                               shape=(len(index), len(index)))
    # The matrix is symmetric (the weights are) and positive definite (diagonally dominant, strictly on every
    # connected group of removed pixels, which touches a kept one): a symmetric ordering without pivoting
    # factors it about 1.5x faster than SuperLU's general default, to the same values up to rounding.
    solution = splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                    options={"SymmetricMode": True}).solve(rhs)
    if noise:
        rng = np.random.default_rng() if rng is None else rng
        solution = solution + noise * rng.standard_normal(solution.shape)
    out.reshape(channels, -1)[:, index] = solution.T
    return out


def pixel_order(maps: np.ndarray, most_relevant_first: bool = True) -> np.ndarray:
    """(N, H*W) flat pixel indices per image, most (or least) relevant first; ties in row-major order."""
    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    return np.argsort(-flat if most_relevant_first else flat, axis=1, kind="stable")


def _counts(fractions: np.ndarray, n_pixels: int) -> np.ndarray:
    return np.floor(fractions * n_pixels + 0.5).astype(int)  # round half up, the same at every call


def normalised_auc(curves: np.ndarray, fractions: Sequence[float]) -> np.ndarray:
    """Trapezoid area under each row of ``curves`` over ``fractions``, divided by the fractions' span."""
    fractions = np.asarray(fractions, dtype=np.float64)
    return trapezoid(curves, fractions, axis=-1) / (fractions[-1] - fractions[0])


def _check(images: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, maps = np.asarray(images, dtype=np.float32), np.asarray(maps, dtype=np.float64)
    if images.ndim != 4 or maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"expected images (N, C, H, W) and maps (N, H, W), got {images.shape} and {maps.shape}")
    flat = maps.reshape(len(maps), -1)
    ordered = np.isfinite(flat).all(axis=1) & (flat.max(axis=1) > flat.min(axis=1))
    return images, maps, ordered


def _predict(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    out = [np.asarray(predict(images[i:i + batch_size]), dtype=np.float64).reshape(-1)
           for i in range(0, len(images), batch_size)]
    p = np.concatenate(out) if out else np.empty(0)
    if p.shape != (len(images),) or not np.isfinite(p).all():
        raise ValueError(f"predict must return one finite value per image: got shape {p.shape} for {len(images)}")
    return p


def _substrate(images: np.ndarray, substrate: Substrate, blur_sigma: float) -> np.ndarray:
    if isinstance(substrate, str):
        if substrate != "blur":
            raise ValueError(f"substrate must be a number, an array or 'blur', got {substrate!r}")
        # RISE blurs with an 11x11 Gaussian of sigma 5; here the window is +-sigma (truncate=1) with replicated
        # edges and a kernel renormalised to sum 1 (RISE zero-pads, darkening the image's edges).
        return ndimage.gaussian_filter(images, sigma=(0, 0, blur_sigma, blur_sigma), truncate=1.0, mode="nearest")
    return np.broadcast_to(np.asarray(substrate, dtype=np.float32), images.shape)


@dataclass
class DeletionInsertion:
    """``fractions`` (K,); curves (N, K) of p; AUCs (N,) (:func:`normalised_auc`, NaN for constant maps)."""

    fractions: np.ndarray
    deletion_curve: np.ndarray
    insertion_curve: np.ndarray
    deletion_auc: np.ndarray
    insertion_auc: np.ndarray


def deletion_insertion(predict: Predict, images: np.ndarray, maps: np.ndarray, n_steps: int = 20,
                       deletion_substrate: Substrate = 0.0, insertion_substrate: Substrate = "blur",
                       blur_sigma: float = 5.0, batch_size: int = 64) -> DeletionInsertion:
    """Deletion and insertion curves (Petsiuk et al. 2018) at fractions k / ``n_steps``, k = 0..n_steps.

    Deletion starts from the image and replaces the most relevant pixels by ``deletion_substrate`` (0, as RISE's
    code, which works on normalised tensors: there 0 is the data mean); insertion starts from
    ``insertion_substrate`` (``"blur"``: the image blurred, sigma ``blur_sigma`` px, as RISE) and puts the most
    relevant original pixels back. Substrates may be a number or an array of the images' shape. One ``predict``
    call per step and chunk of ``batch_size`` images.
    """
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    images, maps, ordered = _check(images, maps)
    n, _, height, width = images.shape
    fractions = np.arange(n_steps + 1) / n_steps
    rank = np.empty((n, height * width), dtype=int)
    np.put_along_axis(rank, pixel_order(maps), np.arange(height * width)[None], axis=1)
    rank = rank.reshape(n, 1, height, width)
    deleted, blurred = _substrate(images, deletion_substrate, blur_sigma), _substrate(images, insertion_substrate,
                                                                                       blur_sigma)
    curves = {"deletion": [], "insertion": []}
    for count in _counts(fractions, height * width):
        changed = rank < count
        curves["deletion"].append(_predict(predict, np.where(changed, deleted, images), batch_size))
        curves["insertion"].append(_predict(predict, np.where(changed, images, blurred), batch_size))
    deletion, insertion = (np.stack(curves[key], axis=1) for key in ("deletion", "insertion"))
    undefined = np.where(ordered, 1.0, np.nan)
    return DeletionInsertion(fractions, deletion, insertion, normalised_auc(deletion, fractions) * undefined,
                             normalised_auc(insertion, fractions) * undefined)


@dataclass
class Road:
    """``fractions`` (K,); MoRF and LeRF curves (N, K) of p; AUCs (N,); ``combined`` = mean(LeRF - MoRF) / 2."""

    fractions: np.ndarray
    morf_curve: np.ndarray
    lerf_curve: np.ndarray
    morf_auc: np.ndarray
    lerf_auc: np.ndarray
    combined: np.ndarray


def road(predict: Predict, images: np.ndarray, maps: np.ndarray, fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
         noise: float = 0.01, seed: int = 0, batch_size: int = 64, first_index: int = 0) -> Road:
    """ROAD (Rong et al. 2022): p after removing each fraction of pixels, most (MoRF) or least (LeRF) relevant
    first, filled by :func:`noisy_linear_impute`.

    The noise of image i, order o (0 MoRF, 1 LeRF) and fraction k is drawn from
    ``default_rng([seed, first_index + i, o, k])``, so results do not depend on ``batch_size``, and a caller
    that passes a longer sample in parts (``first_index``: the position of ``images[0]`` in it) gets the
    values of one call on the whole sample. ``combined`` is the
    per-image mean over fractions of (p_LeRF - p_MoRF) / 2, as pytorch-grad-cam's ``ROADCombined`` (its
    differences from p(x) cancel).
    """
    images, maps, ordered = _check(images, maps)
    fractions = np.asarray(fractions, dtype=np.float64)
    if len(fractions) < 2 or np.any(np.diff(fractions) <= 0) or fractions[0] < 0 or fractions[-1] >= 1:
        raise ValueError(f"fractions must increase, at least two, within [0, 1): got {fractions}")
    if not isinstance(first_index, (int, np.integer)) or first_index < 0:
        raise ValueError(f"first_index must be a non-negative integer, got {first_index!r}")
    n, _, height, width = images.shape
    counts = _counts(fractions, height * width)
    curves = []
    for order_id, most_first in enumerate((True, False)):
        order = pixel_order(maps, most_first)
        per_fraction = []
        for k, count in enumerate(counts):
            filled = np.empty_like(images)
            for i in range(n):
                removed = np.zeros(height * width, dtype=bool)
                removed[order[i, :count]] = True
                filled[i] = noisy_linear_impute(images[i], removed.reshape(height, width), noise,
                                                np.random.default_rng([seed, first_index + i, order_id, k]))
            per_fraction.append(_predict(predict, filled, batch_size))
        curves.append(np.stack(per_fraction, axis=1))
    morf, lerf = curves
    undefined = np.where(ordered, 1.0, np.nan)
    return Road(fractions, morf, lerf, normalised_auc(morf, fractions) * undefined,
                normalised_auc(lerf, fractions) * undefined, np.mean(lerf - morf, axis=1) / 2 * undefined)


def faithfulness_scores(predict: Predict, images: np.ndarray, maps: np.ndarray, *, n_steps: int = 20,
                        road_fractions: Sequence[float] = (0.2, 0.4, 0.6, 0.8), noise: float = 0.01, seed: int = 0,
                        batch_size: int = 64, first_index: int = 0) -> dict[str, np.ndarray]:
    """Per-image ``deletion_auc`` (lower is better), ``insertion_auc`` (higher), ``road_morf_auc`` (lower),
    ``road_lerf_auc`` (higher) and ``road_combined`` (higher), with the defaults of the two functions
    (``first_index``: see :func:`road`; deletion and insertion draw no noise)."""
    curves = deletion_insertion(predict, images, maps, n_steps=n_steps, batch_size=batch_size)
    removal = road(predict, images, maps, road_fractions, noise=noise, seed=seed, batch_size=batch_size,
                   first_index=first_index)
    return {"deletion_auc": curves.deletion_auc, "insertion_auc": curves.insertion_auc,
            "road_morf_auc": removal.morf_auc, "road_lerf_auc": removal.lerf_auc, "road_combined": removal.combined}
