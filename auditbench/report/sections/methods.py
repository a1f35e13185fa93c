"""The explanation-methods section (runs with several ``explain.method``): per model and method, the
method's sanity verdict, its agreement with the primary method, the attention and faithfulness metrics its maps
give, and the rank the selection rule would give the model with that method's maps. From models.csv
alone (``ResultTables.by_method``)."""
from __future__ import annotations

from typing import Any

from auditbench.report.formatting import arrow, ci, fmt, fmt_int, number, text
from auditbench.report.tables import ResultTables, as_bool

METHOD_METRICS = ("method_agreement", "lung_mass", "border_mass", "artifact_mass", "pointing_game", "deletion_auc",
                  "insertion_auc")
"""The models.csv metrics the section compares across methods (those the run has)."""
DISAGREEMENT = 0.5
"""A model's ``method_agreement`` (mean Spearman with the primary method's maps) below this is
reported as disagreement (docs/report.md): a plain, stated rule, not tuned on any data."""


def methods(tables: ResultTables, directions: dict[str, bool]) -> dict[str, Any] | None:
    """None for a run with one method (or a folder from before the method axis)."""
    by_method = tables.by_method
    if by_method is None or len(tables.methods) < 2:
        return None
    metrics = [m for m in METHOD_METRICS if f"{m}_mean" in by_method]
    order = {text(m): k for k, m in enumerate(tables.models["model_id"])}  # the primary method's rank order
    selected = as_bool(by_method["selected"]) if "selected" in by_method else by_method["model_id"].map(lambda _: False)
    rows = []
    for index, row in sorted(by_method.iterrows(), key=lambda item: order.get(text(item[1]["model_id"]), len(order))):
        agreement = number(row.get("method_agreement_mean"))
        rows.append({
            "model_id": text(row["model_id"]), "method": text(row["method"]),
            "primary": text(row["method"]) == tables.methods[0],
            "sanity": text(row.get("explanation_sanity", "")) or "not run",
            "rank": fmt_int(row.get("rank")), "selected": bool(selected[index]),
            "disagrees": agreement < DISAGREEMENT,
            "values": [(fmt(row.get(f"{m}_mean")), ci(row, m)) for m in metrics],
        })
    return {
        "methods": tables.methods, "primary": tables.methods[0], "rows": rows, "threshold": DISAGREEMENT,
        "metrics": [(m, arrow(directions.get(m))) for m in metrics],
    }
