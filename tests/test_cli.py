"""The command line through typer's runner, on a tiny run that takes seconds."""
import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from auditbench.cli import app
from auditbench.outputs import seal
from conftest import REPO, TINY_RUN, run_quick

runner = CliRunner()

TINY = [
    *TINY_RUN,
    "--set", "training.finetune=[false, true]",
    "--set", "training.finetune_phase.max_epochs=1",
    "--set", "report.save_models=all",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_quick(tmp_path_factory.mktemp("tiny"), *TINY)


def test_run_writes_outputs_and_is_deterministic(tiny_run, tmp_path):
    again = run_quick(tmp_path / "again", *TINY)
    first, second = pd.read_csv(tiny_run / "results.csv"), pd.read_csv(again / "results.csv")
    assert first["run_id"].nunique() == 1 and first["run_id"].iloc[0] != second["run_id"].iloc[0]
    assert first["protocol_sha256"].equals(second["protocol_sha256"])  # same protocol
    pd.testing.assert_frame_equal(first.drop(columns="run_id"), second.drop(columns="run_id"))
    assert len(list((tiny_run / "models").iterdir())) == 4  # save_models: all
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (tiny_run, again)]
    assert summaries[0]["data_fingerprint"] == summaries[1]["data_fingerprint"]  # same images
    assert len(summaries[0]["data_fingerprint"]) == 32
    assert "git_commit" in summaries[0]  # the checkout's commit, or null outside a git checkout


def test_lungs_removed_auc_is_the_auc_of_the_lung_filled_copies(tiny_run):
    """results.csv's lungs_removed_auc per model, split and fold is the rank AUC of images.csv's
    p_lungs_removed (p on the lung-filled copy), recomputed here with scikit-learn."""
    from sklearn.metrics import roc_auc_score

    results, images = pd.read_csv(tiny_run / "results.csv"), pd.read_csv(tiny_run / "images.csv")
    rows = results[results["metric"] == "lungs_removed_auc"]
    assert len(rows) == 8  # 4 models x 2 folds, internal split (no other split has occluded copies here)
    for _, row in rows.iterrows():
        part = images[(images["model_id"] == row["model_id"]) & (images["fold"] == row["fold"])
                      & (images["split"] == row["split"])].dropna(subset=["p_lungs_removed"])
        assert row["value"] == pytest.approx(roc_auc_score(part["label_index"], part["p_lungs_removed"]))
    models = pd.read_csv(tiny_run / "models.csv")
    assert {"lungs_removed_auc_mean", "lungs_removed_auc_ci_low", "lungs_removed_auc_ci_high"} <= set(models)


def test_sanity_checks_run_once_per_backbone_and_mark_its_models(tiny_run):
    """One backbone: one model's fold 0 carries the cascade (head first, then the backbone's stages
    from the top, then the stem) and the label-shuffle test; every model of that backbone carries
    the cascade's verdict in models.csv."""
    sanity = pd.read_csv(tiny_run / "sanity.csv", keep_default_na=False)
    assert sanity["model_id"].nunique() == 1 and set(sanity["backbone"]) == {"resnet10t"}
    cascade = sanity[sanity["test"] == "cascading_randomisation"]
    assert cascade["step"].tolist() == list(range(len(cascade)))
    assert cascade["unit"].iloc[:2].tolist() == ["head.fc2", "head.fc1"]
    assert cascade["unit"].iloc[-1] == "backbone.conv1+bn1"  # the stem last
    assert (cascade["verdict"].iloc[:-1] == "").all() and cascade["verdict"].iloc[-1] in ("pass", "fail", "undefined")
    assert sanity[sanity["test"] == "label_shuffle"]["verdict"].isin(["pass", "fail", "undefined"]).all()
    assert (sanity["n_images"] == 24).all()  # fold 0 has 24 test images, fewer than sanity.images (64)
    models = pd.read_csv(tiny_run / "models.csv")
    assert (models["explanation_sanity"] == cascade["verdict"].iloc[-1]).all()


def test_gallery_shows_each_models_most_confident_decisions(tiny_run):
    """gallery.csv holds, per model, the most confident internal tp / fp / fn / tn wherever the model
    made such a decision (recomputed here from images.csv, whose rows are in plan order: ties go
    to the first), best / worst lung_mass where a map had any, and a PNG for every row."""
    from auditbench.report.tables import read_tables

    tables = read_tables(tiny_run)
    internal, gallery = tables.images[tables.images["split"] == "internal"], tables.gallery
    seen = set()
    for model_id, part in internal.groupby("model_id", sort=False):
        called, positive = part["p_positive"] > 0.5, part["label_index"] == 1
        decisions = {"tp": called & positive, "fp": called & ~positive, "fn": ~called & positive, "tn": ~called & ~positive}
        shown = gallery[(gallery["model_id"] == model_id) & (gallery["split"] == "internal")]
        lung_mass = part["lung_mass"].dropna()  # blank where the map was all zero (random-init frozen models)
        for kind, value in (("best", lung_mass.max()), ("worst", lung_mass.min())):
            assert list(shown.loc[shown["kind"] == kind, "lung_mass"]) == ([value] if len(lung_mass) else [])
        for kind, made in decisions.items():
            rows = shown[shown["kind"] == kind]
            if not made.any():
                assert rows.empty, (model_id, kind)
                continue
            confidence = part["p_positive"] if kind in ("tp", "fp") else 1 - part["p_positive"]
            expected = part[made & (confidence == confidence[made].max())].iloc[0]
            (row,) = rows.to_dict("records")
            assert (row["sample_id"], row["fold"], row["p_positive"]) == (
                expected["sample_id"], expected["fold"], expected["p_positive"]), (model_id, kind)
            assert (row["label"], row["prediction"]) == (expected["label"], expected["prediction"])
            seen.add(kind)
    assert seen == {"tp", "fp", "fn", "tn"}  # near-chance tiny models make every kind of decision
    assert set(gallery["split"]) == {"internal"}  # synthetic data has no external set
    for file in gallery["file"]:
        assert (tiny_run / file).is_file(), file
    html = (tiny_run / "report.html").read_text()
    section = html[html.index('id="decisions"'):html.index('id="gallery"')]
    assert section.count('class="gallery-model decision-model"') == 4 and "true positive" in section


def test_validate_prints_the_grid():
    result = runner.invoke(app, ["validate", str(REPO / "protocols" / "quick.yaml")])
    assert result.exit_code == 0, result.output
    assert "16 models x 2 folds" in result.output
    assert "efficientnet_lite0-frozen-full-ss1" in result.output


def test_validate_bad_protocol_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((REPO / "protocols" / "quick.yaml").read_text().replace("folds: 2", "fold: 2"))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "did you mean 'folds'" in result.output


def test_check_exit_codes(tiny_run):
    def check(*args):
        return runner.invoke(app, ["check", str(tiny_run), "--all-models", *args])

    assert check("--min-accuracy", "0").exit_code == 0
    failing = check("--min-accuracy", "1.01")
    assert failing.exit_code == 1
    assert "accuracy" in failing.output and "1.01" in failing.output
    assert check("--max", "border_occlusion_effect=1").exit_code == 0
    unknown = check("--min", "lung_mas=0.5")
    assert unknown.exit_code == 2 and "lung_mass" in unknown.output
    assert runner.invoke(app, ["check", str(tiny_run / "missing"), "--min-accuracy", "0"]).exit_code == 2
    assert check().exit_code == 2  # no thresholds: nothing to gate on


def test_report_re_renders_from_tables(tiny_run):
    html = tiny_run / "report.html"
    html.unlink()
    result = runner.invoke(app, ["report", str(tiny_run)])
    assert result.exit_code == 0, result.output
    assert html.is_file() and "resnet10t" in html.read_text()


def test_checkpoint_loads_back_for_prediction_and_gradcam(tiny_run):
    import numpy as np
    import torch

    from auditbench.data.transforms import normalise
    from auditbench.explain.gradcam import GradCAM
    from auditbench.models.checkpoint import load_checkpoint

    model_dir = next((tiny_run / "models").iterdir())
    model, config = load_checkpoint(model_dir)
    size = config["preprocessing"]["input_size"]
    x = normalise(np.random.default_rng(0).random((2, size, size), dtype=np.float32),
                  config["preprocessing"]["mean"], config["preprocessing"]["std"])
    result = GradCAM(model)(x, 1)
    assert result.maps.shape == (2, size, size)
    assert torch.all(result.maps >= 0)


def test_validate_unknown_backbone_suggests_names():
    result = runner.invoke(app, ["validate", str(REPO / "protocols" / "quick.yaml"), "--set", "models.backbones=[efficientnet_lite]"])
    assert result.exit_code == 2
    assert "models.backbones[0].name" in result.output and "efficientnet_lite0" in result.output


def test_predicted_class_target_and_no_occlusion(tmp_path):
    args = ["run", str(REPO / "protocols" / "quick.yaml"), *TINY, "--out", str(tmp_path),
            "--set", "explain.target=predicted", "--set", "metrics.occlusion=false", "--set", "training.finetune=[false]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    images = pd.read_csv(tmp_path / "images.csv")
    assert "artifact_occlusion_effect" not in images.columns
    assert images["lung_mass"].notna().any()


@pytest.mark.parametrize("mode", ["minority_once", "online"])
def test_augmentation_modes_run(tmp_path, mode):
    args = ["run", str(REPO / "protocols" / "quick.yaml"), *TINY, "--out", str(tmp_path),
            "--set", "training.augment=[false, true]", "--set", f"training.augment_mode={mode}",
            "--set", "data.synthetic.shortcut_strength=[0]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    models = pd.read_csv(tmp_path / "models.csv")
    assert set(models["model_id"]) == {"resnet10t-ft-aug", "resnet10t-ft-noaug", "resnet10t-frozen-aug", "resnet10t-frozen-noaug"}


def test_check_against_a_baseline_fails_on_regression(tiny_run, tmp_path):
    import shutil

    worse = tmp_path / "worse"
    shutil.copytree(tiny_run, worse)
    models = pd.read_csv(worse / "models.csv")
    selected = models["selected"].astype(bool)
    models.loc[selected, "accuracy_mean"] -= 0.2  # higher is better: a drop of 0.2 > tolerance 0.05
    models.loc[selected, "border_occlusion_effect_mean"] += 0.01  # lower is better: worse, within tolerance
    models.to_csv(worse / "models.csv", index=False)
    unsealed = runner.invoke(app, ["check", str(worse), "--baseline", str(tiny_run)])
    assert unsealed.exit_code == 2 and "models.csv: sha256 differs" in unsealed.output  # edited after the run
    seal(worse)  # accept the edit: the test is about the regression rule

    same = runner.invoke(app, ["check", str(tiny_run), "--baseline", str(tiny_run)])
    assert same.exit_code == 0, same.output
    regressed = runner.invoke(app, ["check", str(worse), "--baseline", str(tiny_run)])
    assert regressed.exit_code == 1
    assert "accuracy" in regressed.output and "regressed from" in regressed.output
    within = runner.invoke(app, ["check", str(worse), "--baseline", str(tiny_run), "--regression-metric", "border_occlusion_effect"])
    assert within.exit_code == 0, within.output
    strict = runner.invoke(app, ["check", str(worse), "--baseline", str(tiny_run), "--regression-metric", "border_occlusion_effect",
                                 "--tolerance", "0.001"])
    assert strict.exit_code == 1 and "border_occlusion_effect" in strict.output
    missing = runner.invoke(app, ["check", str(worse), "--baseline", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2


@pytest.mark.parametrize("method, layer", [("inputxgradient", "last"), ("hirescam", "stride16"), ("eigencam", "last")])
def test_run_explains_with_any_registered_method(tmp_path, method, layer):
    """Input-level (InputXGradient; Score-CAM takes the same path), gradient (HiResCAM at a finer level) and gradient-free (EigenCAM)
    methods all go through the run, for frozen and fine-tuned models, and give finite maps."""
    args = ["run", str(REPO / "protocols" / "quick.yaml"), *TINY, "--out", str(tmp_path / "out"),
            "--set", f"explain.method={method}", "--set", f"explain.layer={layer}",
            "--set", "data.synthetic.shortcut_strength=[1]", "--set", "report.save_models=none",
            "--set", "explain.batch_size=64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    models = pd.read_csv(tmp_path / "out" / "models.csv")
    assert len(models) == 2 and set(models["cam_layer"]) == {layer}
    # stride 16 at 64 px is a 4x4 map, "last" (stride 32) 2x2; InputXGradient is per pixel (64x64, stride 1)
    expected = {"inputxgradient": (64, 1), "hirescam": (4, 16), "eigencam": (2, 32)}[method]
    assert set(zip(models["cam_map_size"], models["cam_stride"])) == {expected}
    images = pd.read_csv(tmp_path / "out" / "images.csv")
    assert images["lung_mass"].notna().any() and images["lung_mass"].dropna().between(0, 1).all()


def test_probes_on_data_of_one_source_are_undefined_and_say_why(tiny_run):
    """Phantoms have one source: the shortcut probes have nothing to tell apart, in every group."""
    probes = pd.read_csv(tiny_run / "probes.csv")
    assert set(probes["probe"]) == {"source", "outside_lung"} and set(probes["label"]) == {"covid", "non_covid"}
    assert probes["reason"].str.startswith("one source only (synthetic)").all()
    models = pd.read_csv(tiny_run / "models.csv")
    assert models[["source_probe_accuracy_mean", "outside_lung_probe_accuracy_mean"]].isna().all().all()
