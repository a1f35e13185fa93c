"""Sections that compare models: with and without the crop, the validation of each metric, the
external test sets and the confusion matrices."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from auditbench.report.external import (
    EXTERNAL_DROP,
    external_result,
    external_splits,
    mean_accuracy,
)
from auditbench.report.formatting import arrow, fmt, fmt_int, interval, nanmean, number, percent, text
from auditbench.report.sections.ranking import split_grid
from auditbench.report.tables import INTERNAL_SPLIT, METHOD_KINDS, SEPARATES_AUROC, ResultTables, as_bool

CROP_METRICS = ["accuracy", "lung_mass", "border_mass", "artifact_mass"]
ALL_FRAMES = "all"
"""validation.csv: the frame of the stratified rows (models compared only within a frame)."""
CONFUSION_COUNTS = ["tn", "fp", "fn", "tp"]


def crop_pairs(tables: ResultTables, models: pd.DataFrame) -> dict[str, Any] | None:
    if "crop" not in models:
        return None
    metrics = [m for m in CROP_METRICS if f"{m}_mean" in models]
    keys = [c for c in tables.grid_columns if c not in ("model_id", "crop")]
    varying, _ = split_grid(tables, models)
    shown = [c for c in varying if c != "crop"]
    crop = as_bool(models["crop"])
    pairs = []
    for _, group in models.assign(_crop=crop).groupby([models[k].astype(str) for k in keys], sort=False):
        without, with_ = group[~group["_crop"]], group[group["_crop"]]
        if len(without) == 1 and len(with_) == 1:
            pairs.append((without.iloc[0], with_.iloc[0]))
    rows = [{
        "config": [text(a[c]) for c in shown],
        "ids": (text(a["model_id"]), text(b["model_id"])),
        "pairs": [(fmt(a[f"{m}_mean"]), fmt(b[f"{m}_mean"])) for m in metrics],
    } for a, b in pairs]
    mean = [(fmt(nanmean([a[f"{m}_mean"] for a, _ in pairs])), fmt(nanmean([b[f"{m}_mean"] for _, b in pairs])))
            for m in metrics] if pairs else []
    return {"metrics": metrics, "config_columns": shown, "rows": rows, "mean": mean}


def validation(table: pd.DataFrame) -> dict[str, Any] | None:
    """The stratified ("all") rows as the main table, the per-frame rows apart."""
    if table.empty:
        return None
    if "method" in table:
        # Only the metrics of a method's maps depend on it; the others are shown once.
        first = table["method"].iloc[0]
        table = table[table["kind"].isin(METHOD_KINDS) | (table["method"] == first)].reset_index(drop=True)
    frames = table["frame"].map(text) if "frame" in table else pd.Series(ALL_FRAMES, index=table.index)
    order = {m: k for k, m in enumerate(dict.fromkeys(table["metric"].map(text)))}
    main, per_frame = [], []
    for i, row in table.iterrows():
        entry = validation_row(row, frames[i])
        (main if frames[i] in (ALL_FRAMES, "") else per_frame).append(entry)
    if not main:  # no stratified rows: the per-frame rows are all there is
        main, per_frame = per_frame, []
    per_frame.sort(key=lambda r: order.get(r["metric"], len(order)))
    return {"main": main, "per_frame": per_frame, "frames": list(dict.fromkeys(r["frame"] for r in per_frame))}


def validation_row(row: pd.Series, frame: str) -> dict[str, Any]:
    def get(name: str, old: str | None = None) -> Any:  # old: the column's name before the schema change
        return row.get(name, row.get(old) if old else None)

    auroc, ci_low = number(row["auroc"]), number(get("auroc_ci_low"))
    if number(get("n_models")) == 0:  # e.g. a source probe on data of one source
        verdict, cls = "undefined for every model", "na"
    elif math.isnan(auroc):
        verdict, cls = "cannot tell (needs relying and non-relying models in one stratum)", "na"
    elif bool(row["separates"]):
        verdict, cls = "separates", "good"
    elif auroc >= SEPARATES_AUROC and not math.isnan(ci_low) and ci_low <= 0.5:
        verdict, cls = "does not separate (CI reaches 0.5)", "bad"
    else:
        verdict, cls = "does not separate", "bad"
    method = text(row.get("method", "")) if row.get("kind") in METHOD_KINDS else "any"
    return {
        "metric": text(row["metric"]), "kind": text(row["kind"]), "frame": text(frame), "method": method,
        "arrow": arrow(bool(row["higher_is_better"])),
        "n_models": fmt_int(get("n_models")),
        "n_relying": fmt_int(get("n_relying", "n_shortcut_models")),
        "n_not_relying": fmt_int(get("n_not_relying", "n_clean_models")),
        "mean_relying": fmt(get("mean_relying", "mean_shortcut")),
        "mean_not_relying": fmt(get("mean_not_relying", "mean_clean")),
        "auroc": fmt(auroc, 2), "auroc_ci": interval(get("auroc_ci_low"), get("auroc_ci_high")),
        "spearman": fmt(get("spearman"), 2, signed=True),
        "spearman_ci": interval(get("spearman_ci_low"), get("spearman_ci_high"), signed=True),
        "verdict": verdict, "cls": cls,
    }


def external(tables: ResultTables, models: pd.DataFrame, classes: dict[int, str]) -> dict[str, Any] | None:
    splits = external_splits(tables)
    if not splits:
        return None
    images = tables.images
    accuracy = mean_accuracy(tables.results)
    sets = []
    for split in splits:
        part = images[images["split"] == split]
        labels = part.drop_duplicates("sample_id")["label"].value_counts()
        sets.append({"name": split, "n_images": part["sample_id"].nunique(),
                     "labels": ", ".join(f"{k} {v}" for k, v in labels.items())})
    rows = []
    for _, row in models.iterrows():
        model = row["model_id"]
        internal = accuracy.get((model, INTERNAL_SPLIT), math.nan)
        cells = []
        for split in splits:
            result = external_result(tables, model, split, accuracy)
            acc = result.accuracy if result else math.nan
            rate = result.positive_share if result else math.nan
            cells.append({
                "accuracy": fmt(acc), "change": fmt(acc - internal, signed=True),
                "drop": bool(result and result.accuracy_dropped),
                "rates": [(classes.get(1, "positive"), percent(rate)), (classes.get(0, "negative"), percent(1 - rate))],
            })
        rows.append({"model_id": text(model), "internal": fmt(internal), "cells": cells})
    return {"sets": sets, "rows": rows, "drop": EXTERNAL_DROP}


def confusion(results: pd.DataFrame, models: pd.DataFrame, classes: dict[int, str]) -> dict[str, Any]:
    counts = results[(results["split"] == INTERNAL_SPLIT) & results["metric"].isin(CONFUSION_COUNTS)]
    totals = (counts.assign(value=pd.to_numeric(counts["value"], errors="coerce"))
              .groupby(["model_id", "metric"])["value"].sum(min_count=1))
    matrices = []
    for model in models["model_id"]:
        values = {c: totals.get((model, c), math.nan) for c in CONFUSION_COUNTS}
        if all(math.isnan(number(v)) for v in values.values()):
            continue
        matrices.append({"model_id": text(model), **{c: fmt_int(v) for c, v in values.items()}})
    return {"matrices": matrices, "negative": classes.get(0, "negative"), "positive": classes.get(1, "positive")}
