"""The report's header: run identity, notes and warnings, and the selection rule."""
from __future__ import annotations

from typing import Any

from auditbench.report.formatting import as_list, direction_words, fmt, pairs, text
from auditbench.report.rule import constraints, selection_rule
from auditbench.report.tables import ResultTables


def run_info(tables: ResultTables) -> dict[str, Any]:
    s = tables.summary
    warnings = s.get("warnings") or {}
    return {
        "name": text(s.get("name", "")) or (tables.out_dir.name if tables.out_dir else ""),
        "seed": text(s.get("seed", "")),
        "device": text(s.get("device", "")),
        "date": text(s.get("finished") or s.get("started") or ""),
        "version": text(s.get("auditbench_version", "")),
        "run_id": text(s.get("run_id", "")),
        "protocol_sha256": text(s.get("protocol_sha256", "")),
        "n_models": len(tables.models),
        "n_images": s.get("n_images", tables.images["sample_id"].nunique()),
        "n_skipped": len(tables.skipped),
        "notes": [text(n) for n in as_list(s.get("notes"))],
        "warnings": [(text(k), text(v)) for k, v in warnings.items()] if isinstance(warnings, dict) else [],
        "cam_layers": pairs(s.get("cam_layers")),
        "stage_seconds": [(k, fmt(v, 1)) for k, v in pairs(s.get("stage_seconds"), raw=True)],
        "package_versions": pairs(s.get("package_versions")),
    }


def selection_info(tables: ResultTables, directions: dict[str, bool]) -> dict[str, Any]:
    rule = selection_rule(tables.summary)
    primary = text(rule.get("primary", ""))
    return {
        "selected": tables.selected_model,
        "primary": primary,
        "primary_direction": direction_words(directions.get(primary)),
        "constraints": [
            {"metric": c.metric, "sign": c.sign, "bound": c.bound, "value": text(c.value),
             "direction": direction_words(directions.get(c.metric))}
            for c in constraints(rule)
        ],
        "pareto": ", ".join(map(text, as_list(rule.get("pareto")))),
    }
