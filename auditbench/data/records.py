"""Typed records that the data stage hands to the rest of the pipeline."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One chest X-ray with its masks, in its own (possibly downsized) pixel frame.

    ``image`` is float32 greyscale in [0, 1], shape (H, W). Masks are bool arrays of the same
    shape, or None where the data set has none. ``label`` is the data set's raw class name
    (``covid``, ``normal``, ``viral``, ``bacterial``, ...); tasks map raw names to task classes.
    """

    sample_id: str
    image: np.ndarray
    label: str
    patient_id: str
    source: str
    lung_mask: np.ndarray | None = None
    artifact_mask: np.ndarray | None = None
    mask_source: str = "none"  # dataset | predicted | synthetic | none
    artifact_mask_source: str = "none"  # dataset | detected | synthetic | none
    path: str = ""
    view: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 2:
            raise ValueError(f"{self.sample_id}: image must be 2-D greyscale, got shape {self.image.shape}")
        for name in ("lung_mask", "artifact_mask"):
            mask = getattr(self, name)
            if mask is not None and mask.shape != self.image.shape:
                raise ValueError(
                    f"{self.sample_id}: {name} shape {mask.shape} differs from image shape {self.image.shape}"
                )

    @property
    def has_artifact(self) -> bool:
        return self.artifact_mask is not None and bool(self.artifact_mask.any())


@dataclass(frozen=True)
class SkippedFile:
    """A file the loader could not use; recorded in skipped.csv and the report, never fatal."""

    path: str
    reason: str
    source: str = ""


@dataclass
class LoadedDataset:
    samples: list[Sample]
    skipped: list[SkippedFile] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def extend(self, other: "LoadedDataset") -> None:
        self.samples.extend(other.samples)
        self.skipped.extend(other.skipped)


class DataError(ValueError):
    """Bad data input that must stop the run before training (missing root, empty class)."""


def content_key(sample: Sample) -> str:
    """A key for what a model frame is made of: the sample id and the bytes of its image and masks.

    Caches of frames and backbone features are keyed by it, not by object identity, so two views
    that hold the same image (the decorrelated test view of every training strength, say) share
    one backbone pass, and a changed image or mask can never hit a stale entry."""
    digest = hashlib.blake2b(sample.sample_id.encode(), digest_size=16)
    for array in (sample.image, sample.lung_mask, sample.artifact_mask):
        if array is None:
            digest.update(b"|none")
            continue
        digest.update(f"|{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).view(np.uint8).data)
    return digest.hexdigest()


def data_fingerprint(samples: list[Sample]) -> str:
    """One hash of a run's images: the sorted distinct :func:`content_key` of every sample, so two
    runs on the same images and masks (in any order) share it, and any changed pixel changes it."""
    digest = hashlib.blake2b(digest_size=16)
    for key in sorted({content_key(sample) for sample in samples}):
        digest.update(key.encode())
    return digest.hexdigest()
