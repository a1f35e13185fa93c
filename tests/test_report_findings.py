"""The findings box: each rule of docs/report.md on tables built to meet it, or just miss it."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from test_report import make_tables

from auditbench.report.external import external_result
from auditbench.report.findings import (
    external_findings,
    findings,
    occlusion_findings,
    selection_findings,
    validation_findings,
)
from auditbench.report.html import render_html


def by_headline(items, start):
    return [f for f in items if f.headline.startswith(start)]


def test_selected_model_is_named_with_its_constraints():
    (finding,) = selection_findings(make_tables())
    assert finding.level == "good" and finding.headline == "Selected model: r18-crop-s0."
    assert "best accuracy (0.800 [0.78, 0.82])" in finding.detail
    assert "lung_mass ≥ 0.5: 0.660" in finding.detail and "artifact_occlusion_effect ≤ 0.1: undefined" in finding.detail


def no_selection(tables):
    """Nobody selected; rank order by accuracy (nocrop-s1 first), lung_mass >= 0.7 broken by all."""
    tables.summary["selected_model"] = None
    tables.summary["selection"]["constraints"]["lung_mass"] = {"min": 0.7}
    ranks = {"r18-nocrop-s1": 1, "r18-nocrop-s0": 2, "r18-crop-s0": 3}
    tables.models["rank"] = tables.models["model_id"].map(ranks)
    tables.models["selected"] = False
    tables.models["meets_constraints"] = False
    return tables


def test_closest_model_breaks_fewest_constraints_by_least_not_the_best_ranked():
    (finding,) = selection_findings(no_selection(make_tables()))
    assert finding.level == "bad" and finding.headline.startswith("No model meets the constraints")
    # r18-nocrop-s1 ranks first but breaks two constraints; r18-nocrop-s0 misses lung_mass by 0.12.
    assert finding.detail == "Closest is r18-crop-s0 (rank 3), failing lung_mass ≥ 0.7 by 0.040 (lung_mass = 0.660)."


def test_closest_model_that_breaks_nothing_but_is_unverified_says_so():
    tables = make_tables()
    tables.summary["selected_model"] = None
    tables.models["selected"] = False
    tables.models.loc[tables.models["model_id"] == "r18-crop-s0", "unverified"] = "artifact_occlusion_effect"
    (finding,) = selection_findings(tables)
    assert finding.headline.startswith("No model is verified to meet the constraints")
    assert "r18-crop-s0 (rank 1): it breaks no constraint, but artifact_occlusion_effect is undefined" in finding.detail


def with_external(tables, called_covid: int, of: int = 10, internal_normal_called_covid: int = 0,
                  labels=("normal",)):
    """Replace the external set of every model: ``of`` images labelled ``labels`` (cycled), the first
    ``called_covid`` predicted covid; and ``internal_normal_called_covid`` of 10 internal normal images."""
    images = tables.images[tables.images["split"] == "internal"]
    rows = []
    for model in tables.models["model_id"]:
        base = images[images["model_id"] == model].iloc[0].to_dict()
        for i in range(10):
            rows.append({**base, "split": "internal", "sample_id": f"int-{i}", "label": "normal", "label_index": 0,
                         "prediction": int(i < internal_normal_called_covid), "fold": 0})
        for i in range(of):
            label = labels[i % len(labels)]
            rows.append({**base, "split": "ext", "sample_id": f"ext-{i}", "label": label,
                         "label_index": int(label == "covid"), "prediction": int(i < called_covid), "fold": 0})
    tables.images = pd.concat([images[~images["sample_id"].isin(["NA"])], pd.DataFrame(rows)], ignore_index=True)
    results = tables.results[tables.results["split"] == "internal"]
    extra = results[results["metric"] == "accuracy"].assign(split="ext", value=0.5)
    tables.results = pd.concat([results, extra], ignore_index=True)
    return tables


@pytest.mark.parametrize(("called", "internal", "suspected"), [
    (2, 0, True),    # 20% called covid, none at home: the stated share, met exactly
    (1, 0, False),   # 10%: below the share
    (6, 4, False),   # 60%, but 40% of internal normal images are called covid too: below twice that
    (8, 4, True),    # 80% vs 40% at home: twice, met exactly
])
def test_source_shortcut_rule(called, internal, suspected):
    tables = with_external(make_tables(), called, internal_normal_called_covid=internal)
    result = external_result(tables, "r18-crop-s0", "ext")
    assert result.single_class == 0 and result.n_images == 10
    assert math.isclose(result.other_class_share, called / 10)
    assert math.isclose(result.internal_error_share, internal / 10)
    assert result.source_shortcut_suspected is suspected
    finding = external_findings(tables)[0]
    assert (finding.headline == "Source shortcut suspected:") is suspected


def test_source_shortcut_finding_says_who_how_many_and_against_what():
    tables = with_external(make_tables(), 5)
    (finding,) = external_findings(tables)
    assert finding.level == "bad"
    assert finding.detail.startswith("50% of the 10 images of external set 'ext' (all labelled normal) are called "
                                     "covid by the selected model r18-crop-s0, vs 0% of its internal normal images; "
                                     "accuracy 0.500 there vs 0.800 internal (-0.300).")
    assert "All 3 models evaluated on it meet the same rule." in finding.detail


def test_mixed_external_set_is_judged_by_its_accuracy_drop_only():
    tables = with_external(make_tables(), 9, labels=("normal", "covid"))
    result = external_result(tables, "r18-crop-s0", "ext")
    assert result.single_class is None and not result.source_shortcut_suspected
    (finding,) = external_findings(tables)
    assert finding.level == "warn" and finding.headline == "Accuracy falls on external set 'ext':"
    assert "it calls 90% of the set's images covid" in finding.detail
    tables.results.loc[tables.results["split"] == "ext", "value"] = 0.75  # -0.05: within the stated 0.10
    assert external_findings(tables)[0].level == "info"


def test_external_finding_falls_back_to_the_best_ranked_model_evaluated_on_the_set():
    tables = with_external(make_tables(), 5)
    keep = ~((tables.images["model_id"] == "r18-crop-s0") & (tables.images["split"] == "ext"))
    tables.images = tables.images[keep]
    results = tables.results
    tables.results = results[~((results["model_id"] == "r18-crop-s0") & (results["split"] == "ext"))]
    (finding,) = external_findings(tables)
    assert "by the best-ranked model evaluated on it, r18-nocrop-s0 (the selected model was not)" in finding.detail


def test_occlusion_constraint_failures_name_the_models_and_effects():
    (finding,) = occlusion_findings(make_tables())
    assert finding.level == "bad" and finding.headline == "1 of 3 models fails artifact_occlusion_effect ≤ 0.1:"
    assert "burned-in markers (artifact masks) moves p(covid) on average by 0.950 for r18-nocrop-s1" in finding.detail
    tables = make_tables()
    tables.models["artifact_occlusion_effect_mean"] = [math.nan, 0.02, 0.05]
    (finding,) = occlusion_findings(tables)
    assert finding.level == "good"
    assert "by at most 0.050 on average (r18-nocrop-s1); 2 of 3 models measured" in finding.detail


def test_validation_findings_follow_the_auroc_interval():
    tables = make_tables()
    inverted = tables.validation.iloc[[0]].assign(metric="lung_enrichment", auroc=0.38, auroc_ci_low=0.30,
                                                  auroc_ci_high=0.47)
    tables.validation = pd.concat([tables.validation, inverted], ignore_index=True)
    items = validation_findings(tables)
    (gated,) = by_headline(items, "The selection rule gates on a metric that does not separate")
    assert "lung_mass 0.62 [0.40, 0.85]" in gated.detail and "lung_enrichment" not in gated.detail  # not a constraint
    (chance,) = by_headline(items, "Metrics that do not separate")
    assert "lung_mass 0.62 [0.40, 0.85]" in chance.detail and "128px" not in chance.detail  # stratified rows only
    (wrong,) = by_headline(items, "Metrics that point the wrong way")
    assert "lung_enrichment 0.38 [0.30, 0.47]" in wrong.detail
    (good,) = by_headline(items, "Metrics that separate")
    assert "artifact_occlusion_effect 1.00 [0.93, 1.00]" in good.detail
    tables.validation = tables.validation.iloc[:0]
    assert validation_findings(tables) == []


def test_findings_box_is_first_and_escapes_data():
    tables = make_tables()
    hostile = "<img src=x onerror=alert(1)>"
    tables.images.loc[tables.images["split"] == "ext_normal", "label"] = hostile
    tables.images["split"] = tables.images["split"].replace("ext_normal", "ext|<b>")
    tables.results["split"] = tables.results["split"].replace("ext_normal", "ext|<b>")
    html = render_html(tables)
    box = html[html.index('id="findings"'):html.index("</section>", html.index('id="findings"'))]
    assert html.index('id="findings"') < html.index('id="ranking"')
    assert hostile not in html and "|<b>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in box and "external set &#39;ext|&lt;b&gt;&#39;" in box
    assert len(findings(tables)) == len(box.split('<li class="finding')) - 1


def test_explanation_findings_name_a_failing_primary_method_and_disagreeing_methods():
    """The selected model r18-crop-s0: its primary method fails the cascade; of two other methods,
    one agrees (0.8) and one does not (0.2 < 0.5)."""
    from auditbench.report.findings import explanation_findings

    tables = make_tables()
    tables.models["method"] = "gradcam"
    tables.models["explanation_sanity"] = "fail"
    others = []
    for method, agreement in (("hirescam", 0.8), ("eigencam", 0.2)):
        rows = tables.models.copy()
        rows["method"], rows["method_agreement_mean"], rows["explanation_sanity"] = method, agreement, "pass"
        others.append(rows)
    tables.by_method = pd.concat([tables.models, *others], ignore_index=True)
    sanity, disagreement = explanation_findings(tables)
    assert sanity.level == "bad" and sanity.headline == "gradcam fails the randomisation sanity check on r18-crop-s0's backbone:"
    assert disagreement.level == "warn" and disagreement.headline == "Explanation methods disagree on r18-crop-s0:"
    assert disagreement.detail.startswith("eigencam (Spearman 0.20) rank") and "hirescam" not in disagreement.detail
    tables.models["explanation_sanity"] = "pass"
    tables.by_method["method_agreement_mean"] = 0.5  # at the threshold: not below it
    assert explanation_findings(tables) == []
    assert 'id="methods"' in render_html(tables)
