"""Stage 2: backbone passes. Per backbone x model frame: each image's frame and regions, pooled
features, last feature map and occluded copies, computed once and shared by every task, fold and
grid cell that holds the same image and masks (keyed by content: :func:`content_key`)."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import torch

from auditbench.audit.occlusion import OCCLUSION_REGIONS, OccludedImages, occlude
from auditbench.data.augment import AugmentConfig, augmented_copy, copies_to_make
from auditbench.data.prepare import Frames, TaskData, to_frames
from auditbench.data.records import Sample, content_key
from auditbench.data.transforms import FrameSpec
from auditbench.models.backbones import FeatureBackbone, build_backbone
from auditbench.pipeline.records import GroupInputs, GroupPlan, Occlusion, StageClock, stable_seed
from auditbench.pipeline.store import CachedSample, FeatureStore, store_namespace
from auditbench.protocol.schema import Protocol
from auditbench.training.device import Accelerator
from auditbench.training.features import CachedFeatures, extract_features


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
    """Makes the backbone passes of a group: one store per backbone x frame, in memory and (with
    ``cache_dir``) on disk. Picklable, so an executor can run passes in another process; there it
    starts with empty memory and shares only the disk store."""

    def __init__(self, protocol: Protocol, accelerator: Accelerator, cache_dir=None):
        self.protocol = protocol
        self.accelerator = accelerator
        self.cache_dir = cache_dir
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
            self.stores[key] = FeatureStore(self.cache_dir, namespace)
        return BackbonePasses(self.protocol, backbone, frame, self.accelerator, self.stores[key], self.clock,
                              self.warning_counts)

    def group_inputs(self, group: GroupPlan) -> GroupInputs:
        return self.passes(group.backbone, group.weights, group.crop).group_inputs(group)

    def store_counts(self) -> dict[str, int]:
        return {"entries_read": sum(s.read_from_disk for s in self.stores.values()),
                "entries_written": sum(s.written_to_disk for s in self.stores.values())}


class BackbonePasses:
    """The backbone passes of one backbone and model frame, through a content-addressed store."""

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
        self._augmented: dict[str, Sample] = {}

    # ----- per view ---------------------------------------------------------------------------

    def get(self, samples: list[Sample], keep_maps: bool, occlusion: bool) -> tuple[Frames, CachedFeatures, Occlusion | None]:
        occlusion = occlusion and self.protocol.metrics.occlusion
        keys = [content_key(s) for s in samples]
        missing = {k: s for k, s in zip(keys, samples) if not self.store.has(k, keep_maps, occlusion)}
        if missing:
            self._compute(list(missing), list(missing.values()), keep_maps, occlusion)
        entries = [self.store.get(k) for k in keys]
        frames = Frames.concatenate([e.frames for e in entries])
        features = CachedFeatures(
            torch.cat([e.pooled for e in entries]),
            torch.cat([e.feature_map for e in entries]) if keep_maps else None,
        )
        if not occlusion:
            return frames, features, None
        indices = {r: np.array([i for i, e in enumerate(entries) if r in e.occluded], dtype=int) for r in OCCLUSION_REGIONS}
        shape = frames.images.shape[1:]
        filled = {
            r: np.stack([entries[i].occluded[r][0] for i in idx]) if len(idx) else np.empty((0, *shape), np.float32)
            for r, idx in indices.items()
        }
        pooled = {
            r: torch.cat([entries[i].occluded[r][1] for i in idx]) if len(idx) else torch.empty(0, self.backbone.num_features)
            for r, idx in indices.items()
        }
        return frames, features, Occlusion(OccludedImages(len(entries), indices, filled), pooled)

    def group_inputs(self, group: GroupPlan) -> GroupInputs:
        """Frames, features and occluded copies of every view a group's models use."""
        data = group.task_inputs.data
        # Test view first: where it is the training view too (real data), one pass serves both.
        test_frames, test_features, test_occlusion = self.get(data.test_view, keep_maps=True, occlusion=True)
        train_frames, train_features, _ = self.get(data.train_view, keep_maps=False, occlusion=False)
        augmented_frames = augmented_features = augmented_source = None
        if any(s.augment for s in group.specs):
            augmented_source, augmented_samples = self.augmented_copies(data)
            if augmented_samples:  # "minority_once" on tied classes makes none
                augmented_frames, augmented_features, _ = self.get(augmented_samples, keep_maps=False, occlusion=False)
            else:
                augmented_source = None
        external = {name: self.get(samples, keep_maps=True, occlusion=True) for name, (samples, _) in data.external.items()}
        clean_frames = clean_features = None
        if data.clean_view is not None:
            clean_frames, clean_features, _ = self.get(data.clean_view, keep_maps=False, occlusion=False)
        return GroupInputs(
            self.backbone, self.frame, self.mean, self.std, train_frames, test_frames, train_features, test_features,
            augmented_frames, augmented_features, augmented_source, external, test_occlusion, clean_frames, clean_features,
        )

    def augmented_copies(self, data: TaskData) -> tuple[np.ndarray, list[Sample]]:
        """One augmented copy per image of ``data.augment.copies_to_make``: the minority class
        (the study's mode; nothing when the classes tie), or every image (``online`` mode, whose
        frozen phase trains on cached features of these copies). Memoised by content."""
        source = copies_to_make(data.labels, self.protocol.training.augment_mode)
        copies = []
        for i in source:
            sample = data.train_view[i]
            key = content_key(sample)
            if key not in self._augmented:
                seed = stable_seed(self.protocol.seed, "augment", sample.sample_id)
                self._augmented[key] = augmented_copy(sample, AugmentConfig(), seed)
            copies.append(self._augmented[key])
        return source, copies

    # ----- computing --------------------------------------------------------------------------

    def _features(self, images: np.ndarray, keep_maps: bool) -> CachedFeatures:
        with self.clock.stage("features"):
            return extract_features(self.backbone, images, self.mean, self.std, self.accelerator,
                                    self.protocol.training.batch_size, keep_maps=keep_maps)

    def _compute(self, keys: list[str], samples: list[Sample], keep_maps: bool, occlusion: bool) -> None:
        # Recomputing an entry keeps what it already had, so requests in any order never lose work.
        held = [e for k in keys if (e := self.store.get(k)) is not None]
        keep_maps = keep_maps or any(e.feature_map is not None for e in held)
        occlusion = occlusion or any(e.occluded is not None for e in held)
        with self.clock.stage("preprocess"):
            frames = to_frames(samples, self.frame, self.protocol.border_fraction)
        features = self._features(frames.images, keep_maps)
        per_sample: list[dict] = [{} for _ in samples]
        if occlusion:
            with self.clock.stage("occlude"), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                occluded = occlude(frames.images, frames.lungs, frames.artifact_footprint, frames.border_footprint,
                                   frames.lung_footprint)
            for item in caught:
                self.warning_counts[str(item.message)] += 1
            for region in OCCLUSION_REGIONS:
                filled = occluded.filled[region]
                if len(filled):
                    pooled = self._features(filled, keep_maps=False).pooled
                    for row, i in enumerate(occluded.indices[region]):
                        per_sample[i][region] = (filled[row], pooled[row : row + 1])
        for i, key in enumerate(keys):
            self.store.put(key, CachedSample(
                frames.subset(np.array([i])),
                features.pooled[i : i + 1],
                features.maps[i : i + 1] if keep_maps else None,
                per_sample[i] if occlusion else None,
            ))
