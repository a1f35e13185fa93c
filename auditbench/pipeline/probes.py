"""Stage 4c: shortcut probes that need no masks, once per backbone pass (issue 8).

DeGrave, Janizek & Lee (Nature MI 2021): a classifier has a source shortcut *available* when the
image's source (data set, hospital) is readable from its features within one class. Per group of the
plan (one task x backbone x weights x frame x data cell) its first cell runs, on the group's pooled
features of every internal image and every external set's images (``audit.probes``):

- ``source``: the source probe on the intact images (``source_probe_accuracy``);
- ``outside_lung``: the same probe on the images with their lungs filled, the fill of
  ``lung_occlusion_effect`` (``outside_lung_probe_accuracy``).

In a run the features are the group's *pretrained* backbone's, the features a frozen model's head
reads: the values enter the models.csv rows of the group's frozen models. A fine-tuned model's backbone
is not probed (its rows stay NaN, and the run's notes say so). ``auditbench audit`` passes the audited
model's own backbone (``features = "model"``): its values are that model's, fine-tuned or not. Rows go
to probes.csv, one per group, probe and class.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from auditbench.audit.probes import SourceProbeResult, outside_lung_probe, source_probe
from auditbench.pipeline.plan import RunPlan
from auditbench.pipeline.records import CellKey, GroupInputs, frame_name, stable_seed
from auditbench.data.prepare import TaskData
from auditbench.protocol.grid import ModelSpec

PROBE_METRICS = {"source": "source_probe_accuracy", "outside_lung": "outside_lung_probe_accuracy"}
"""probes.csv's ``probe`` -> the registered metric its summary value is (``audit.metrics``)."""
GROUP_COLUMNS = ["task", "backbone", "weights", "crop"]
"""The grid columns that name a group; the data axes (synthetic data) follow them in probes.csv."""
PROBE_COLUMNS = [
    "frame", "features", "probe", "metric", "value", "label", "sources", "n_images", "n_patients", "n_folds",
    "balanced_accuracy", "chance", "adjusted", "ci_low", "ci_high", "adjusted_ci_low", "adjusted_ci_high",
    "fold_std", "reason",
]
"""probes.csv: after the group columns and data axes. ``value``: the probe's summary for the group
(mean ``adjusted`` over the classes where it is defined), the same on each of its class rows. ``features``:
``pretrained`` (a run's backbone pass) or ``model`` (an audited model's own backbone)."""


def probe_cells(plan: RunPlan) -> set[CellKey]:
    """The cell that carries each group's probes: its first model in plan order, first fold."""
    return {CellKey(group.cells[0][0].model_id, group.cells[0][1].index) for group in plan.groups if group.cells}


def probe_rows(protocol, spec: ModelSpec, inputs: GroupInputs, data: TaskData, own_backbone: bool = False) -> list[dict]:
    """probes.csv's rows for the group of ``spec``: both probes on the group's pooled features of the
    internal images (``test_view``: every image on real data) and of every external set. ``own_backbone``:
    the features are the model's own (an audit), not the pretrained backbone's."""
    views = [(inputs.test, data.test_view, np.asarray(data.labels))]
    views += [(inputs.external[name], samples, np.asarray(labels)) for name, (samples, labels) in data.external.items()]
    pooled = np.concatenate([view.pooled.numpy() for view, _, _ in views])
    samples = [sample for _, view_samples, _ in views for sample in view_samples]
    labels = np.concatenate([labels for _, _, labels in views])
    sources = np.array([sample.source for sample in samples])
    # A patient id is unique within its source only: two data sets may both have a patient "1".
    patients = np.array([f"{sample.source}/{sample.patient_id}" for sample in samples])
    class_names = spec.task.class_names
    seed = stable_seed(protocol.seed, "probe", spec.backbone, spec.weights, spec.crop, spec.task.name)
    n_boot = protocol.metrics.bootstrap
    head = {**{column: spec.grid_row()[column] for column in GROUP_COLUMNS}, **spec.data_axes,
            "frame": frame_name(inputs.frame), "features": "model" if own_backbone else "pretrained"}
    rows = _rows(head, "source", source_probe(pooled, sources, labels, patients, seed, n_boot=n_boot), class_names)
    if not all(view.has_occlusion for view, _, _ in views):
        return rows + _undefined(head, "outside_lung", "no lung-filled copies: metrics.occlusion is off")
    filled, kept = [], []
    offset = 0
    for view, _, _ in views:
        occluded = view.occlusion(np.arange(len(view)), with_images=False)
        kept.append(offset + occluded.images.indices["lung"])
        filled.append(occluded.pooled["lung"].numpy())
        offset += len(view)
    kept = np.concatenate(kept)
    if not len(kept):
        return rows + _undefined(head, "outside_lung", "no image has its lungs in view")
    result = outside_lung_probe(np.concatenate(filled), sources[kept], labels[kept], patients[kept], seed, n_boot=n_boot)
    return rows + _rows(head, "outside_lung", result, class_names)


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
    """models.csv's ``<probe metric>_mean`` / ``_std`` / ``_ci_low`` / ``_ci_high`` columns. Each frozen model
    gets its group's value (every model of the group where the features are the model's own); the CI is the
    class's where exactly one class is defined (the mean of several classes' intervals is not an interval);
    fine-tuned models and groups without probes get NaN."""
    models = models.copy()
    keys = [c for c in probes.columns if c not in PROBE_COLUMNS]  # the group columns and data axes
    for probe, metric in PROBE_METRICS.items():
        values = {column: np.full(len(models), np.nan) for column in ("mean", "std", "ci_low", "ci_high")}
        for group, rows in probes[probes["probe"] == probe].groupby(keys, sort=False, dropna=False):
            group = group if isinstance(group, tuple) else (group,)
            own = (rows["features"] == "model").all()
            match = np.ones(len(models), bool) if own else ~models["finetune"].astype(bool).to_numpy()
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
        notes.append("Shortcut probes read the pretrained backbone's features (the features a frozen model's head "
                     "reads); fine-tuned models are not probed and their probe metrics are NaN (probes.csv).")
    for row in probes[probes["reason"].fillna("") == ""].itertuples():
        if row.adjusted_ci_low > 0:
            where = "with the lungs filled" if row.probe == "outside_lung" else "in the intact images"
            notes.append(
                f"Source readable within class {row.label} {where} ({row.backbone}, {row.frame}, task {row.task}): "
                f"a linear probe tells {row.sources} apart with balanced accuracy {row.balanced_accuracy:.2f} "
                f"[{row.ci_low:.2f}, {row.ci_high:.2f}] vs chance {row.chance:.2f} (probes.csv). A model of these "
                "features has a source shortcut available (DeGrave et al. 2021)."
            )
    return notes
