"""Typed records the pipeline stages pass to each other, and the run's fixed conventions."""
from __future__ import annotations

import time
import zlib
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from auditbench.audit.occlusion import OCCLUSION_REGIONS, OccludedImages
from auditbench.data.prepare import Frames, TaskData
from auditbench.data.splits import Fold
from auditbench.data.transforms import FrameSpec
from auditbench.models.backbones import FeatureBackbone
from auditbench.models.classifier import Classifier
from auditbench.protocol.grid import ModelSpec
from auditbench.protocol.schema import TaskSpec
from auditbench.pipeline.store import FRAME_FIELDS, FeatureStore

# Synthetic data only: the internal test images redrawn with the training shortcut strength.
TRAIN_DISTRIBUTION_SPLIT = "train_distribution"
# One threshold rule everywhere: an image is called positive when p(positive) > 0.5.
THRESHOLD = 0.5


def stable_seed(*parts) -> int:
    """A seed derived from the protocol seed and names, the same on every run and machine."""
    return zlib.crc32("|".join(map(str, parts)).encode()) % (2**31)


def frame_name(frame: FrameSpec) -> str:
    """The stratum of the validation: input size and crop ("128px" or "128px crop")."""
    return f"{frame.input_size}px{' crop' if frame.crop else ''}"


@dataclass
class StageClock:
    """Seconds spent per stage; clocks of separate workers add up with :meth:`merge`."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def merge(self, seconds: dict[str, float]) -> None:
        for name, value in seconds.items():
            self.seconds[name] += value


# ----- planning ---------------------------------------------------------------------------------


@dataclass
class TaskInputs:
    """One task x data-axes cell of the data: its images and its folds."""

    task: TaskSpec
    axes: dict[str, float | str | int]
    data: TaskData
    folds: list[Fold]


@dataclass(frozen=True)
class CellKey:
    """One unit of fitting work: a grid cell (model) on one fold."""

    model_id: str
    fold: int


@dataclass
class GroupPlan:
    """The models sharing one backbone pass: same backbone, weights, frame and task data."""

    backbone: str
    weights: str
    crop: bool
    task_inputs: TaskInputs
    specs: list[ModelSpec]

    @property
    def cells(self) -> list[tuple[ModelSpec, Fold]]:
        return [(spec, fold) for spec in self.specs for fold in self.task_inputs.folds]


# ----- backbone passes --------------------------------------------------------------------------


@dataclass
class Occlusion:
    """Occluded copies of a set of frames, with their pooled backbone features: a frozen model's
    occlusion effects then need only its head (and not the images)."""

    images: OccludedImages
    pooled: dict[str, torch.Tensor]


@dataclass
class ViewPass:
    """One view (a list of samples) through one backbone pass. Pooled features and each image's
    artifact status stay in memory; frames, feature maps and occluded copies are read from the
    store by rows, a batch at a time."""

    store: FeatureStore
    keys: list[str]
    pooled: torch.Tensor  # (N, C) float32
    artifact_status: np.ndarray  # (N,) str
    has_maps: bool
    has_occlusion: bool

    def __len__(self) -> int:
        return len(self.keys)

    def _keys(self, rows: np.ndarray) -> list[str]:
        return [self.keys[i] for i in rows]

    def frames(self, rows: np.ndarray) -> Frames:
        keys = self._keys(rows)
        return Frames(*(self.store.gather(keys, name) for name in FRAME_FIELDS))

    def images(self, rows: np.ndarray) -> np.ndarray:
        return self.store.gather(self._keys(rows), "images")

    def maps(self, rows: np.ndarray) -> torch.Tensor | None:
        return torch.from_numpy(self.store.gather(self._keys(rows), "maps")) if self.has_maps else None

    def occlusion(self, rows: np.ndarray, with_images: bool) -> Occlusion | None:
        """The occluded copies of ``rows`` (renumbered 0..len-1); their images only when asked."""
        if not self.has_occlusion:
            return None
        keys, indices, filled, pooled = self._keys(rows), {}, {}, {}
        for region in OCCLUSION_REGIONS:
            positions, images, features = self.store.gather_occluded(keys, region, with_images)
            indices[region] = positions
            filled[region] = images if images is not None else np.empty((len(positions), 0, 0), np.float32)
            if not len(positions):  # no image of these rows has the region in view
                features = np.empty((0, self.pooled.shape[1]), np.float32)
            pooled[region] = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        return Occlusion(OccludedImages(len(rows), indices, filled), pooled)


@dataclass
class GroupInputs:
    """Everything the backbone pass gives the models of one group."""

    backbone: FeatureBackbone
    frame: FrameSpec
    mean: tuple
    std: tuple
    train: ViewPass
    test: ViewPass
    augmented: ViewPass | None
    augmented_source: np.ndarray | None  # index into the train view of each augmented copy
    external: dict[str, ViewPass]
    clean: ViewPass | None = None  # synthetic: the test images' clean twins


# ----- fitting and evaluation -------------------------------------------------------------------


@dataclass
class ModelFold:
    """One trained model of one fold, ready to predict and explain."""

    classifier: Classifier
    frozen: bool  # True: the backbone is the shared pretrained one, so cached maps are valid


SOURCE_KINDS = ("source_correct", "source_wrong")
"""Gallery kinds of the per-source examples: a model's most confident correct and wrong decision
among one split's images of one data source (pipeline/gallery.py)."""


@dataclass
class GalleryCandidate:
    """One image of a model's gallery, with what its overlay and caption need. ``kind`` says why it
    was chosen (pipeline/gallery.py): "best" / "worst" internal lung_mass, the decision ("tp",
    "fp", "fn", "tn") the model made on it with the most confidence on ``split``, or the most
    confident correct / wrong decision among ``split``'s images of its data ``source``
    (:data:`SOURCE_KINDS`)."""

    lung_mass: float
    fold: int
    sample_id: str
    label: str
    p_positive: float
    image: np.ndarray
    heatmap: np.ndarray
    lung: np.ndarray
    artifact: np.ndarray
    split: str
    kind: str
    prediction: str
    source: str = ""  # the image's data source (images.csv); a journal of an older format has none

    @staticmethod
    def score_of(kind: str, lung_mass, p_positive):
        """What ranks the candidates of ``kind``, larger first (floats or arrays): lung_mass for
        "best", its negative for "worst"; for a decision the confidence in the call the model made,
        p for a positive call (tp, fp) and 1 - p for a negative one (tn, fn); for a per-source
        example either, whichever call it was (the larger of p and 1 - p)."""
        if kind == "best":
            return lung_mass
        if kind == "worst":
            return -lung_mass
        if kind in SOURCE_KINDS:
            return np.maximum(p_positive, 1 - p_positive)
        return p_positive if kind in ("tp", "fp") else 1 - p_positive

    @property
    def score(self) -> float:
        return self.score_of(self.kind, self.lung_mass, self.p_positive)


@dataclass
class CellResult:
    """Everything one model x fold contributes to the run's outputs: a unit the journal writes
    atomically, so that a resumed run reuses it unchanged."""

    model_id: str
    fold: int
    results_rows: list[dict] = field(default_factory=list)
    image_rows: list[dict] = field(default_factory=list)
    gallery: dict[str, GalleryCandidate] = field(default_factory=dict)  # "<split>|<kind>|<rank>" (pipeline/gallery.py)
    cam_geometry: dict = field(default_factory=dict)  # method -> map geometry (models.csv's geometry columns)
    cam_layer: str = ""
    warnings: Counter = field(default_factory=Counter)
    heatmaps_evaluated: Counter = field(default_factory=Counter)  # split -> count
    undefined_heatmaps: Counter = field(default_factory=Counter)  # "split|cause" -> count
    stage_seconds: dict[str, float] = field(default_factory=dict)
    sanity_rows: list[dict] = field(default_factory=list)  # sanity.csv (one cell per backbone has them)
    probe_rows: list[dict] = field(default_factory=list)  # probes.csv (one cell per group has them)

    @property
    def key(self) -> CellKey:
        return CellKey(self.model_id, self.fold)
