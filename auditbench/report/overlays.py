"""Heatmap overlays as PNG bytes for the report's gallery."""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image
from skimage.segmentation import find_boundaries

# Inferno-like colour map: perceptually ordered, readable in greyscale print.
_ANCHORS = np.array([
    (0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
    (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164),
], dtype=np.float64)
LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)],
    axis=1,
).astype(np.uint8)
"""(256, 3) uint8 colour map used for heatmaps and the legend's colour bar."""

LUNG_COLOUR = (0, 220, 255)
ARTIFACT_COLOUR = (60, 255, 60)
MAX_ALPHA = 0.65
"""Opacity of the heatmap at its maximum; it fades to 0 where the map is 0 so anatomy stays visible."""


def overlay_png(
    image: np.ndarray,
    heatmap: np.ndarray,
    lung_mask: np.ndarray | None = None,
    artifact_mask: np.ndarray | None = None,
    min_size: int = 192,
) -> bytes:
    """PNG of a greyscale image with its heatmap and mask contours.

    ``image`` is (H, W) in [0, 1]; ``heatmap`` is the raw map (H, W) >= 0, scaled by its own maximum
    for display only. Images smaller than ``min_size`` are enlarged by an integer factor (nearest).
    """
    image = np.asarray(image, dtype=np.float64)
    heatmap = np.nan_to_num(np.asarray(heatmap, dtype=np.float64), nan=0.0)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    for name, array in (("heatmap", heatmap), ("lung_mask", lung_mask), ("artifact_mask", artifact_mask)):
        if array is not None and np.shape(array) != image.shape:
            raise ValueError(f"{name} shape {np.shape(array)} differs from image shape {image.shape}")

    factor = max(1, math.ceil(min_size / max(image.shape)))
    image, heatmap = _enlarge(image, factor), _enlarge(heatmap, factor)
    grey = np.repeat(np.clip(image, 0.0, 1.0)[..., None] * 255.0, 3, axis=2)

    peak = heatmap.max()
    level = np.clip(heatmap / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(heatmap)
    colour = LUT[np.round(level * 255).astype(np.intp)].astype(np.float64)
    alpha = (MAX_ALPHA * level)[..., None]
    rgb = (1.0 - alpha) * grey + alpha * colour

    # Contours are traced after enlarging so they stay thin lines at display size.
    for mask, contour_colour in ((lung_mask, LUNG_COLOUR), (artifact_mask, ARTIFACT_COLOUR)):
        if mask is not None and np.any(mask):
            edge = find_boundaries(_enlarge(np.asarray(mask, dtype=bool), factor), mode="inner")
            rgb[edge] = contour_colour

    return _png(np.round(rgb).astype(np.uint8))


def colorbar_png(width: int = 160, height: int = 12) -> bytes:
    """PNG of the heatmap colour map, low (left) to high (right), for the report's legend."""
    row = LUT[np.round(np.linspace(0, 255, width)).astype(np.intp)]
    return _png(np.repeat(row[None], height, axis=0))


def _enlarge(array: np.ndarray, factor: int) -> np.ndarray:
    return array if factor == 1 else np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
