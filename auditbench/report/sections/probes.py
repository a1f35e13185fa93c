"""The shortcut-probes section and its findings, from probes.csv alone (pipeline/probes.py).

Per group (task, backbone, frame) and class: can a linear probe on the backbone's pooled features tell
the images' sources apart (DeGrave, Janizek & Lee, Nature MI 2021), in the intact images and with the
lungs filled? A class whose chance-adjusted balanced accuracy has its CI above 0 has its source
readable: a model of those features has a source shortcut available.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from auditbench.report.formatting import fmt, fmt_int, interval, number, text
from auditbench.report.tables import ResultTables

PROBE_TITLES = {"source": "intact images", "outside_lung": "lungs filled"}


def readable(row: pd.Series) -> bool:
    """The stated rule: the source is readable when the CI of the chance-adjusted balanced accuracy lies above 0."""
    return not text(row.get("reason")) and number(row.get("adjusted_ci_low")) > 0


def features(row: pd.Series) -> str:
    """``pretrained``, or ``model <model_id>`` for a fine-tuned or audited model's own backbone."""
    model_id = text(row.get("model_id"))
    return f"{text(row['features'])} {model_id}" if model_id else text(row["features"])


def probes(tables: ResultTables) -> dict[str, Any] | None:
    """None for a run without probes.csv (older runs) or without any row."""
    table = tables.probes
    if table.empty:
        return None
    rows = []
    for _, row in table.iterrows():
        reason = text(row.get("reason"))
        rows.append({
            "task": text(row.get("task")), "backbone": text(row["backbone"]), "weights": text(row["weights"]),
            "frame": text(row["frame"]), "features": features(row),
            "probe": PROBE_TITLES.get(text(row["probe"]), text(row["probe"])),
            "label": text(row["label"]), "sources": text(row["sources"]), "n_images": fmt_int(row["n_images"]),
            "n_patients": fmt_int(row["n_patients"]), "balanced_accuracy": fmt(row["balanced_accuracy"], 2),
            "ci": interval(row["ci_low"], row["ci_high"]), "chance": fmt(row["chance"], 2),
            "adjusted": fmt(row["adjusted"], 2), "readable": readable(row), "reason": reason,
        })
    return {"rows": rows, "n_readable": sum(r["readable"] for r in rows)}


def probe_findings(tables: ResultTables) -> list[tuple[str, str, str]]:
    """(level, headline, detail) of one finding per probe kind where some class's source is readable."""
    table = tables.probes
    out = []
    for probe, rows in (table.groupby("probe", sort=False) if len(table) else []):
        hits = [row for _, row in rows.iterrows() if readable(row)]
        if not hits:
            continue
        where = "even with the lungs filled" if probe == "outside_lung" else "from the backbone's features"
        listed = "; ".join(
            f"class {text(r['label'])} on {_whose(r)} ({text(r['frame'])}): {text(r['sources'])} told apart "
            f"with balanced accuracy {fmt(r['balanced_accuracy'], 2)} {interval(r['ci_low'], r['ci_high'])} vs chance "
            f"{fmt(r['chance'], 2)}" for r in hits[:5])
        more = f" (and {len(hits) - 5} more)" if len(hits) > 5 else ""
        out.append(("warn", f"The image's source is readable within a class {where}:",
                    f"{listed}{more}. Where the classes come from different sources, a model of these features "
                    "has a source shortcut available (DeGrave et al. 2021): check the external test sets."))
    return out


def _whose(row: pd.Series) -> str:
    model_id = text(row.get("model_id"))
    return f"model {model_id}'s own backbone" if model_id else text(row["backbone"])
