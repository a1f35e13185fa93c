"""Localisation scored as CheXlocalize scores it: IoU of the thresholded map with a mask, and hit rate.

Saporta, Gui, Agrawal, Pareek, Truong, Nguyen, Ngo, Seekins, Blankenberg, Ng, Lungren & Rajpurkar,
"Benchmarking saliency methods for chest X-ray interpretation", Nature Machine Intelligence 2022
(code: github.com/rajpurkarlab/cheXlocalize). Per image:

- the map is min-max scaled to [0, 1] (:func:`auditbench.audit.sanity.scale_to_unit_range`; a constant or
  non-finite map is undefined: NaN);
- **binarised** by Otsu's threshold, as CheXlocalize: the scaled map is quantised to uint8 (255 x value,
  truncated) and Otsu's threshold t is found on those 256 levels (``skimage.filters.threshold_otsu``; the first
  maximum of the between-class variance, as OpenCV's), foreground = level > t. Quantising first makes
  "foreground" exactly Otsu's upper class (on floats skimage returns a bin centre that can split a bin). Or by
  a given threshold: foreground = scaled value > threshold (no quantisation);
- **IoU** = |B and M| / |B or M|; NaN where the mask is empty or the map undefined (CheXlocalize's
  ``true_pos_only``: B is never empty for a defined map, since its maximum scales to 1 and lies above t);
- **hit** = 1 if the map's maximum pixel lies in the mask, else 0 (first maximum in row-major order, as
  ``np.argmax``); NaN where the mask is empty or the map undefined. It is the pointing game of
  :func:`auditbench.audit.metrics.pointing_game` at zero tolerance.

Map and mask must be on one grid: upsample maps first (:func:`auditbench.explain.cam_base.upsample_cams`,
bilinear as CheXlocalize) and map source masks into the model frame with the image's own transform
(:func:`auditbench.data.transforms.mask_to_model_frame`). These functions take no frame geometry.

How they differ from the mass metrics (``lung_mass`` etc., :mod:`auditbench.audit.metrics`), and why both:
the mass metrics read the raw map (never normalised) and weigh every pixel by its value: threshold-free,
they answer "what share of the evidence lies in the region" and a diffuse low background counts. IoU and hit
binarise or reduce the map, so they are unchanged by any increasing affine rescaling and ignore how much
evidence lies outside the binarised region; they answer "does the map's salient region coincide with the
mask" and are what published saliency benchmarks on chest X-rays report (CheXlocalize against lesion masks),
so auditbench's numbers can be set beside theirs. Min-max scaling is needed for a threshold to mean the same
on every map, and is exactly what must never precede a mass ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from skimage.filters import threshold_otsu

from auditbench.audit.metrics import stack_optional_masks
from auditbench.audit.uncertainty import mean_ci
from auditbench.audit.sanity import scale_to_unit_range

__all__ = [
    "DEFAULT_THRESHOLDS", "ThresholdTuning", "binarise", "hit_rate", "iou", "localisation_scores",
    "localisation_summary", "tune_threshold",
]

Threshold = Union[float, str]

# CheXlocalize tunes over 0.2, 0.3, ..., 0.8 (its docstring; its code, np.arange(0.2, .8, .1), stops at 0.7).
DEFAULT_THRESHOLDS = tuple(np.round(np.arange(2, 9) / 10, 1))


def _inputs(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    scaled = scale_to_unit_range(maps)
    if masks is None:
        raise ValueError("masks are required (use a list with None for images without one)")
    if isinstance(masks, np.ndarray) and masks.shape[-2:] != scaled.shape[1:]:
        raise ValueError(f"maps {scaled.shape} and masks {masks.shape} must share one grid: upsample the maps "
                         "(explain.cam_base.upsample_cams) or map the masks into the frame first")
    return scaled, stack_optional_masks(masks, scaled.shape)


def binarise(maps, threshold: Threshold = "otsu") -> tuple[np.ndarray, np.ndarray]:
    """Binary maps (N, H, W) and ``defined`` (N,): Otsu on the uint8-quantised scaled map (``"otsu"``) or
    scaled value > ``threshold`` (a number in [0, 1)); undefined maps (constant, non-finite) are all False."""
    scaled = scale_to_unit_range(maps)
    defined = ~np.isnan(scaled).any(axis=(1, 2))
    binary = np.zeros(scaled.shape, dtype=bool)
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number, got {threshold!r}")
        for i in np.flatnonzero(defined):
            levels = (255 * scaled[i]).astype(np.uint8)  # truncation, as np.uint8 in CheXlocalize
            binary[i] = levels > threshold_otsu(levels)
    else:
        if not 0 <= threshold < 1:
            raise ValueError(f"a threshold on maps scaled to [0, 1] must lie in [0, 1), got {threshold}")
        binary[defined] = scaled[defined] > threshold
    return binary, defined


def iou(maps, masks, threshold: Threshold = "otsu") -> np.ndarray:
    """Per-image |B and M| / |B or M| with B = :func:`binarise` (maps, threshold); NaN where the mask is empty,
    the map undefined, or (never for a defined map) B is empty."""
    _, masks = _inputs(maps, masks)
    binary, defined = binarise(maps, threshold)
    n = len(masks)
    inter = np.logical_and(binary, masks).reshape(n, -1).sum(axis=1)
    union = np.logical_or(binary, masks).reshape(n, -1).sum(axis=1)
    valid = defined & masks.reshape(n, -1).any(axis=1) & binary.reshape(n, -1).any(axis=1)
    return np.where(valid, inter / np.maximum(union, 1), np.nan)


def hit_rate(maps, masks) -> np.ndarray:
    """Per-image hit: 1.0 if the map's first maximum (row-major) lies in the mask, else 0.0; NaN where the mask
    is empty or the map undefined. Its mean over images is CheXlocalize's hit rate."""
    scaled, masks = _inputs(maps, masks)
    n = len(masks)
    defined = ~np.isnan(scaled).any(axis=(1, 2)) & masks.reshape(n, -1).any(axis=1)
    peak = np.argmax(np.nan_to_num(scaled.reshape(n, -1), nan=0.0), axis=1)
    hit = masks.reshape(n, -1)[np.arange(n), peak].astype(np.float64)
    return np.where(defined, hit, np.nan)


def localisation_scores(maps, masks, threshold: Threshold = "otsu") -> dict[str, np.ndarray]:
    """``{"iou": ..., "hit": ...}`` per image (:func:`iou` at ``threshold``, :func:`hit_rate`)."""
    return {"iou": iou(maps, masks, threshold), "hit": hit_rate(maps, masks)}


@dataclass(frozen=True)
class ThresholdTuning:
    """The chosen ``threshold`` and the mean IoU at every candidate (``thresholds``, ``mean_iou``)."""

    threshold: float
    thresholds: tuple[float, ...]
    mean_iou: tuple[float, ...]


def tune_threshold(maps, masks, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> ThresholdTuning:
    """The threshold of ``thresholds`` that maximises the mean IoU (NaN-ignoring) over the images given, as
    CheXlocalize tunes per class on its validation split; ties go to the smallest threshold (the first maximum
    in ascending order). Call it on validation maps and masks only, then score the test split with the result:
    tuning on test images would report the best case, not a measurement."""
    thresholds = tuple(sorted(float(t) for t in thresholds))
    if not thresholds:
        raise ValueError("thresholds is empty")
    means = []
    for t in thresholds:
        values = iou(maps, masks, t)
        means.append(float(np.nanmean(values)) if np.isfinite(values).any() else np.nan)
    if not np.isfinite(means).any():
        raise ValueError("no image has a defined IoU (empty masks or constant maps): nothing to tune on")
    best = int(np.nanargmax(means))  # first maximum
    return ThresholdTuning(thresholds[best], thresholds, tuple(means))


def localisation_summary(scores: dict[str, np.ndarray], groups: Sequence, n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """(mean, CI low, CI high) per score: NaN-ignoring mean over images and the patient-level percentile
    bootstrap (:func:`auditbench.audit.uncertainty.mean_ci`, the one every auditbench CI uses)."""
    out = {}
    for name, values in scores.items():
        values = np.asarray(values, dtype=float)
        mean = float(np.nanmean(values)) if np.isfinite(values).any() else np.nan
        out[name] = (mean, *mean_ci(values, np.asarray(groups), n_boot, seed, level))
    return out
