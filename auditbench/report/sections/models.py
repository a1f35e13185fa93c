"""The per-model section: for each model shown (the selected one first, then by rank, bounded as the
decisions section is), its confusion matrix on every test split, its metrics with 95% CIs grouped by
kind, and its Grad-CAM maps per data source (gallery.csv's per-source examples, chosen by
pipeline/gallery.py). Everything comes from the result tables; nothing is recomputed from images."""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from auditbench.report.external import external_splits
from auditbench.report.formatting import arrow, ci, fmt, fmt_int, isnan, items, number, text
from auditbench.report.rule import constraints, descriptions, selection_rule, violates
from auditbench.report.sections.decisions import TRAIN_DISTRIBUTION, decision_models
from auditbench.report.sections.gallery import gallery_rows, gallery_uri
from auditbench.report.sections.ranking import geometry, split_grid
from auditbench.report.tables import INTERNAL_SPLIT, ResultTables, as_bool, load_metrics

MODEL_DETAILS = 6
"""Models the section shows: all of a grid this small, else the selected model and the best-ranked
others up to this many (as the decisions section)."""
CONFUSION_COUNTS = ("tn", "fp", "fn", "tp")
SOURCE_KINDS = {"source_correct": "correct", "source_wrong": "wrong"}
"""gallery.csv kinds of the per-source examples, and how a caption names them."""
KIND_ORDER = ("classification", "attention", "faithfulness", "occlusion", "behaviour", "probe")
KIND_TITLES = {"classification": "classification", "attention": "attention (Grad-CAM)",
               "faithfulness": "faithfulness of the maps (deletion, insertion, ROAD)",
               "occlusion": "occlusion (causal)", "behaviour": "behaviour", "probe": "probes", "other": "other"}
SOURCE_EXAMPLE_SOURCES = 8
"""pipeline/gallery.py's bound, restated for the page (the report imports nothing of the pipeline;
tests/test_report_models.py keeps the two equal): examples for the first this many sources of a
split by name."""
SOURCES_NAMED = 10
"""Sources without examples named per model; the rest are counted."""


def model_details(tables: ResultTables, classes: dict[int, str], directions: dict[str, bool]) -> dict[str, Any]:
    """What the template shows: one block per model of :func:`decision_models` (at most :data:`MODEL_DETAILS`)."""
    shown = decision_models(tables, MODEL_DETAILS)
    rows = {text(r["model_id"]): r for _, r in tables.models.iterrows()}
    varying, _ = split_grid(tables, tables.models)
    counts = _confusion_totals(tables.results)
    splits = [INTERNAL_SPLIT, *external_splits(tables)]
    examples = _source_examples(tables)
    out = []
    for model in shown:
        row = rows[model]
        unverified = items(row.get("unverified"))
        out.append({
            "model_id": model, "rank": fmt_int(row["rank"]), "selected": model == tables.selected_model,
            "pareto": bool(row["pareto"]), "meets": bool(row["meets_constraints"]),
            "verified": not unverified and bool(row.get("verified", True)),
            "violations": items(row["violations"]), "unverified": unverified,
            "config": [(c, text(row[c])) for c in varying],
            "frame": text(row.get("frame")), "geometry": geometry(row),
            "confusion": [m for split in splits if (m := _matrix(counts, model, split)) is not None],
            "metric_groups": _metric_groups(tables, row, directions),
            "sources": _sources(tables, model, examples),
        })
    return {"models": out, "n_models": len(tables.models), "limit": MODEL_DETAILS, "source_limit": SOURCE_EXAMPLE_SOURCES,
            "omitted": len(tables.models) - len(out), "has_examples": examples is not None,
            "negative": text(classes.get(0, "negative")), "positive": text(classes.get(1, "positive"))}


def _confusion_totals(results: pd.DataFrame) -> pd.Series:
    """tn, fp, fn, tp summed over folds, indexed by (model_id, split, metric)."""
    rows = results[results["metric"].isin(CONFUSION_COUNTS)]
    values = pd.to_numeric(rows["value"], errors="coerce")
    return values.groupby([rows["model_id"].map(text), rows["split"].map(text), rows["metric"]]).sum(min_count=1)


def _matrix(totals: pd.Series, model: str, split: str) -> dict[str, Any] | None:
    values = {c: totals.get((model, split, c), math.nan) for c in CONFUSION_COUNTS}
    if all(isnan(v) for v in values.values()):
        return None
    n = sum(number(v) for v in values.values() if not isnan(v))
    return {"split": split, "n": fmt_int(n), **{c: fmt_int(v) for c, v in values.items()}}


def _metric_groups(tables: ResultTables, row: pd.Series, directions: dict[str, bool]) -> list[dict[str, Any]]:
    """Every metric of models.csv but the confusion counts, grouped by the registry's kind."""
    registry = load_metrics()
    kinds = {name: str(info.kind) for name, info in registry.items()} if registry is not None else {}
    titles = descriptions()
    rule_constraints = constraints(selection_rule(tables.summary))
    not_applicable, unverified = items(row.get("not_applicable")), items(row.get("unverified"))
    groups: dict[str, list[dict[str, Any]]] = {}
    for metric in tables.metrics:
        if metric in CONFUSION_COUNTS:
            continue
        kind = kinds.get(metric) if kinds.get(metric) in KIND_ORDER else "other"
        mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
        status, cls = "", ""
        if isnan(mean):
            if metric in not_applicable:
                status, cls = "not applicable: its region is out of view by proof", "na"
            elif metric in unverified:
                status, cls = "undefined without proof: the constraint is unverified", "warn"
            else:
                status, cls = "undefined (no mask, blank maps or not measured)", "na"
        else:
            own = [c for c in rule_constraints if c.metric == metric]
            broken = [c for c in own if violates(mean, c)]
            if broken:
                status, cls = "✗ breaks " + ", ".join(c.describe() for c in broken), "bad"
            elif own:
                status, cls = "✓ meets " + ", ".join(c.describe() for c in own), "good"
        groups.setdefault(kind, []).append({
            "metric": metric, "arrow": arrow(directions.get(metric)), "title": titles.get(metric, ""),
            "mean": fmt(mean), "ci": "" if isnan(mean) else ci(row, metric),
            "std": "" if isnan(mean) or isnan(std) else fmt(std), "status": status, "cls": cls,
        })
    order = [*KIND_ORDER, "other"]
    return [{"kind": KIND_TITLES[k], "rows": groups[k]} for k in order if k in groups]


def _source_examples(tables: ResultTables) -> pd.DataFrame | None:
    """gallery.csv's per-source examples; None where the run wrote none (gallery off, an older run)."""
    rows = gallery_rows(tables)
    rows = rows[rows["kind"].isin(SOURCE_KINDS)]
    if rows.empty:
        return None
    return rows.assign(model_id=rows["model_id"].map(text), split=rows["split"].map(text),
                       source=rows["source"].map(text))


def _sources(tables: ResultTables, model: str, examples: pd.DataFrame | None) -> dict[str, Any]:
    """Per split and data source the model was scored on with maps: its evaluations, how many were
    wrong, and its example images; the sources that have none."""
    images = tables.images[tables.images["model_id"].map(text) == model]
    images = images[images["split"].map(text) != TRAIN_DISTRIBUTION]  # scored without maps
    order = {s: k for k, s in enumerate([INTERNAL_SPLIT, *external_splits(tables)])}
    groups = images.groupby([images["split"].map(text), images["source"].map(text)], sort=False)
    keys = sorted(groups.groups, key=lambda k: (order.get(k[0], len(order)), k[0], k[1]))
    mine = examples[examples["model_id"] == model] if examples is not None else None
    shown, without = [], []
    for split, source in keys:
        part = groups.get_group((split, source))
        wrong = int((~as_bool(part["correct"])).sum()) if "correct" in part else 0
        rows = mine[(mine["split"] == split) & (mine["source"] == source)] if mine is not None else None
        if rows is None or rows.empty:
            without.append(f"{source} ({split})")
            continue
        figures = []
        for kind, name in SOURCE_KINDS.items():
            found = rows[rows["kind"] == kind]
            figures.append(_figure(found.iloc[0], tables, name) if len(found)
                           else {"missing": f"no {name} call"})
        shown.append({"split": split, "source": source, "scored": len(part), "wrong": wrong, "figures": figures})
    return {"shown": shown, "without": without[:SOURCES_NAMED], "without_more": max(0, len(without) - SOURCES_NAMED),
            "n_without": len(without)}


def _figure(row: pd.Series, tables: ResultTables, name: str) -> dict[str, Any]:
    return {
        "kind": name, "sample_id": text(row["sample_id"]), "label": text(row["label"]),
        "prediction": text(row["prediction"]), "p": fmt(row["p_positive"]), "fold": fmt_int(row["fold"]),
        "split": text(row["split"]), "source": text(row["source"]), "file": text(row["file"]),
        "uri": gallery_uri(tables.out_dir, row["file"]),
    }
