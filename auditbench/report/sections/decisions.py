"""The decisions section: where a model looked when it decided. Per model, its most confident true
positive, false positive, false negative and true negative on the internal test split, and its most
confident errors on each external set, each with its Grad-CAM overlay (gallery.csv; the images are
chosen by pipeline/gallery.py)."""
from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd

from auditbench.report.external import external_splits
from auditbench.report.formatting import fmt, fmt_int, text
from auditbench.report.sections.gallery import gallery_rows, gallery_uri
from auditbench.report.tables import INTERNAL_SPLIT, ResultTables, as_bool

DECISION_MODELS = 6
"""Models the section shows: all of a grid this small, else the selected model and the best-ranked
others up to this many (each model brings 4 images and up to 4 per external set)."""
DECISION_KINDS = {"tp": "true positive", "fp": "false positive", "fn": "false negative", "tn": "true negative"}
ERROR_KINDS = ("fp", "fn")
TRAIN_DISTRIBUTION = "train_distribution"
"""Synthetic data's internal test images redrawn with the training bias: scored without maps, never in the gallery."""


def decision_models(tables: ResultTables, limit: int = DECISION_MODELS) -> list[str]:
    """The models the section shows, the selected one first, then by rank, at most ``limit``
    (:data:`DECISION_MODELS`; the per-model section uses the same rule)."""
    ranked = [text(m) for m in tables.models.sort_values("rank", kind="stable")["model_id"]]
    if len(ranked) <= limit:
        return ranked
    selected = tables.selected_model
    first = [selected] if selected in ranked else []
    return (first + [m for m in ranked if m != selected])[:limit]


def errors_anchor(model_id: str, split: str) -> str:
    """The page id of a model's errors on an external set: a digest, so no data string becomes an id."""
    return "errors-" + hashlib.sha256(f"{model_id}\0{split}".encode()).hexdigest()[:16]


def error_links(tables: ResultTables) -> dict[tuple[str, str], str]:
    """(model, external set) -> the page id of its error images, for each model the section shows."""
    rows = _decision_rows(tables)
    rows = rows[(rows["split"] != INTERNAL_SPLIT) & rows["model_id"].isin(decision_models(tables))]
    return {(model, split): errors_anchor(model, split) for model, split in zip(rows["model_id"], rows["split"])}


def decisions(tables: ResultTables, classes: dict[int, str]) -> dict[str, Any] | None:
    """What the template shows; None where gallery.csv holds no decision (gallery off, or an older run)."""
    rows = _decision_rows(tables)
    if rows.empty:
        return None
    ranks = dict(zip(tables.models["model_id"].map(text), tables.models["rank"]))
    shown = decision_models(tables)
    out = []
    for model in shown:
        part = rows[rows["model_id"] == model]
        internal = part[part["split"] == INTERNAL_SPLIT]
        out.append({
            "model_id": model, "rank": fmt_int(ranks.get(model)), "selected": model == tables.selected_model,
            "internal": [_figure(internal[internal["kind"] == kind].iloc[0], tables) if (internal["kind"] == kind).any()
                         else {"missing": f"no {name}"} for kind, name in DECISION_KINDS.items()],
            "external": _external(tables, model, part),
        })
    return {"models": out, "n_models": len(tables.models), "limit": DECISION_MODELS,
            "positive": text(classes.get(1, "positive"))}


def _decision_rows(tables: ResultTables) -> pd.DataFrame:
    rows = gallery_rows(tables)
    rows = rows[rows["kind"].isin(DECISION_KINDS)]
    return rows.assign(model_id=rows["model_id"].map(text), split=rows["split"].map(text))


def _external(tables: ResultTables, model: str, part: pd.DataFrame) -> list[dict[str, Any]]:
    """Per external set the model was scored on: its error images, or that it made no error."""
    images = tables.images[tables.images["model_id"].map(text) == model]
    out = []
    for split in external_splits(tables):
        errors = part[(part["split"] == split) & part["kind"].isin(ERROR_KINDS)]
        scored = images[images["split"].map(text) == split]
        wrong = int((~as_bool(scored["correct"])).sum()) if "correct" in scored else 0
        if errors.empty and (split == TRAIN_DISTRIBUTION or scored.empty or wrong):
            continue  # not scored, or scored without maps: no image to show
        out.append({"split": text(split), "anchor": errors_anchor(model, split) if len(errors) else "",
                    "wrong": wrong, "scored": len(scored),
                    "figures": [_figure(row, tables) for _, row in errors.iterrows()]})
    return out


def _figure(row: pd.Series, tables: ResultTables) -> dict[str, Any]:
    return {
        "kind": DECISION_KINDS.get(text(row["kind"]), text(row["kind"])), "sample_id": text(row["sample_id"]),
        "label": text(row["label"]), "prediction": text(row["prediction"]), "p": fmt(row["p_positive"]),
        "fold": fmt_int(row["fold"]), "split": text(row["split"]), "file": text(row["file"]),
        "uri": gallery_uri(tables.out_dir, row["file"]),
    }
