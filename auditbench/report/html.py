"""Render report.html from a run's output folder alone (`auditbench report DIR`)."""
from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from auditbench.report.overlays import colorbar_png
from auditbench.report.tables import (
    GALLERY_DIR,
    INTERNAL_SPLIT,
    SEPARATES_AUROC,
    ResultTables,
    as_bool,
    load_metrics,
    read_tables,
)

REPORT_FILE = "report.html"
TEMPLATE = "report.html.j2"
RANKING_METRICS = [
    "accuracy", "balanced_accuracy", "roc_auc", "lung_mass", "border_mass", "artifact_mass",
    "lung_enrichment", "artifact_enrichment", "pointing_game", "shortcut_reliance", "shortcut_accuracy_drop",
]
OCCLUSION_SUFFIX = "_occlusion_effect"
CROP_METRICS = ["accuracy", "lung_mass", "border_mass", "artifact_mass"]
SCATTER_AXES = ("accuracy", "lung_mass")
SHORTCUT_AXIS = "shortcut_strength"
RELIANCE_COLUMN = "shortcut_reliance_mean"
RELIANCE_THRESHOLD = 0.1
"""Scatter colour: a model "relies on the marker" when its mean shortcut_reliance exceeds this
(the protocol's default validation.reliance_threshold; summary.json need not hold it)."""
ALL_FRAMES = "all"
"""validation.csv: the frame of the stratified rows (models compared only within a frame)."""
CONFUSION_COUNTS = ["tn", "fp", "fn", "tp"]
EXTERNAL_DROP = 0.10
"""External accuracy this far below internal is shown in red."""

_SVG = {"width": 620, "height": 380, "left": 60, "right": 20, "top": 20, "bottom": 50}


def render_report(out_dir: Path | str) -> Path:
    """Write ``out_dir/report.html`` from the folder's tables and gallery PNGs; return its path."""
    out_dir = Path(out_dir)
    html = render_html(read_tables(out_dir))
    path = out_dir / REPORT_FILE
    path.write_text(html, encoding="utf-8")
    return path


def render_html(tables: ResultTables) -> str:
    """The report as one self-contained HTML string; every string from the data is escaped."""
    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(TEMPLATE).render(**build_context(tables))


def build_context(tables: ResultTables) -> dict[str, Any]:
    """Everything the template shows, as plain values (numbers already formatted)."""
    directions = _directions(tables.summary)
    models = tables.models.sort_values("rank", kind="stable").reset_index(drop=True)
    classes = _class_names(tables.images)
    return {
        "run": _run_info(tables),
        "selection": _selection_info(tables, directions),
        "ranking": _ranking(tables, models, directions),
        "scatter": _scatter(tables, models, directions),
        "crop": _crop_pairs(tables, models),
        "validation": _validation(tables.validation),
        "external": _external(tables, models, classes),
        "confusion": _confusion(tables.results, models, classes),
        "gallery": _gallery(tables, models),
        "data": _data_info(tables),
        "colorbar": _data_uri(colorbar_png()),
        "separates_auroc": SEPARATES_AUROC,
        "external_drop": EXTERNAL_DROP,
    }


# --- header -----------------------------------------------------------------------------------


def _run_info(tables: ResultTables) -> dict[str, Any]:
    s = tables.summary
    warnings = s.get("warnings") or {}
    return {
        "name": _text(s.get("name", "")) or (tables.out_dir.name if tables.out_dir else ""),
        "seed": _text(s.get("seed", "")),
        "device": _text(s.get("device", "")),
        "date": _text(s.get("finished") or s.get("started") or ""),
        "version": _text(s.get("auditbench_version", "")),
        "run_id": _text(s.get("run_id", "")),
        "protocol_sha256": _text(s.get("protocol_sha256", "")),
        "n_models": len(tables.models),
        "n_images": s.get("n_images", tables.images["sample_id"].nunique()),
        "n_skipped": len(tables.skipped),
        "notes": [_text(n) for n in _as_list(s.get("notes"))],
        "warnings": [(_text(k), _text(v)) for k, v in warnings.items()] if isinstance(warnings, dict) else [],
        "cam_layers": _pairs(s.get("cam_layers")),
        "stage_seconds": [(k, _fmt(v, 1)) for k, v in _pairs(s.get("stage_seconds"), raw=True)],
        "package_versions": _pairs(s.get("package_versions")),
    }


def _selection_info(tables: ResultTables, directions: dict[str, bool]) -> dict[str, Any]:
    rule = _rule(tables.summary)
    primary = _text(rule.get("primary", ""))
    return {
        "selected": tables.selected_model,
        "primary": primary,
        "primary_direction": _direction_words(directions.get(primary)),
        "constraints": [
            {"metric": metric, "sign": "≥" if bound == "min" else "≤", "bound": bound, "value": _text(value),
             "direction": _direction_words(directions.get(metric))}
            for metric, bound, value in _constraints(rule)
        ],
        "pareto": ", ".join(map(_text, _as_list(rule.get("pareto")))),
    }


def _rule(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json's ``selection`` {primary, constraints, pareto}; {} when absent or malformed."""
    rule = summary.get("selection")
    return rule if isinstance(rule, dict) else {}


def _constraints(rule: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(metric, "min"|"max", value) from ``{metric: {min, max}}`` or ``[{metric, min, max}, ...]``."""
    constraints = rule.get("constraints")
    if isinstance(constraints, dict):
        entries = [{"metric": metric, **bounds} for metric, bounds in constraints.items() if isinstance(bounds, dict)]
    elif isinstance(constraints, list):
        entries = [c for c in constraints if isinstance(c, dict) and "metric" in c]
    else:
        return []
    return [(str(c["metric"]), bound, c[bound]) for c in entries for bound in ("min", "max")
            if c.get(bound) is not None]


# --- ranking and scatter ----------------------------------------------------------------------


def _ranking(tables: ResultTables, models: pd.DataFrame, directions: dict[str, bool]) -> dict[str, Any]:
    available = set(tables.metrics)
    rule = _rule(tables.summary)
    constraints = _constraints(rule)
    extra = [m for m in [rule.get("primary"), *(c[0] for c in constraints)] if m and m not in RANKING_METRICS]
    occlusion = sorted(m for m in available if m.endswith(OCCLUSION_SUFFIX))
    metrics = [m for m in dict.fromkeys([*RANKING_METRICS, *occlusion, *extra]) if m in available]
    varying, constant = _split_grid(tables, models)
    descriptions = _descriptions()
    rows = []
    for _, row in models.iterrows():
        cells = []
        for metric in metrics:
            mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
            broken = any(_violates(mean, bound, value) for m, bound, value in constraints if m == metric)
            cells.append({"mean": _fmt(mean), "std": "" if _isnan(std) or _isnan(mean) else _fmt(std),
                          "ci": "" if _isnan(mean) else _ci(row, metric),
                          "bad": broken, "na": _isnan(mean)})
        unverified = _items(row.get("unverified"))
        rows.append({
            "rank": _fmt_int(row["rank"]),
            "model_id": _text(row["model_id"]),
            "config": [_text(row[c]) for c in varying],
            "cells": cells,
            "meets": bool(row["meets_constraints"]),
            "violations": _items(row["violations"]) or ["violates"],
            "unverified": unverified,
            "verified": not unverified and bool(row.get("verified", True)),
            "not_applicable": _text(row["not_applicable"]),
            "frame": _text(row.get("frame")),
            "geometry": _geometry(row),
            "pareto": bool(row["pareto"]),
            "selected": bool(row["selected"]),
        })
    return {
        "config_columns": varying,
        "constant": constant,
        "metrics": [{"name": m, "arrow": _arrow(directions.get(m)), "title": descriptions.get(m, "")}
                    for m in metrics],
        "rows": rows,
        "has_frame": any(r["frame"] or r["geometry"] for r in rows),
    }


def _ci(row: pd.Series, metric: str, digits: int = 2) -> str:
    """``[low, high]`` from ``<metric>_ci_low``/``_ci_high``; "" where the columns are absent or NaN."""
    low, high = _number(row.get(f"{metric}_ci_low")), _number(row.get(f"{metric}_ci_high"))
    if math.isnan(low) or math.isnan(high):
        return ""
    return f"[{_fmt(low, digits)}, {_fmt(high, digits)}]"


def _geometry(row: pd.Series) -> str:
    """The explained map's geometry, e.g. ``4×4 map, stride 32 px``; "" where unknown."""
    size, stride = _number(row.get("cam_map_size")), _number(row.get("cam_stride"))
    parts = []
    if not math.isnan(size):
        parts.append(f"{_fmt_int(size)}×{_fmt_int(size)} map")
    if not math.isnan(stride):
        parts.append(f"stride {_fmt(stride, 0) if stride == round(stride) else _fmt(stride, 1)} px")
    return ", ".join(parts)


def _items(value: Any) -> list[str]:
    """The ``;``-separated entries of a text cell (violations, unverified)."""
    return [v.strip() for v in _text(value).split(";") if v.strip()]


def _scatter(tables: ResultTables, models: pd.DataFrame, directions: dict[str, bool]) -> dict[str, Any] | None:
    """Models on the selection's Pareto axes (accuracy vs lung_mass unless summary.json says otherwise)."""
    axes = _rule(tables.summary).get("pareto")
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
    x_ci = _ci_columns(models, x_name)
    y_ci = _ci_columns(models, y_name)
    x_ticks, (xlo, xhi), x_digits = _axis(pd.concat([x[shown], *(c[shown] for c in x_ci or ())]).dropna())
    y_ticks, (ylo, yhi), y_digits = _axis(pd.concat([y[shown], *(c[shown] for c in y_ci or ())]).dropna())

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
        title = f"#{_fmt_int(row['rank'])} {row['model_id']}: {x_name} {_fmt(x[i])}, {y_name} {_fmt(y[i])}"
        if reliance is not None:
            title += f", shortcut_reliance {_fmt(reliance[i])}"
            kind = "unknown" if math.isnan(reliance[i]) else ("shortcut" if reliance[i] > RELIANCE_THRESHOLD else "clean")
        elif shortcut is not None:
            title += f", {SHORTCUT_AXIS} {row[SHORTCUT_AXIS]}"
            kind = "shortcut" if shortcut[i] else "clean"
        else:
            kind = "clean"
        whiskers = []
        for ci, axis, at, across in ((x_ci, "x", py(y[i]), px), (y_ci, "y", px(x[i]), py)):
            if ci is None or _isnan(ci[0][i]) or _isnan(ci[1][i]):
                continue
            whiskers.append({"axis": axis, "at": at, "lo": across(ci[0][i]), "hi": across(ci[1][i])})
        points.append({
            "x": px(x[i]), "y": py(y[i]), "rank": _fmt_int(row["rank"]), "title": title,
            "kind": kind, "whiskers": whiskers,
            "selected": selected is not None and str(row["model_id"]) == selected,
        })
    # Along the front, sorted from worst to best x, each step holds x and drops y to the next point's
    # level: the boundary of the region the front dominates, whatever each axis's direction.
    sx, sy = (1 if directions.get(name, True) else -1 for name in (x_name, y_name))
    front = models.assign(_x=x, _y=y, _gx=sx * x, _gy=sy * y)[shown & as_bool(models["pareto"])]
    front = front.sort_values(["_gx", "_gy"], ascending=[True, False])
    path = ""
    for k, (fx, fy) in enumerate(zip(front["_x"], front["_y"])):
        path += f"M{px(fx)},{py(fy)}" if k == 0 else f" V{py(fy)} H{px(fx)}"
    return {
        "width": w, "height": h, "x0": x0, "x1": x1, "y0": y0, "y1": y1,
        "x_ticks": [{"pos": px(t), "label": _fmt(t, x_digits)} for t in x_ticks],
        "y_ticks": [{"pos": py(t), "label": _fmt(t, y_digits)} for t in y_ticks],
        "x_label": x_name, "y_label": y_name, "x_arrow": _arrow(directions.get(x_name)),
        "y_arrow": _arrow(directions.get(y_name)), "points": points, "front": path,
        "colour_by": "reliance" if reliance is not None else ("strength" if shortcut is not None else None),
        "has_unknown": any(p["kind"] == "unknown" for p in points),
        "reliance_threshold": RELIANCE_THRESHOLD,
        "has_ci": bool(x_ci or y_ci),
        "omitted": [_text(m) for m in models.loc[~shown, "model_id"]],
    }


def _ci_columns(models: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series] | None:
    """(ci_low, ci_high) of a metric as numbers; None where models.csv has no such columns."""
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    if low not in models or high not in models:
        return None
    return pd.to_numeric(models[low], errors="coerce"), pd.to_numeric(models[high], errors="coerce")


def _axis(values: pd.Series) -> tuple[list[float], tuple[float, float], int]:
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


# --- crop, validation, external sets, confusion -----------------------------------------------


def _crop_pairs(tables: ResultTables, models: pd.DataFrame) -> dict[str, Any] | None:
    if "crop" not in models:
        return None
    metrics = [m for m in CROP_METRICS if f"{m}_mean" in models]
    keys = [c for c in tables.grid_columns if c not in ("model_id", "crop")]
    varying, _ = _split_grid(tables, models)
    shown = [c for c in varying if c != "crop"]
    crop = as_bool(models["crop"])
    pairs = []
    for _, group in models.assign(_crop=crop).groupby([models[k].astype(str) for k in keys], sort=False):
        without, with_ = group[~group["_crop"]], group[group["_crop"]]
        if len(without) == 1 and len(with_) == 1:
            pairs.append((without.iloc[0], with_.iloc[0]))
    rows = [{
        "config": [_text(a[c]) for c in shown],
        "ids": (_text(a["model_id"]), _text(b["model_id"])),
        "pairs": [(_fmt(a[f"{m}_mean"]), _fmt(b[f"{m}_mean"])) for m in metrics],
    } for a, b in pairs]
    mean = [(_fmt(_nanmean([a[f"{m}_mean"] for a, _ in pairs])), _fmt(_nanmean([b[f"{m}_mean"] for _, b in pairs])))
            for m in metrics] if pairs else []
    return {"metrics": metrics, "config_columns": shown, "rows": rows, "mean": mean}


def _validation(validation: pd.DataFrame) -> dict[str, Any] | None:
    """The stratified ("all") rows as the main table, the per-frame rows apart."""
    if validation.empty:
        return None
    frames = (validation["frame"].map(_text) if "frame" in validation
              else pd.Series(ALL_FRAMES, index=validation.index))
    order = {m: k for k, m in enumerate(dict.fromkeys(validation["metric"].map(_text)))}
    main, per_frame = [], []
    for i, row in validation.iterrows():
        entry = _validation_row(row, frames[i])
        (main if frames[i] in (ALL_FRAMES, "") else per_frame).append(entry)
    if not main:  # no stratified rows: the per-frame rows are all there is
        main, per_frame = per_frame, []
    per_frame.sort(key=lambda r: order.get(r["metric"], len(order)))
    return {"main": main, "per_frame": per_frame,
            "frames": list(dict.fromkeys(r["frame"] for r in per_frame))}


def _validation_row(row: pd.Series, frame: str) -> dict[str, Any]:
    def get(name: str, old: str | None = None) -> Any:  # old: the column's name before the schema change
        return row.get(name, row.get(old) if old else None)

    auroc, ci_low = _number(row["auroc"]), _number(get("auroc_ci_low"))
    if math.isnan(auroc):
        verdict, cls = "cannot tell (needs relying and non-relying models in one frame)", "na"
    elif bool(row["separates"]):
        verdict, cls = "separates", "good"
    elif auroc >= SEPARATES_AUROC and not math.isnan(ci_low) and ci_low <= 0.5:
        verdict, cls = "does not separate (CI reaches 0.5)", "bad"
    else:
        verdict, cls = "does not separate", "bad"
    return {
        "metric": _text(row["metric"]), "kind": _text(row["kind"]), "frame": _text(frame),
        "arrow": _arrow(bool(row["higher_is_better"])),
        "n_models": _fmt_int(get("n_models")),
        "n_relying": _fmt_int(get("n_relying", "n_shortcut_models")),
        "n_not_relying": _fmt_int(get("n_not_relying", "n_clean_models")),
        "mean_relying": _fmt(get("mean_relying", "mean_shortcut")),
        "mean_not_relying": _fmt(get("mean_not_relying", "mean_clean")),
        "auroc": _fmt(auroc, 2), "auroc_ci": _interval(get("auroc_ci_low"), get("auroc_ci_high")),
        "spearman": _fmt(get("spearman"), 2, signed=True),
        "spearman_ci": _interval(get("spearman_ci_low"), get("spearman_ci_high"), signed=True),
        "verdict": verdict, "cls": cls,
    }


def _interval(low: Any, high: Any, signed: bool = False) -> str:
    if _isnan(low) or _isnan(high):
        return ""
    return f"[{_fmt(low, 2, signed)}, {_fmt(high, 2, signed)}]"


def _external(tables: ResultTables, models: pd.DataFrame, classes: dict[int, str]) -> dict[str, Any] | None:
    results, images = tables.results, tables.images
    splits = [s for s in dict.fromkeys(results["split"]) if s != INTERNAL_SPLIT]
    if not splits:
        return None
    accuracy = (results[results["metric"] == "accuracy"]
                .assign(value=lambda f: pd.to_numeric(f["value"], errors="coerce"))
                .groupby(["model_id", "split"])["value"].mean())
    positive = _predicted_positive(images)
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
            acc = accuracy.get((model, split), math.nan)
            mask = (images["model_id"] == model) & (images["split"] == split)
            rate = float(positive[mask].mean()) if mask.any() else math.nan
            cells.append({
                "accuracy": _fmt(acc), "change": _fmt(acc - internal, signed=True),
                "drop": not _isnan(acc - internal) and acc - internal <= -EXTERNAL_DROP,
                "rates": [(classes.get(1, "positive"), _percent(rate)), (classes.get(0, "negative"), _percent(1 - rate))],
            })
        rows.append({"model_id": _text(model), "internal": _fmt(internal), "cells": cells})
    return {"sets": sets, "rows": rows}


def _confusion(results: pd.DataFrame, models: pd.DataFrame, classes: dict[int, str]) -> dict[str, Any]:
    counts = results[(results["split"] == INTERNAL_SPLIT) & results["metric"].isin(CONFUSION_COUNTS)]
    totals = (counts.assign(value=pd.to_numeric(counts["value"], errors="coerce"))
              .groupby(["model_id", "metric"])["value"].sum(min_count=1))
    matrices = []
    for model in models["model_id"]:
        values = {c: totals.get((model, c), math.nan) for c in CONFUSION_COUNTS}
        if all(_isnan(v) for v in values.values()):
            continue
        matrices.append({"model_id": _text(model), **{c: _fmt_int(v) for c, v in values.items()}})
    return {"matrices": matrices, "negative": classes.get(0, "negative"), "positive": classes.get(1, "positive")}


# --- gallery and data -------------------------------------------------------------------------


def _gallery(tables: ResultTables, models: pd.DataFrame) -> list[dict[str, Any]]:
    gallery = tables.gallery
    out = []
    for model in models["model_id"]:
        part = gallery[gallery["model_id"] == model]
        part = part.assign(_order=(part["kind"] != "best").astype(int)).sort_values(["_order", "lung_mass"],
                                                                                    ascending=[True, False])
        items = [{
            "kind": _text(r["kind"]), "sample_id": _text(r["sample_id"]), "label": _text(r["label"]),
            "fold": _fmt_int(r["fold"]), "p": _fmt(r["p_positive"]), "lung_mass": _fmt(r["lung_mass"]),
            "file": _text(r["file"]), "uri": _gallery_uri(tables.out_dir, r["file"]),
        } for _, r in part.iterrows()]
        if items:
            out.append({"model_id": _text(model), "figures": items})
    return out


def _gallery_uri(out_dir: Path | None, name: Any) -> str | None:
    """Data URI of a gallery PNG; None when absent or outside the output folder (never embed other files)."""
    if out_dir is None or not isinstance(name, str) or not name:
        return None
    root = out_dir.resolve()
    for candidate in (root / name, root / GALLERY_DIR / name):
        path = candidate.resolve()
        if path.is_relative_to(root) and path.suffix.lower() == ".png" and path.is_file():
            return _data_uri(path.read_bytes())
    return None


def _data_info(tables: ResultTables) -> dict[str, Any]:
    images = tables.images.drop_duplicates(["split", "source", "sample_id"])
    counts = images.groupby(["source", "mask_source"]).size().unstack(fill_value=0)
    skipped = tables.skipped
    return {
        "mask_columns": [_text(c) for c in counts.columns],
        "mask_rows": [(_text(source), [int(v) for v in row]) for source, row in counts.iterrows()],
        "splits": [(_text(k), int(v)) for k, v in images["split"].value_counts(sort=False).items()],
        "skipped": [(_text(r["path"]), _text(r["reason"]), _text(r["source"])) for _, r in skipped.iterrows()],
    }


# --- helpers ----------------------------------------------------------------------------------


def _directions(summary: dict[str, Any]) -> dict[str, bool]:
    """metric -> higher is better; the metric registry wins over summary.json's copy."""
    declared = summary.get("metric_directions")
    declared = declared if isinstance(declared, dict) else {}
    directions = {str(k): v == "higher" for k, v in declared.items() if v in ("higher", "lower")}
    registry = load_metrics()
    if registry is not None:
        directions.update({name: bool(info.higher_is_better) for name, info in registry.items()})
    return directions


def _descriptions() -> dict[str, str]:
    registry = load_metrics()
    return {name: str(info.description) for name, info in registry.items()} if registry is not None else {}


def _split_grid(tables: ResultTables, models: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]]]:
    """Grid columns that differ between models, and (column, value) of those that do not."""
    varying, constant = [], []
    for column in tables.grid_columns:
        if column == "model_id":
            continue
        values = models[column].astype(str).unique()
        if len(values) > 1:
            varying.append(column)
        else:
            constant.append((column, _text(models[column].iloc[0])))
    return varying, constant


def _class_names(images: pd.DataFrame) -> dict[int, str]:
    """label_index -> the labels seen with it on the internal split ("normal / viral" when several)."""
    internal = images[images["split"] == INTERNAL_SPLIT]
    index = pd.to_numeric(internal["label_index"], errors="coerce")
    names: dict[int, str] = {}
    for i in (0, 1):
        labels = sorted(set(internal.loc[index == i, "label"].astype(str)))
        if labels:
            names[i] = " / ".join(labels)
    return names


def _predicted_positive(images: pd.DataFrame) -> pd.Series:
    """Whether each image row was predicted as class 1, from ``prediction`` as index or label name."""
    prediction = images["prediction"]
    numeric = pd.to_numeric(prediction, errors="coerce")
    if numeric.notna().all():
        return numeric == 1
    positive = set(images.loc[pd.to_numeric(images["label_index"], errors="coerce") == 1, "label"].astype(str))
    if positive:
        return prediction.astype(str).isin(positive)
    return pd.to_numeric(images["p_positive"], errors="coerce") >= 0.5


def _violates(mean: Any, bound: str, value: Any) -> bool:
    mean, value = _number(mean), _number(value)
    if math.isnan(mean) or math.isnan(value):
        return False
    return mean < value if bound == "min" else mean > value


def _pairs(mapping: Any, raw: bool = False) -> list[tuple[str, Any]]:
    if not isinstance(mapping, dict):
        return []
    return [(_text(k), v if raw else _text(v)) for k, v in mapping.items()]


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _arrow(higher: bool | None) -> str:
    return "" if higher is None else ("↑" if higher else "↓")


def _direction_words(higher: bool | None) -> str:
    return "" if higher is None else ("higher is better" if higher else "lower is better")


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _isnan(value: Any) -> bool:
    return math.isnan(_number(value))


def _nanmean(values: list[Any]) -> float:
    numbers = [_number(v) for v in values if not _isnan(v)]
    return sum(numbers) / len(numbers) if numbers else math.nan


def _fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    number = _number(value)
    if math.isnan(number):
        return "n/a"
    return f"{number:+.{digits}f}" if signed else f"{number:.{digits}f}"


def _fmt_int(value: Any) -> str:
    number = _number(value)
    return "n/a" if math.isnan(number) else str(int(round(number)))


def _percent(rate: float) -> str:
    return "n/a" if math.isnan(rate) else f"{100 * rate:.0f}%"


def _text(value: Any) -> str:
    """Display text of a cell; blanks and NaN become ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
