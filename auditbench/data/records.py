"""Typed records that the data stage hands to the rest of the pipeline."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Callable

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

    def pixels(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(image, lung mask, artifact mask) in one access (a rendered sample renders once)."""
        return self.image, self.lung_mask, self.artifact_mask


Render = Callable[[], tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]
_PIXEL_FIELDS = ("image", "lung_mask", "artifact_mask")


class RenderedSample(Sample):
    """A :class:`Sample` whose pixels are rendered again on each access instead of held: for
    generated data whose pixels are an exact function of a few parameters (synthetic phantoms).
    A view of them costs memory for its metadata only, so a run's memory does not grow with the
    number of images. ``render`` must be deterministic and picklable (e.g. a ``functools.partial``
    of a module-level function); the content key is computed once from the rendered bytes.
    ``dataclasses.replace`` gives a copy that holds its pixels."""

    def __init__(self, render: Render | None = None, *, image: np.ndarray | None = None,
                 lung_mask: np.ndarray | None = None, artifact_mask: np.ndarray | None = None, **metadata):
        self._render = render if render is not None else HeldPixels(image, lung_mask, artifact_mask)
        self._held: dict[str, np.ndarray | None] = {}
        super().__init__(image=None, lung_mask=None, artifact_mask=None, **metadata)
        image, lung_mask, artifact_mask = self._render()
        Sample.__post_init__(_Checked(self.sample_id, image, lung_mask, artifact_mask))
        self.content_key = _key(self.sample_id, (image, lung_mask, artifact_mask))

    def __post_init__(self) -> None:  # checked on the rendered pixels in __init__
        pass

    def pixels(self):
        return self._render()

    def __reduce__(self):  # pickle (Ray) by metadata and render, never by pixels
        metadata = {f.name: getattr(self, f.name) for f in dataclasses.fields(Sample) if f.name not in _PIXEL_FIELDS}
        return (_rebuild, (self._render, metadata))


@dataclass(frozen=True)
class HeldPixels:
    """A render that returns pixels it holds (a rendered sample copied with changed pixels)."""

    image: np.ndarray
    lung_mask: np.ndarray | None
    artifact_mask: np.ndarray | None

    def __call__(self):
        return self.image, self.lung_mask, self.artifact_mask


def _rebuild(render: Render, metadata: dict) -> RenderedSample:
    return RenderedSample(render, **metadata)


def _pixel_property(index: int, name: str) -> property:
    def get(self):
        return self._render()[index]

    def set(self, value):
        if value is not None:  # dataclass __init__ assigns None; a real assignment is refused
            raise AttributeError(f"{name} of a rendered sample is computed; use dataclasses.replace for a copy")

    return property(get, set)


for _index, _name in enumerate(_PIXEL_FIELDS):
    setattr(RenderedSample, _name, _pixel_property(_index, _name))
del _index, _name


@dataclass
class _Checked:
    """The fields Sample's shape check reads."""

    sample_id: str
    image: np.ndarray
    lung_mask: np.ndarray | None
    artifact_mask: np.ndarray | None


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
    if isinstance(sample, RenderedSample):
        return sample.content_key
    return _key(sample.sample_id, (sample.image, sample.lung_mask, sample.artifact_mask))


def _key(sample_id: str, arrays) -> str:
    digest = hashlib.blake2b(sample_id.encode(), digest_size=16)
    for array in arrays:
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
