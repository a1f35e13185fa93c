"""Render a run's reports from its output folder alone (`auditbench report DIR`): report.html and the
model card (model_card.md, model_card.json) of the selected or best-ranked model.

The page is assembled from templates/report.html.j2 and its parts; each section's values come from
:mod:`auditbench.report.sections`, the findings box from :mod:`auditbench.report.findings`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from auditbench.report.external import (
    EXTERNAL_DROP,
    SOURCE_SHORTCUT_RATIO,
    SOURCE_SHORTCUT_SHARE,
    class_names,
)
from auditbench.report.findings import findings, ranked_models
from auditbench.report.formatting import data_uri
from auditbench.report.model_card import build_model_card, card_json
from auditbench.report.model_card_markdown import card_markdown
from auditbench.report.overlays import colorbar_png
from auditbench.report.rule import directions
from auditbench.report.sections.comparisons import confusion, crop_pairs, external, validation
from auditbench.report.sections.decisions import decisions
from auditbench.report.sections.gallery import data_info, gallery
from auditbench.report.sections.header import run_info, selection_info
from auditbench.report.sections.models import model_details
from auditbench.report.sections.methods import methods
from auditbench.report.sections.probes import probes
from auditbench.report.sections.ranking import ranking
from auditbench.report.sections.scatter import scatter
from auditbench.report.tables import SEPARATES_AUROC, ResultTables, read_tables

REPORT_FILE = "report.html"
MODEL_CARD_MARKDOWN = "model_card.md"
MODEL_CARD_JSON = "model_card.json"
REPORT_FILES = (REPORT_FILE, MODEL_CARD_MARKDOWN, MODEL_CARD_JSON)
"""Every file :func:`render_report` writes (and ``auditbench report DIR`` rewrites)."""
TEMPLATE = "report.html.j2"
FINDING_LABELS = {"good": "ok", "info": "note", "warn": "caution", "bad": "problem"}


def render_report(out_dir: Path | str) -> Path:
    """Write ``out_dir``'s report.html, model_card.md and model_card.json from the folder's tables
    and gallery PNGs; return the path of report.html."""
    out_dir = Path(out_dir)
    for name, content in render_files(read_tables(out_dir)).items():
        (out_dir / name).write_text(content, encoding="utf-8")
    return out_dir / REPORT_FILE


def render_files(tables: ResultTables) -> dict[str, str]:
    """File name -> content of every file in :data:`REPORT_FILES`."""
    card = build_model_card(tables)
    return {REPORT_FILE: render_html(tables), MODEL_CARD_MARKDOWN: card_markdown(card),
            MODEL_CARD_JSON: card_json(card)}


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
    higher = directions(tables.summary)
    models = ranked_models(tables)
    classes = class_names(tables.images)
    return {
        "run": run_info(tables),
        "selection": selection_info(tables, higher),
        "findings": findings(tables),
        "finding_labels": FINDING_LABELS,
        "ranking": ranking(tables, models, higher),
        "scatter": scatter(tables, models, higher),
        "crop": crop_pairs(tables, models),
        "validation": validation(tables.validation),
        "methods": methods(tables, higher),
        "external": external(tables, models, classes),
        "probes": probes(tables),
        "confusion": confusion(tables.results, models, classes),
        "decisions": decisions(tables, classes),
        "models_detail": model_details(tables, classes, higher),
        "gallery": gallery(tables, models),
        "data": data_info(tables),
        "colorbar": data_uri(colorbar_png()),
        "separates_auroc": SEPARATES_AUROC,
        "external_drop": EXTERNAL_DROP,
        "source_shortcut_share": SOURCE_SHORTCUT_SHARE,
        "source_shortcut_ratio": SOURCE_SHORTCUT_RATIO,
    }
