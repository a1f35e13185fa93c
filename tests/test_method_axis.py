"""explain.method is a list, an evaluation axis: every model is trained once and explained by each
method; a method's rows do not depend on which other methods run beside it."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from auditbench.cli import app
from auditbench.report.tables import read_tables
from conftest import REPO, TINY_RUN, run_quick

runner = CliRunner()

# One frozen and one fine-tuned model, two strengths so that the validation has both kinds.
SMALL = [
    *TINY_RUN,
    "--set", "training.finetune=[false]",
    "--set", "data.synthetic.shortcut_strength=[0, 1]",
    "--set", "sanity.images=8",
    "--set", "report.save_models=none",
]
DROP = ["run_id", "protocol_sha256"]


def _run(out, methods: str):
    return run_quick(out, *SMALL, "--set", f"explain.method={methods}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("methods")
    return _run(base / "one", "[gradcam]"), _run(base / "three", "[gradcam, hirescam, eigencam]")


def test_every_table_has_one_set_of_rows_per_method(runs):
    _, three = runs
    models = pd.read_csv(three / "models.csv")
    assert list(models.columns[:2]) == ["model_id", "method"]
    assert len(models) == 2 * 3 and models["method"].tolist() == ["gradcam", "hirescam", "eigencam"] * 2
    assert models["rank"].tolist()[::3] == [1, 2]  # in the primary method's rank order
    images = pd.read_csv(three / "images.csv")
    counts = images.groupby("method").size()
    assert set(counts.index) == {"gradcam", "hirescam", "eigencam"} and counts.nunique() == 1
    assert images.loc[images["method"] == "gradcam", "method_agreement"].isna().all()
    results = pd.read_csv(three / "results.csv")
    metrics = results.groupby("method")["metric"].apply(set)
    assert metrics["hirescam"] == metrics["eigencam"] == metrics["gradcam"] | {"method_agreement"}
    sanity = pd.read_csv(three / "sanity.csv")
    assert set(sanity["method"]) == {"gradcam", "hirescam", "eigencam"}


def test_the_validation_scores_each_methods_metrics_on_their_own():
    """Four models, two relying; Grad-CAM's lung_mass is low exactly on the relying ones (AUROC 1),
    EigenCAM's the other way round (AUROC 0); the reliance itself is the model's, the same for both."""
    from auditbench.pipeline.validate import validation_table
    from auditbench.protocol.loader import load_protocol

    protocol = load_protocol(REPO / "protocols" / "quick.yaml", ["explain.method=[gradcam, eigencam]"])
    reliance = [0.5, 0.4, 0.01, 0.02]
    models = pd.DataFrame({
        "model_id": list("abcd") * 2, "method": ["gradcam"] * 4 + ["eigencam"] * 4, "frame": "128px full",
        "shortcut_reliance_mean": reliance * 2,
        "lung_mass_mean": [0.1, 0.2, 0.8, 0.9] + [0.9, 0.8, 0.2, 0.1],
    })
    notes = []
    table = validation_table(models, protocol, notes)
    lung = table[(table["metric"] == "lung_mass") & (table["frame"] == "all")].set_index("method")
    assert lung.loc["gradcam", "auroc"] == 1.0 and lung.loc["eigencam", "auroc"] == 0.0
    assert list(dict.fromkeys(table["method"])) == ["gradcam", "eigencam"] and notes == []


def test_a_single_method_run_has_no_methods_section(runs):
    one, _ = runs
    assert 'id="methods"' not in (one / "report.html").read_text(encoding="utf-8")


def test_adding_methods_changes_no_number_of_the_primary_one(runs):
    one, three = runs
    for name in ("results.csv", "images.csv", "models.csv"):
        alone = pd.read_csv(one / name).drop(columns=DROP)
        beside = pd.read_csv(three / name).drop(columns=DROP)
        beside = beside[beside["method"] == "gradcam"].reset_index(drop=True)
        pd.testing.assert_frame_equal(beside[alone.columns], alone, check_exact=True, obj=name)


def test_only_attention_metrics_differ_between_methods(runs):
    _, three = runs
    images = pd.read_csv(three / "images.csv")
    by_method = {m: rows.reset_index(drop=True) for m, rows in images.groupby("method", sort=False)}
    same = ["p_positive", "correct", "lung_occlusion_effect", "shortcut_reliance"]
    for method in ("hirescam", "eigencam"):
        pd.testing.assert_frame_equal(by_method[method][same], by_method["gradcam"][same])
    # EigenCAM ignores the class: its maps are not Grad-CAM's, so its masses differ somewhere.
    assert not by_method["eigencam"]["lung_mass"].equals(by_method["gradcam"]["lung_mass"])


def test_the_report_and_check_read_the_primary_method(runs):
    _, three = runs
    tables = read_tables(three)
    assert tables.methods == ["gradcam", "hirescam", "eigencam"]
    assert set(tables.models["method"]) == {"gradcam"} and len(tables.models) == 2
    assert set(tables.images["method"]) == {"gradcam"} and len(tables.by_method) == 6
    summary = json.loads((three / "summary.json").read_text())
    assert any("explanation method" in note for note in summary["notes"])
    html = (three / "report.html").read_text(encoding="utf-8")
    assert 'id="methods"' in html and html.count('<tr class="primary-method">') == 2
    result = runner.invoke(app, ["check", str(three), "--min-lung-mass", "0.01"])
    assert result.exit_code == 0, result.output


def test_a_method_listed_twice_or_unknown_is_refused():
    twice = runner.invoke(app, ["validate", str(REPO / "protocols" / "quick.yaml"),
                                "--set", "explain.method=[gradcam, gradcam]"])
    assert twice.exit_code == 2 and "more than once" in twice.output
    unknown = runner.invoke(app, ["validate", str(REPO / "protocols" / "quick.yaml"),
                                  "--set", "explain.method=[gradcam, hirescan]"])
    assert unknown.exit_code == 2 and "explain.method[1]" in unknown.output and "hirescam" in unknown.output


def test_rank_agreement_by_hand_and_against_scipy():
    import numpy as np
    from scipy.stats import spearmanr

    from auditbench.audit.agreement import rank_agreement
    from auditbench.audit.metrics import MetricWarning

    a = np.array([[[0, 1], [2, 3]], [[0, 0], [1, 1]], [[0, 1], [2, 3]], [[5, 5], [5, 5]]], float)
    b = np.array([[[3, 2], [1, 0]], [[0, 1], [2, 3]], [[0, 10], [20, 30]], [[0, 1], [2, 3]]], float)
    with pytest.warns(MetricWarning, match="1 of 4 map pairs"):
        r = rank_agreement(a, b)
    # reversed order: -1; ties (ranks 1.5 1.5 3.5 3.5 vs 1 2 3 4): 4 / sqrt(4 * 5) = 2 / sqrt(5);
    # same order, other scale: 1; a constant map ranks nothing: NaN
    np.testing.assert_allclose(r[:3], [-1.0, 2 / np.sqrt(5), 1.0])
    assert np.isnan(r[3])
    rng = np.random.default_rng(0)
    x, y = rng.random((3, 8, 8)), rng.random((3, 8, 8))
    x[0, :4] = 0.5  # ties
    expected = [spearmanr(u.ravel(), v.ravel()).statistic for u, v in zip(x, y)]
    np.testing.assert_allclose(rank_agreement(x, y), expected, rtol=1e-12)
