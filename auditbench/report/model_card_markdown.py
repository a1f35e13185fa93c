"""model_card.md: the model card of :func:`auditbench.report.model_card.build_model_card` as Markdown.

Every text that comes from the data goes through :func:`md`, so a pipe cannot split a table cell, a
newline cannot end one, and HTML or Markdown markup in a file name or label shows as written.
"""
from __future__ import annotations

from typing import Any

from auditbench.report.formatting import fmt, fmt_int, percent

_MARKDOWN_SPECIALS = "\\`*_[]|~#"
"""Backslash-escaped: emphasis, code, links, table cells, strikethrough, headings."""


def md(value: Any) -> str:
    """One line of Markdown that shows ``value`` as written: no cell break, no markup, no HTML."""
    if value is None:
        return ""
    out = []
    for char in " ".join(str(value).splitlines()):
        if char in _MARKDOWN_SPECIALS:
            out.append("\\" + char)
        elif char in "&<>":
            out.append({"&": "&amp;", "<": "&lt;", ">": "&gt;"}[char])
        else:
            out.append(char)
    return "".join(out)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A GFM table; header and cells are escaped here."""
    lines = ["| " + " | ".join(md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in rows]
    return lines


def card_markdown(card: dict[str, Any]) -> str:
    p = card["provenance"]
    lines = [f"# Model card: {md(card['model_id'])}", "",
             f"Status: {md(card['status'])}. Rank {fmt_int(card['rank'])} of {card['n_models']} models of run "
             f"{md(p.get('run_id') or 'n/a')} ({md(p.get('run_name') or 'unnamed')}).", ""]
    frame = card["model_frame"]
    lines += ["## Model", "", *table(["field", "value"], [*card["configuration"].items(), *frame.items()]), ""]
    lines += ["## Intended use and limits", "", md(card["intended_use"]), ""]
    lines += [f"- {md(limit)}" for limit in card["limitations"]] + [""]
    lines += _data(card["data"])
    lines += _selection(card["selection"])
    lines += _metrics(card)
    lines += ["## Known shortcuts found (causal checks and external sets)", ""]
    lines += [f"- {md(s)}" for s in card["shortcuts"]] or [
        "- None by this run's checks (occlusion effects, external sets); that is not proof that there is none."]
    lines += [""] + _external(card["external_results"])
    if card["validation_caveats"]:
        lines += ["## What the validation says about the metrics", ""]
        lines += [f"- {md(c)}" for c in card["validation_caveats"]] + [""]
    if card["run_notes"]:
        lines += ["## Run notes", ""] + [f"- {md(n)}" for n in card["run_notes"]] + [""]
    lines += ["## Provenance", "", *table(["field", "value"], [[k, "n/a" if v is None else v] for k, v in p.items()])]
    return "\n".join(lines) + "\n"


def _data(data: dict[str, Any]) -> list[str]:
    rows = [[s["split"], s["n_images"], _counts(s["by_source"]), _counts(s["by_label"])] for s in data["test_images"]]
    lines = ["## Data", "", "Test images this model was scored on (distinct images over all folds):", "",
             *table(["split", "images", "by source", "by label"], rows), ""]
    if data["images_in_run"] is not None:
        lines += [f"Images in the run: {md(data['images_in_run'])}."]
    skipped = data["skipped"]
    lines += [f"Skipped files: {skipped['count']} (skipped.csv, each with its reason).", ""]
    if skipped["listed"]:
        listed = [[s["path"], s["reason"], s["source"]] for s in skipped["listed"]]
        lines += [*table(["path", "reason", "source"], listed), ""]
        if skipped["count"] > len(listed):
            lines += [f"and {skipped['count'] - len(listed)} more in skipped.csv.", ""]
    return lines


def _selection(selection: dict[str, Any]) -> list[str]:
    lines = ["## Selection rule", "", f"Primary metric: {md(selection['primary'] or 'n/a')}.", ""]
    if selection["constraints"]:
        rows = [[f"{c['metric']} {'≥' if c['bound'] == 'min' else '≤'} {c['value']}", fmt(c["model_value"]),
                 c["status"].replace("_", " ")] for c in selection["constraints"]]
        lines += [*table(["constraint", "this model", "status"], rows), ""]
    else:
        lines += ["The rule sets no constraints.", ""]
    return lines


def _metrics(card: dict[str, Any]) -> list[str]:
    rows = []
    for m in card["metrics"]:
        direction = {True: "↑", False: "↓"}.get(m["higher_is_better"], "")
        interval = "" if m["ci_low"] is None or m["ci_high"] is None else f"[{fmt(m['ci_low'])}, {fmt(m['ci_high'])}]"
        rows.append([m["metric"], direction, fmt(m["mean"]), interval, fmt(m["std"])])
    header = ["metric", "", "mean", "95% CI", "std over folds"]
    lines = ["## Metrics (internal test split)", "", *table(header, rows), ""]
    counts = card["confusion_internal"]
    if counts:
        summed = ", ".join(f"{k} {fmt_int(v)}" for k, v in counts.items())
        lines += [f"Confusion counts summed over folds: {summed}.", ""]
    return lines


def _external(results: list[dict[str, Any]]) -> list[str]:
    lines = ["## External test sets", ""]
    if not results:
        return lines + ["The run has no external test set.", ""]
    rows = []
    for r in results:
        if not r["evaluated"]:
            rows.append([r["split"], "not evaluated", "", "", "", "", "", ""])
            continue
        rows.append([r["split"], r["n_images"], _counts(r["labels"]), fmt(r["accuracy"]), fmt(r["internal_accuracy"]),
                     fmt(r["change"], signed=True), f"{percent(r['positive_share'])} {r['positive_class']}",
                     "yes" if r["source_shortcut_suspected"] else "no"])
    header = ["set", "images", "labels", "accuracy", "internal accuracy", "change", "called positive",
              "source shortcut suspected"]
    return lines + [*table(header, rows), ""]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())
