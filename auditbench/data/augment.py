"""The study's augmentation (Keras ImageDataGenerator): random shift, zoom and rotation.

Shift up to 20% of the width/height each way, zoom 10%, rotation up to 50 degrees; no flips and
no brightness changes. Lung and artifact masks take the image's exact geometric transform: the
same sampling grid, read nearest-neighbour so they stay binary.

Fill. Pixels that the transform moves in from outside the image are filled by *reflection*
(``fill_mode="reflect"``, the default): the image is continued as its mirror image about its
edges, ``d c b a | a b c d | d c b a``, repeated as far as needed. This is exact (no padding
width to guess): the output-to-input coordinate map is built with
``torch.nn.functional.affine_grid`` and read with ``grid_sample(padding_mode="reflection",
align_corners=False)``, which folds any out-of-range coordinate back about the pixel edges, i.e.
Keras's ``fill_mode='reflect'`` (scipy's ``mode='reflect'``).

Why not a constant: a constant fill (Keras ``fill_mode='constant', cval=0``) leaves black
wedges in the corners of every augmented image. In the study's ``minority_once`` mode only one
class gets augmented copies, so those wedges (median 5%, up to 14% of the cropped image exactly
0) appear in one class only: a label-linked shortcut that the augmentation itself adds, the
very thing this package audits. Reflected content carries no such fingerprint: it is lung,
border and marker texture like the rest of the image (a reflected marker is still a marker, and
the artifact mask reflects with it). Keras's default ``'nearest'`` is no better: it smears the
edge row, often burned-in text, into constant streaks. ``fill_mode="constant"`` (0 in the image,
False in the masks) is kept only to reproduce the original behaviour and measure its shortcut.

Other differences from Keras: the zoom is isotropic (Keras draws the x and y zoom
independently), the shift is continuous (sub-pixel), and the image is resampled bilinearly, as
Keras does (order 1). Positive angles rotate the content counter-clockwise on screen.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from auditbench.data.records import RenderedSample, Sample

AugmentMode = Literal["minority_once", "online"]
FillMode = Literal["reflect", "constant"]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random affine transform; each parameter is drawn uniformly in its range."""

    shift: float = 0.2  # translation, fraction of width (x) and height (y), each way
    zoom: float = 0.1  # scale in [1 - zoom, 1 + zoom]
    rotation: float = 50.0  # degrees, each way
    fill_mode: FillMode = "reflect"  # "constant": the original 0 fill, only to measure its shortcut

    def __post_init__(self) -> None:
        if self.fill_mode not in ("reflect", "constant"):
            raise ValueError(f"fill_mode must be 'reflect' or 'constant', got {self.fill_mode!r}")
        if not 0.0 <= self.zoom < 1.0:
            raise ValueError(f"zoom must be in [0, 1), got {self.zoom}")
        if self.shift < 0.0 or self.rotation < 0.0:
            raise ValueError("shift and rotation must be non-negative")


@dataclass(frozen=True)
class AffineParams:
    """One drawn transform: content rotated by ``angle`` degrees (counter-clockwise) and scaled by
    ``scale`` about the image centre, then moved by (``dx``, ``dy``) pixels (right, down)."""

    angle: float
    dx: float
    dy: float
    scale: float


def draw_params(config: AugmentConfig, height: int, width: int, seed: int) -> AffineParams:
    """The transform that ``seed`` selects, drawn from an explicit generator (not torch's global
    RNG), so a seed fixes the transform regardless of what else uses randomness."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float) -> float:
        return float(torch.empty(1, dtype=torch.float64).uniform_(low, high, generator=generator).item())

    max_dx, max_dy = config.shift * width, config.shift * height
    return AffineParams(
        angle=uniform(-config.rotation, config.rotation),
        dx=uniform(-max_dx, max_dx),
        dy=uniform(-max_dy, max_dy),
        scale=uniform(1.0 - config.zoom, 1.0 + config.zoom),
    )


def _sampling_grid(params: AffineParams, height: int, width: int) -> torch.Tensor:
    """``grid_sample`` grid (1, H, W, 2): for each output pixel, where to read the input.

    In pixel coordinates centred on the image centre (y down), the forward map is
    ``out = s R(angle) in + t``; the grid needs its inverse ``in = R(-angle) (out - t) / s``.
    With ``align_corners=False`` the normalised coordinate is ``u = x_centred / (W / 2)`` (and
    ``H / 2`` for y), so ``theta = D^-1 [R(-angle) / s] D`` with ``D = diag(W/2, H/2)``, which
    keeps rotations exact on non-square images.
    """
    a = math.radians(params.angle)
    cos, sin = math.cos(a), math.sin(a)
    # Counter-clockwise on screen (y down) is (x, y) -> (x cos + y sin, -x sin + y cos); its inverse:
    inverse = np.array([[cos, -sin], [sin, cos]]) / params.scale
    half = np.array([width / 2.0, height / 2.0])
    linear = inverse * half[None, :] / half[:, None]  # D^-1 M D
    offset = -(inverse @ np.array([params.dx, params.dy])) / half
    theta = torch.tensor(np.concatenate([linear, offset[:, None]], axis=1)[None], dtype=torch.float64)
    return F.affine_grid(theta, [1, 1, height, width], align_corners=False)


def apply_affine(
    image: np.ndarray,
    masks: list[np.ndarray],
    params: AffineParams,
    fill_mode: FillMode = "reflect",
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``params`` applied to ``image`` (H, W) (bilinear) and each mask (H, W) (nearest, same grid)."""
    height, width = image.shape
    grid = _sampling_grid(params, height, width)
    padding = "reflection" if fill_mode == "reflect" else "zeros"
    source = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float64))[None, None]
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    result = out[0, 0].clamp(0.0, 1.0).numpy().astype(np.float32)
    moved = []
    if masks:
        stacked = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float64) for m in masks]))[None]
        read = F.grid_sample(stacked, grid, mode="nearest", padding_mode=padding, align_corners=False)
        moved = list(read[0].numpy() > 0.5)
    return result, moved


def augment_sample(
    image: np.ndarray,
    lung: np.ndarray | None,
    artifact: np.ndarray | None,
    config: AugmentConfig,
    seed: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One random affine transform of ``image`` (H, W) in [0, 1] and its masks; same seed, same result.

    Masks that are None stay None; the others take the image's exact transform. Exposed pixels
    are filled by reflection (``config.fill_mode``).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {image.shape}")
    params = draw_params(config, image.shape[0], image.shape[1], seed)
    masks = [m for m in (lung, artifact) if m is not None]
    result, moved_masks = apply_affine(image, masks, params, config.fill_mode)
    moved = iter(moved_masks)
    return (
        result,
        next(moved) if lung is not None else None,
        next(moved) if artifact is not None else None,
    )


def augment_frames(frames: np.ndarray, seed: int, config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Each frame of ``frames`` (N, H, W) augmented independently (the ``online`` mode, one call per
    epoch); matches the trainer's ``augment(frames, seed)``. Frame ``i`` uses a seed derived from
    (``seed``, ``i``), so consecutive epoch seeds do not reuse each other's transforms."""
    frames = np.asarray(frames)
    if frames.ndim != 3:
        raise ValueError(f"frames must be (N, H, W), got shape {frames.shape}")
    if len(frames) == 0:
        return frames.astype(np.float32, copy=True)
    states = np.random.SeedSequence([seed % 2**63, len(frames)]).spawn(len(frames))
    return np.stack([
        augment_sample(frame, None, None, config, int(state.generate_state(1)[0]))[0]
        for frame, state in zip(frames, states)
    ])


def copies_to_make(labels, mode: AugmentMode) -> np.ndarray:
    """Indices (ascending, into ``labels``) of the images that get one augmented copy.

    ``"minority_once"`` (the study's mode): every image of each class with fewer images than the
    largest class, i.e. of the smaller class in a binary task; nothing when the classes tie (or
    only one class is present). ``"online"``: every image.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if mode == "online":
        return np.arange(len(labels), dtype=np.int64)
    if mode != "minority_once":
        raise ValueError(f"unknown augment mode {mode!r}; expected 'minority_once' or 'online'")
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    minority = counts < counts.max()
    return np.flatnonzero(minority[inverse.reshape(-1)]).astype(np.int64)


def augmented_copy(sample: Sample, config: AugmentConfig, seed: int) -> Sample:
    """``sample`` under one random transform (``seed`` used as is): id ``sample_id + "#aug1"``, the
    same label, patient and source (copies must stay in their original's fold), masks
    transformed with the image, and ``extra["augmented_from"] = sample.sample_id``.
    The copy is rendered from its original on each access, never held (``RenderedSample``).
    """
    metadata = {f.name: getattr(sample, f.name) for f in dataclasses.fields(Sample)
                if f.name not in ("image", "lung_mask", "artifact_mask")}
    metadata.update(sample_id=f"{sample.sample_id}#aug1", extra={**sample.extra, "augmented_from": sample.sample_id})
    return RenderedSample(functools.partial(_augmented_pixels, sample, config, seed), **metadata)


def _augmented_pixels(sample: Sample, config: AugmentConfig, seed: int):
    return augment_sample(*sample.pixels(), config, seed)


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

    Returns ``samples`` followed by the copies (in ``samples`` order), chosen by
    ``copies_to_make(labels, "minority_once")`` and made by ``augmented_copy`` with a per-image
    seed from (``seed``, ``sample_id``), so the result does not depend on list order.
    """
    if len(samples) != len(labels):
        raise ValueError(f"{len(samples)} samples but {len(labels)} labels")
    chosen = copies_to_make(np.asarray(labels, dtype=np.int64), "minority_once")
    copies = [augmented_copy(samples[i], config, _sample_seed(seed, samples[i].sample_id)) for i in chosen]
    return [*samples, *copies]
