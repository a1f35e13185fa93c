"""One row per model (models.csv): fold means, patient-level bootstrap CIs, map geometry, and
which undefined metrics are out of view by construction.

A metric that is NaN for a model is *not applicable* only when the masks prove its region is out
of the model's view: every test image's artifacts were removed by the crop (or the image has
none, by its mask), or the crop removed the whole border band. Any other NaN (no artifact mask,
blank maps) is left to selection as *unverified* (``selection.ranking``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from auditbench.audit.metrics import METRICS
from auditbench.audit.uncertainty import bootstrap_ci, mean_cis

INTERNAL = "internal"
TRAIN_DISTRIBUTION = "train_distribution"
GEOMETRY_COLUMNS = ["input_size", "frame", "cam_layer", "cam_map_size", "cam_stride"]
_ARTIFACT_OUT_OF_VIEW = ("out_of_view", "absent")


def add_accuracy_drop(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` plus internal rows of ``shortcut_accuracy_drop`` = accuracy on the
    train_distribution split minus accuracy on the internal (decorrelated) split, per model and fold."""
    accuracy = results[results["metric"] == "accuracy"]
    if TRAIN_DISTRIBUTION not in set(accuracy["split"]):
        return results
    keys = [c for c in results.columns if c not in ("split", "metric", "value")]
    by_split = accuracy.pivot_table(index=keys, columns="split", values="value", dropna=False)
    drop = (by_split[TRAIN_DISTRIBUTION] - by_split[INTERNAL]).rename("value").reset_index()
    drop["split"], drop["metric"] = INTERNAL, "shortcut_accuracy_drop"
    return pd.concat([results, drop[results.columns]], ignore_index=True)


def rank_auc(p: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank sum (ties 1/2); NaN with one class."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def lungs_removed_auc_value(p_lungs_removed: np.ndarray, y: np.ndarray) -> float:
    """ROC AUC of p on lung-filled copies (images without lungs in view left out); NaN with one class.
    The per-fold value of ``lungs_removed_auc`` (``audit.probes.lungs_removed_auc`` adds its CI)."""
    defined = np.isfinite(p_lungs_removed)
    return rank_auc(p_lungs_removed[defined], np.asarray(y)[defined])


def _balanced(correct: np.ndarray, y: np.ndarray) -> float:
    if y.all() or not y.any():
        return float("nan")
    return float((correct[y == 1].mean() + correct[y == 0].mean()) / 2)


def model_cis(images: pd.DataFrame, metrics: Sequence[str], n_boot: int, seed: int) -> dict[str, tuple[float, float]]:
    """95% CIs of one model's metrics over its internal test images (all folds), resampling
    patients: means of per-image values, and accuracy, sensitivity, specificity, balanced accuracy
    and ROC AUC recomputed on each resample (Efron & Tibshirani 1993; Field & Welsh 2007)."""
    groups = images["patient_id"].astype(str).to_numpy()
    y = images["label_index"].to_numpy(dtype=int)
    correct = images["correct"].to_numpy(dtype=float)
    columns = {"accuracy": correct, "sensitivity": np.where(y == 1, correct, np.nan),
               "specificity": np.where(y == 0, correct, np.nan)}
    columns.update({m: images[m].to_numpy(dtype=float) for m in metrics if m in images})
    names = list(columns)
    bounds = mean_cis(np.column_stack([columns[n] for n in names]), groups, n_boot, seed)
    out = {name: (float(low), float(high)) for name, (low, high) in zip(names, bounds)}
    p = images["p_positive"].to_numpy(dtype=float)
    out["roc_auc"] = bootstrap_ci(lambda i: rank_auc(p[i], y[i]), groups, n_boot, seed)
    out["balanced_accuracy"] = bootstrap_ci(lambda i: _balanced(correct[i], y[i]), groups, n_boot, seed)
    if "p_lungs_removed" in images:
        p_filled = images["p_lungs_removed"].to_numpy(dtype=float)
        out["lungs_removed_auc"] = bootstrap_ci(lambda i: lungs_removed_auc_value(p_filled[i], y[i]), groups, n_boot, seed)
    return out


def not_applicable(images: pd.DataFrame, means: pd.Series) -> list[str]:
    """Region metrics that are NaN for this model *because* their region is out of view."""
    if images.empty:
        return []
    artifact_gone = images["artifact_status"].isin(_ARTIFACT_OUT_OF_VIEW).all()
    border_gone = not images["border_in_view"].astype(bool).any()
    names = []
    for name, info in METRICS.items():
        if f"{name}_mean" not in means.index or not np.isnan(means[f"{name}_mean"]):
            continue
        if (info.region == "artifact" and artifact_gone) or (info.region == "border" and border_gone):
            names.append(name)
    return names


def aggregate_models(
    results: pd.DataFrame,
    images: pd.DataFrame,
    grid: pd.DataFrame,
    n_folds: int,
    geometry: dict[tuple[str, str], dict],
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """models.csv: one row per model and explanation method (``method``, in the order of first
    appearance in ``results``): grid columns, n_folds, map geometry (``geometry[(model_id, method)]``),
    then per metric ``_mean``, ``_std``, ``_ci_low``, ``_ci_high`` (CI over patients of the internal
    test images, pooled over folds; the mean is the mean over folds), then ``not_applicable``."""
    keys = ["model_id", "method"]
    internal = results[results["split"] == INTERNAL]
    stats = internal.groupby(keys + ["metric"], sort=False)["value"].agg(["mean", "std"]).unstack("metric")
    stats.columns = [f"{metric}_{stat}" for stat, metric in stats.columns]
    metrics = sorted({c.rsplit("_", 1)[0] for c in stats.columns})
    internal_images = images[images["split"] == INTERNAL] if len(images) else images
    by_model = dict(tuple(internal_images.groupby(keys, sort=False))) if len(internal_images) else {}
    ci_rows, na_rows = {}, {}
    for key in stats.index:
        rows = by_model.get(key, pd.DataFrame())
        cis = model_cis(rows, metrics, n_boot, seed) if len(rows) else {}
        ci_rows[key] = {f"{m}_ci_{side}": cis.get(m, (np.nan, np.nan))[k]
                        for m in metrics for k, side in enumerate(("low", "high"))}
        na_rows[key] = "; ".join(not_applicable(rows, stats.loc[key]))
    stats = stats.join(pd.DataFrame.from_dict(ci_rows, orient="index").rename_axis(keys))
    ordered = [f"{m}_{stat}" for m in metrics for stat in ("mean", "std", "ci_low", "ci_high") if f"{m}_{stat}" in stats]
    methods = list(dict.fromkeys(results["method"])) if len(results) else []
    # Grid order, each model's rows in method order.
    models = grid.merge(pd.DataFrame({"method": methods}), how="cross").set_index(keys)
    models["n_folds"] = n_folds
    for column in GEOMETRY_COLUMNS:
        models[column] = [geometry.get(key, {}).get(column) for key in models.index]
    models = models.join(stats[ordered])
    models["not_applicable"] = [na_rows.get(key, "") for key in models.index]
    return models.reset_index()
