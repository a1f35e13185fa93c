"""Causal occlusion effects: how much p(positive) moves when a region is filled in.

effect = |p(x) - p(x with the region filled)| per image (Zeiler & Fergus 2014 occlusion; region
removal as in RISE and ROAD). Each region is filled over its *resampling footprint* in the model
frame (every pixel the region's source pixels influence, ``data.transforms``), so no trace of it
survives the resize; artifacts and the border band are inpainted harmonically from the pixels
outside the footprint, which never hold any of the region's intensity, so the model sees a
plausible image without them; the lungs are filled with their own median intensity, which removes
their content. Directions live in ``audit.metrics.METRICS``.
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu

from auditbench.audit.metrics import MetricWarning, stack_optional_masks

Predict = Callable[[np.ndarray], np.ndarray]


def inpaint(image: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """``image`` with the ``unknown`` pixels replaced by the harmonic interpolation of the others.

    Solves the discrete Laplace equation on the unknown pixels (4-neighbour; a pixel at the image
    edge averages only its in-image neighbours, a reflecting boundary) with the known pixels as
    boundary values (Bertalmio et al., SIGGRAPH 2000, in its simplest, harmonic form). By the
    discrete maximum principle every filled value lies between the lowest and the highest known
    pixel bordering its region, so the fill can create nothing brighter than its surroundings, and
    it reads no unknown pixel. Linear in the image: a constant is restored exactly, and so is a
    linear ramp around a region that does not reach the image edge. The factorisation depends on the mask only and is cached, so images that share a
    mask (the border band of one frame) cost one back-substitution each.
    """
    unknown = np.asarray(unknown, dtype=bool)
    if unknown.shape != image.shape:
        raise ValueError(f"mask shape {unknown.shape} differs from image shape {image.shape}")
    out = np.array(image, dtype=np.float32, copy=True)
    if not unknown.any():
        return out
    if unknown.all():
        raise ValueError("the mask covers the whole image: there is no background to fill from")
    key = hashlib.sha1(np.packbits(unknown).tobytes()).hexdigest()
    system = _laplace_system(key, unknown.shape, unknown.tobytes())
    if system is None:
        raise ValueError("a masked region touches no unmasked pixel: there is no background to fill from")
    solver, unknown_index, known_neighbours = system
    values = image.ravel().astype(np.float64)
    rhs = np.bincount(known_neighbours[0], weights=values[known_neighbours[1]], minlength=len(unknown_index))
    out.ravel()[unknown_index] = solver.solve(rhs)
    return out


@functools.lru_cache(maxsize=16)
def _laplace_system(key: str, shape: tuple[int, int], mask_bytes: bytes):
    """LU factors of the Laplacian on the unknown pixels, their flat indices, and (row, known pixel)
    pairs for the right-hand side; None when a component has no known neighbour. ``key`` names
    the mask for the cache; ``mask_bytes`` rebuilds it."""
    height, width = shape
    unknown = np.frombuffer(mask_bytes, dtype=bool).reshape(shape)
    labels, n_components = ndimage.label(unknown)
    # components with an unknown pixel next to a known one (4-neighbours, as the Laplacian)
    touching = np.unique(labels[ndimage.binary_dilation(~unknown) & unknown])
    if len(touching) < n_components:
        return None
    index = np.flatnonzero(unknown)
    n = len(index)
    row_of = np.full(height * width, -1)
    row_of[index] = np.arange(n)
    r, c = np.divmod(index, width)
    degree = np.zeros(n)
    rows, cols, known_rows, known_pixels = [], [], [], []
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        rr, cc = r + dr, c + dc
        inside = (rr >= 0) & (rr < height) & (cc >= 0) & (cc < width)
        degree += inside
        source = np.flatnonzero(inside)
        neighbour = rr[inside] * width + cc[inside]
        neighbour_row = row_of[neighbour]
        is_unknown = neighbour_row >= 0
        rows.append(source[is_unknown])
        cols.append(neighbour_row[is_unknown])
        known_rows.append(source[~is_unknown])
        known_pixels.append(neighbour[~is_unknown])
    matrix = sparse.csc_matrix(
        (np.concatenate([degree, -np.ones(sum(len(x) for x in rows))]),
         (np.concatenate([np.arange(n), *rows]), np.concatenate([np.arange(n), *cols]))),
        shape=(n, n),
    )
    return splu(matrix), index, (np.concatenate(known_rows), np.concatenate(known_pixels))


def fill_lung_median(image: np.ndarray, lung_mask: np.ndarray, footprint: np.ndarray | None = None) -> np.ndarray:
    """``image`` with every pixel of ``footprint`` (default: the lung mask) set to the median
    intensity of the lung mask (removes lung content)."""
    lung_mask = np.asarray(lung_mask, dtype=bool)
    if not lung_mask.any():
        raise ValueError("empty lung mask: nothing to fill")
    out = np.array(image, dtype=np.float32, copy=True)
    out[lung_mask if footprint is None else np.asarray(footprint, bool) | lung_mask] = np.median(image[lung_mask])
    return out


def border_fill_region(border_footprint: np.ndarray, artifact_footprint: np.ndarray) -> np.ndarray:
    """The border band's footprint plus every artifact footprint it touches: a marker that
    straddles the band's inner edge must not be copied into the band, so it is filled too."""
    touching = border_footprint | artifact_footprint
    labels, _ = ndimage.label(touching, structure=np.ones((3, 3)))
    keep = np.unique(labels[border_footprint])
    return np.isin(labels, keep[keep > 0])


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
    artifact_footprints: np.ndarray | Sequence[np.ndarray | None] | None = None,
    border_footprints: np.ndarray | None = None,
    lung_footprints: np.ndarray | None = None,
) -> OccludedImages:
    """Fill each region over its footprint: artifacts and the border band by :func:`inpaint` (the
    band together with the markers it touches, :func:`border_fill_region`), lungs by
    :func:`fill_lung_median`. Images whose region is not in view get no variant for it; a lung
    mask that is empty gives a counted :class:`MetricWarning`. Footprints default to the masks
    (frames without resampling); ``border_footprints`` None means no band in view.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
    n = len(images)
    lung_masks = stack_optional_masks(lung_masks, images.shape)
    lung_footprints = lung_masks if lung_footprints is None else stack_optional_masks(lung_footprints, images.shape)
    artifact_footprints = stack_optional_masks(artifact_footprints, images.shape)
    border_footprints = stack_optional_masks(border_footprints, images.shape)
    has_lung = lung_masks.reshape(n, -1).any(axis=1)
    if not has_lung.all():
        warnings.warn(
            f"{int((~has_lung).sum())} of {n} lung masks are empty: lung_occlusion_effect is NaN for them",
            MetricWarning, stacklevel=2,
        )
    indices = {
        "artifact": np.flatnonzero(artifact_footprints.reshape(n, -1).any(axis=1)),
        "border": np.flatnonzero(border_footprints.reshape(n, -1).any(axis=1)),
        "lung": np.flatnonzero(has_lung),
    }
    fills = {
        "artifact": lambda i: inpaint(images[i], artifact_footprints[i]),
        "border": lambda i: inpaint(images[i], border_fill_region(border_footprints[i], artifact_footprints[i])),
        "lung": lambda i: fill_lung_median(images[i], lung_masks[i], lung_footprints[i]),
    }
    filled = {
        region: np.stack([np.clip(fills[region](i), 0.0, 1.0) for i in idx]) if len(idx)
        else np.empty((0, *images.shape[1:]), np.float32)
        for region, idx in indices.items()
    }
    return OccludedImages(n, indices, filled)


def occlusion_effects(
    predict: Predict,
    images: np.ndarray,
    lung_masks: np.ndarray | None = None,
    artifact_footprints: np.ndarray | Sequence[np.ndarray | None] | None = None,
    border_footprints: np.ndarray | None = None,
    p_original: np.ndarray | None = None,
    batch_size: int = 64,
    occluded: OccludedImages | None = None,
) -> dict[str, np.ndarray]:
    """Per-image artifact_occlusion_effect, border_occlusion_effect and lung_occlusion_effect.

    ``predict`` maps float (n, H, W) images in [0, 1] (model frame) to p(positive) of shape (n,).
    effect = |p(x) - p(x with the region filled)| (see :func:`occlude`); NaN where the region is
    not in view. ``p_original`` reuses p(x) from the test pass;
    ``occluded`` reuses filled images made once for several models.
    """
    images = np.asarray(images)
    if occluded is None:
        occluded = occlude(images, lung_masks, artifact_footprints, border_footprints)
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
