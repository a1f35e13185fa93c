"""The study's protocol on the real samples in ../shared/data (skipped, saying why, without them)."""
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from auditbench.cli import app
from conftest import NO_FAITHFULNESS, REPO

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]
runner = CliRunner()


@pytest.fixture(scope="module")
def real_run(shared_data, tmp_path_factory):
    """paper.yaml restricted by --set to what a CPU does in about a minute."""
    out = tmp_path_factory.mktemp("paper_cpu")
    args = [
        "run", str(REPO / "protocols" / "paper.yaml"), "--out", str(out),
        "--set", f"data.root={shared_data}",
        "--set", "data.sources=[{dataset: ieee8023, root: ieee8023-covid-chestxray},"
                 " {dataset: kermany, root: kermany-chest-xray-224, options: {splits: [test]}}]",
        "--set", "data.external=[{name: adult-normal, sources: [{dataset: shenzhen_montgomery,"
                 " root: lung-masks-shenzhen-montgomery-256, options: {labels: [normal]}}]}]",
        "--set", "data.max_side=256",
        "--set", "task=[covid_vs_non_covid]",
        "--set", "models.backbones=[efficientnet_lite0]",
        "--set", "models.hidden=[256]",
        "--set", "training.finetune=[false]",
        "--set", "training.augment=[false]",
        "--set", "training.folds=2",
        "--set", "preprocessing.input_size=128",
        *NO_FAITHFULNESS,
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_real_run_reports_masks_crop_and_external(real_run):
    images = pd.read_csv(real_run / "images.csv")
    internal = images[images["split"] == "internal"]
    # Kermany has no lung masks: the shipped U-Net predicted them; ieee8023 brings V7/lungVAE masks.
    sources = internal.groupby("source")["mask_source"].agg(set)
    assert sources["kermany"] == {"predicted"}
    assert "dataset-v7" in sources["ieee8023"]
    external = images[images["split"] == "adult-normal"]
    assert len(external) > 0 and set(external["label"]) == {"non_covid"}
    results = pd.read_csv(real_run / "results.csv")
    assert set(results["split"]) == {"internal", "adult-normal"}
    models = pd.read_csv(real_run / "models.csv")
    assert set(models["crop"]) == {True, False}
    for metric in ["accuracy", "lung_mass", "border_mass", "artifact_mass"]:
        assert models[f"{metric}_mean"].notna().any()
    html = (real_run / "report.html").read_text()
    assert "adult-normal" in html and "predicted" in html


def test_gallery_shows_the_most_confident_errors_on_the_external_set(real_run):
    """Healthy adults called COVID: per model its (at most 2) most confident false positives on the
    external set, each image once over the folds, with their overlays."""
    from auditbench.report.tables import read_tables

    tables = read_tables(real_run)
    external = tables.images[tables.images["split"] == "adult-normal"]
    shown = tables.gallery[tables.gallery["split"] == "adult-normal"]
    shown = shown[shown["kind"].isin(["fp", "fn"])]  # its errors (the per-source examples: the next test)
    assert set(shown["kind"]) <= {"fp"}  # one class only: no false negative can exist
    for model_id, part in external.groupby("model_id"):
        wrong = part[~part["correct"]]
        # Per image the most confident fold; ties keep the earlier (images.csv is in plan order).
        expected = wrong.sort_values("p_positive", ascending=False, kind="stable").drop_duplicates("sample_id")
        rows = shown[shown["model_id"] == model_id]
        assert list(rows["sample_id"]) == list(expected["sample_id"][:2]), model_id
        assert list(rows["p_positive"]) == list(expected["p_positive"][:2])
    assert len(shown), "no model called a healthy adult COVID: the check above tested nothing"
    for file in shown["file"]:
        assert (real_run / file).is_file()


def test_gallery_shows_each_sources_most_confident_correct_and_wrong_call(real_run):
    """Per model, split and data source (ieee8023 and kermany inside, the external set's own): the
    most confident correct and wrong call over all folds (recomputed from images.csv, in plan order:
    ties keep the first), each with its overlay; report.html shows them per model."""
    from auditbench.pipeline.gallery import SOURCE_EXAMPLE_SOURCES
    from auditbench.report.tables import read_tables

    tables = read_tables(real_run)
    examples = tables.gallery[tables.gallery["kind"].isin(["source_correct", "source_wrong"])]
    seen = set()
    for (model_id, split, source), part in tables.images.groupby(["model_id", "split", "source"], sort=False):
        rows = examples[(examples["model_id"] == model_id) & (examples["split"] == split)
                        & (examples["source"] == source)]
        names = sorted(set(tables.images.loc[tables.images["split"] == split, "source"]))
        if source not in names[:SOURCE_EXAMPLE_SOURCES]:
            assert rows.empty
            continue
        confidence = part["p_positive"].where(part["p_positive"] > 0.5, 1 - part["p_positive"])
        for kind, eligible in (("source_correct", part["correct"]), ("source_wrong", ~part["correct"])):
            row = rows[rows["kind"] == kind]
            if not eligible.any():
                assert row.empty, (model_id, split, source, kind)
                continue
            expected = part[eligible & (confidence == confidence[eligible].max())].iloc[0]
            (got,) = row.to_dict("records")
            assert (got["sample_id"], got["fold"], got["p_positive"]) == (
                expected["sample_id"], expected["fold"], expected["p_positive"]), (model_id, split, source, kind)
            assert (real_run / got["file"]).is_file()
            seen.add((split, source))
    assert {"ieee8023", "kermany"} <= {source for split, source in seen if split == "internal"}
    assert any(split == "adult-normal" for split, _ in seen)
    html = (real_run / "report.html").read_text()
    models = html[html.index('id="models"'):html.index('id="gallery"')]
    assert "source <span class=\"id\">ieee8023</span>" in models and "adult-normal" in models


def test_data_check_prints_counts(shared_data):
    result = runner.invoke(app, ["data", "check", str(shared_data / "ieee8023-covid-chestxray"), "--dataset", "ieee8023"])
    assert result.exit_code == 0, result.output
    assert "covid" in result.output and "80" in result.output


def test_data_check_missing_root_exits_2(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path / "nowhere"), "--dataset", "kermany"])
    assert result.exit_code == 2
    assert "nowhere" in result.output


def test_masks_predict_writes_a_mask_per_image(shared_data, tmp_path):
    pairs = tmp_path / "pairs"
    (pairs / "cxr").mkdir(parents=True)
    (pairs / "masks").mkdir()
    for name in sorted((shared_data / "lung-masks-shenzhen-montgomery-256" / "cxr").glob("*_0.png"))[:4]:
        (pairs / "cxr" / name.name).write_bytes(name.read_bytes())
        (pairs / "masks" / name.name).write_bytes((name.parent.parent / "masks" / name.name).read_bytes())
    out = tmp_path / "predicted"
    result = runner.invoke(app, ["masks", "predict", str(pairs), "--dataset", "shenzhen_montgomery", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "masks.csv")
    assert len(table) == 4
    assert all((out / name).is_file() for name in table["lung_mask"])


def test_probes_read_the_source_within_non_covid_beside_the_external_set(real_run):
    """COVID images come from ieee8023 alone (nothing to tell apart); non-COVID images from ieee8023, Kermany
    and the external Shenzhen/Montgomery set: that probe is defined, and its value is the frozen models'."""
    probes = pd.read_csv(real_run / "probes.csv", keep_default_na=False, na_values=[""])
    source = probes[probes["probe"] == "source"]
    assert source[source["label"] == "covid"]["reason"].str.startswith("one source only (ieee8023)").all()
    non_covid = source[source["label"] == "non_covid"]
    assert len(non_covid) == 2 and non_covid["reason"].isna().all()  # crop off and on
    assert set(non_covid["sources"]) == {"ieee8023; kermany; shenzhen_montgomery"}
    assert non_covid["chance"].eq(1 / 3).all() and non_covid["balanced_accuracy"].between(0, 1).all()
    models = pd.read_csv(real_run / "models.csv")
    for crop, rows in models.groupby("crop"):
        group = non_covid[non_covid["crop"] == crop]
        assert np.allclose(rows["source_probe_accuracy_mean"], group["adjusted"].iloc[0])  # one defined class
    html = (real_run / "report.html").read_text()
    assert html.index('<section id="external">') < html.index('<section id="probes">')
