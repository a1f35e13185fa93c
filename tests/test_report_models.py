"""The per-model section of report.html ("Models in detail"), on test_report's hand-made run with
per-source examples added: confusion matrices per split, metrics with CIs and their status, the
maps per data source with their captions, the bound on a large grid, escaping, older runs."""
from __future__ import annotations

import re

import pandas as pd
import pytest
from test_report import XSS, make_tables, phantom

from auditbench.pipeline import gallery as pipeline_gallery
from auditbench.pipeline.records import SOURCE_KINDS
from auditbench.report.html import render_html, render_report
from auditbench.report.overlays import overlay_png
from auditbench.report.sections import models as section
from auditbench.report.tables import ResultTables, read_tables, write_tables

HOSTILE = '<script>alert("src")</script>'
"""The external set's data source: a name that must stay text."""


def make_source_tables() -> ResultTables:
    """test_report's run (3 models, 2 folds; internal: XSS from ieee8023 and "NA" from kermany, both called
    right; external set ext_normal: "ext-1", called covid by every fold) with the external set's images
    from source HOSTILE, its confusion counts (per fold tn 0, fp 1, fn 0, tp 0) and per model the
    per-source examples a run writes: each source's most confident correct and wrong call."""
    tables = make_tables()
    images = tables.images
    images.loc[images["split"] == "ext_normal", "source"] = HOSTILE
    results, extra, rows = tables.results, [], []
    for _, r in results[(results["split"] == "ext_normal") & (results["metric"] == "accuracy")].iterrows():
        for metric, value in (("tn", 0), ("fp", 1), ("fn", 0), ("tp", 0)):
            extra.append({**r.to_dict(), "metric": metric, "value": value})
    tables.results = pd.concat([results, pd.DataFrame(extra)], ignore_index=True)
    for model_id in tables.models["model_id"]:
        for split, source, kind, sample_id, label, prediction, p in (
            ("internal", "ieee8023", "source_correct", XSS, "covid", "covid", 0.7),
            ("internal", "kermany", "source_correct", "NA", "normal", "normal", 0.2),
            ("ext_normal", HOSTILE, "source_wrong", "ext-1", "normal", "covid", 0.7),
        ):
            rows.append({"model_id": model_id, "sample_id": sample_id, "fold": 1, "split": split, "kind": kind,
                         "label": label, "prediction": prediction, "p_positive": p, "lung_mass": 0.6,
                         "file": f"gallery/{model_id}__{split}__{source[:3]}__{kind}.png", "source": source})
    tables.gallery = pd.concat([tables.gallery.assign(source=""), pd.DataFrame(rows)], ignore_index=True)
    return tables


def write_run(tables: ResultTables, out) -> None:
    write_tables(tables, out)
    (out / "gallery").mkdir()
    image, heat, lung, artifact = phantom()
    for file in tables.gallery["file"]:
        (out / file).write_bytes(overlay_png(image, heat, lung, artifact))


@pytest.fixture
def source_run(tmp_path):
    write_run(make_source_tables(), tmp_path)
    return tmp_path


def block(html: str, model_id: str) -> str:
    """One model's block of the section."""
    part = html[html.index('id="models"'):html.index('id="gallery"')]
    starts = [m.start() for m in re.finditer(r'<div class="gallery-model model-detail">', part)]
    for start, end in zip(starts, [*starts[1:], len(part)]):
        if f'<span class="id">{model_id}</span>' in part[start:start + 200]:
            return part[start:end]
    raise AssertionError(f"no block of {model_id}")


def test_each_model_shows_its_confusion_matrices_per_split(source_run):
    html = render_report(source_run).read_text()
    models = html[html.index('id="models"'):html.index('id="gallery"')]
    assert models.count('<div class="gallery-model model-detail">') == 3  # all of a grid this small
    assert models.index("r18-crop-s0") < models.index("r18-nocrop-s0") < models.index("r18-nocrop-s1")
    assert "Shown:" not in models  # nothing omitted
    mine = block(html, "r18-crop-s0")
    # internal: per fold tn 4, fp 1, fn 2, tp 3 (results.csv), 2 folds
    internal = mine[mine.index('<span class="id">internal</span>'):mine.index('<span class="id">ext_normal</span>')]
    assert "20 image evaluations" in internal
    assert re.search(r'<th>normal</th><td class="diag">8</td><td>2</td></tr>\s*'
                     r'<tr><th>covid</th><td>4</td><td class="diag">6</td>', internal)
    # ext_normal: per fold fp 1 only
    external = mine[mine.index('<span class="id">ext_normal</span>'):mine.index("metrics (internal test split)")]
    assert "2 image evaluations" in external
    assert re.search(r'<th>normal</th><td class="diag">0</td><td>2</td></tr>\s*'
                     r'<tr><th>covid</th><td>0</td><td class="diag">0</td>', external)


def test_metrics_carry_ci_direction_and_status(source_run):
    html = render_report(source_run).read_text()
    selected = block(html, "r18-crop-s0")
    metrics = selected[selected.index("metrics (internal test split)"):selected.index("maps per data source")]
    for kind in ("classification", "attention (Grad-CAM)", "occlusion (causal)", "behaviour"):
        assert f'<th colspan="5" class="group">{kind}</th>' in metrics
    assert metrics.index("classification") < metrics.index("attention (Grad-CAM)") < metrics.index("occlusion")
    # accuracy 0.80, CI 0.80 ± 0.02, std 0.01; higher is better
    assert re.search(r"<code>accuracy</code>&nbsp;↑</td>\s*<td class=\"num\">0.800</td>\s*"
                     r"<td class=\"num ci\">\[0.78, 0.82\]</td><td class=\"num ci\">0.010</td>", metrics)
    assert "<code>border_<wbr>mass</code>&nbsp;↓" in metrics
    assert "✓ meets lung_mass ≥ 0.5" in metrics  # 0.66
    # artifact_mass is not applicable for this model (models.csv), artifact_occlusion_effect merely undefined
    row = metrics[metrics.index("<code>artifact_<wbr>mass</code>"):]
    assert row[:row.index("</tr>")].count("not applicable: its region is out of view by proof") == 1
    row = metrics[metrics.index("<code>artifact_<wbr>occlusion_<wbr>effect</code>"):]
    assert "undefined (no mask, blank maps or not measured)" in row[:row.index("</tr>")]
    assert "tn" not in re.findall(r"<code>(\w+)</code>", metrics)  # counts are in the matrices
    # r18-nocrop-s0: the constraint's metric is undefined without proof; r18-nocrop-s1 breaks lung_mass
    unverified = block(html, "r18-nocrop-s0")
    assert '<td class="warn">undefined without proof: the constraint is unverified</td>' in unverified
    assert "? unverified: artifact_occlusion_effect" in unverified
    broken = block(html, "r18-nocrop-s1")
    assert '<td class="num bad">0.310</td>' in broken and '<td class="bad">✗ breaks lung_mass ≥ 0.5</td>' in broken
    assert "✗ lung_mass=0.31 &lt; min 0.5" in broken


def test_maps_per_source_with_labels_and_escaping(source_run):
    html = render_report(source_run).read_text()
    assert HOSTILE not in html and "&lt;script&gt;alert(&#34;src&#34;)&lt;/script&gt;" in html
    mine = block(html, "r18-nocrop-s1")
    maps = mine[mine.index("maps per data source"):]
    headers = re.findall(r'<h5>source <span class="id">(.*?)</span> <span class="muted">· (.*?) · (.*?)</span></h5>', maps)
    assert headers == [
        ("ieee8023", "internal", "0 of 2 image evaluations wrong (all folds)"),
        ("kermany", "internal", "0 of 2 image evaluations wrong (all folds)"),
        ("&lt;script&gt;alert(&#34;src&#34;)&lt;/script&gt;", "ext_normal", "2 of 2 image evaluations wrong (all folds)"),
    ]
    assert maps.count("<figure>") == 6 and maps.count('src="data:image/png;base64,') == 3
    assert maps.count(">no wrong call<") == 2 and maps.count(">no correct call<") == 1
    external = maps[maps.index("ext_normal"):]
    assert "<b>wrong</b> · <span class=\"id\">ext-1</span><br>" in external
    assert "label normal · called covid<br>p(covid) = 0.700 · fold 1" in external
    assert 'alt="wrong call ext-1 from &lt;script&gt;alert(&#34;src&#34;)&lt;/script&gt; on ext_normal"' in external
    internal = maps[:maps.index("kermany")]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in internal and "<b>correct</b>" in internal  # the XSS sample id
    assert "No examples in gallery.csv" not in maps
    # Every image of the page: 3 models x (best/worst, tp/tn, external fp, 3 source examples) + colour bar
    assert html.count('src="data:image/png;base64,') == 3 * (2 + 2 + 1 + 3) + 1
    # The other sections are unchanged by the new rows.
    decisions = html[html.index('id="decisions"'):html.index('id="models"')]
    assert decisions.count("<figure>") == 3 * (4 + 1)
    assert html[html.index('id="gallery"'):html.index('id="data"')].count("<figure>") == 6


def test_a_source_without_examples_is_named(source_run):
    tables = read_tables(source_run)
    tables.gallery = tables.gallery[~((tables.gallery["model_id"] == "r18-crop-s0")
                                      & (tables.gallery["source"] == "kermany"))]
    mine = block(render_html(tables), "r18-crop-s0")
    assert mine.count("<h5>") == 2
    assert (f"No examples in gallery.csv for 1 source\n    (examples are kept for the first "
            f"{section.SOURCE_EXAMPLE_SOURCES} sources of a split by name):\n    kermany (internal).") in mine


def test_a_large_grid_is_bounded_and_says_where_the_rest_is(source_run):
    tables = read_tables(source_run)
    template = tables.models.iloc[-1]
    extra = [template.copy() for _ in range(section.MODEL_DETAILS)]
    for i, row in enumerate(extra):
        row["model_id"], row["rank"], row["selected"] = f"extra-{i}", 4 + i, False
    tables.models = pd.concat([tables.models, pd.DataFrame(extra)], ignore_index=True)
    tables.models.loc[tables.models["model_id"] == "r18-crop-s0", "rank"] = 9  # selected, yet ranked low
    html = render_html(tables)
    models = html[html.index('id="models"'):html.index('id="gallery"')]
    n = section.MODEL_DETAILS
    assert models.count('<div class="gallery-model model-detail">') == n
    assert f"Shown: {n} of {n + 3} models (at most {n})" in models and f"the other 3 are in the ranking" in models
    assert models.index("r18-crop-s0") < models.index("r18-nocrop-s0")  # the selected model first
    assert "extra-5" not in models
    # A model without results rows or examples still gets its block, saying so.
    extra0 = block(html, "extra-0")
    assert "results.csv has no confusion counts" in extra0 and "<figure>" not in extra0


def test_an_older_run_without_per_source_examples_says_so(source_run):
    tables = read_tables(source_run)
    tables.gallery = tables.gallery[~tables.gallery["kind"].isin(SOURCE_KINDS)].drop(columns=["source"])
    html = render_html(tables)
    models = html[html.index('id="models"'):html.index('id="gallery"')]
    assert models.count("No per-source examples in this run") == 3 and "<figure>" not in models
    assert models.count('<table class="cm">') == 3 * 2  # the matrices stay: internal and ext_normal
    assert '<a href="#models">Models</a>' in html


def test_the_report_restates_the_pipelines_rule():
    assert section.SOURCE_EXAMPLE_SOURCES == pipeline_gallery.SOURCE_EXAMPLE_SOURCES
    assert tuple(section.SOURCE_KINDS) == SOURCE_KINDS
