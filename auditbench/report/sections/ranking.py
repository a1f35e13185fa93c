"""The ranking table: every model in rank order with its constraints and metric means."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from auditbench.report.formatting import arrow, ci, fmt, fmt_int, isnan, items, number, text
from auditbench.report.rule import constraints, descriptions, selection_rule, violates
from auditbench.report.tables import ResultTables

RANKING_METRICS = [
    "accuracy", "balanced_accuracy", "roc_auc", "lung_mass", "border_mass", "artifact_mass",
    "lung_enrichment", "artifact_enrichment", "pointing_game", "shortcut_reliance", "shortcut_accuracy_drop",
]
OCCLUSION_SUFFIX = "_occlusion_effect"


def ranking(tables: ResultTables, models: pd.DataFrame, directions: dict[str, bool]) -> dict[str, Any]:
    available = set(tables.metrics)
    rule = selection_rule(tables.summary)
    rule_constraints = constraints(rule)
    extra = [m for m in [rule.get("primary"), *(c.metric for c in rule_constraints)] if m and m not in RANKING_METRICS]
    occlusion = sorted(m for m in available if m.endswith(OCCLUSION_SUFFIX))
    metrics = [m for m in dict.fromkeys([*RANKING_METRICS, *occlusion, *extra]) if m in available]
    varying, constant = split_grid(tables, models)
    titles = descriptions()
    rows = []
    for _, row in models.iterrows():
        cells = []
        for metric in metrics:
            mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
            broken = any(violates(mean, c) for c in rule_constraints if c.metric == metric)
            cells.append({"mean": fmt(mean), "std": "" if isnan(std) or isnan(mean) else fmt(std),
                          "ci": "" if isnan(mean) else ci(row, metric),
                          "bad": broken, "na": isnan(mean)})
        unverified = items(row.get("unverified"))
        rows.append({
            "rank": fmt_int(row["rank"]),
            "model_id": text(row["model_id"]),
            "config": [text(row[c]) for c in varying],
            "cells": cells,
            "meets": bool(row["meets_constraints"]),
            "violations": items(row["violations"]) or ["violates"],
            "unverified": unverified,
            "verified": not unverified and bool(row.get("verified", True)),
            "not_applicable": text(row["not_applicable"]),
            "frame": text(row.get("frame")),
            "geometry": geometry(row),
            "pareto": bool(row["pareto"]),
            "selected": bool(row["selected"]),
        })
    return {
        "config_columns": varying,
        "constant": constant,
        "metrics": [{"name": m, "arrow": arrow(directions.get(m)), "title": titles.get(m, "")} for m in metrics],
        "rows": rows,
        "has_frame": any(r["frame"] or r["geometry"] for r in rows),
    }


def geometry(row: pd.Series) -> str:
    """The explained map's geometry, e.g. ``4×4 map, stride 32 px``; "" where unknown."""
    size, stride = number(row.get("cam_map_size")), number(row.get("cam_stride"))
    parts = []
    if not math.isnan(size):
        parts.append(f"{fmt_int(size)}×{fmt_int(size)} map")
    if not math.isnan(stride):
        parts.append(f"stride {fmt(stride, 0) if stride == round(stride) else fmt(stride, 1)} px")
    return ", ".join(parts)


def split_grid(tables: ResultTables, models: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]]]:
    """Grid columns that differ between models, and (column, value) of those that do not."""
    varying, constant = [], []
    for column in tables.grid_columns:
        if column == "model_id":
            continue
        if models[column].astype(str).nunique() > 1:
            varying.append(column)
        else:
            constant.append((column, text(models[column].iloc[0])))
    return varying, constant
