"""Geometric preprocessing into the model frame; masks take exactly the image's transform."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# The study resized to 300 px and centre-cropped 224, removing 38 px per side (12.7%, not the 8%
# its text says); the ratio is kept and scaled to any input size.
STUDY_CROP_RATIO = 38 / 300


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
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
    return F.interpolate(array[None, None], size=(size, size), mode=mode, **kwargs)[0, 0]


def _centre_crop(array: torch.Tensor, size: int) -> torch.Tensor:
    top = (array.shape[0] - size) // 2
    left = (array.shape[1] - size) // 2
    return array[top : top + size, left : left + size]


def to_model_frame(image: np.ndarray, frame: FrameSpec) -> np.ndarray:
    """Resize (and centre-crop when ``frame.crop``) a [0, 1] greyscale image."""
    mode = "bicubic" if frame.interpolation == "bicubic" else "bilinear"
    out = _resize(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), frame.resize_to, mode)
    if frame.crop:
        out = _centre_crop(out, frame.input_size)
    return out.clamp_(0.0, 1.0).numpy()


def mask_to_model_frame(mask: np.ndarray | None, frame: FrameSpec) -> np.ndarray | None:
    """The same geometric transform as :func:`to_model_frame`, with nearest-neighbour sampling."""
    if mask is None:
        return None
    out = _resize(torch.from_numpy(mask.astype(np.float32)), frame.resize_to, "nearest")
    if frame.crop:
        out = _centre_crop(out, frame.input_size)
    return out.numpy() > 0.5


def normalise(images: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """(N, H, W) greyscale in [0, 1] -> (N, 3, H, W) normalised with the backbone's mean/std."""
    x = torch.as_tensor(images, dtype=torch.float32)
    x = x[:, None].expand(-1, 3, -1, -1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t
