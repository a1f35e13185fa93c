"""The scatter plot of models on the selection's Pareto axes, as inline SVG geometry."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from auditbench.report.formatting import arrow, fmt, fmt_int, isnan, text
from auditbench.report.rule import selection_rule
from auditbench.report.tables import ResultTables, as_bool

SCATTER_AXES = ("accuracy", "lung_mass")
SHORTCUT_AXIS = "shortcut_strength"
RELIANCE_COLUMN = "shortcut_reliance_mean"
RELIANCE_THRESHOLD = 0.1
"""Point colour: a model "relies on the marker" when its mean shortcut_reliance exceeds this
(the protocol's default validation.reliance_threshold; summary.json need not hold it)."""

_SVG = {"width": 620, "height": 380, "left": 60, "right": 20, "top": 20, "bottom": 50}


def scatter(tables: ResultTables, models: pd.DataFrame, directions: dict[str, bool]) -> dict[str, Any] | None:
    """Models on the selection's Pareto axes (accuracy vs lung_mass unless summary.json says otherwise)."""
    axes = selection_rule(tables.summary).get("pareto")
    x_name, y_name = (str(axes[0]), str(axes[1])) if isinstance(axes, list) and len(axes) == 2 else SCATTER_AXES
    if f"{x_name}_mean" not in models or f"{y_name}_mean" not in models:
        return None
    x = pd.to_numeric(models[f"{x_name}_mean"], errors="coerce")
    y = pd.to_numeric(models[f"{y_name}_mean"], errors="coerce")
    shown = x.notna() & y.notna()
    if not shown.any():
        return None
    selected = tables.selected_model
    w, h = _SVG["width"], _SVG["height"]
    x0, x1 = _SVG["left"], w - _SVG["right"]
    y0, y1 = h - _SVG["bottom"], _SVG["top"]
    x_ci, y_ci = ci_columns(models, x_name), ci_columns(models, y_name)
    x_ticks, (xlo, xhi), x_digits = axis(pd.concat([x[shown], *(c[shown] for c in x_ci or ())]).dropna())
    y_ticks, (ylo, yhi), y_digits = axis(pd.concat([y[shown], *(c[shown] for c in y_ci or ())]).dropna())

    def px(v: float) -> float:
        return round(x0 + (v - xlo) / (xhi - xlo) * (x1 - x0), 1)

    def py(v: float) -> float:
        return round(y0 + (v - ylo) / (yhi - ylo) * (y1 - y0), 1)

    reliance = pd.to_numeric(models[RELIANCE_COLUMN], errors="coerce") if RELIANCE_COLUMN in models else None
    if reliance is not None and reliance.isna().all():
        reliance = None
    shortcut = pd.to_numeric(models[SHORTCUT_AXIS], errors="coerce") > 0 if SHORTCUT_AXIS in models else None
    points = []
    for i, row in models[shown].iterrows():
        title = f"#{fmt_int(row['rank'])} {row['model_id']}: {x_name} {fmt(x[i])}, {y_name} {fmt(y[i])}"
        if reliance is not None:
            title += f", shortcut_reliance {fmt(reliance[i])}"
            kind = "unknown" if math.isnan(reliance[i]) else ("shortcut" if reliance[i] > RELIANCE_THRESHOLD else "clean")
        elif shortcut is not None:
            title += f", {SHORTCUT_AXIS} {row[SHORTCUT_AXIS]}"
            kind = "shortcut" if shortcut[i] else "clean"
        else:
            kind = "clean"
        whiskers = []
        for interval, name, at, across in ((x_ci, "x", py(y[i]), px), (y_ci, "y", px(x[i]), py)):
            if interval is None or isnan(interval[0][i]) or isnan(interval[1][i]):
                continue
            whiskers.append({"axis": name, "at": at, "lo": across(interval[0][i]), "hi": across(interval[1][i])})
        points.append({
            "x": px(x[i]), "y": py(y[i]), "rank": fmt_int(row["rank"]), "title": title,
            "kind": kind, "whiskers": whiskers,
            "selected": selected is not None and str(row["model_id"]) == selected,
        })
    # Along the front, sorted from worst to best x, each step holds x and drops y to the next point's
    # level: the boundary of the region the front dominates, whatever each axis's direction.
    sx, sy = (1 if directions.get(name, True) else -1 for name in (x_name, y_name))
    # copy(): models.csv read back has hundreds of columns; assign on a fragmented frame warns.
    front = models.copy().assign(_x=x, _y=y, _gx=sx * x, _gy=sy * y)[shown & as_bool(models["pareto"])]
    front = front.sort_values(["_gx", "_gy"], ascending=[True, False])
    path = ""
    for k, (fx, fy) in enumerate(zip(front["_x"], front["_y"])):
        path += f"M{px(fx)},{py(fy)}" if k == 0 else f" V{py(fy)} H{px(fx)}"
    return {
        "width": w, "height": h, "x0": x0, "x1": x1, "y0": y0, "y1": y1,
        "x_ticks": [{"pos": px(t), "label": fmt(t, x_digits)} for t in x_ticks],
        "y_ticks": [{"pos": py(t), "label": fmt(t, y_digits)} for t in y_ticks],
        "x_label": x_name, "y_label": y_name, "x_arrow": arrow(directions.get(x_name)),
        "y_arrow": arrow(directions.get(y_name)), "points": points, "front": path,
        "colour_by": "reliance" if reliance is not None else ("strength" if shortcut is not None else None),
        "has_unknown": any(p["kind"] == "unknown" for p in points),
        "reliance_threshold": RELIANCE_THRESHOLD,
        "has_ci": bool(x_ci or y_ci),
        "omitted": [text(m) for m in models.loc[~shown, "model_id"]],
    }


def ci_columns(models: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series] | None:
    """(ci_low, ci_high) of a metric as numbers; None where models.csv has no such columns."""
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    if low not in models or high not in models:
        return None
    return pd.to_numeric(models[low], errors="coerce"), pd.to_numeric(models[high], errors="coerce")


def axis(values: pd.Series) -> tuple[list[float], tuple[float, float], int]:
    """Ticks, range and label decimals; the range has a margin but stays within [0, 1] where the data does."""
    lo, hi = float(values.min()), float(values.max())
    span = max(hi - lo, 0.1)
    raw = span / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(s * magnitude for s in (1, 2, 5, 10) if s * magnitude >= raw)
    start = math.floor((lo - 0.08 * span) / step) * step
    stop = math.ceil((hi + 0.08 * span) / step) * step
    if lo >= 0:
        start = max(start, 0.0)
    if hi <= 1:
        stop = min(stop, 1.0)
    ticks = [round(t, 10) for t in np.arange(start, stop + step / 2, step)]
    return ticks, (start, stop), max(0, -math.floor(math.log10(step)))
