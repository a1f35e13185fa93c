"""The study's augmentation (Keras ImageDataGenerator): random shift, zoom and rotation.

Shift up to 20% of the width/height each way, zoom 10%, rotation up to 50 degrees; no flips and
no brightness changes. Lung and artifact masks take the image's exact geometric transform
(nearest neighbour). Pixels the transform exposes are filled with 0 (black), as Keras's
``fill_mode='constant', cval=0``; Keras's default 'nearest' would smear the border (often
burned-in text) inward and create artifacts the audit would then measure. The image is resampled
bilinearly, as Keras does (order 1); unlike Keras, the zoom is isotropic (Keras draws the x and y
zoom independently), as torchvision's RandomAffine only scales isotropically.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from auditbench.data.records import Sample


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random affine transform; each parameter is drawn uniformly in its range."""

    shift: float = 0.2  # translation, fraction of width (x) and height (y), each way
    zoom: float = 0.1  # scale in [1 - zoom, 1 + zoom]
    rotation: float = 50.0  # degrees, each way


class _SeededAffine(v2.RandomAffine):
    """RandomAffine that draws its parameters from an explicit generator, not torch's global RNG,
    so a seed fixes the transform regardless of what else uses randomness."""

    def __init__(self, config: AugmentConfig, generator: torch.Generator):
        super().__init__(
            degrees=config.rotation,
            translate=(config.shift, config.shift),
            scale=(1.0 - config.zoom, 1.0 + config.zoom),
            interpolation=InterpolationMode.BILINEAR,
            fill=0,
        )
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(low, high, generator=self.generator).item())

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        max_dx, max_dy = self.translate[0] * width, self.translate[1] * height
        return dict(
            angle=self._uniform(*self.degrees),
            translate=(int(round(self._uniform(-max_dx, max_dx))), int(round(self._uniform(-max_dy, max_dy)))),
            scale=self._uniform(*self.scale),
            shear=(0.0, 0.0),
        )


def augment_sample(
    image: np.ndarray,
    lung: np.ndarray | None,
    artifact: np.ndarray | None,
    config: AugmentConfig,
    seed: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One random affine transform of ``image`` (H, W) in [0, 1] and its masks; same seed, same result.

    Masks that are None stay None; exposed pixels are 0 in the image and False in the masks.
    """
    transform = _SeededAffine(config, torch.Generator().manual_seed(seed))
    image_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None])
    masks = [m for m in (lung, artifact) if m is not None]
    masks_t = tv_tensors.Mask(torch.from_numpy(np.stack(masks).astype(np.uint8))) if masks else None
    # One call: the image and the stacked masks share the drawn parameters.
    out_image, out_masks = transform(image_t, masks_t)
    result = out_image[0].clamp(0.0, 1.0).numpy()
    moved = iter(out_masks.numpy().astype(bool)) if masks else iter(())
    return (
        result,
        next(moved) if lung is not None else None,
        next(moved) if artifact is not None else None,
    )


def _sample_seed(seed: int, sample_id: str) -> int:
    """A per-image seed from the run seed and the image's id, independent of list order."""
    return int(np.random.SeedSequence([seed, zlib.crc32(sample_id.encode())]).generate_state(1)[0])


def augment_minority_once(
    samples: list[Sample],
    labels: list[int],
    seed: int,
    config: AugmentConfig = AugmentConfig(),
) -> list[Sample]:
    """The study's mode: every image of a minority class gets one augmented copy.

    Returns ``samples`` followed by the copies (in ``samples`` order). A minority class is any
    class with fewer images than the largest; with equal counts nothing is added. Copies have
    ``sample_id + "#aug1"``, the same label, patient and source (they must stay in the same fold),
    and ``extra["augmented_from"]``.
    """
    if len(samples) != len(labels):
        raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
    counts = Counter(int(label) for label in labels)
    largest = max(counts.values(), default=0)
    copies = []
    for sample, label in zip(samples, labels):
        if counts[int(label)] == largest:
            continue
        image, lung, artifact = augment_sample(
            sample.image, sample.lung_mask, sample.artifact_mask, config, _sample_seed(seed, sample.sample_id)
        )
        copies.append(
            dataclasses.replace(
                sample,
                sample_id=f"{sample.sample_id}#aug1",
                image=image,
                lung_mask=lung,
                artifact_mask=artifact,
                extra={**sample.extra, "augmented_from": sample.sample_id},
            )
        )
    return [*samples, *copies]
