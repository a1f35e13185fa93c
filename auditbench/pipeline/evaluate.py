"""Stage 4: one grid cell on one fold, from fitting to the rows it adds to every result table.

:func:`run_cell` is the unit of work an executor runs: it fits the model, evaluates it on the
internal test split, every external set and (synthetic data) the training distribution, saves the
fold-0 checkpoint, and returns a :class:`CellResult`, which depends on nothing but its inputs.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from auditbench.audit.metrics import attention_metrics, classification_metrics
from auditbench.audit.occlusion import effects_from_probabilities, occlusion_effects
from auditbench.data.prepare import ARTIFACT_ABSENT, Frames, TaskData
from auditbench.data.records import Sample
from auditbench.data.splits import Fold
from auditbench.models.checkpoint import save_checkpoint
from auditbench.pipeline.fit import fit_cell
from auditbench.pipeline.predict import head_probability, predict_and_explain, probability_fn
from auditbench.pipeline.records import (
    THRESHOLD, TRAIN_DISTRIBUTION_SPLIT, CellResult, GalleryCandidate, GroupInputs, ModelFold, Occlusion, StageClock,
    frame_name,
)
from auditbench.protocol.grid import ModelSpec
from auditbench.protocol.schema import Protocol
from auditbench.training.device import Accelerator

CLASSIFICATION_METRICS = ["accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity"]
COUNT_METRICS = ["tn", "fp", "fn", "tp"]


@dataclass
class CellContext:
    """What every cell of a run shares: the protocol, the device, the explanation method, where
    checkpoints go and the provenance they carry."""

    protocol: Protocol
    accelerator: Accelerator
    cam: object  # a registered explanation method (explain.cam_base)
    out_dir: Path
    provenance: dict[str, str]


def run_cell(context: CellContext, spec: ModelSpec, inputs: GroupInputs, data: TaskData, fold: Fold) -> CellResult:
    clock = StageClock()
    result = CellResult(spec.model_id, fold.index, cam_layer=inputs.backbone.cam_layer_description)
    model = fit_cell(context.protocol, context.accelerator, spec, inputs, data, fold, clock)
    test_samples = [data.test_view[i] for i in fold.test]
    test_maps = inputs.test_features.maps[torch.as_tensor(fold.test)]
    test_occlusion = inputs.test_occlusion.subset(fold.test) if inputs.test_occlusion else None
    evaluate = _Evaluation(context, spec, model, inputs, result, clock)
    evaluate.split(inputs.test_frames.subset(fold.test), test_maps, test_occlusion, data.labels[fold.test],
                   test_samples, "internal", clean_index=fold.test)
    for name, (frames, features, occlusion) in inputs.external.items():
        samples, labels = data.external[name]
        evaluate.split(frames, features.maps, occlusion, labels, samples, name)
    if data.test_view is not data.train_view:
        evaluate.training_distribution(data, fold)
    if fold.index == 0 and context.protocol.report.save_models != "none":
        with clock.stage("save"):
            save_model(context, spec, model, inputs)
    result.stage_seconds = dict(clock.seconds)
    return result


def save_model(context: CellContext, spec: ModelSpec, model: ModelFold, inputs: GroupInputs) -> None:
    protocol = context.protocol
    config = {
        "model_id": spec.model_id, "weights": spec.weights, "finetune": spec.finetune, "augment": spec.augment,
        "task": spec.task.model_dump(), "classes": spec.task.class_names, "positive_class": spec.task.positive,
        "fold": 0, "data_axes": spec.data_axes, "protocol": protocol.name, "seed": protocol.seed,
        **context.provenance,
        "preprocessing": {
            "input_size": inputs.frame.input_size, "crop": inputs.frame.crop, "crop_ratio": inputs.frame.crop_ratio,
            "interpolation": inputs.frame.interpolation, "mean": list(inputs.mean), "std": list(inputs.std),
        },
    }
    save_checkpoint(model.classifier, context.out_dir / "models" / spec.model_id, config)


class _Evaluation:
    """Evaluates one fitted model on each split, adding to one :class:`CellResult`."""

    def __init__(self, context: CellContext, spec: ModelSpec, model: ModelFold, inputs: GroupInputs,
                 result: CellResult, clock: StageClock):
        self.context, self.spec, self.model, self.inputs, self.result, self.clock = context, spec, model, inputs, result, clock
        self.batch_size = context.protocol.explain.batch_size

    def split(self, frames: Frames, maps, occlusion: Occlusion | None, labels: np.ndarray, samples: list[Sample],
              split: str, clean_index: np.ndarray | None = None) -> None:
        context, model, inputs, result = self.context, self.model, self.inputs, self.result
        with self.clock.stage("explain"):
            p, heatmaps, map_side = predict_and_explain(model, inputs, frames, maps, context.cam, context.protocol.explain,
                                                        context.accelerator)
        cell_px = int(np.ceil(frames.images.shape[-1] / map_side)) if map_side else 0
        result.cam_geometry = {
            "input_size": inputs.frame.input_size, "frame": frame_name(inputs.frame),
            "cam_layer": context.protocol.explain.layer, "cam_map_size": map_side, "cam_stride": cell_px,
        }
        with self.clock.stage("audit"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attention = attention_metrics(heatmaps, frames.lungs, frames.artifact_footprint, frames.border, cell_px)
            caught.clear()  # counted below per cause, summed over models and folds, not one line per batch
            values = dict(attention.values)
            if occlusion is not None and model.frozen:
                p_occluded = {r: head_probability(model, f) for r, f in occlusion.pooled.items()}
                values.update(effects_from_probabilities(occlusion.images, p, p_occluded))
            elif occlusion is not None:
                values.update(occlusion_effects(probability_fn(model, inputs, self.batch_size, context.accelerator),
                                                frames.images, p_original=p, occluded=occlusion.images,
                                                batch_size=self.batch_size))
        self._count_warnings(caught, split)
        result.heatmaps_evaluated[split] += len(p)
        for cause in ("zero_map", "empty_lung_mask"):
            result.undefined_heatmaps[f"{split}|{cause}"] += attention.nan_counts.get(cause, 0)
        if split == "internal" and inputs.clean_frames is not None:
            values["shortcut_reliance"] = self._reliance(frames, p, clean_index)
        self._record(split, labels, p, samples, frames, values)
        if split == "internal":
            self._gallery_candidates(values["lung_mass"], p, heatmaps, frames, labels, samples)

    def _reliance(self, frames: Frames, p: np.ndarray, index: np.ndarray) -> np.ndarray:
        """|p(x) - p(clean twin of x)| per test image whose source shows a marker (NaN elsewhere):
        the behavioural ground truth of the validation (a cropped frame that removed the marker
        gives 0, as it should: the model cannot use what it does not see)."""
        marked = frames.artifact_status != ARTIFACT_ABSENT
        reliance = np.full(len(p), np.nan)
        if not marked.any():
            return reliance
        rows = index[marked]
        if self.model.frozen:
            p_clean = head_probability(self.model, self.inputs.clean_features.pooled[torch.as_tensor(rows)])
        else:
            p_clean = probability_fn(self.model, self.inputs, self.batch_size, self.context.accelerator)(
                self.inputs.clean_frames.images[rows])
        reliance[marked] = np.abs(p[marked] - p_clean)
        return reliance

    def training_distribution(self, data: TaskData, fold: Fold) -> None:
        """Accuracy on the fold's test images drawn like the training images (synthetic data: with the
        training shortcut strength): what a user evaluating on data with the same bias would see."""
        index = fold.test
        with self.clock.stage("explain"):
            if self.model.frozen:
                p = head_probability(self.model, self.inputs.train_features.pooled[torch.as_tensor(index)])
            else:
                p = probability_fn(self.model, self.inputs, self.batch_size, self.context.accelerator)(
                    self.inputs.train_frames.images[index])
        self._record(TRAIN_DISTRIBUTION_SPLIT, data.labels[index], p, [data.train_view[i] for i in index],
                     self.inputs.train_frames.subset(index), {})

    def _count_warnings(self, caught: list, split: str) -> None:
        """Identical messages are counted, so a large grid gives a short list."""
        for item in caught:
            self.result.warnings[f"{split}: {item.message}"] += 1

    def _record(self, split: str, labels: np.ndarray, p: np.ndarray, samples: list[Sample], frames: Frames,
                values: dict[str, np.ndarray]) -> None:
        """Rows of results.csv (per fold) and images.csv (per image) for one evaluated split."""
        spec, fold, result = self.spec, self.result.fold, self.result
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = classification_metrics(labels, p, THRESHOLD)
        self._count_warnings(caught, split)
        grid = spec.grid_row()
        for metric in CLASSIFICATION_METRICS + COUNT_METRICS:
            result.results_rows.append({**grid, "split": split, "fold": fold, "metric": metric, "value": float(scores[metric])})
        for metric, per_image in values.items():
            finite = per_image[np.isfinite(per_image)]
            value = float(finite.mean()) if len(finite) else float("nan")
            result.results_rows.append({**grid, "split": split, "fold": fold, "metric": metric, "value": value})
        class_names = spec.task.class_names
        prediction = (p > THRESHOLD).astype(int)
        has_artifact = frames.artifact_footprint.reshape(len(p), -1).any(axis=1)
        border_in_view = frames.border_footprint.reshape(len(p), -1).any(axis=1)
        for i, sample in enumerate(samples):
            result.image_rows.append({
                "model_id": spec.model_id, "fold": fold, "split": split, "sample_id": sample.sample_id,
                "source": sample.source, "patient_id": sample.patient_id, "path": sample.path,
                "label": class_names[labels[i]], "label_index": int(labels[i]),
                "prediction": class_names[prediction[i]], "p_positive": float(p[i]),
                "correct": bool(prediction[i] == labels[i]), "mask_source": sample.mask_source,
                "has_artifact": bool(has_artifact[i]), "artifact_status": str(frames.artifact_status[i]),
                "border_in_view": bool(border_in_view[i]),
                **{metric: float(per_image[i]) for metric, per_image in values.items()},
            })

    def _gallery_candidates(self, lung_mass, p, heatmaps, frames: Frames, labels, samples: list[Sample]) -> None:
        finite = np.flatnonzero(np.isfinite(lung_mass))
        if not len(finite) or not self.context.protocol.report.gallery_per_model:
            return
        for kind, index in (("best", finite[np.argmax(lung_mass[finite])]), ("worst", finite[np.argmin(lung_mass[finite])])):
            self.result.gallery[kind] = GalleryCandidate(
                float(lung_mass[index]), self.result.fold, samples[index].sample_id,
                self.spec.task.class_names[labels[index]], float(p[index]), frames.images[index].copy(),
                heatmaps[index].copy(), frames.lungs[index].copy(), frames.artifacts[index].copy(),
            )
