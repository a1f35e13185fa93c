"""Automatic detection of burned-in artifacts in chest X-rays that come without an artifact mask.

Text, arrows, laterality letters, panel letters, rulers and device markers are drawn or exposed
onto the film as bright, high-contrast, sharp-edged and small objects; anatomy that is as bright
(bone, mediastinum) is large or has soft edges. The detector keeps exactly those objects:

1. work at a fixed size (longest side ``work_side``) so that every size in pixels below means the
   same fraction of the image whatever the file's resolution;
2. local contrast = white top-hat (image minus its grey opening by a ``tophat_size`` square):
   bright structures narrower than the square stand out, the smooth anatomy behind them does not;
3. candidates = pixels with local contrast >= ``min_contrast``, or saturated (>= ``saturation``);
4. connected components are kept when their area is within [``min_area``, ``max_area``] of the
   work image and the mean Sobel gradient along their outline is >= ``min_edge`` (drawn overlays
   switch from background to near-white within a pixel or two; ribs and vessels do not);
5. inside the lung mask, where vessels and rib crossings give most false alarms, a component
   also needs contrast >= ``lung_min_contrast``;
6. holes are filled (letters in boxes, ring markers), the mask grows by ``grow`` pixels to cover
   anti-aliased strokes, and it is resized back to the image (nearest neighbour).

Measured against the V7 Labs "Ignore" regions of the ieee8023 sample by
``evaluate_artifact_detector``; numbers in ``MODEL_CARD.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from skimage import filters, measure, morphology


@dataclass(frozen=True)
class ArtifactDetectorConfig:
    """Parameters of ``detect_artifacts``; sizes are pixels of the work image (long side
    ``work_side``), areas are fractions of the work image, intensities are in [0, 1] units.

    ``tophat_size``, ``min_contrast`` and ``min_edge`` were chosen once on the "tune" half of the
    V7 images (highest component recall, then pixel F1), from a 2x2x3 grid; the rest were set a
    priori. Numbers for the "test" half are in ``MODEL_CARD.md``.
    """

    work_side: int = 512  # long side of the work image
    tophat_size: int = 61  # side of the opening square: wider bright objects count as anatomy
    min_contrast: float = 0.3  # top-hat level for a candidate pixel
    saturation: float = 0.98  # pixels at or above are candidates whatever their contrast
    min_area: float = 2e-5  # ~5 px at 512x512: smaller specks are noise
    max_area: float = 0.01  # ~2600 px at 512x512: larger bright regions are anatomy or frames
    min_edge: float = 0.1  # mean Sobel magnitude along a component's outline
    lung_min_contrast: float = 0.35  # stricter contrast for components mostly inside the lungs
    grow: int = 2  # dilation (work pixels) to cover anti-aliased strokes


DEFAULT_CONFIG = ArtifactDetectorConfig()


def _resize(image: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if nearest:
        return F.interpolate(t, size=shape, mode="nearest")[0, 0].numpy()
    return F.interpolate(t, size=shape, mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def detect_artifacts(
    image: np.ndarray,
    lung_mask: np.ndarray | None = None,
    config: ArtifactDetectorConfig = DEFAULT_CONFIG,
) -> np.ndarray:
    """Boolean mask (H, W) of burned-in artifacts in a float [0, 1] greyscale image (H, W).

    ``lung_mask`` (bool (H, W)), when given, makes the detector stricter inside the lungs.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"detect_artifacts expects an (H, W) greyscale image, got {image.shape}")
    if lung_mask is not None and lung_mask.shape != image.shape:
        raise ValueError(f"lung_mask shape {lung_mask.shape} differs from image shape {image.shape}")
    h, w = image.shape
    scale = config.work_side / max(h, w)
    work_shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    g = np.clip(_resize(image, work_shape), 0.0, 1.0)
    lung = None
    if lung_mask is not None:
        lung = _resize(lung_mask.astype(np.float32), work_shape, nearest=True) > 0.5

    side = config.tophat_size
    contrast = morphology.white_tophat(g, morphology.footprint_rectangle((side, side), decomposition="separable"))
    candidates = (contrast >= config.min_contrast) | (g >= config.saturation)
    # Upsampling a small image spreads each edge over ``scale`` work pixels; measure edges per
    # source pixel so that a sharp overlay on a small figure is still sharp.
    edges = filters.sobel(g) * max(1.0, scale)

    n_pixels = g.size
    labels = measure.label(candidates, connectivity=2)
    keep = np.zeros(labels.max() + 1, dtype=bool)
    for region in measure.regionprops(labels, intensity_image=contrast):
        if not config.min_area * n_pixels <= region.area <= config.max_area * n_pixels:
            continue
        # bounding box plus a one-pixel margin, so that the outline band fits inside it
        r0, c0, r1, c1 = region.bbox
        r0, c0, r1, c1 = max(r0 - 1, 0), max(c0 - 1, 0), min(r1 + 1, g.shape[0]), min(c1 + 1, g.shape[1])
        comp = labels[r0:r1, c0:c1] == region.label
        outline = ndimage.binary_dilation(comp) & ~ndimage.binary_erosion(comp)
        if edges[r0:r1, c0:c1][outline].mean() < config.min_edge:
            continue
        in_lung = lung is not None and lung[r0:r1, c0:c1][comp].mean() > 0.5
        if in_lung and region.intensity_mean < config.lung_min_contrast:
            continue
        keep[region.label] = True
    mask = keep[labels]
    mask = ndimage.binary_fill_holes(mask)
    if config.grow:
        mask = ndimage.binary_dilation(mask, iterations=config.grow)
    return _resize(mask.astype(np.float32), (h, w), nearest=True) > 0.5


def _v7_pairs(ieee_root: Path) -> list[tuple[str, Path, Path]]:
    ieee_root = Path(ieee_root)
    mask_dir = ieee_root / "annotations" / "v7labs-masks"
    images = {p.stem: p for p in (ieee_root / "images").iterdir() if p.is_file()}
    pairs = [(m.stem, images[m.stem], m) for m in sorted(mask_dir.glob("*.png")) if m.stem in images]
    if not pairs:
        raise FileNotFoundError(f"{mask_dir}: no V7 mask with a matching image in {ieee_root / 'images'}")
    return pairs


def evaluate_artifact_detector(
    ieee_root: Path,
    config: ArtifactDetectorConfig = DEFAULT_CONFIG,
    subset: str = "all",
    lung_masks: str = "v7",
) -> dict:
    """Compare ``detect_artifacts`` with the V7 "Ignore" regions (value 127) of an ieee8023 clone.

    ``subset``: "all" images with a V7 mask, or "tune" / "test" (alternate images in name order:
    even positions tune, odd positions test). ``lung_masks``: "v7" passes the V7 lung masks (255)
    to the detector, "none" passes none. Returns pixel ``precision`` and ``recall`` pooled over all
    images, ``component_recall`` (fraction of V7 ignore components, 8-connected, touched by the
    detection), ``component_precision`` (fraction of detected components touching a V7 ignore
    region, counted on images that have one, since V7 marked artifacts only on some images), and
    the counts. Precision is NaN when nothing is detected, recall when V7 marks nothing.
    """
    from auditbench.masks.lungseg import read_grey

    pairs = _v7_pairs(ieee_root)
    if subset in ("tune", "test"):
        pairs = pairs[subset == "test" :: 2]
    elif subset != "all":
        raise ValueError(f"subset must be 'all', 'tune' or 'test', got {subset!r}")
    tp = fp = fn = 0
    comps_hit = comps_total = det_hit = det_total = annotated = 0
    for _, image_path, mask_path in pairs:
        v7 = np.asarray(Image.open(mask_path).convert("L"))
        truth = v7 == 127
        lung = (v7 == 255) if lung_masks == "v7" and (v7 == 255).any() else None
        found = detect_artifacts(read_grey(image_path), lung, config)
        tp += int((found & truth).sum())
        fp += int((found & ~truth).sum())
        fn += int((~found & truth).sum())
        truth_labels, n_truth = ndimage.label(truth, structure=np.ones((3, 3)))
        comps_total += n_truth
        annotated += n_truth > 0
        comps_hit += len(np.setdiff1d(np.unique(truth_labels[found]), [0]))
        if n_truth:
            found_labels, n_found = ndimage.label(found, structure=np.ones((3, 3)))
            det_total += n_found
            det_hit += len(np.setdiff1d(np.unique(found_labels[truth]), [0]))

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "subset": subset,
        "n_images": len(pairs),
        "n_images_with_ignore": annotated,
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "component_recall": ratio(comps_hit, comps_total),
        "component_precision": ratio(det_hit, det_total),
        "n_ignore_components": comps_total,
        "n_detected_components_on_annotated": det_total,
    }
