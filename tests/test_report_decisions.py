"""The decisions section of report.html: each model's most confident internal decisions and
external errors with their captions, the bound on a large grid, the findings link, older runs."""
from __future__ import annotations

import re

import pandas as pd
from test_report import XSS, run_dir  # noqa: F401  (run_dir: the fixture these tests share)

from auditbench.report.html import render_html, render_report
from auditbench.report.sections.decisions import DECISION_MODELS
from auditbench.report.tables import read_tables


def test_decisions_section_shows_each_decision_and_external_error_with_captions(run_dir):
    html = render_report(run_dir).read_text()
    section = html[html.index('id="decisions"'):html.index('id="gallery"')]
    # Every model (3 <= the bound), the selected first; internal tp and tn shown, fp and fn absent.
    assert section.count('class="gallery-model decision-model"') == 3
    assert section.index("r18-crop-s0") < section.index("r18-nocrop-s0") < section.index("r18-nocrop-s1")
    assert section.count("<b>true positive</b>") == 3 and section.count("<b>true negative</b>") == 3
    assert section.count(">no false positive<") == 3 and section.count(">no false negative<") == 3
    # The external error: label, call, p and split in the caption; data strings escaped.
    assert section.count("<b>false positive</b>") == 3
    assert "label normal · called covid<br>p(covid) = 0.700 · ext_normal · fold 0" in section
    assert "2 of 2 image evaluations wrong (all folds); the most confident shown" in section
    assert XSS not in section and "&lt;script&gt;alert(1)&lt;/script&gt;" in section
    # The best / worst gallery keeps its own section, without the decisions.
    gallery = html[html.index('id="gallery"'):html.index('id="data"')]
    assert gallery.count("<figure>") == 6 and "true positive" not in gallery
    # The findings box links the selected model's external errors.
    box = html[html.index('id="findings"'):html.index("</section>", html.index('id="findings"'))]
    (link,) = re.findall(r'<a href="#(errors-[0-9a-f]{16})">', box)
    target = section[section.index(f'id="{link}"'):]
    assert "ext_normal" in target[:200] and section.count(f'id="{link}"') == 1
    assert target.index("r18-nocrop-s0") > target.index("<b>false positive</b>")  # the selected model's block


def test_decisions_section_bounds_a_large_grid_and_tells_old_runs(run_dir):
    tables = read_tables(run_dir)
    template = tables.models.iloc[-1]
    extra = [template.copy() for _ in range(DECISION_MODELS)]
    for i, row in enumerate(extra):
        row["model_id"], row["rank"], row["selected"] = f"extra-{i}", 4 + i, False
    tables.models = pd.concat([tables.models, pd.DataFrame(extra)], ignore_index=True)
    tables.models.loc[tables.models["model_id"] == "r18-crop-s0", "rank"] = 9  # selected, yet ranked low
    html = render_html(tables)
    section = html[html.index('id="decisions"'):html.index('id="gallery"')]
    assert section.count('class="gallery-model decision-model"') == DECISION_MODELS
    assert f"Shown: {DECISION_MODELS} of {DECISION_MODELS + 3} models" in section
    assert section.index("r18-crop-s0") < section.index("r18-nocrop-s0")  # the selected model first
    assert "extra-5" not in section  # rank 9 of 9 others: past the bound
    # A run from before the gallery of decisions: best / worst rows only, no split or prediction column.
    tables.gallery = tables.gallery[tables.gallery["kind"].isin(["best", "worst"])].drop(columns=["split", "prediction"])
    html = render_html(tables)
    assert "No decision images in this run" in html
    assert html[html.index('id="gallery"'):].count("<figure>") == 6
