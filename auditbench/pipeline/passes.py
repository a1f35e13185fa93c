"""Stage 2: backbone passes. Per backbone x model frame: each image's frame and regions, pooled
features, last feature map and occluded copies, computed once and shared by every task, fold and
grid cell that holds the same image and masks (keyed by content: :func:`content_key`).

Passes are computed :data:`store.CHUNK` images at a time into the on-disk store; a view
(:class:`ViewPass`) keeps only pooled features in memory and reads frames, maps and occluded copies
back by rows, so memory follows the batch, not the data."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import torch

from auditbench.audit.occlusion import OCCLUSION_REGIONS, occlude
from auditbench.data.augment import AugmentConfig, augmented_copy, copies_to_make
from auditbench.data.loader import frame_chunks
from auditbench.data.prepare import Frames, TaskData
from auditbench.data.records import Sample, content_key
from auditbench.data.transforms import FrameSpec
from auditbench.models.backbones import FeatureBackbone, build_backbone
from auditbench.pipeline.records import GroupInputs, GroupPlan, StageClock, ViewPass, stable_seed
from auditbench.pipeline.store import CHUNK, FeatureStore, store_namespace
from auditbench.protocol.schema import Protocol
from auditbench.training.device import Accelerator
from auditbench.training.features import extract_features


def load_backbone(protocol: Protocol, name: str, weights: str) -> FeatureBackbone:
    """The frozen feature backbone; random initialisation (weights: none) is seeded by the protocol
    seed and the backbone's name, so it never depends on what ran before in the process."""
    torch.manual_seed(stable_seed(protocol.seed, "backbone", name, weights))
    backbone = build_backbone(name, weights)
    backbone.eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    return backbone


def model_frame(protocol: Protocol, backbone: FeatureBackbone, crop: bool) -> FrameSpec:
    size = protocol.preprocessing.input_size or int(backbone.data_config["input_size"][-1])
    # Always bilinear, whatever the backbone was pretrained with: its kernel is non-negative
    # and compact, so region footprints are tight and the occlusion fill reconstructs what a
    # marker hid (measured: bicubic frames leave 2-12% of the marker's excess intensity,
    # bilinear 1-4%; docs/metrics.md).
    return FrameSpec(size, crop, protocol.preprocessing.crop_ratio, "bilinear")


class PassFactory:
    """Makes the backbone passes of a group: one store per backbone x frame under ``folder`` (the
    run's staging folder, or a ``--cache`` shared by runs). Picklable, so an executor can run
    passes in another process; processes share the store through its folder."""

    def __init__(self, protocol: Protocol, accelerator: Accelerator, folder):
        self.protocol = protocol
        self.accelerator = accelerator
        self.folder = folder
        self.clock = StageClock()
        self.warning_counts: Counter = Counter()
        self.stores: dict[tuple, FeatureStore] = {}

    def passes(self, name: str, weights: str, crop: bool) -> "BackbonePasses":
        backbone = load_backbone(self.protocol, name, weights)
        frame = model_frame(self.protocol, backbone, crop)
        key = (name, weights, crop)
        if key not in self.stores:
            init_seed = stable_seed(self.protocol.seed, "backbone", name, weights)
            namespace = store_namespace(name, weights, init_seed, frame, self.protocol.border_fraction,
                                        self.accelerator.describe())
            self.stores[key] = FeatureStore(self.folder, namespace)
        return BackbonePasses(self.protocol, backbone, frame, self.accelerator, self.stores[key], self.clock,
                              self.warning_counts)

    def group_inputs(self, group: GroupPlan) -> GroupInputs:
        return self.passes(group.backbone, group.weights, group.crop).group_inputs(group)

    def store_counts(self) -> dict[str, int]:
        return {"entries_read": sum(s.entries_read for s in self.stores.values()),
                "entries_written": sum(s.entries_written for s in self.stores.values())}


class BackbonePasses:
    """The backbone passes of one backbone and model frame, through the content-addressed store."""

    def __init__(self, protocol: Protocol, backbone: FeatureBackbone, frame: FrameSpec, accelerator: Accelerator,
                 store: FeatureStore, clock: StageClock | None = None, warning_counts: Counter | None = None):
        self.protocol = protocol
        self.backbone = backbone
        self.frame = frame
        self.accelerator = accelerator
        self.store = store
        self.clock = clock or StageClock()
        self.warning_counts = warning_counts if warning_counts is not None else Counter()
        self.mean, self.std = backbone.data_config["mean"], backbone.data_config["std"]

    def view(self, samples: list[Sample], keep_maps: bool, occlusion: bool) -> ViewPass:
        """The pass of ``samples`` (computing what the store lacks), as a view read back by rows."""
        occlusion = occlusion and self.protocol.metrics.occlusion
        keys = [content_key(s) for s in samples]
        missing = set(self.store.missing(keys, keep_maps, occlusion))
        if missing:
            todo = [(k, s) for k, s in dict(zip(keys, samples)).items() if k in missing]
            chunks = [todo[start : start + CHUNK] for start in range(0, len(todo), CHUNK)]
            frames = frame_chunks([[s for _, s in chunk] for chunk in chunks], self.frame,
                                  self.protocol.border_fraction, self.accelerator.loader_workers)
            for chunk in chunks:
                with self.clock.stage("preprocess"):  # with workers: the time spent waiting for them
                    chunk_frames = next(frames)
                self._compute([k for k, _ in chunk], chunk_frames, keep_maps, occlusion)
        self.store.note_reads(keys)
        pooled = torch.from_numpy(self.store.gather(keys, "pooled"))
        status = self.store.gather(keys, "artifact_status")
        return ViewPass(self.store, keys, pooled, status, keep_maps, occlusion)

    def group_inputs(self, group: GroupPlan) -> GroupInputs:
        """The views a group's models use: test (with maps and occluded copies), train, augmented
        copies, external sets and (synthetic data) the test images' clean twins."""
        data = group.task_inputs.data
        # Test view first: where it is the training view too (real data), one pass serves both.
        test = self.view(data.test_view, keep_maps=True, occlusion=True)
        train = test if data.train_view is data.test_view else self.view(data.train_view, keep_maps=False, occlusion=False)
        augmented = augmented_source = None
        if any(s.augment for s in group.specs):
            augmented_source, augmented_samples = self.augmented_copies(data)
            if augmented_samples:  # "minority_once" on tied classes makes none
                augmented = self.view(augmented_samples, keep_maps=False, occlusion=False)
            else:
                augmented_source = None
        external = {name: self.view(samples, keep_maps=True, occlusion=True) for name, (samples, _) in data.external.items()}
        clean = self.view(data.clean_view, keep_maps=False, occlusion=False) if data.clean_view is not None else None
        return GroupInputs(self.backbone, self.frame, self.mean, self.std, train, test, augmented, augmented_source,
                           external, clean)

    def augmented_copies(self, data: TaskData) -> tuple[np.ndarray, list[Sample]]:
        """One augmented copy per image of ``data.augment.copies_to_make``: the minority class
        (the study's mode; nothing when the classes tie), or every image (``online`` mode, whose
        frozen phase trains on cached features of these copies). Seeded per sample, so the same
        copy every time: made on demand, not held."""
        source = copies_to_make(data.labels, self.protocol.training.augment_mode)
        copies = [augmented_copy(data.train_view[i], AugmentConfig(),
                                 stable_seed(self.protocol.seed, "augment", data.train_view[i].sample_id)) for i in source]
        return source, copies

    # ----- computing --------------------------------------------------------------------------

    def _features(self, images: np.ndarray, keep_maps: bool):
        with self.clock.stage("features"):
            return extract_features(self.backbone, images, self.mean, self.std, self.accelerator,
                                    self.protocol.training.batch_size, keep_maps=keep_maps)

    def _compute(self, keys: list[str], frames: Frames, keep_maps: bool, occlusion: bool) -> None:
        # Recomputing an entry keeps what it already had, so requests in any order never lose work.
        held = [self.store.index[k] for k in keys if k in self.store.index]
        keep_maps = keep_maps or any(location.has_maps for location in held)
        occlusion = occlusion or any(location.has_occlusion for location in held)
        features = self._features(frames.images, keep_maps)
        occluded = None
        if occlusion:
            with self.clock.stage("occlude"), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                filled = occlude(frames.images, frames.lungs, frames.artifact_footprint, frames.border_footprint,
                                 frames.lung_footprint)
            for item in caught:
                self.warning_counts[str(item.message)] += 1
            occluded = {}
            for region in OCCLUSION_REGIONS:
                images = filled.filled[region]
                pooled = self._features(images, keep_maps=False).pooled.numpy() if len(images) else \
                    np.empty((0, self.backbone.num_features), np.float32)
                occluded[region] = (filled.indices[region], images, pooled)
        self.store.write_chunk(keys, frames, features.pooled, features.maps if keep_maps else None, occluded)
