"""Causal occlusion effects: how much p(positive) moves when a region is filled in.

effect = |p(x) - p(x with the region filled)| per image (Zeiler & Fergus 2014 occlusion; region
removal as in RISE and ROAD). Artifacts and the border band are filled with the surrounding
background, so the model sees a plausible image without them; the lungs are filled with their own
median intensity, which removes their content. Directions live in ``audit.metrics.METRICS``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage
from skimage.measure import label, regionprops
from skimage.restoration import inpaint_biharmonic

from auditbench.audit.metrics import MetricWarning, border_band, stack_optional_masks

Predict = Callable[[np.ndarray], np.ndarray]

# Biharmonic inpainting costs ~5 ms for a 1000 px marker but ~150 ms for a 224 px frame's border band
# (15k unknowns), so only components up to this size are inpainted; larger ones take the fast fill
# (~3 ms), which the border band always takes so the fill does not change with the input size.
MAX_INPAINT_PIXELS = 4096
_CROP_PAD = 4  # known pixels kept around a component's bounding box: the biharmonic stencil needs 2
_SMOOTH = 5  # window of the local mean that large components copy from (suppresses noise streaks)


def fill_background(
    image: np.ndarray, mask: np.ndarray, max_inpaint_pixels: int = MAX_INPAINT_PIXELS
) -> np.ndarray:
    """``image`` with the ``mask`` region filled from the pixels around it, clipped to [0, 1].

    Each 8-connected component of up to ``max_inpaint_pixels`` pixels (markers, letters, wires) is
    inpainted biharmonically (``skimage.restoration.inpaint_biharmonic``) on its bounding box plus a
    4 px margin. Larger components copy, for each pixel, the 5x5 mean of unmasked pixels around its
    nearest unmasked pixel: for a border band (``max_inpaint_pixels=0``) that is the interior value
    just inside, per row and column, lightly smoothed so image noise is not drawn out into streaks.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    out = np.array(image, dtype=np.float32, copy=True)
    if not mask.any():
        return out
    if mask.all():
        raise ValueError("the mask covers the whole image: there is no background to fill from")

    components = label(mask, connectivity=2)
    large = np.zeros_like(mask)
    for region in regionprops(components):
        if region.area > max_inpaint_pixels:
            large |= components == region.label
            continue
        r0, c0, r1, c1 = region.bbox
        r0, c0 = max(r0 - _CROP_PAD, 0), max(c0 - _CROP_PAD, 0)
        r1, c1 = min(r1 + _CROP_PAD, mask.shape[0]), min(c1 + _CROP_PAD, mask.shape[1])
        # the crop's whole mask is unknown (a neighbour component must not act as background)
        filled = inpaint_biharmonic(image[r0:r1, c0:c1], mask[r0:r1, c0:c1])
        own = components[r0:r1, c0:c1] == region.label
        out[r0:r1, c0:c1][own] = filled[own]

    if large.any():
        # normalised convolution: the local mean of unmasked pixels only
        known_values = np.where(mask, 0.0, image).astype(np.float64)
        local_sum = ndimage.uniform_filter(known_values, _SMOOTH, mode="nearest")
        local_count = ndimage.uniform_filter((~mask).astype(np.float64), _SMOOTH, mode="nearest")
        local_mean = local_sum / np.maximum(local_count, 1e-12)  # count > 0 at every unmasked pixel
        rows, cols = ndimage.distance_transform_edt(mask, return_distances=False, return_indices=True)
        out[large] = local_mean[rows[large], cols[large]]
    return np.clip(out, 0.0, 1.0)


def fill_lung_median(image: np.ndarray, lung_mask: np.ndarray) -> np.ndarray:
    """``image`` with every lung pixel set to the median lung intensity (removes lung content)."""
    lung_mask = np.asarray(lung_mask, dtype=bool)
    if not lung_mask.any():
        raise ValueError("empty lung mask: nothing to fill")
    out = np.array(image, dtype=np.float32, copy=True)
    out[lung_mask] = np.median(image[lung_mask])
    return out


def _predict_batches(predict: Predict, images: Sequence[np.ndarray] | np.ndarray, batch_size: int
                     ) -> np.ndarray:
    """p(positive) for images fed to ``predict`` in batches; checks the output shape and range."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.stack(images[start:start + batch_size]).astype(np.float32, copy=False)
        p = np.asarray(predict(batch), dtype=np.float64)
        if p.shape != (len(batch),):
            raise ValueError(f"predict returned shape {p.shape} for {len(batch)} images; expected ({len(batch)},)")
        if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
            raise ValueError("predict must return p(positive) in [0, 1]")
        out.append(p)
    return np.concatenate(out) if out else np.zeros(0)


OCCLUSION_REGIONS = ("artifact", "border", "lung")


@dataclass
class OccludedImages:
    """Images with one region filled, per region: ``indices`` into the original batch and the
    filled copies. They depend on the images and masks only, so one set serves every model."""

    n: int
    indices: dict[str, np.ndarray]
    filled: dict[str, np.ndarray]
    parent_rows: dict[str, np.ndarray] | None = None  # after subset(): rows of the parent's filled arrays

    def subset(self, index: np.ndarray) -> "OccludedImages":
        """The occluded images of ``index`` (positions in the original batch), renumbered 0..len-1."""
        position = np.full(self.n, -1)
        position[index] = np.arange(len(index))
        indices, filled, rows = {}, {}, {}
        for region, idx in self.indices.items():
            keep = position[idx] >= 0
            indices[region] = position[idx][keep]
            filled[region] = self.filled[region][keep]
            rows[region] = np.flatnonzero(keep)
        return OccludedImages(len(index), indices, filled, rows)


def occlude(
    images: np.ndarray,
    lung_masks: np.ndarray,
    artifact_masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
    border_fraction: float = 0.08,
) -> OccludedImages:
    """Fill each region: artifacts by :func:`fill_background`, the border band by its fast fill from
    just inside (``max_inpaint_pixels=0``), lungs by :func:`fill_lung_median`. Images without an
    artifact (or with an empty lung mask) get no artifact (lung) variant; a lung mask that is
    empty gives a counted :class:`MetricWarning`."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
    n = len(images)
    lung_masks = stack_optional_masks(lung_masks, images.shape)
    artifact_masks = stack_optional_masks(artifact_masks, images.shape)
    band = border_band(images.shape[1:], border_fraction)
    has_lung = lung_masks.reshape(n, -1).any(axis=1)
    has_artifact = artifact_masks.reshape(n, -1).any(axis=1)
    if not has_lung.all():
        warnings.warn(
            f"{int((~has_lung).sum())} of {n} lung masks are empty: lung_occlusion_effect is NaN for them",
            MetricWarning, stacklevel=2,
        )
    indices = {
        "artifact": np.flatnonzero(has_artifact),
        "border": np.arange(n),
        "lung": np.flatnonzero(has_lung),
    }
    fills = {
        "artifact": lambda i: fill_background(images[i], artifact_masks[i]),
        "border": lambda i: fill_background(images[i], band, max_inpaint_pixels=0),
        "lung": lambda i: fill_lung_median(images[i], lung_masks[i]),
    }
    filled = {
        region: np.stack([fills[region](i) for i in idx]) if len(idx) else np.empty((0, *images.shape[1:]), images.dtype)
        for region, idx in indices.items()
    }
    return OccludedImages(n, indices, filled)


def occlusion_effects(
    predict: Predict,
    images: np.ndarray,
    lung_masks: np.ndarray | None = None,
    artifact_masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
    border_fraction: float = 0.08,
    p_original: np.ndarray | None = None,
    batch_size: int = 64,
    occluded: OccludedImages | None = None,
) -> dict[str, np.ndarray]:
    """Per-image artifact_occlusion_effect, border_occlusion_effect and lung_occlusion_effect.

    ``predict`` maps float (n, H, W) images in [0, 1] (model frame) to p(positive) of shape (n,).
    effect = |p(x) - p(x with the region filled)| (see :func:`occlude`); NaN where the region is
    absent (no artifact: "not applicable"). ``p_original`` reuses p(x) from the test pass;
    ``occluded`` reuses filled images made once for several models.
    """
    images = np.asarray(images)
    if occluded is None:
        occluded = occlude(images, lung_masks, artifact_masks, border_fraction)
    if p_original is None:
        p_original = _predict_batches(predict, images, batch_size)
    p_occluded = {
        region: _predict_batches(predict, occluded.filled[region], batch_size) if len(occluded.indices[region]) else np.empty(0)
        for region in OCCLUSION_REGIONS
    }
    return effects_from_probabilities(occluded, p_original, p_occluded)


def effects_from_probabilities(
    occluded: OccludedImages, p_original: np.ndarray, p_occluded: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """|p(x) - p(x filled)| per region, NaN where the region is absent; ``p_occluded[region]`` is
    aligned with ``occluded.filled[region]`` (however it was computed, e.g. from cached features)."""
    n = occluded.n
    p_original = np.asarray(p_original, dtype=np.float64)
    if p_original.shape != (n,):
        raise ValueError(f"p_original has shape {p_original.shape}, expected ({n},)")
    effects = {}
    for region in OCCLUSION_REGIONS:
        effect = np.full(n, np.nan)
        idx = occluded.indices[region]
        effect[idx] = np.abs(p_original[idx] - np.asarray(p_occluded[region], dtype=np.float64))
        effects[f"{region}_occlusion_effect"] = effect
    return effects
