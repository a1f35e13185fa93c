"""`auditbench run`: protocol -> data -> training -> Grad-CAM -> audit metrics -> selection -> report."""
from __future__ import annotations

import contextlib
import copy
import itertools
import platform
import shlex
import shutil
import subprocess
import sys
import time
import warnings
import zlib
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from auditbench.audit.aggregate import add_accuracy_drop, aggregate_models
from auditbench.audit.metrics import METRICS, attention_metrics, classification_metrics
from auditbench.audit.uncertainty import paired_bootstrap
from auditbench.audit.occlusion import OCCLUSION_REGIONS, OccludedImages, effects_from_probabilities, occlude, occlusion_effects
from auditbench.audit.validation import metric_validation
from auditbench.data.augment import AugmentConfig, augment_frames, augmented_copy, copies_to_make
from auditbench.data.prepare import (
    ARTIFACT_ABSENT, Frames, TaskData, fill_missing_masks, load_sources, real_task_data,
    synthetic_task_data, to_frames,
)
from auditbench.data.records import Sample, content_key, data_fingerprint
from auditbench.data.splits import Fold, make_folds
from auditbench.data.transforms import FrameSpec, normalise
from auditbench.explain.cam_base import explain_batch, resolve_method
from auditbench.explain.gradcam import upsample_cams
from auditbench.models.backbones import FeatureBackbone, build_backbone
from auditbench.models.checkpoint import save_checkpoint
from auditbench.models.classifier import Classifier, Head
from auditbench.outputs import (
    PARTIAL_MARKER, PNG_PROTOCOL_KEY, PNG_RUN_KEY, build_manifest, new_run_id, png_with_text, prepare_output,
    protocol_yaml, write_json_atomic,
)
from auditbench.protocol.grid import ModelSpec, data_axes, expand_grid
from auditbench.protocol.loader import dump_protocol
from auditbench.protocol.names import check_registered_names
from auditbench.protocol.schema import Protocol, TaskSpec
from auditbench.report.overlays import overlay_png
from auditbench.report.tables import (
    GALLERY_FILE, IMAGES_FILE, MODELS_FILE, RESULTS_FILE, SKIPPED_FILE, SUMMARY_FILE, VALIDATION_FILE, write_csv,
)
from auditbench.selection.ranking import Constraint, SelectionRule, rank_models
from auditbench.training.device import Accelerator, select_accelerator
from auditbench.training.features import CachedFeatures, extract_features
from auditbench.training.trainer import finetune, predict_logits, train_head

# Synthetic data only: the internal test images redrawn with the training shortcut strength.
TRAIN_DISTRIBUTION_SPLIT = "train_distribution"
CLASSIFICATION_METRICS = ["accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity"]
COUNT_METRICS = ["tn", "fp", "fn", "tp"]
ATTENTION_METRICS = ["lung_mass", "border_mass", "artifact_mass", "artifact_enrichment", "lung_enrichment", "pointing_game"]
OCCLUSION_METRICS = ["artifact_occlusion_effect", "border_occlusion_effect", "lung_occlusion_effect"]
# One threshold rule everywhere: an image is called positive when p(positive) > 0.5.
THRESHOLD = 0.5
PACKAGES = ["auditbench", "torch", "torchvision", "timm", "captum", "numpy", "pandas", "scikit-image", "scikit-learn", "scipy"]


@dataclass
class StageClock:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


@dataclass
class ModelFold:
    """One trained model of one fold, ready to predict and explain."""

    classifier: Classifier
    frozen: bool  # True: the backbone is the shared pretrained one, so cached maps are valid


@dataclass
class GalleryCandidate:
    lung_mass: float
    fold: int
    sample: Sample
    label: str
    p_positive: float
    image: np.ndarray
    heatmap: np.ndarray
    lung: np.ndarray
    artifact: np.ndarray


@dataclass
class Occlusion:
    """Occluded copies of a set of frames, with their pooled backbone features: a frozen model's
    occlusion effects then need only its head."""

    images: OccludedImages
    pooled: dict[str, torch.Tensor]

    def subset(self, index: np.ndarray) -> "Occlusion":
        images = self.images.subset(index)
        return Occlusion(images, {r: self.pooled[r][torch.as_tensor(images.parent_rows[r])] for r in self.pooled})


@dataclass
class GroupInputs:
    """Everything shared by the models of one (task, data axes, backbone, crop) group."""

    backbone: FeatureBackbone
    frame: FrameSpec
    mean: tuple
    std: tuple
    train_frames: Frames
    test_frames: Frames
    train_features: CachedFeatures
    test_features: CachedFeatures
    augmented_frames: Frames | None
    augmented_features: CachedFeatures | None
    augmented_source: np.ndarray | None  # index into train view of each augmented copy
    external: dict[str, tuple[Frames, CachedFeatures, Occlusion | None]]
    test_occlusion: Occlusion | None
    clean_frames: Frames | None = None  # synthetic: the test images' clean twins
    clean_features: CachedFeatures | None = None


def stable_seed(*parts) -> int:
    """A seed derived from the protocol seed and names, the same on every run and machine."""
    return zlib.crc32("|".join(map(str, parts)).encode()) % (2**31)


class Runner:
    def __init__(self, protocol: Protocol, out_dir: Path, base_dir: Path, console: Console | None = None,
                 run_id: str | None = None):
        self.protocol = protocol
        self.out_dir = out_dir
        self.run_id = run_id or new_run_id()
        self.protocol_text, self.protocol_sha256 = protocol_yaml(dump_protocol(protocol), self.run_id)
        self.base_dir = base_dir
        self.console = console or Console(stderr=True)
        self.clock = StageClock()
        self.accelerator: Accelerator = select_accelerator(protocol.training.device, protocol.training.mixed_precision)
        self.specs = expand_grid(protocol)
        self.results_rows: list[dict] = []
        self.image_rows: list[dict] = []
        self.gallery: dict[str, dict[str, GalleryCandidate]] = defaultdict(dict)
        self.warning_counts: Counter[str] = Counter()
        self.heatmaps_evaluated: Counter[str] = Counter()
        self.undefined_heatmaps: Counter[tuple[str, str]] = Counter()
        self.notes: list[str] = []
        self.cam_layers: dict[str, str] = {}
        self.cam_geometry: dict[str, dict] = {}
        self.skipped = []
        self.n_images = 0
        self.data_fingerprint = ""
        self._gallery_rows: list[dict] = []
        self._augmented: dict[int, tuple[Sample, Sample]] = {}
        self._backbones: dict[tuple[str, str], FeatureBackbone] = {}
        check_registered_names(protocol)
        self.cam = resolve_method(protocol.explain.method)

    # ----- data -------------------------------------------------------------------------------

    def _task_data(self) -> list[tuple[TaskSpec, dict[str, float], TaskData]]:
        axes = data_axes(self.protocol)
        out = []
        if self.protocol.data.dataset == "synthetic":
            for task in self.protocol.task:
                for values in itertools.product(*axes.values()):
                    cell = dict(zip(axes, values))
                    out.append((task, cell, synthetic_task_data(self.protocol, task, cell)))
            return out
        data = self.protocol.data
        internal = load_sources(data.sources, data, self.base_dir)
        external = {ext.name: load_sources(ext.sources, data, self.base_dir) for ext in data.external}
        everything = internal.samples + [s for loaded in external.values() for s in loaded.samples]
        fill_missing_masks(everything, data)
        for task in self.protocol.task:
            out.append((task, {}, real_task_data(self.protocol, task, internal, external)))
        return out

    # ----- models -----------------------------------------------------------------------------

    def _backbone(self, name: str, weights: str) -> FeatureBackbone:
        key = (name, weights)
        if key not in self._backbones:
            # Random initialisation (weights: none) must not depend on what ran before in the process.
            torch.manual_seed(stable_seed(self.protocol.seed, "backbone", name, weights))
            backbone = build_backbone(name, weights)
            backbone.eval()
            for parameter in backbone.parameters():
                parameter.requires_grad_(False)
            self._backbones[key] = backbone
            self.cam_layers[name] = backbone.cam_layer_description
        return self._backbones[key]

    def _frame(self, backbone: FeatureBackbone, crop: bool) -> FrameSpec:
        size = self.protocol.preprocessing.input_size or int(backbone.data_config["input_size"][-1])
        # Always bilinear, whatever the backbone was pretrained with: its kernel is non-negative
        # and compact, so region footprints are tight and the occlusion fill reconstructs what a
        # marker hid (measured: bicubic frames leave 2-12% of the marker's excess intensity,
        # bilinear 1-4%; docs/metrics.md).
        return FrameSpec(size, crop, self.protocol.preprocessing.crop_ratio, "bilinear")

    def _group_inputs(self, group: list[ModelSpec], data: TaskData, cache: "SampleCache") -> GroupInputs:
        # Test view first: where it is the training view too (real data), one pass serves both.
        test_frames, test_features, test_occlusion = cache.get(data.test_view, keep_maps=True, occlusion=True)
        train_frames, train_features, _ = cache.get(data.train_view, keep_maps=False, occlusion=False)
        augmented_frames = augmented_features = augmented_source = None
        if any(s.augment for s in group):
            augmented_source, augmented_samples = self._augmented_copies(data)
            if augmented_samples:  # "minority_once" on tied classes makes none
                augmented_frames, augmented_features, _ = cache.get(augmented_samples, keep_maps=False, occlusion=False)
            else:
                augmented_source = None
        external = {name: cache.get(samples, keep_maps=True, occlusion=True) for name, (samples, _) in data.external.items()}
        clean_frames = clean_features = None
        if data.clean_view is not None:
            clean_frames, clean_features, _ = cache.get(data.clean_view, keep_maps=False, occlusion=False)
        return GroupInputs(
            cache.backbone, cache.frame, cache.mean, cache.std, train_frames, test_frames, train_features, test_features,
            augmented_frames, augmented_features, augmented_source, external, test_occlusion, clean_frames, clean_features,
        )

    def _augmented_copies(self, data: TaskData) -> tuple[np.ndarray, list[Sample]]:
        """One augmented copy per image of ``data.augment.copies_to_make``: the minority class
        (the study's mode; nothing when the classes tie), or every image (``online`` mode, whose
        frozen phase trains on cached features of these copies)."""
        source = copies_to_make(data.labels, self.protocol.training.augment_mode)
        copies = []
        for i in source:
            sample = data.train_view[i]
            held = self._augmented.get(id(sample))
            if held is None or held[0] is not sample:
                seed = stable_seed(self.protocol.seed, "augment", sample.sample_id)
                held = self._augmented[id(sample)] = (sample, augmented_copy(sample, AugmentConfig(), seed))
            copies.append(held[1])
        return source, copies

    def _train(self, spec: ModelSpec, inputs: GroupInputs, data: TaskData, fold: Fold) -> ModelFold:
        training = self.protocol.training
        seed = stable_seed(self.protocol.seed, spec.model_id, fold.index)
        torch.manual_seed(seed)
        head = Head(inputs.backbone.num_features, spec.hidden, self.protocol.models.dropout, num_classes=2)
        train_index = fold.train
        pooled = inputs.train_features.pooled[train_index]
        labels = data.labels[train_index]
        frames = inputs.train_frames.images[train_index]
        frame_labels = labels
        if spec.augment and inputs.augmented_source is not None:
            in_fold = np.isin(inputs.augmented_source, train_index)
            pooled = torch.cat([pooled, inputs.augmented_features.pooled[in_fold]])
            labels = np.concatenate([labels, data.labels[inputs.augmented_source[in_fold]]])
            if training.augment_mode == "minority_once":
                frames = np.concatenate([frames, inputs.augmented_frames.images[in_fold]])
                frame_labels = labels
        y = torch.as_tensor(labels, dtype=torch.long)
        val_pooled = inputs.train_features.pooled[fold.validation]
        val_y = torch.as_tensor(data.labels[fold.validation], dtype=torch.long)
        with self.clock.stage("train_head"):
            train_head(head, pooled, y, val_pooled, val_y, training.head, training.batch_size, seed)
        if not spec.finetune:
            return ModelFold(Classifier(inputs.backbone, head), frozen=True)
        model = Classifier(copy.deepcopy(inputs.backbone), head)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        augment_fn = self._online_augment if spec.augment and training.augment_mode == "online" else None
        with self.clock.stage("finetune"):
            finetune(
                model, frames, frame_labels, inputs.train_frames.images[fold.validation], data.labels[fold.validation],
                inputs.mean, inputs.std, training.finetune_phase, training.batch_size, seed, self.accelerator, augment_fn,
            )
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return ModelFold(model.cpu() if self.accelerator.device.type == "cpu" else model, frozen=False)

    @staticmethod
    def _online_augment(frames: np.ndarray, seed: int) -> np.ndarray:
        return augment_frames(frames, seed)

    # ----- evaluation -------------------------------------------------------------------------

    def _predict_and_explain(self, model: ModelFold, inputs: GroupInputs, frames: Frames, maps: torch.Tensor | None):
        """p(positive) and the raw Grad-CAM of ``explain.target`` (positive or predicted class) with
        ``explain.score`` at ``explain.layer``, upsampled to the model frame; and the map's side.

        p comes from the fp32 head on the backbone's map, exactly as for the occluded copies."""
        device = self.accelerator.device
        explain = self.protocol.explain
        head = model.classifier.head.to(device).eval()
        size = frames.images.shape[-2:]
        probabilities, heatmaps, map_side = [], [], 0
        # Images are normalised only where needed: a frozen model explained at "last" by a feature-level
        # method runs its head on the cached map alone.
        needs_images = self.cam.needs_input or explain.layer != "last"
        backbone = model.classifier.backbone.to(device).eval()
        for start in range(0, len(frames), explain.batch_size):
            batch = slice(start, start + explain.batch_size)
            cached = model.frozen and maps is not None
            x = normalise(frames.images[batch], inputs.mean, inputs.std).to(device) if needs_images or not cached else None
            if cached:
                feature_map = maps[batch].to(device)
            else:
                with torch.no_grad(), self.accelerator.autocast():
                    feature_map = backbone(x)
                feature_map = feature_map.float()
            with torch.no_grad():
                logits = head(feature_map)
            target = 1 if explain.target == "positive" else logits.argmax(dim=1)
            # Backbone passes (finer levels, input-level methods) under the run's precision; a head-only
            # map stays in fp32 (small weights times activations underflow in fp16).
            with self.accelerator.autocast() if needs_images else contextlib.nullcontext():
                cams = explain_batch(self.cam, backbone, head, x, feature_map, target, explain.score, explain.layer,
                                     batch_size=explain.batch_size)
            cams = cams.float()
            map_side = cams.shape[-1]
            probabilities.append(torch.softmax(logits, dim=1)[:, 1].cpu())
            heatmaps.append(upsample_cams(cams, tuple(size)).cpu())
        return torch.cat(probabilities).numpy(), torch.cat(heatmaps).numpy(), map_side

    def _probability_fn(self, model: ModelFold, inputs: GroupInputs):
        """p(positive) of images, the same precision path as :meth:`_predict_and_explain`."""

        def predict(images: np.ndarray) -> np.ndarray:
            logits = predict_logits(model.classifier, images, inputs.mean, inputs.std, self.protocol.explain.batch_size, self.accelerator)
            return torch.softmax(logits, dim=1)[:, 1].numpy()

        return predict

    def _evaluate(
        self, spec: ModelSpec, model: ModelFold, inputs: GroupInputs, frames: Frames, maps, occlusion: Occlusion | None,
        labels: np.ndarray, samples: list[Sample], fold: int, split: str, clean_index: np.ndarray | None = None,
    ) -> None:
        with self.clock.stage("explain"):
            p, heatmaps, map_side = self._predict_and_explain(model, inputs, frames, maps)
        cell_px = int(np.ceil(frames.images.shape[-1] / map_side)) if map_side else 0
        self.cam_geometry[spec.model_id] = {
            "input_size": inputs.frame.input_size, "frame": frame_name(inputs.frame),
            "cam_layer": self.protocol.explain.layer, "cam_map_size": map_side, "cam_stride": cell_px,
        }
        with self.clock.stage("audit"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attention = attention_metrics(heatmaps, frames.lungs, frames.artifact_footprint, frames.border, cell_px)
            caught.clear()  # counted below per cause, summed over models and folds, not one line per batch
            values = dict(attention.values)
            if occlusion is not None and model.frozen:
                head = model.classifier.head.cpu()
                with torch.no_grad():
                    p_occluded = {r: torch.softmax(head.forward_pooled(f), 1)[:, 1].numpy() for r, f in occlusion.pooled.items()}
                values.update(effects_from_probabilities(occlusion.images, p, p_occluded))
            elif occlusion is not None:
                values.update(occlusion_effects(self._probability_fn(model, inputs), frames.images, p_original=p,
                                                occluded=occlusion.images, batch_size=self.protocol.explain.batch_size))
        self._count_warnings(caught, split)
        self.heatmaps_evaluated[split] += len(p)
        for cause in ("zero_map", "empty_lung_mask"):
            self.undefined_heatmaps[(split, cause)] += attention.nan_counts.get(cause, 0)
        if split == "internal" and inputs.clean_frames is not None:
            values["shortcut_reliance"] = self._reliance(model, inputs, frames, p, clean_index)
        self._record(spec, split, fold, labels, p, samples, frames, values)
        if split == "internal":
            self._gallery_candidates(spec, fold, values["lung_mass"], p, heatmaps, frames, labels, samples)

    def _reliance(self, model: ModelFold, inputs: GroupInputs, frames: Frames, p: np.ndarray, index: np.ndarray) -> np.ndarray:
        """|p(x) - p(clean twin of x)| per test image whose source shows a marker (NaN elsewhere):
        the behavioural ground truth of the validation (a cropped frame that removed the marker
        gives 0, as it should: the model cannot use what it does not see)."""
        marked = frames.artifact_status != ARTIFACT_ABSENT
        reliance = np.full(len(p), np.nan)
        if not marked.any():
            return reliance
        rows = index[marked]
        if model.frozen:
            with torch.no_grad():
                logits = model.classifier.head.cpu().forward_pooled(inputs.clean_features.pooled[torch.as_tensor(rows)])
            p_clean = torch.softmax(logits, dim=1)[:, 1].numpy()
        else:
            p_clean = self._probability_fn(model, inputs)(inputs.clean_frames.images[rows])
        reliance[marked] = np.abs(p[marked] - p_clean)
        return reliance

    def _count_warnings(self, caught: list, split: str) -> None:
        """Identical messages are counted, so a large grid gives a short list."""
        for item in caught:
            self.warning_counts[f"{split}: {item.message}"] += 1

    def _record(
        self, spec: ModelSpec, split: str, fold: int, labels: np.ndarray, p: np.ndarray, samples: list[Sample],
        frames: Frames, values: dict[str, np.ndarray],
    ) -> None:
        """Rows of results.csv (per fold) and images.csv (per image) for one evaluated split."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = classification_metrics(labels, p, THRESHOLD)
        self._count_warnings(caught, split)
        grid = spec.grid_row()
        for metric in CLASSIFICATION_METRICS + COUNT_METRICS:
            self.results_rows.append({**grid, "split": split, "fold": fold, "metric": metric, "value": float(scores[metric])})
        for metric, per_image in values.items():
            finite = per_image[np.isfinite(per_image)]
            value = float(finite.mean()) if len(finite) else float("nan")
            self.results_rows.append({**grid, "split": split, "fold": fold, "metric": metric, "value": value})
        class_names = spec.task.class_names
        prediction = (p > THRESHOLD).astype(int)
        has_artifact = frames.artifact_footprint.reshape(len(p), -1).any(axis=1)
        border_in_view = frames.border_footprint.reshape(len(p), -1).any(axis=1)
        for i, sample in enumerate(samples):
            self.image_rows.append({
                "model_id": spec.model_id, "fold": fold, "split": split, "sample_id": sample.sample_id,
                "source": sample.source, "patient_id": sample.patient_id, "path": sample.path,
                "label": class_names[labels[i]], "label_index": int(labels[i]),
                "prediction": class_names[prediction[i]], "p_positive": float(p[i]),
                "correct": bool(prediction[i] == labels[i]), "mask_source": sample.mask_source,
                "has_artifact": bool(has_artifact[i]), "artifact_status": str(frames.artifact_status[i]),
                "border_in_view": bool(border_in_view[i]),
                **{metric: float(per_image[i]) for metric, per_image in values.items()},
            })

    def _evaluate_training_distribution(self, spec: ModelSpec, model: ModelFold, inputs: GroupInputs, data: TaskData, fold: Fold) -> None:
        """Accuracy on the fold's test images drawn like the training images (synthetic data: with the
        training shortcut strength): what a user evaluating on data with the same bias would see."""
        index = fold.test
        with self.clock.stage("explain"):
            if model.frozen:
                with torch.no_grad():
                    logits = model.classifier.head.cpu().forward_pooled(inputs.train_features.pooled[torch.as_tensor(index)])
            else:
                logits = None
                p = self._probability_fn(model, inputs)(inputs.train_frames.images[index])
        if logits is not None:
            p = torch.softmax(logits, dim=1)[:, 1].numpy()
        self._record(spec, TRAIN_DISTRIBUTION_SPLIT, fold.index, data.labels[index], p,
                     [data.train_view[i] for i in index], inputs.train_frames.subset(index), {})

    def _gallery_candidates(self, spec, fold, lung_mass, p, heatmaps, frames, labels, samples) -> None:
        finite = np.flatnonzero(np.isfinite(lung_mass))
        if not len(finite) or not self.protocol.report.gallery_per_model:
            return
        current = self.gallery[spec.model_id]
        for kind, index in (("best", finite[np.argmax(lung_mass[finite])]), ("worst", finite[np.argmin(lung_mass[finite])])):
            held = current.get(kind)
            better = held is None or (lung_mass[index] > held.lung_mass if kind == "best" else lung_mass[index] < held.lung_mass)
            if better:
                current[kind] = GalleryCandidate(
                    float(lung_mass[index]), fold, samples[index], spec.task.class_names[labels[index]], float(p[index]),
                    frames.images[index].copy(), heatmaps[index].copy(), frames.lungs[index].copy(), frames.artifacts[index].copy(),
                )

    # ----- the run ----------------------------------------------------------------------------

    def run(self) -> dict:
        started = datetime.now(timezone.utc)
        total = len(self.specs) * self.protocol.training.folds
        done = 0
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "protocol.resolved.yaml").write_text(self.protocol_text, encoding="utf-8")
            with self.clock.stage("data"):
                task_data = self._task_data()
            for _, _, data in task_data:
                self.skipped.extend(s for s in data.skipped if s not in self.skipped)
                self.notes.extend(n for n in data.notes if n not in self.notes)
            self.n_images = sum(len(d.labels) for _, _, d in task_data)
            self.data_fingerprint = data_fingerprint([
                sample for _, _, d in task_data
                for view in (d.train_view, d.test_view, d.clean_view or [], *(s for s, _ in d.external.values()))
                for sample in view
            ])
            folds_by_data = {
                id(data): make_folds(data.labels, data.groups, self.protocol.training.folds, self.protocol.training.val_fraction, self.protocol.seed)
                for _, _, data in task_data
            }
            # A terminal gets the live bar; a log (CI, a pipe) one plain line per finished model x fold.
            plain = not self.console.is_terminal
            clock = lambda seconds: f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"  # noqa: E731
            loop_start = time.perf_counter()
            columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
            with Progress(*columns, console=self.console, disable=plain) as progress:
                bar = progress.add_task("training and auditing", total=total)
                # Backbone and frame outermost: each sample's features are computed once for all tasks.
                for backbone_key in dict.fromkeys((s.backbone, s.weights, s.crop) for s in self.specs):
                    cache = self._sample_cache(*backbone_key)
                    for task, axes, data in task_data:
                        group = [s for s in self.specs if s.task.name == task.name and s.data_axes == axes
                                 and (s.backbone, s.weights, s.crop) == backbone_key]
                        if not group:
                            continue
                        progress.update(bar, description=f"features {group[0].backbone} crop={group[0].crop}")
                        inputs = self._group_inputs(group, data, cache)
                        for spec in group:
                            for fold in folds_by_data[id(data)]:
                                progress.update(bar, description=f"{spec.model_id} fold {fold.index}")
                                step_start = time.perf_counter()
                                self._train_and_evaluate(spec, inputs, data, fold)
                                progress.advance(bar)
                                done += 1
                                if plain:
                                    now = time.perf_counter()
                                    eta = (now - loop_start) / done * (total - done)
                                    self.console.print(
                                        f"[{done}/{total}] {spec.model_id} fold {fold.index} done in {now - step_start:.1f} s; "
                                        f"elapsed {clock((datetime.now(timezone.utc) - started).total_seconds())}, ETA {clock(eta)}",
                                        markup=False, highlight=False, soft_wrap=True,
                                    )
                            self._write_gallery(spec)
            return self._finish(started)
        except KeyboardInterrupt:  # Ctrl-C: say what is kept and how to rerun; exit 130 (128 + SIGINT)
            if (self.out_dir / PARTIAL_MARKER).exists():  # a staging folder, removed on exit
                kept = "nothing of this run is kept (outputs appear only when a run completes); the output folder is as it was"
            else:
                entries = [f"{p.name}/ ({sum(1 for _ in p.iterdir())} entries)" if p.is_dir() else p.name
                           for p in (sorted(self.out_dir.iterdir()) if self.out_dir.is_dir() else [])]
                kept = f"kept in {self.out_dir}: {', '.join(entries) or 'nothing'} (result tables only if listed)"
            command = shlex.join(["auditbench", *sys.argv[1:]]) if sys.argv[1:2] == ["run"] else "the same auditbench run command"
            self.console.print(
                f"interrupted after {done} of {total} model x fold runs; {kept}. A run does not resume: to rerun it, {command}",
                markup=False, highlight=False, soft_wrap=True,
            )
            raise SystemExit(130) from None

    def _train_and_evaluate(self, spec: ModelSpec, inputs: GroupInputs, data: TaskData, fold: Fold) -> None:
        model = self._train(spec, inputs, data, fold)
        test_samples = [data.test_view[i] for i in fold.test]
        test_maps = inputs.test_features.maps[torch.as_tensor(fold.test)]
        test_occlusion = inputs.test_occlusion.subset(fold.test) if inputs.test_occlusion else None
        self._evaluate(spec, model, inputs, inputs.test_frames.subset(fold.test), test_maps, test_occlusion,
                       data.labels[fold.test], test_samples, fold.index, "internal", clean_index=fold.test)
        for name, (frames, features, occlusion) in inputs.external.items():
            samples, labels = data.external[name]
            self._evaluate(spec, model, inputs, frames, features.maps, occlusion, labels, samples, fold.index, name)
        if data.test_view is not data.train_view:
            self._evaluate_training_distribution(spec, model, inputs, data, fold)
        if fold.index == 0 and self.protocol.report.save_models != "none":
            with self.clock.stage("save"):
                self._save_model(spec, model, inputs)

    def _sample_cache(self, name: str, weights: str, crop: bool) -> "SampleCache":
        backbone = self._backbone(name, weights)
        return SampleCache(self, backbone, self._frame(backbone, crop))

    def _save_model(self, spec: ModelSpec, model: ModelFold, inputs: GroupInputs) -> None:
        config = {
            "model_id": spec.model_id, "weights": spec.weights, "finetune": spec.finetune, "augment": spec.augment,
            "task": spec.task.model_dump(), "classes": spec.task.class_names, "positive_class": spec.task.positive,
            "fold": 0, "data_axes": spec.data_axes, "protocol": self.protocol.name, "seed": self.protocol.seed,
            **self.provenance,
            "preprocessing": {
                "input_size": inputs.frame.input_size, "crop": inputs.frame.crop, "crop_ratio": inputs.frame.crop_ratio,
                "interpolation": inputs.frame.interpolation, "mean": list(inputs.mean), "std": list(inputs.std),
            },
        }
        save_checkpoint(model.classifier, self.out_dir / "models" / spec.model_id, config)

    def _write_gallery(self, spec: ModelSpec) -> None:
        folder = self.out_dir / "gallery"
        folder.mkdir(exist_ok=True)
        for kind, candidate in self.gallery.pop(spec.model_id, {}).items():
            file = f"{_safe_name(spec.model_id)}__{kind}.png"
            png = overlay_png(candidate.image, candidate.heatmap, candidate.lung, candidate.artifact)
            (folder / file).write_bytes(png_with_text(png, {PNG_RUN_KEY: self.run_id, PNG_PROTOCOL_KEY: self.protocol_sha256}))
            self._gallery_rows.append({
                "model_id": spec.model_id, "sample_id": candidate.sample.sample_id, "fold": candidate.fold, "kind": kind,
                "lung_mass": candidate.lung_mass, "p_positive": candidate.p_positive, "label": candidate.label, "file": f"gallery/{file}",
            })

    def _finish(self, started: datetime) -> dict:
        with self.clock.stage("select"):
            results = add_accuracy_drop(pd.DataFrame(self.results_rows))
            images = pd.DataFrame(self.image_rows)
            grid = pd.DataFrame([s.grid_row() for s in self.specs])
            models = aggregate_models(results, images, grid, self.protocol.training.folds, self.cam_geometry,
                                      self.protocol.metrics.bootstrap, self.protocol.seed)
            rule = SelectionRule(
                primary=self.protocol.selection.primary,
                constraints=[Constraint(metric, c.min, c.max) for metric, c in self.protocol.selection.constraints.items()],
                pareto=tuple(self.protocol.selection.pareto),
            )
            models = rank_models(models, rule)
            selected = models.loc[models["selected"], "model_id"]
            selected_id = str(selected.iloc[0]) if len(selected) else None
            validation = self._validation(models)
            self.notes.extend(external_findings(results, models))
            self.notes.extend(runner_up_comparison(models, images, self.protocol))
        with self.clock.stage("report"):
            # Every CSV through the one writer: text cells neutralised, run id and protocol hash per row.
            write_csv(results, self.out_dir / RESULTS_FILE, self.provenance)
            write_csv(models, self.out_dir / MODELS_FILE, self.provenance)
            write_csv(images, self.out_dir / IMAGES_FILE, self.provenance)
            write_csv(pd.DataFrame(self._gallery_rows, columns=["model_id", "sample_id", "fold", "kind", "lung_mass", "p_positive", "label", "file"]),
                      self.out_dir / GALLERY_FILE, self.provenance)
            write_csv(pd.DataFrame([vars(s) for s in self.skipped], columns=["path", "reason", "source"]),
                      self.out_dir / SKIPPED_FILE, self.provenance)
            if validation is not None:
                write_csv(validation, self.out_dir / VALIDATION_FILE, self.provenance)
            self._prune_models(selected_id)
            summary = self._summary(started, selected_id, rule)
            write_json_atomic(self.out_dir / SUMMARY_FILE, summary)  # the report reads it
            if self.protocol.report.html:
                from auditbench.report.html import render_report

                render_report(self.out_dir)
        summary["stage_seconds"] = {k: round(v, 2) for k, v in self.clock.seconds.items()}
        summary["manifest"] = build_manifest(self.out_dir)  # every file but summary.json, with its sha256
        write_json_atomic(self.out_dir / SUMMARY_FILE, summary)
        return summary

    @property
    def provenance(self) -> dict[str, str]:
        """What every output carries: this run's id and the sha256 of its resolved protocol."""
        return {"run_id": self.run_id, "protocol_sha256": self.protocol_sha256}

    def _validation(self, models: pd.DataFrame) -> pd.DataFrame | None:
        """Known-answer check of the audit itself (synthetic data): does each metric tell the models
        that rely on the marker (shortcut_reliance above validation.reliance_threshold, measured on
        clean twins) from those that do not, within a frame?"""
        if "shortcut_reliance_mean" not in models:
            self.notes.append("No validation table: only synthetic data has a known answer (clean twins of the test images).")
            return None
        table = models.copy()
        table["relies"] = table["shortcut_reliance_mean"] > self.protocol.validation.reliance_threshold
        if table["relies"].all() or not table["relies"].any():
            self.notes.append(
                f"No validation table: {int(table['relies'].sum())} of {len(table)} models rely on the marker "
                f"(shortcut_reliance > {self.protocol.validation.reliance_threshold:g}); it needs both kinds."
            )
            return None
        metrics = [m for m in ATTENTION_METRICS + OCCLUSION_METRICS + ["shortcut_accuracy_drop"] if f"{m}_mean" in table]
        return metric_validation(table, metrics, reliance_column="shortcut_reliance_mean",
                                 n_boot=self.protocol.validation.bootstrap, seed=self.protocol.seed)

    def _prune_models(self, selected_id: str | None) -> None:
        """save_models: selected: the checkpoints this run saved of the models not selected go.
        Only those: nothing else in models/ is touched."""
        folder = self.out_dir / "models"
        if self.protocol.report.save_models != "selected" or not folder.exists():
            return
        for spec in self.specs:
            path = folder / spec.model_id
            if spec.model_id != selected_id and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)

    def _summary(self, started: datetime, selected_id: str | None, rule: SelectionRule) -> dict:
        regional = [m for m in self.protocol.selection.constraints if METRICS.get(m).not_applicable_when_undefined]
        if regional:
            self.notes.append(
                f"A constraint on {', '.join(regional)} counts as met only where the masks prove its region out of "
                "the model's view (e.g. the crop removed every artifact); where the metric is undefined for any "
                "other reason (no mask, blank maps) the model is unverified and ranks below verified models."
            )
        if self.skipped:
            duplicates = sum(str(item.reason).startswith("duplicate") for item in self.skipped)
            self.notes.append(
                f"{len(self.skipped)} entries in skipped.csv, each with its reason: {duplicates} repeated images kept "
                f"once, {len(self.skipped) - duplicates} unreadable or blank images or unusable masks."
            )
        causes = {"zero_map": "Grad-CAM maps were all zero (no positive evidence for the target class)",
                  "empty_lung_mask": "lung masks were empty"}
        for (split, cause), count in sorted(self.undefined_heatmaps.items()):
            if count:
                self.notes.append(
                    f"{split}: for {count} of {self.heatmaps_evaluated[split]} image evaluations (all models and folds) "
                    f"{causes[cause]}; their attention metrics are NaN and left out of the means (images.csv)."
                )
        self.notes.append("Checkpoints are the models trained on fold 0; metrics are over all folds.")
        return {
            "name": self.protocol.name,
            "run_id": self.run_id,
            "protocol_sha256": self.protocol_sha256,
            "data_fingerprint": self.data_fingerprint,
            "git_commit": _git_commit(),
            "seed": self.protocol.seed,
            "selected_model": selected_id,
            "selection": {
                "primary": rule.primary,
                "constraints": {c.metric: {"min": c.min, "max": c.max} for c in rule.constraints},
                "pareto": list(rule.pareto),
            },
            "metric_directions": {name: "higher" if info.higher_is_better else "lower" for name, info in METRICS.items()},
            "n_models": len(self.specs),
            "n_images": self.n_images,
            "n_skipped": len(self.skipped),
            "warnings": dict(self.warning_counts),
            "notes": self.notes,
            "cam_layers": self.cam_layers,
            "device": self.accelerator.describe(),
            "package_versions": _versions(),
            "platform": platform.platform(),
            "stage_seconds": {k: round(v, 2) for k, v in self.clock.seconds.items()},
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "auditbench_version": _versions().get("auditbench", "unknown"),
        }


@dataclass
class _CachedSample:
    frames: Frames  # this one image
    pooled: torch.Tensor  # (1, C)
    feature_map: torch.Tensor | None  # (1, C, h, w)
    occluded: dict[str, tuple[np.ndarray, torch.Tensor]] | None  # region -> (filled image, pooled (1, C))


class SampleCache:
    """Frames, backbone features and occluded copies per sample for one backbone and model frame,
    computed once and shared by every task, fold and grid cell that holds the same image and masks
    (keyed by :func:`content_key`)."""

    def __init__(self, runner: Runner, backbone: FeatureBackbone, frame: FrameSpec):
        self.runner = runner
        self.backbone = backbone
        self.frame = frame
        self.mean, self.std = backbone.data_config["mean"], backbone.data_config["std"]
        self._entries: dict[str, _CachedSample] = {}

    def get(self, samples: list[Sample], keep_maps: bool, occlusion: bool) -> tuple[Frames, CachedFeatures, Occlusion | None]:
        occlusion = occlusion and self.runner.protocol.metrics.occlusion
        keys = [content_key(s) for s in samples]
        missing = {k: s for k, s in zip(keys, samples) if not self._usable(k, keep_maps, occlusion)}
        if missing:
            self._compute(list(missing), list(missing.values()), keep_maps, occlusion)
        entries = [self._entries[k] for k in keys]
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

    def _usable(self, key: str, keep_maps: bool, occlusion: bool) -> bool:
        entry = self._entries.get(key)
        return (
            entry is not None
            and (not keep_maps or entry.feature_map is not None)
            and (not occlusion or entry.occluded is not None)
        )

    def _features(self, images: np.ndarray, keep_maps: bool) -> CachedFeatures:
        runner = self.runner
        with runner.clock.stage("features"):
            return extract_features(
                self.backbone, images, self.mean, self.std, runner.accelerator,
                runner.protocol.training.batch_size, keep_maps=keep_maps,
            )

    def _compute(self, keys: list[str], samples: list[Sample], keep_maps: bool, occlusion: bool) -> None:
        runner = self.runner
        # Recomputing an entry keeps what it already had, so requests in any order never lose work.
        held = [e for k in keys if (e := self._entries.get(k)) is not None]
        keep_maps = keep_maps or any(e.feature_map is not None for e in held)
        occlusion = occlusion or any(e.occluded is not None for e in held)
        with runner.clock.stage("preprocess"):
            frames = to_frames(samples, self.frame, runner.protocol.border_fraction)
        features = self._features(frames.images, keep_maps)
        per_sample: list[dict] = [{} for _ in samples]
        if occlusion:
            with runner.clock.stage("occlude"), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                occluded = occlude(frames.images, frames.lungs, frames.artifact_footprint, frames.border_footprint,
                                   frames.lung_footprint)
            for item in caught:
                runner.warning_counts[str(item.message)] += 1
            for region in OCCLUSION_REGIONS:
                filled = occluded.filled[region]
                if len(filled):
                    pooled = self._features(filled, keep_maps=False).pooled
                    for row, i in enumerate(occluded.indices[region]):
                        per_sample[i][region] = (filled[row], pooled[row : row + 1])
        for i, key in enumerate(keys):
            self._entries[key] = _CachedSample(
                frames.subset(np.array([i])),
                features.pooled[i : i + 1],
                features.maps[i : i + 1] if keep_maps else None,
                per_sample[i] if occlusion else None,
            )


def frame_name(frame: FrameSpec) -> str:
    """The stratum of the validation: input size and crop ("128px" or "128px crop")."""
    return f"{frame.input_size}px{' crop' if frame.crop else ''}"


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _git_commit() -> str | None:
    """The commit of the auditbench checkout that ran (``+dirty`` with uncommitted changes), or None
    where auditbench is not a git checkout (an installed wheel) or git is absent."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        lines = head.stdout.split()
        # Only auditbench's own checkout: an installed package can sit inside somebody else's repository.
        if head.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != here.parent:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return lines[1] + ("+dirty" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def external_findings(results: pd.DataFrame, models: pd.DataFrame) -> list[str]:
    """One line per non-internal split (external sets, train_distribution) for the best-ranked model
    evaluated on it: internal vs that split's accuracy and the share of its images called positive
    (a model 99% accurate inside that calls healthy external images COVID is the audit's most
    important finding)."""
    ranks = models.set_index("model_id")["rank"]
    lines = []
    for split, rows in results[results["split"] != "internal"].groupby("split", sort=False):
        model_id = min(rows["model_id"].unique(), key=lambda m: ranks[m])
        by_metric = rows[rows["model_id"] == model_id].groupby("metric")["value"]
        counts = by_metric.sum()
        called_positive = (counts["fp"] + counts["tp"]) / counts[["tn", "fp", "fn", "tp"]].sum()
        internal_accuracy = models.set_index("model_id").loc[model_id, "accuracy_mean"]
        lines.append(
            f"Test set {split!r}: the best-ranked model evaluated on it, {model_id}, has accuracy "
            f"{by_metric.mean()['accuracy']:.3f} there vs {internal_accuracy:.3f} on the internal test split, "
            f"and calls {called_positive:.0%} of its images the positive class."
        )
    return lines


def runner_up_comparison(models: pd.DataFrame, images: pd.DataFrame, protocol: Protocol) -> list[str]:
    """A paired patient-level bootstrap of the primary metric between rank 1 and rank 2, on the
    internal test images both saw (same task); one line saying whether they can be told apart."""
    if len(models) < 2 or protocol.metrics.bootstrap == 0 or protocol.selection.primary != "accuracy":
        return []
    first, second = models.iloc[0], models.iloc[1]
    internal = images[images["split"] == "internal"]
    pair = [internal[internal["model_id"] == m["model_id"]].set_index(["sample_id", "fold"]) for m in (first, second)]
    common = pair[0].index.intersection(pair[1].index)
    if not len(common):
        return []
    a, b = (frame.loc[common] for frame in pair)
    result = paired_bootstrap(a["correct"].to_numpy(float), b["correct"].to_numpy(float),
                              a["patient_id"].astype(str).to_numpy(), protocol.metrics.bootstrap, protocol.seed)
    verdict = "can be told apart" if result.distinguishable else "cannot be told apart on these images"
    return [
        f"Rank 1 ({first['model_id']}) vs rank 2 ({second['model_id']}): accuracy difference {result.difference:+.3f} "
        f"[95% CI {result.ci_low:+.3f}, {result.ci_high:+.3f}], paired bootstrap over patients: they {verdict}."
    ]


def run_protocol(protocol: Protocol, out_dir: Path, base_dir: Path | None = None, console: Console | None = None,
                 overwrite: bool = False, make_parents: bool = False) -> dict:
    """Run a validated protocol and write every output into ``out_dir`` (docs/tables.md).

    The run writes into a staging folder beside ``out_dir`` and moves it into place when complete
    (``auditbench.outputs``); an existing ``out_dir`` must be empty or an earlier run, unless
    ``overwrite`` (which still deletes no file auditbench did not write). Raises
    :class:`auditbench.outputs.OutputError` when ``out_dir`` cannot be used."""
    console = console or Console(stderr=True)

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    with prepare_output(out_dir, overwrite=overwrite, say=say, make_parents=make_parents) as target:
        runner = Runner(protocol, target.staging, Path(base_dir or Path.cwd()), console, run_id=target.run_id)
        summary = runner.run()
        target.commit({spec.model_id for spec in runner.specs})
    return summary
