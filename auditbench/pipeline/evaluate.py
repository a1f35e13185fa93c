"""Stage 4: one grid cell on one fold, from fitting to the rows it adds to every result table.

:func:`run_cell` is the unit of work an executor runs: it fits the model, evaluates it on the
internal test split, every external set and (synthetic data) the training distribution, saves the
fold-0 checkpoint, and returns a :class:`CellResult`, which depends on nothing but its inputs.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from auditbench.audit.agreement import rank_agreement
from auditbench.audit.metrics import METRICS, attention_metrics
from auditbench.audit.occlusion import effects_from_probabilities
from auditbench.data.prepare import ARTIFACT_ABSENT, Frames, TaskData
from auditbench.data.records import Sample
from auditbench.data.splits import Fold
from auditbench.models.checkpoint import save_checkpoint
from auditbench.pipeline.faithfulness_pass import chunk_faithfulness
from auditbench.pipeline.fit import fit_cell
from auditbench.pipeline.gallery import offer_chunk, offer_sources
from auditbench.pipeline.probes import probe_rows
from auditbench.pipeline.result_rows import append_image_rows, append_results_rows
from auditbench.pipeline.predict import head_probability, predict_and_explain, probability_fn
from auditbench.pipeline.records import (
    THRESHOLD, TRAIN_DISTRIBUTION_SPLIT, CellKey, CellResult, GalleryCandidate, GroupInputs, ModelFold, StageClock, ViewPass,
    frame_name,
)
from auditbench.pipeline.sanity import sanity_rows
from auditbench.pipeline.store import CHUNK
from auditbench.protocol.grid import ModelSpec
from auditbench.protocol.schema import Protocol
from auditbench.training.device import Accelerator

ATTENTION_METRICS = [name for name, info in METRICS.in_registration_order() if info.kind == "attention"]


@dataclass
class CellContext:
    """What every cell of a run shares: the protocol, the device, the explanation methods, where
    checkpoints go and the provenance they carry."""

    protocol: Protocol
    accelerator: Accelerator
    cams: dict  # explain.method name -> registered method (explain.cam_base), the primary first
    out_dir: Path
    provenance: dict[str, str]
    sanity_cells: frozenset = frozenset()  # the cells that run the method's sanity checks (pipeline/sanity.py)
    probe_cells: frozenset = frozenset()  # the cells that run their group's shortcut probes (pipeline/probes.py)


def run_cell(context: CellContext, spec: ModelSpec, inputs: GroupInputs, data: TaskData, fold: Fold) -> CellResult:
    """Fit ``spec`` on ``fold``, evaluate it (:func:`evaluate_model`) and save the fold-0 checkpoint."""
    clock = StageClock()
    model = fit_cell(context.protocol, context.accelerator, spec, inputs, data, fold, clock)
    result = evaluate_model(context, spec, model, inputs, data, fold, clock)
    if CellKey(spec.model_id, fold.index) in context.sanity_cells and context.protocol.sanity.images:
        with clock.stage("sanity"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result.sanity_rows = sanity_rows(context, spec, model, inputs, data, fold)
        for item in caught:  # e.g. constant maps: counted in summary.json, reasons in sanity.csv
            result.warnings[f"sanity: {item.message}"] += 1
    # The group's pretrained features once (its frozen models' values); a fine-tuned model's own, on fold 0.
    pretrained = CellKey(spec.model_id, fold.index) in context.probe_cells
    if pretrained or (not model.frozen and fold.index == 0):
        with clock.stage("probes"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if pretrained:
                result.probe_rows += probe_rows(context.protocol, spec, inputs, data)
            if not model.frozen and fold.index == 0:
                result.probe_rows += probe_rows(context.protocol, spec, inputs, data, model=model,
                                                accelerator=context.accelerator)
        for item in caught:  # e.g. a probe that did not converge: counted in summary.json
            result.warnings[f"probes: {item.message}"] += 1
    if fold.index == 0 and context.protocol.report.save_models != "none":
        with clock.stage("save"):
            save_model(context, spec, model, inputs)
    result.stage_seconds = dict(clock.seconds)
    return result


def evaluate_model(context: CellContext, spec: ModelSpec, model: ModelFold, inputs: GroupInputs, data: TaskData,
                   fold: Fold, clock: StageClock | None = None) -> CellResult:
    """Every split's rows for a fitted model (trained here or loaded from a checkpoint): the fold's
    internal test images, every external set and (synthetic data) the training distribution."""
    clock = clock or StageClock()
    result = CellResult(spec.model_id, fold.index, cam_layer=inputs.backbone.cam_layer_description)
    evaluate = _Evaluation(context, spec, model, inputs, result, clock)
    if len(fold.test):
        evaluate.split(inputs.test, fold.test, data.labels[fold.test], data.test_view, "internal")
    for name, view in inputs.external.items():
        samples, labels = data.external[name]
        evaluate.split(view, np.arange(len(view)), labels, samples, name)
    if data.test_view is not data.train_view and len(fold.test):
        evaluate.training_distribution(data, fold)
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

    def _chunks(self, rows: np.ndarray):
        """``rows`` in chunks of whole explanation batches (so every batch is the one an unchunked
        pass would make), about :data:`store.CHUNK` images each: memory follows the chunk."""
        size = self.batch_size * max(1, CHUNK // self.batch_size)
        for start in range(0, len(rows), size):
            yield start, rows[start : start + size]

    def split(self, view: ViewPass, rows: np.ndarray, labels: np.ndarray, samples: list[Sample], split: str) -> None:
        """Evaluate ``view[rows]`` (``samples`` is the whole view, ``labels`` aligned with ``rows``)
        with every explanation method: attention metrics per method, everything else once."""
        context, model, inputs = self.context, self.model, self.inputs
        methods = list(context.cams)
        p_all, shared_all, lungs_removed = [], defaultdict(list), []
        attention_all = {method: defaultdict(list) for method in methods}
        for start, chunk in self._chunks(rows):
            frames = view.frames(chunk)
            with self.clock.stage("explain"):
                explained = predict_and_explain(model, inputs, frames, view.maps(chunk), context.cams,
                                                context.protocol.explain, context.accelerator, first=start)
            p, chunk_samples = explained.p, [samples[i] for i in chunk]
            attention = {method: self._attention(method, explained, frames, split) for method in methods}
            if split == "internal" and context.protocol.metrics.faithfulness.images:  # the first N, NaN beyond
                with self.clock.stage("faithfulness"), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    predict = probability_fn(model, inputs, self.batch_size, context.accelerator)
                    for method, values in chunk_faithfulness(context.protocol, predict, explained, frames, start,
                                                             self.batch_size).items():
                        attention[method].update(values)
                self._count_warnings(caught, f"{split} (faithfulness)")
            with self.clock.stage("audit"), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                shared = {}
                occlusion = view.occlusion(chunk, with_images=not model.frozen)
                p_lungs_removed = np.full(len(p), np.nan)
                if occlusion is not None:
                    p_occluded = self._occluded_probabilities(occlusion)
                    shared.update(effects_from_probabilities(occlusion.images, p, p_occluded))
                    p_lungs_removed[occlusion.images.indices["lung"]] = p_occluded["lung"]
            self._count_warnings(caught, split)
            if split == "internal" and inputs.clean is not None:
                shared["shortcut_reliance"] = self._reliance(frames, p, chunk)
            chunk_labels = labels[start : start + len(chunk)]
            for method in methods:
                append_image_rows(self.result, self.spec, method, split, chunk_labels, p, chunk_samples, frames,
                                  {**attention[method], **shared}, p_lungs_removed if occlusion is not None else None)
                for name, per_image in attention[method].items():
                    attention_all[method][name].append(per_image)
            lungs_removed.append(p_lungs_removed)
            primary = methods[0]  # the gallery shows the primary method's maps
            self._gallery_candidates(split, attention[primary]["lung_mass"], p, explained.heatmaps[primary], frames,
                                     chunk_labels, chunk_samples)
            p_all.append(p)
            for name, per_image in shared.items():
                shared_all[name].append(per_image)
        shared_values = {k: np.concatenate(v) for k, v in shared_all.items()}
        for method in methods:
            values = {**{k: np.concatenate(v) for k, v in attention_all[method].items()}, **shared_values}
            append_results_rows(self.result, self.spec, method, split, labels, np.concatenate(p_all), values,
                                np.concatenate(lungs_removed) if view.has_occlusion else None)

    def _attention(self, method: str, explained, frames: Frames, split: str) -> dict[str, np.ndarray]:
        """One method's per-image attention metrics on a chunk (NaN on the rows a bounded method did
        not explain); its map geometry; NaN causes counted."""
        result, n = self.result, len(explained.p)
        maps = explained.heatmaps[method]
        rows = len(maps)
        primary = next(iter(self.context.cams))
        # The primary method's counts read as the split's; another method's carry its name.
        key = split if method == primary else f"{split} ({method})"
        values = {name: np.full(n, np.nan) for name in ATTENTION_METRICS}
        if method != primary:
            values["method_agreement"] = np.full(n, np.nan)
        result.heatmaps_evaluated[key] += rows  # the denominator of the other causes: images with a map
        result.undefined_heatmaps[f"{key}|not_explained"] += n - rows
        if not rows:
            return values
        map_side = explained.map_side[method]
        cell_px = int(np.ceil(frames.images.shape[-1] / map_side)) if map_side else 0
        result.cam_geometry[method] = {
            "input_size": self.inputs.frame.input_size, "frame": frame_name(self.inputs.frame),
            "cam_layer": self.context.protocol.explain.layer, "cam_map_size": map_side, "cam_stride": cell_px,
        }
        with self.clock.stage("audit"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attention = attention_metrics(maps, frames.lungs[:rows], frames.artifact_footprint[:rows],
                                          frames.border[:rows], cell_px)
        del caught  # counted below per cause, summed over models and folds, not one line per batch
        for name, per_image in attention.values.items():
            values[name][:rows] = per_image
        if method != primary:
            with self.clock.stage("audit"), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                values["method_agreement"][:rows] = rank_agreement(maps, explained.heatmaps[primary][:rows])
            self._count_warnings(caught, f"{split} ({method})")
        for cause in ("zero_map", "empty_lung_mask"):
            result.undefined_heatmaps[f"{key}|{cause}"] += attention.nan_counts.get(cause, 0)
        return values

    def _occluded_probabilities(self, occlusion) -> dict[str, np.ndarray]:
        """p(positive) of each region's filled copies: a frozen model's head on their cached
        features, a fine-tuned model on the images themselves."""
        if self.model.frozen:
            return {region: head_probability(self.model, pooled) for region, pooled in occlusion.pooled.items()}
        predict = probability_fn(self.model, self.inputs, self.batch_size, self.context.accelerator)
        return {region: predict(filled) if len(occlusion.images.indices[region]) else np.empty(0)
                for region, filled in occlusion.images.filled.items()}

    def _reliance(self, frames: Frames, p: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """|p(x) - p(clean twin of x)| per test image whose source shows a marker (NaN elsewhere):
        the behavioural ground truth of the validation (a cropped frame that removed the marker
        gives 0, as it should: the model cannot use what it does not see)."""
        marked = frames.artifact_status != ARTIFACT_ABSENT
        reliance = np.full(len(p), np.nan)
        if not marked.any():
            return reliance
        twins = rows[marked]
        if self.model.frozen:
            p_clean = head_probability(self.model, self.inputs.clean.pooled[torch.as_tensor(twins)])
        else:
            p_clean = probability_fn(self.model, self.inputs, self.batch_size, self.context.accelerator)(
                self.inputs.clean.images(twins))
        reliance[marked] = np.abs(p[marked] - p_clean)
        return reliance

    def training_distribution(self, data: TaskData, fold: Fold) -> None:
        """Accuracy on the fold's test images drawn like the training images (synthetic data: with the
        training shortcut strength): what a user evaluating on data with the same bias would see."""
        labels, p_all = data.labels[fold.test], []
        for start, chunk in self._chunks(fold.test):
            with self.clock.stage("explain"):
                if self.model.frozen:
                    p = head_probability(self.model, self.inputs.train.pooled[torch.as_tensor(chunk)])
                else:
                    p = probability_fn(self.model, self.inputs, self.batch_size, self.context.accelerator)(
                        self.inputs.train.images(chunk))
            frames = self.inputs.train.frames(chunk)
            for method in self.context.cams:
                append_image_rows(self.result, self.spec, method, TRAIN_DISTRIBUTION_SPLIT,
                                  labels[start : start + len(chunk)], p, [data.train_view[i] for i in chunk], frames, {})
            p_all.append(p)
        for method in self.context.cams:
            append_results_rows(self.result, self.spec, method, TRAIN_DISTRIBUTION_SPLIT, labels, np.concatenate(p_all), {})

    def _count_warnings(self, caught: list, split: str) -> None:
        """Identical messages are counted, so a large grid gives a short list."""
        for item in caught:
            self.result.warnings[f"{split}: {item.message}"] += 1

    def _gallery_candidates(self, split: str, lung_mass, p, heatmaps, frames: Frames, labels,
                            samples: list[Sample]) -> None:
        """Offer this chunk's images to the cell's gallery (pipeline/gallery.py: internal best / worst
        lung_mass and most confident decisions, external errors, per-source examples). Chunks arrive
        in order and only the images that enter are copied, so ties keep the first and memory stays
        bounded."""
        if not self.context.protocol.report.gallery_per_model:
            return
        class_names, fold = self.spec.task.class_names, self.result.fold

        def candidate(row: int, kind: str) -> GalleryCandidate:
            return GalleryCandidate(
                float(lung_mass[row]), fold, samples[row].sample_id, class_names[labels[row]], float(p[row]),
                frames.images[row].copy(), heatmaps[row].copy(), frames.lungs[row].copy(),
                frames.artifacts[row].copy(), split, kind, class_names[int(p[row] > THRESHOLD)],
                str(samples[row].source),
            )

        offer_chunk(self.result.gallery, split, lung_mass, p, labels, candidate)
        offer_sources(self.result.gallery, split, p, labels, [s.source for s in samples], candidate)
