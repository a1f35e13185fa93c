"""The findings box: what a reader should take from a run, in plain words, by fixed rules.

Every finding is derived from the result tables alone (models.csv, results.csv, images.csv,
validation.csv, summary.json) by the rules stated in docs/report.md; none reads a threshold from the
data it judges. Texts are plain strings: the HTML template escapes them, the model card's Markdown
writer escapes them for Markdown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pandas as pd

from auditbench.report.external import (
    EXTERNAL_DROP,
    ExternalResult,
    class_names,
    external_result,
    external_splits,
    mean_accuracy,
)
from auditbench.report.formatting import ci, fmt, fmt_int, interval, items, number, percent, text
from auditbench.report.rule import Constraint, constraints, selection_rule, shortfall, violates
from auditbench.report.sections.decisions import error_links
from auditbench.report.sections.methods import DISAGREEMENT
from auditbench.report.sections.probes import probe_findings
from auditbench.report.tables import ResultTables

OCCLUSION_SUFFIX = "_occlusion_effect"
REGIONS = {"artifact": "burned-in markers (artifact masks)", "border": "border band", "lung": "lungs"}
LISTED = 5
"""At most this many models are named in one finding; the rest are counted."""


@dataclass(frozen=True)
class Finding:
    level: str  # "good" | "warn" | "bad" | "info": how the box colours it
    headline: str
    detail: str
    link: str = ""  # page id of the images behind it (an external set's errors), "" where none


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def ranked_models(tables: ResultTables) -> pd.DataFrame:
    return tables.models.sort_values("rank", kind="stable").reset_index(drop=True)


def card_model(tables: ResultTables) -> tuple[pd.Series, bool]:
    """The model the report speaks for: the selected one, else the best-ranked; and whether selected."""
    models = ranked_models(tables)
    selected = tables.selected_model
    chosen = models[models["model_id"].astype(str) == selected] if selected is not None else models.iloc[:0]
    return (chosen.iloc[0], True) if len(chosen) else (models.iloc[0], False)


def findings(tables: ResultTables) -> list[Finding]:
    """All findings, most important first: the selection, external sets, occlusion constraints, validation."""
    return [*selection_findings(tables), *external_findings(tables), *(Finding(*f) for f in probe_findings(tables)),
            *occlusion_findings(tables), *explanation_findings(tables), *validation_findings(tables)]


# --- selection --------------------------------------------------------------------------------


def selection_findings(tables: ResultTables) -> list[Finding]:
    models = ranked_models(tables)
    rule = selection_rule(tables.summary)
    rule_constraints = constraints(rule)
    row, selected = card_model(tables)
    if selected:
        primary = text(rule.get("primary"))
        best = (f"the best {primary} ({fmt(row.get(f'{primary}_mean'))}{_bracket(ci(row, primary))})"
                if primary else "the best primary metric")
        met = "; ".join(_constraint_status(row, c) for c in rule_constraints) or "the rule sets no constraints"
        return [Finding("good", f"Selected model: {row['model_id']}.",
                        f"Rank 1 of {len(models)}: {best} among the models that meet every constraint ({met}).")]
    broken = {str(r["model_id"]): [(c, shortfall(r.get(f"{c.metric}_mean"), c)) for c in rule_constraints
                                   if violates(r.get(f"{c.metric}_mean"), c)] for _, r in models.iterrows()}
    # Closest: fewest constraints broken, then the smallest total shortfall (metric units), then rank.
    order = sorted(models.index, key=lambda i: (len(broken[str(models.at[i, "model_id"])]),
                                                sum(g for _, g in broken[str(models.at[i, "model_id"])]),
                                                number(models.at[i, "rank"])))
    closest = models.loc[order[0]]
    model, rank = closest["model_id"], fmt_int(closest["rank"])
    failing = broken[str(model)]
    if failing:
        gaps = "; ".join(f"{c.describe()} by {fmt(gap)} ({c.metric} = {fmt(closest.get(f'{c.metric}_mean'))})"
                         for c, gap in failing)
        return [Finding("bad", "No model meets the constraints; none is selected.",
                        f"Closest is {model} (rank {rank}), failing {gaps}.")]
    unverified = items(closest.get("unverified"))
    if unverified:
        return [Finding("bad", "No model is verified to meet the constraints; none is selected.",
                        f"Closest is {model} (rank {rank}): it breaks no constraint, but {', '.join(unverified)} "
                        "is undefined without proof that its region is out of view (no mask, blank maps).")]
    violations = items(closest.get("violations"))
    detail = f"Best-ranked is {model}" + (f", failing {'; '.join(violations)}." if violations else ".")
    return [Finding("bad", "No model is selected.", detail)]


def _constraint_status(row: pd.Series, constraint: Constraint) -> str:
    if constraint.metric in items(row.get("not_applicable")):
        return f"{constraint.describe()}: not applicable, its region is out of view by proof"
    mean = row.get(f"{constraint.metric}_mean")
    if math.isnan(number(mean)):
        return f"{constraint.describe()}: undefined"
    return f"{constraint.describe()}: {fmt(mean)}"


def _bracket(interval: str) -> str:
    return f" {interval}" if interval else ""


# --- external test sets -----------------------------------------------------------------------


def external_findings(tables: ResultTables) -> list[Finding]:
    """One finding per external set, about the selected model (else the best-ranked evaluated on it)."""
    models = ranked_models(tables)
    accuracy = mean_accuracy(tables.results)
    selected = tables.selected_model
    links = error_links(tables)
    out = []
    for split in external_splits(tables):
        results = [r for r in (external_result(tables, m, split, accuracy) for m in models["model_id"]) if r]
        if not results:
            continue
        chosen = next((r for r in results if r.model_id == selected), None)
        if chosen is not None:
            who = f"the selected model {chosen.model_id}"
        else:
            chosen = results[0]  # models are in rank order
            who = (f"the best-ranked model evaluated on it, {chosen.model_id}" if selected is None else
                   f"the best-ranked model evaluated on it, {chosen.model_id} (the selected model was not)")
        suspected = sum(r.source_shortcut_suspected for r in results)
        if suspected == len(results) > 1:
            grid = f" All {len(results)} models evaluated on it meet the same rule."
        elif suspected:
            grid = f" {suspected} of the {len(results)} models evaluated on it meet the same rule."
        else:
            grid = ""
        link = links.get((str(chosen.model_id), split), "")
        out.append(replace(external_finding(chosen, who, grid), link=link))
    return out


def external_finding(result: ExternalResult, who: str, extra: str = "") -> Finding:
    """The finding for one model on one external set; ``who`` names the model in the sentence."""
    name = f"external set '{result.split}'"
    accuracy = (f"accuracy {fmt(result.accuracy)} there vs {fmt(result.internal_accuracy)} internal "
                f"({fmt(result.change, signed=True)})")
    if result.source_shortcut_suspected:
        held, other = result.single_class, 1 - (result.single_class or 0)
        labels = " / ".join(result.labels) or result.class_name(held)
        home = (f", vs {percent(result.internal_error_share)} of its internal {result.class_name(held)} images"
                if not math.isnan(result.internal_error_share) else "")
        return Finding("bad", "Source shortcut suspected:",
                       f"{percent(result.other_class_share)} of the {plural(result.n_images, 'image')} of {name} "
                       f"(all labelled {labels}) are called {result.class_name(other)} by {who}{home}; {accuracy}. The model may "
                       f"tell the image sources apart rather than the disease.{extra}")
    calls = f"it calls {percent(result.positive_share)} of the set's images {result.class_name(1)}"
    if result.accuracy_dropped:
        return Finding("warn", f"Accuracy falls on {name}:",
                       f"{who}: {accuracy}, a fall of at least {EXTERNAL_DROP:.2f}; {calls}.{extra}")
    return Finding("info", f"On {name}:", f"{who}: {accuracy}; {calls}.{extra}")


# --- occlusion constraints --------------------------------------------------------------------


def occlusion_findings(tables: ResultTables) -> list[Finding]:
    """Per constraint on an occlusion effect: the models whose mean breaks it (or that none does)."""
    models = ranked_models(tables)
    positive = class_names(tables.images).get(1, "positive")
    out = []
    for constraint in constraints(selection_rule(tables.summary)):
        if not constraint.metric.endswith(OCCLUSION_SUFFIX) or f"{constraint.metric}_mean" not in models:
            continue
        region = constraint.metric[: -len(OCCLUSION_SUFFIX)]
        region = REGIONS.get(region, region.replace("_", " "))
        values = pd.to_numeric(models[f"{constraint.metric}_mean"], errors="coerce")
        measured = values.notna()
        if not measured.any():
            continue
        failing = models[[violates(v, constraint) for v in values]]
        if failing.empty:
            # The measured model nearest to its bound: the largest effect under a max, the smallest under a min.
            nearest = values[measured].idxmin() if constraint.bound == "min" else values[measured].idxmax()
            extreme = "at least" if constraint.bound == "min" else "at most"
            out.append(Finding("good", f"No model fails {constraint.describe()}.",
                               f"Occluding the {region} moves p({positive}) by {extreme} {fmt(values[nearest])} on "
                               f"average ({models.at[nearest, 'model_id']}); {int(measured.sum())} of {len(models)} "
                               "models measured."))
            continue
        failing = failing.assign(_v=values[failing.index]).sort_values("_v", ascending=constraint.bound == "min")
        named = ", ".join(f"{fmt(r['_v'])} for {r['model_id']}" for _, r in failing.head(LISTED).iterrows())
        more = f", and {len(failing) - LISTED} more" if len(failing) > LISTED else ""
        verb = "fails" if len(failing) == 1 else "fail"
        out.append(Finding("bad", f"{len(failing)} of {len(models)} models {verb} {constraint.describe()}:",
                           f"occluding the {region} moves p({positive}) on average by {named}{more}. "
                           "Their predictions depend on what was occluded."))
    return out


# --- explanation methods ----------------------------------------------------------------------


def explanation_findings(tables: ResultTables) -> list[Finding]:
    """For the model the report speaks for: its primary method failing the randomisation check, and
    other methods whose maps disagree with the primary's (``method_agreement`` below DISAGREEMENT)."""
    row, _ = card_model(tables)
    model = text(row["model_id"])
    primary = tables.methods[0] if tables.methods else "the explanation method"
    out = []
    if text(row.get("explanation_sanity", "")) == "fail":
        out.append(Finding("bad", f"{primary} fails the randomisation sanity check on {model}'s backbone:",
                           "its maps barely change when the model's weights are re-initialised, so they do not "
                           "explain this model; attention metrics from them are not evidence about it (sanity.csv)."))
    by_method = tables.by_method
    if by_method is not None and "method_agreement_mean" in by_method:
        mine = by_method[by_method["model_id"].astype(str) == model]
        low = [(text(r["method"]), number(r["method_agreement_mean"])) for _, r in mine.iterrows()
               if number(r["method_agreement_mean"]) < DISAGREEMENT]
        if low:
            named = ", ".join(f"{method} (Spearman {fmt(value, 2)})" for method, value in low)
            out.append(Finding("warn", f"Explanation methods disagree on {model}:",
                               f"{named} rank the image's pixels unlike {primary} (mean over the internal test "
                               f"images; below {DISAGREEMENT} counts as disagreement). No single method's map "
                               "summarises this model's evidence; see Explanation methods."))
    return out


# --- validation -------------------------------------------------------------------------------


def validation_findings(tables: ResultTables) -> list[Finding]:
    """What validation.csv's stratified rows say about each metric, and about the rule's constraints."""
    table = tables.validation
    if table.empty:
        return []
    if "frame" in table:
        table = table[table["frame"].map(text).isin(["all", ""])]
    if "method" in table and len(table):  # the primary method's rows: what the selection gates with
        table = table[table["method"] == table["method"].iloc[0]]
    chance, inverted, separating = [], [], []
    for _, row in table.iterrows():
        auroc = number(row["auroc"])
        low, high = number(row.get("auroc_ci_low")), number(row.get("auroc_ci_high"))
        if math.isnan(auroc):
            continue
        entry = (text(row["metric"]), f"{text(row['metric'])} {fmt(auroc, 2)}{_bracket(interval(low, high))}")
        if bool(row["separates"]):
            separating.append(entry)
        elif not math.isnan(high) and high < 0.5:
            inverted.append(entry)
        elif math.isnan(low) or low <= 0.5 <= high:
            chance.append(entry)
    out = []
    gated = {c.metric for c in constraints(selection_rule(tables.summary))}
    weak = [label for metric, label in chance + inverted if metric in gated]
    if weak:
        out.append(Finding("bad", "The selection rule gates on a metric that does not separate:",
                           f"the validation table gives {'; '.join(weak)} (AUROC, 95% CI): it does not tell models "
                           "that rely on the marker from models that do not."))
    if chance:
        out.append(Finding("warn", "Metrics that do not separate relying models:",
                           f"AUROC 95% CI covers 0.5 (chance) for {'; '.join(label for _, label in chance)}. "
                           "Do not gate on them."))
    if inverted:
        out.append(Finding("warn", "Metrics that point the wrong way:",
                           f"AUROC 95% CI below 0.5 for {'; '.join(label for _, label in inverted)}: models that "
                           "rely on the marker score better on them."))
    if separating:
        out.append(Finding("good", "Metrics that separate relying models:",
                           f"{'; '.join(label for _, label in separating)} (AUROC, 95% CI)."))
    return out
