"""The model card of a run (model_card.json, model_card.md): the selected model, or where none is
selected the best-ranked one, saying so. Built from the result tables alone, as plain data; the
Markdown form is :mod:`auditbench.report.model_card_markdown`'s."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from auditbench.report.external import class_names, external_result, external_splits, mean_accuracy
from auditbench.report.findings import (
    OCCLUSION_SUFFIX,
    REGIONS,
    card_model,
    external_finding,
    validation_findings,
)
from auditbench.report.formatting import as_list, ci, fmt, items, number
from auditbench.report.rule import constraints, descriptions, directions, selection_rule, violates
from auditbench.report.sections.scatter import RELIANCE_THRESHOLD
from auditbench.report.tables import INTERNAL_SPLIT, ResultTables

SCHEMA = "auditbench-model-card/1"
CONFUSION_COUNTS = ("tn", "fp", "fn", "tp")
SKIPPED_LISTED = 20
"""The card lists this many skipped files; skipped.csv holds them all."""
PROVENANCE_KEYS = ["run_id", "protocol_sha256", "data_fingerprint", "git_commit", "auditbench_version", "seed",
                   "device", "started", "finished"]
INTENDED_USE = ("Research audit of shortcut learning and explainability in chest X-ray classifiers, trained and "
                "scored by auditbench. Not a medical device: not for diagnosis, triage, screening or any other "
                "clinical decision.")
LIMITATIONS = [
    "Trained and tested only on the data listed below; on other hospitals, scanners, populations or label "
    "definitions its behaviour is unknown, except on the external sets listed.",
    "Metrics are means over the cross-validation folds of the internal test split; brackets are 95% "
    "patient-level bootstrap intervals over the internal test images of all folds.",
    "Grad-CAM attention metrics (lung_mass, border_mass, artifact_mass and their enrichments) say where the "
    "explanation lies, not what the model needs; the occlusion effects are the causal checks.",
    "A shortcut that no mask marks (a source's scanner, resolution or population) shows only on an external "
    "set from other sources; where the run has none, nothing here rules such a shortcut out.",
]


AUDIT_INTENDED_USE = ("Research audit of shortcut learning and explainability in a chest X-ray classifier trained "
                      "elsewhere and scored by `auditbench audit`. Not a medical device: not for diagnosis, triage, "
                      "screening or any other clinical decision.")
AUDIT_METRICS_LIMITATION = ("Metrics are from one evaluation on every image of the audit's data (no folds: the "
                            "model was not trained here); brackets are 95% patient-level bootstrap intervals.")


def _use_and_limits(summary: dict) -> tuple[str, list[str]]:
    """A run trained and scored the model; an audit only scored it (summary.json ``mode``)."""
    if summary.get("mode") != "audit":
        return INTENDED_USE, LIMITATIONS
    return AUDIT_INTENDED_USE, [AUDIT_METRICS_LIMITATION if "cross-validation" in text else text.replace(
        "Trained and tested only on", "Tested here only on") for text in LIMITATIONS]


def build_model_card(tables: ResultTables) -> dict[str, Any]:
    """The card as JSON-ready data (numbers as numbers, undefined as None, text unescaped)."""
    row, selected = card_model(tables)
    model_id = str(row["model_id"])
    rule = selection_rule(tables.summary)
    status = ("selected by the run's selection rule" if selected else
              "not selected: no model meets the selection rule; this card describes the best-ranked model")
    return plain({
        "schema": SCHEMA,
        "model_id": model_id,
        "selected": selected,
        "status": status,
        "rank": int(row["rank"]) if not math.isnan(number(row["rank"])) else None,
        "n_models": len(tables.models),
        "configuration": {c: row[c] for c in tables.grid_columns if c != "model_id"},
        "model_frame": {c: row.get(c) for c in ("input_size", "frame", "cam_layer", "cam_map_size", "cam_stride")
                        if c in row.index},
        "intended_use": _use_and_limits(tables.summary or {})[0],
        "limitations": _use_and_limits(tables.summary or {})[1],
        "data": _data(tables, model_id),
        "selection": {
            "primary": rule.get("primary"),
            "constraints": [{"metric": c.metric, "bound": c.bound, "value": c.value,
                             "model_value": number(row.get(f"{c.metric}_mean")), "status": _status(row, c)}
                            for c in constraints(rule)],
            "meets_constraints": bool(row["meets_constraints"]),
            "verified": bool(row.get("verified", True)),
            "violations": items(row.get("violations")),
            "unverified": items(row.get("unverified")),
            "not_applicable": items(row.get("not_applicable")),
        },
        "metrics": _metrics(tables, row),
        "confusion_internal": _confusion(tables.results, model_id),
        "shortcuts": _shortcuts(tables, row),
        "external_results": _external(tables, model_id),
        "validation_caveats": [f"{f.headline} {f.detail}" for f in validation_findings(tables)],
        "run_notes": [str(n) for n in as_list(tables.summary.get("notes"))],
        "provenance": {"run_name": tables.summary.get("name"),
                       **{k: tables.summary.get(k) for k in PROVENANCE_KEYS}},
    })


def card_json(card: dict[str, Any]) -> str:
    return json.dumps(card, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def plain(value: Any) -> Any:
    """JSON-ready: NumPy scalars to Python, NaN and infinities to None, keys to text."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return None if pd.isna(value) else str(value)


def _status(row: pd.Series, constraint: Any) -> str:
    if constraint.metric in items(row.get("not_applicable")):
        return "not_applicable"
    mean = row.get(f"{constraint.metric}_mean")
    if math.isnan(number(mean)):
        return "undefined"
    return "violated" if violates(mean, constraint) else "met"


def _data(tables: ResultTables, model_id: str) -> dict[str, Any]:
    """Distinct test images this model saw, per split, source and label; and the skipped files."""
    images = tables.images[tables.images["model_id"].astype(str) == model_id].drop_duplicates(["split", "sample_id"])
    splits = []
    for split, part in images.groupby("split", sort=False):
        splits.append({"split": split, "n_images": len(part),
                       "by_source": {str(k): int(v) for k, v in part["source"].astype(str).value_counts().items()},
                       "by_label": {str(k): int(v) for k, v in part["label"].astype(str).value_counts().items()}})
    splits.sort(key=lambda s: s["split"] != INTERNAL_SPLIT)
    skipped = tables.skipped
    return {
        "images_in_run": tables.summary.get("n_images"),
        "test_images": splits,
        "skipped": {"count": len(skipped),
                    "listed": [{"path": r["path"], "reason": r["reason"], "source": r["source"]}
                               for _, r in skipped.head(SKIPPED_LISTED).iterrows()]},
    }


def _metrics(tables: ResultTables, row: pd.Series) -> list[dict[str, Any]]:
    higher, texts = directions(tables.summary), descriptions()
    return [{"metric": m, "higher_is_better": higher.get(m), "mean": number(row.get(f"{m}_mean")),
             "std": number(row.get(f"{m}_std")), "ci_low": number(row.get(f"{m}_ci_low")),
             "ci_high": number(row.get(f"{m}_ci_high")), "description": texts.get(m)}
            for m in tables.metrics if m not in CONFUSION_COUNTS]


def _confusion(results: pd.DataFrame, model_id: str) -> dict[str, float] | None:
    rows = results[(results["model_id"].astype(str) == model_id) & (results["split"] == INTERNAL_SPLIT)
                   & results["metric"].isin(CONFUSION_COUNTS)]
    if rows.empty:
        return None
    totals = pd.to_numeric(rows["value"], errors="coerce").groupby(rows["metric"]).sum(min_count=1)
    return {c: number(totals.get(c)) for c in CONFUSION_COUNTS}


def _shortcuts(tables: ResultTables, row: pd.Series) -> list[str]:
    """Plain sentences: what the causal checks and the external sets found for this model."""
    positive = class_names(tables.images).get(1, "positive")
    rule_constraints = constraints(selection_rule(tables.summary))
    out = []
    for metric in (m for m in tables.metrics if m.endswith(OCCLUSION_SUFFIX)):
        region = metric[: -len(OCCLUSION_SUFFIX)]
        region = REGIONS.get(region, region.replace("_", " "))
        mean = row.get(f"{metric}_mean")
        if metric in items(row.get("not_applicable")):
            out.append(f"{metric}: not applicable, the {region} is out of the model's view by proof.")
            continue
        if math.isnan(number(mean)):
            continue
        sentence = f"{metric}: occluding the {region} moves p({positive}) by {_with_ci(row, metric)} on average"
        for c in (c for c in rule_constraints if c.metric == metric):
            sentence += f", {'breaking' if violates(mean, c) else 'within'} the constraint {c.describe()}"
        out.append(sentence + ".")
    reliance = number(row.get("shortcut_reliance_mean"))
    if not math.isnan(reliance):
        verdict = "relies on" if reliance > RELIANCE_THRESHOLD else "does not rely on"
        out.append(f"shortcut_reliance {_with_ci(row, 'shortcut_reliance')}: the model {verdict} the synthetic "
                   f"marker (threshold {RELIANCE_THRESHOLD}).")
    accuracy = mean_accuracy(tables.results)
    for split in external_splits(tables):
        result = external_result(tables, row["model_id"], split, accuracy)
        if result and (result.source_shortcut_suspected or result.accuracy_dropped):
            finding = external_finding(result, "this model")
            out.append(f"{finding.headline} {finding.detail}")
    return out


def _with_ci(row: pd.Series, metric: str) -> str:
    """``0.645 [0.61, 0.68]``, or the mean alone where the interval is undefined."""
    interval = ci(row, metric, digits=3)
    return f"{fmt(row.get(f'{metric}_mean'))} {interval}" if interval else fmt(row.get(f"{metric}_mean"))


def _external(tables: ResultTables, model_id: str) -> list[dict[str, Any]]:
    accuracy = mean_accuracy(tables.results)
    out = []
    for split in external_splits(tables):
        result = external_result(tables, model_id, split, accuracy)
        if result is None:
            out.append({"split": split, "evaluated": False})
            continue
        out.append({"split": split, "evaluated": True, "n_images": result.n_images, "labels": result.labels,
                    "accuracy": result.accuracy, "internal_accuracy": result.internal_accuracy,
                    "change": result.change, "positive_class": result.class_name(1),
                    "positive_share": result.positive_share, "other_class_share": result.other_class_share,
                    "internal_error_share": result.internal_error_share,
                    "source_shortcut_suspected": result.source_shortcut_suspected,
                    "accuracy_dropped": result.accuracy_dropped})
    return out
