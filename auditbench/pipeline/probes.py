"""Stage 4c: shortcut probes that need no masks, once per backbone pass (issue 8).

DeGrave, Janizek & Lee (Nature MI 2021): a classifier has a source shortcut *available* when the
image's source (data set, hospital) is readable from its features within one class. Per group of the
plan (one task x backbone x weights x frame x data cell) its first cell runs, on the group's pooled
features of every internal image and every external set's images (``audit.probes``):

- ``source``: the source probe on the intact images (``source_probe_accuracy``);
- ``outside_lung``: the same probe on the images with their lungs filled, the fill of
  ``lung_occlusion_effect`` (``outside_lung_probe_accuracy``).

In a run the features are the group's *pretrained* backbone's, the features a frozen model's head
reads: the values enter the models.csv rows of the group's frozen models. A fine-tuned model reads its
own backbone's features: fold 0 of each fine-tuned model probes them (``features = "model"``, one more
pass of that backbone over the images and their lung-filled copies, skipped where no class has two
sources). ``auditbench audit`` probes the audited model's own backbone the same way. Rows go to
probes.csv, one per group (or model), probe and class.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from auditbench.audit.probes import SourceProbeResult, outside_lung_probe, probe_possible, source_probe
from auditbench.data.prepare import TaskData
from auditbench.pipeline.plan import RunPlan
from auditbench.pipeline.records import CellKey, GroupInputs, ModelFold, ViewPass, frame_name, stable_seed
from auditbench.pipeline.store import CHUNK
from auditbench.protocol.grid import ModelSpec
from auditbench.training.device import Accelerator
from auditbench.training.features import extract_features

PROBE_METRICS = {"source": "source_probe_accuracy", "outside_lung": "outside_lung_probe_accuracy"}
"""probes.csv's ``probe`` -> the registered metric its summary value is (``audit.metrics``)."""
GROUP_COLUMNS = ["task", "backbone", "weights", "crop"]
"""The grid columns that name a group; the data axes (synthetic data) follow them in probes.csv."""
PROBE_COLUMNS = [
    "frame", "features", "model_id", "probe", "metric", "value", "label", "sources", "n_images", "n_patients", "n_folds",
    "balanced_accuracy", "chance", "adjusted", "ci_low", "ci_high", "adjusted_ci_low", "adjusted_ci_high",
    "fold_std", "reason",
]
"""probes.csv: after the group columns and data axes. ``value``: the probe's summary for the group
(mean ``adjusted`` over the classes where it is defined), the same on each of its class rows. ``features``:
``pretrained`` (a run's backbone pass: the group's frozen models' values) or ``model`` (the backbone of the
model ``model_id``: a fine-tuned model's, fold 0, or an audited model's)."""


def probe_cells(plan: RunPlan) -> set[CellKey]:
    """The cell that carries each group's probes: its first model in plan order, first fold."""
    return {CellKey(group.cells[0][0].model_id, group.cells[0][1].index) for group in plan.groups if group.cells}


def probe_rows(protocol, spec: ModelSpec, inputs: GroupInputs, data: TaskData, own_backbone: bool = False,
               model: ModelFold | None = None, accelerator: Accelerator | None = None) -> list[dict]:
    """probes.csv's rows for the group of ``spec``: both probes on pooled features of the internal images
    (``test_view``: every image on real data) and of every external set.

    The features are the group's pretrained backbone pass (the store's), or a model's own: ``own_backbone``
    (an audit, whose pass already is the model's backbone) or ``model`` (a fine-tuned model: its backbone runs
    here over every image and lung-filled copy, unless no class can have a defined probe)."""
    views = [(inputs.test, data.test_view, np.asarray(data.labels))]
    views += [(inputs.external[name], samples, np.asarray(labels)) for name, (samples, labels) in data.external.items()]
    samples = [sample for _, view_samples, _ in views for sample in view_samples]
    labels = np.concatenate([labels for _, _, labels in views])
    sources = np.array([sample.source for sample in samples])
    # A patient id is unique within its source only: two data sets may both have a patient "1".
    patients = np.array([f"{sample.source}/{sample.patient_id}" for sample in samples])
    class_names = spec.task.class_names
    seed = stable_seed(protocol.seed, "probe", spec.backbone, spec.weights, spec.crop, spec.task.name)
    n_boot = protocol.metrics.bootstrap
    own = own_backbone or model is not None
    head = {**{column: spec.grid_row()[column] for column in GROUP_COLUMNS}, **spec.data_axes,
            "frame": frame_name(inputs.frame), "features": "model" if own else "pretrained",
            "model_id": spec.model_id if own else ""}
    occlusion = all(view.has_occlusion for view, _, _ in views)
    if model is None:
        pooled, filled = _store_features([view for view, _, _ in views], occlusion)
    elif probe_possible(sources, labels, patients):
        pooled, filled = _model_features(model, inputs, [view for view, _, _ in views], occlusion, accelerator,
                                         protocol.explain.batch_size)
    else:  # every class is undefined whatever the features: no pass of the model's backbone
        pooled = np.zeros((len(samples), 1), np.float32)
        filled = (np.arange(len(samples)), pooled) if occlusion else None
    rows = _rows(head, "source", source_probe(pooled, sources, labels, patients, seed, n_boot=n_boot), class_names)
    if filled is None:
        return rows + _undefined(head, "outside_lung", "no lung-filled copies: metrics.occlusion is off")
    kept, filled_pooled = filled
    if not len(kept):
        return rows + _undefined(head, "outside_lung", "no image has its lungs in view")
    result = outside_lung_probe(filled_pooled, sources[kept], labels[kept], patients[kept], seed, n_boot=n_boot)
    return rows + _rows(head, "outside_lung", result, class_names)


def _store_features(views: list[ViewPass], occlusion: bool) -> tuple[np.ndarray, tuple | None]:
    """The pretrained pass's pooled features of every image, and (row numbers, pooled) of the lung-filled copies."""
    pooled = np.concatenate([view.pooled.numpy() for view in views])
    if not occlusion:
        return pooled, None
    kept, filled, offset = [], [], 0
    for view in views:
        occluded = view.occlusion(np.arange(len(view)), with_images=False)
        kept.append(offset + occluded.images.indices["lung"])
        filled.append(occluded.pooled["lung"].numpy())
        offset += len(view)
    return pooled, (np.concatenate(kept), np.concatenate(filled))


def _model_features(model: ModelFold, inputs: GroupInputs, views: list[ViewPass], occlusion: bool,
                    accelerator: Accelerator, batch_size: int) -> tuple[np.ndarray, tuple | None]:
    """As :func:`_store_features` through ``model``'s own backbone, :data:`CHUNK` images at a time."""
    backbone = model.classifier.backbone

    def features(images: np.ndarray) -> np.ndarray:
        if not len(images):
            return np.empty((0, backbone.num_features), np.float32)
        return extract_features(backbone, images, inputs.mean, inputs.std, accelerator, batch_size).pooled.numpy()

    pooled, kept, filled, offset = [], [], [], 0
    for view in views:
        for start in range(0, len(view), CHUNK):
            rows = np.arange(start, min(start + CHUNK, len(view)))
            pooled.append(features(view.images(rows)))
            if occlusion:
                occluded = view.occlusion(rows, with_images=True)
                kept.append(offset + start + occluded.images.indices["lung"])
                filled.append(features(occluded.images.filled["lung"]))
        offset += len(view)
    pooled = np.concatenate(pooled)
    return pooled, (np.concatenate(kept), np.concatenate(filled)) if occlusion else None


def _rows(head: dict, probe: str, result: SourceProbeResult, class_names: list[str]) -> list[dict]:
    rows = []
    for item in result.classes:
        scale = 1 - item.chance if item.chance and math.isfinite(item.chance) else math.nan
        rows.append({
            **head, "probe": probe, "metric": PROBE_METRICS[probe], "value": result.value,
            "label": class_names[int(item.label)], "sources": "; ".join(item.sources), "n_images": item.n_images,
            "n_patients": item.n_patients, "n_folds": item.n_folds, "balanced_accuracy": item.balanced_accuracy,
            "chance": item.chance, "adjusted": item.adjusted, "ci_low": item.ci_low, "ci_high": item.ci_high,
            "adjusted_ci_low": (item.ci_low - item.chance) / scale, "adjusted_ci_high": (item.ci_high - item.chance) / scale,
            "fold_std": item.fold_std, "reason": item.reason,
        })
    return rows


def _undefined(head: dict, probe: str, reason: str) -> list[dict]:
    nan = {column: math.nan for column in PROBE_COLUMNS}
    return [{**nan, **head, "probe": probe, "metric": PROBE_METRICS[probe], "label": "", "sources": "",
             "n_images": 0, "n_patients": 0, "n_folds": 0, "reason": reason}]


def add_probe_columns(models: pd.DataFrame, probes: pd.DataFrame) -> pd.DataFrame:
    """models.csv's ``<probe metric>_mean`` / ``_std`` / ``_ci_low`` / ``_ci_high`` columns. A frozen model gets
    its group's pretrained-feature value, a model probed on its own backbone (``features = model``: fine-tuned,
    or audited) its own; the CI is the class's where exactly one class is defined (the mean of several classes'
    intervals is not an interval); models without probes get NaN."""
    models = models.copy()
    keys = [c for c in probes.columns if c not in PROBE_COLUMNS]  # the group columns and data axes
    model_ids = probes["model_id"].fillna("").astype(str) if "model_id" in probes else pd.Series("", probes.index)
    for probe, metric in PROBE_METRICS.items():
        values = {column: np.full(len(models), np.nan) for column in ("mean", "std", "ci_low", "ci_high")}
        selected = probes[probes["probe"] == probe]
        for (group, model_id), rows in selected.groupby([selected[keys].apply(tuple, axis=1), model_ids[selected.index]],
                                                        sort=False):
            if model_id:
                match = (models["model_id"] == model_id).to_numpy()
            elif (rows["features"] == "model").all():  # an audit's rows written before they named the model
                match = np.ones(len(models), bool)
            else:
                match = ~models["finetune"].astype(bool).to_numpy()
            if not model_id:
                for column, value in zip(keys, group):
                    match &= (models[column] == value).to_numpy()
            defined = rows[rows["reason"].fillna("") == ""]
            values["mean"][match] = rows["value"].iloc[0]
            if len(defined) == 1:
                values["ci_low"][match] = defined["adjusted_ci_low"].iloc[0]
                values["ci_high"][match] = defined["adjusted_ci_high"].iloc[0]
        for column, array in values.items():
            models[f"{metric}_{column}"] = array
    return models


def probe_notes(models: pd.DataFrame, probes: pd.DataFrame) -> list[str]:
    """What the probes found, one line per group and probe where a class's source is readable."""
    notes = []
    if (probes["features"] == "pretrained").any() and models["finetune"].astype(bool).any():
        notes.append("Shortcut probes read the pretrained backbone's features for the frozen models (the features "
                     "their heads read) and each fine-tuned model's own backbone (fold 0) for that model (probes.csv, "
                     "column features).")
    for row in probes[probes["reason"].fillna("") == ""].itertuples():
        if row.adjusted_ci_low > 0:
            where = "with the lungs filled" if row.probe == "outside_lung" else "in the intact images"
            whose = f"model {row.model_id}" if isinstance(row.model_id, str) and row.model_id else row.backbone
            notes.append(
                f"Source readable within class {row.label} {where} ({whose}, {row.frame}, task {row.task}): "
                f"a linear probe tells {row.sources} apart with balanced accuracy {row.balanced_accuracy:.2f} "
                f"[{row.ci_low:.2f}, {row.ci_high:.2f}] vs chance {row.chance:.2f} (probes.csv). A model of these "
                "features has a source shortcut available (DeGrave et al. 2021)."
            )
    return notes
