"""Geometric preprocessing into the model frame; masks take exactly the image's transform.

One sampling grid serves the image and every region: pixel-centred (``align_corners=False``),
the image's own kernel (bilinear or bicubic, antialiased when shrinking), then the centre crop.
A region (lung mask, artifact mask, border band) is resampled as a float map, so each frame pixel
gets the kernel-weighted fraction of the region under it. It is thresholded once:

- ``mask`` = fraction >= 0.5: where the region *is* in the frame (what metrics score);
- ``footprint`` = fraction != 0: every frame pixel the region's source pixels influence at all.
  Outside it the frame is exactly what it would be without the region, so occlusion fills the
  footprint from pixels outside it and never copies any of the region's intensity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from auditbench.protocol.schema import STUDY_CROP_RATIO  # noqa: F401  (the protocol's default crop, re-exported)


@dataclass(frozen=True)
class FrameSpec:
    """How a sample is mapped to the model's square input frame."""

    input_size: int
    crop: bool
    crop_ratio: float = STUDY_CROP_RATIO
    interpolation: str = "bilinear"

    @property
    def resize_to(self) -> int:
        if not self.crop:
            return self.input_size
        return int(round(self.input_size / (1.0 - 2.0 * self.crop_ratio)))


def _resize(array: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    return F.interpolate(array[None, None], size=(size, size), mode=mode, align_corners=False, antialias=True)[0, 0]


def _centre_crop(array: torch.Tensor, size: int) -> torch.Tensor:
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def resample(array: np.ndarray, frame: FrameSpec) -> np.ndarray:
    """``array`` (H, W) on the frame's sampling grid: resized with its kernel, then centre-cropped."""
    mode = "bicubic" if frame.interpolation == "bicubic" else "bilinear"
    out = _resize(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), frame.resize_to, mode)
    if frame.crop:
        out = _centre_crop(out, frame.input_size)
    return out.numpy()


def to_model_frame(image: np.ndarray, frame: FrameSpec) -> np.ndarray:
    """Resize (and centre-crop when ``frame.crop``) a [0, 1] greyscale image."""
    return np.clip(resample(image, frame), 0.0, 1.0)


@dataclass(frozen=True)
class RegionInFrame:
    """A source-image region on a model frame's grid (see the module docstring)."""

    mask: np.ndarray  # bool (S, S): fraction >= 0.5
    footprint: np.ndarray  # bool (S, S): fraction != 0, a superset of mask

    @property
    def in_view(self) -> bool:
        return bool(self.footprint.any())


def region_to_frame(region: np.ndarray, frame: FrameSpec) -> RegionInFrame:
    """A bool source region mapped with exactly the image's transform (:func:`resample`)."""
    fraction = resample(np.asarray(region, dtype=np.float32), frame)
    # Bicubic weights can be negative, so the footprint is any non-zero weight, not > 0.
    return RegionInFrame(mask=fraction >= 0.5, footprint=fraction != 0)


def mask_to_model_frame(mask: np.ndarray | None, frame: FrameSpec) -> np.ndarray | None:
    """The region's ``mask`` in the frame (area fraction >= 0.5); None stays None."""
    return None if mask is None else region_to_frame(mask, frame).mask


def border_band(shape: tuple[int, int], fraction: float) -> np.ndarray:
    """Bool mask of the outer band (the border region, defined on the source image).

    Pixel k (counted from an edge) is in the band iff k < floor(fraction * side), separately for
    rows (from H) and columns (from W): the synthetic generator's marker band
    (``SyntheticConfig.band_px``), so the default band holds exactly the border markers.
    """
    if not 0 <= fraction < 0.5:
        raise ValueError(f"border fraction must be in [0, 0.5), got {fraction}")
    height, width = shape
    rows, cols = (int(np.floor(fraction * side + 1e-9)) for side in (height, width))
    band = np.zeros((height, width), dtype=bool)
    band[:rows] = band[height - rows:] = True
    band[:, :cols] = band[:, width - cols:] = True
    return band


def normalise(images: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """(N, H, W) greyscale in [0, 1] -> (N, 3, H, W) normalised with the backbone's mean/std."""
    x = torch.as_tensor(images, dtype=torch.float32)
    x = x[:, None].expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
