"""Stage 4 rows: what one evaluated split of one model x fold adds to results.csv and images.csv."""
from __future__ import annotations

import warnings

import numpy as np

from auditbench.audit.aggregate import lungs_removed_auc_value
from auditbench.audit.metrics import METRICS, classification_metrics
from auditbench.data.prepare import Frames
from auditbench.data.records import Sample
from auditbench.pipeline.records import THRESHOLD, CellResult
from auditbench.protocol.grid import ModelSpec

CLASSIFICATION_METRICS = [name for name, info in METRICS.in_registration_order() if info.kind == "classification"]
COUNT_METRICS = ["tn", "fp", "fn", "tp"]  # reported by classification_metrics, never registered: counts, not scores


def append_results_rows(result: CellResult, spec: ModelSpec, method: str, split: str, labels: np.ndarray,
                        p: np.ndarray, values: dict[str, np.ndarray], p_lungs_removed: np.ndarray | None = None) -> None:
    """Rows of results.csv (per fold) for one evaluated split: classification metrics, the
    mean of each per-image metric over the images where it is defined, and (with occluded
    copies) ``lungs_removed_auc``, the ROC AUC of p on the lung-filled copies (Maguolo & Nanni,
    Information Fusion 2021: a model that still separates the classes without lungs reads
    something else)."""
    fold = result.fold
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = classification_metrics(labels, p, THRESHOLD)
    for item in caught:  # identical messages counted, as for every other stage
        result.warnings[f"{split}: {item.message}"] += 1
    grid = {"model_id": spec.model_id, "method": method, **spec.grid_row()}
    for metric in CLASSIFICATION_METRICS + COUNT_METRICS:
        result.results_rows.append({**grid, "split": split, "fold": fold, "metric": metric, "value": float(scores[metric])})
    for metric, per_image in values.items():
        finite = per_image[np.isfinite(per_image)]
        value = float(finite.mean()) if len(finite) else float("nan")
        result.results_rows.append({**grid, "split": split, "fold": fold, "metric": metric, "value": value})
    if p_lungs_removed is not None:
        result.results_rows.append({**grid, "split": split, "fold": fold, "metric": "lungs_removed_auc",
                                    "value": lungs_removed_auc_value(p_lungs_removed, labels)})


def append_image_rows(result: CellResult, spec: ModelSpec, method: str, split: str, labels: np.ndarray,
                      p: np.ndarray, samples: list[Sample], frames: Frames, values: dict[str, np.ndarray],
                      p_lungs_removed: np.ndarray | None = None) -> None:
    """Rows of images.csv, one per evaluated image and explanation method."""
    fold = result.fold
    class_names = spec.task.class_names
    prediction = (p > THRESHOLD).astype(int)
    has_artifact = frames.artifact_footprint.reshape(len(p), -1).any(axis=1)
    border_in_view = frames.border_footprint.reshape(len(p), -1).any(axis=1)
    for i, sample in enumerate(samples):
        result.image_rows.append({
            "model_id": spec.model_id, "method": method, "fold": fold, "split": split, "sample_id": sample.sample_id,
            "source": sample.source, "patient_id": sample.patient_id, "path": sample.path,
            "label": class_names[labels[i]], "label_index": int(labels[i]),
            "prediction": class_names[prediction[i]], "p_positive": float(p[i]),
            "correct": bool(prediction[i] == labels[i]), "mask_source": sample.mask_source,
            "has_artifact": bool(has_artifact[i]), "artifact_status": str(frames.artifact_status[i]),
            "border_in_view": bool(border_in_view[i]),
            **{metric: float(per_image[i]) for metric, per_image in values.items()},
            **({} if p_lungs_removed is None else {"p_lungs_removed": float(p_lungs_removed[i])}),
        })
