"""End-to-end runs on synthetic phantoms, where the answer is known."""
import json

import pandas as pd
import pytest

from auditbench.protocol.loader import load_protocol
from auditbench.report.tables import GRID_COLUMNS, IMAGE_COLUMNS
from auditbench.run import run_protocol
from conftest import REPO

pytestmark = pytest.mark.slow

# A smaller quick.yaml: frozen efficientnet_lite0 only (real ImageNet weights), both shortcut
# strengths, with and without the crop.
KNOWN_ANSWER = [
    "models.backbones=[{name: efficientnet_lite0, weights: imagenet}]",
    "training.finetune=[false]",
    "data.synthetic.n_images=160",
    "preprocessing.input_size=128",
]


@pytest.fixture(scope="module")
def known_answer_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("known_answer")
    protocol = load_protocol(REPO / "protocols" / "quick.yaml", KNOWN_ANSWER)
    summary = run_protocol(protocol, out, REPO)
    return out, summary, pd.read_csv(out / "models.csv").set_index("model_id")


def test_outputs_exist_with_their_columns(known_answer_run):
    out, summary, models = known_answer_run
    for name in ["protocol.resolved.yaml", "results.csv", "models.csv", "images.csv", "validation.csv",
                 "skipped.csv", "gallery.csv", "summary.json", "report.html"]:
        assert (out / name).is_file(), name
    results = pd.read_csv(out / "results.csv")
    assert list(results.columns) == GRID_COLUMNS + ["shortcut_strength", "split", "fold", "metric", "value"]
    internal = results[results["split"] == "internal"]
    assert len(internal) == 4 * 2 * internal["metric"].nunique()  # 4 models x 2 folds x metrics
    assert set(results["split"]) == {"internal", "train_distribution"}
    images = pd.read_csv(out / "images.csv")
    assert set(IMAGE_COLUMNS) <= set(images.columns)
    assert (images["split"] == "internal").sum() == 4 * 160  # every image is tested once per model
    for metric in ["accuracy", "lung_mass", "artifact_occlusion_effect"]:
        assert {f"{metric}_mean", f"{metric}_std"} <= set(models.columns)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["selected_model"] == summary["selected_model"]
    assert (out / "models" / summary["selected_model"] / "weights.safetensors").is_file()
    assert len(list((out / "models").iterdir())) == 1  # save_models: selected


def test_known_answer(known_answer_run):
    """The model trained with the marker always on COVID (strength 1, no crop) loses accuracy on
    decorrelated test images, the causal artifact metric flags it, and it is not selected."""
    _, summary, models = known_answer_run
    shortcut, clean = models.loc["efficientnet_lite0-full-ss1"], models.loc["efficientnet_lite0-full-ss0"]
    assert shortcut["accuracy_mean"] < clean["accuracy_mean"] - 0.05
    # ... while on test images with the training bias it looks better than the clean model.
    results = pd.read_csv(known_answer_run[0] / "results.csv")
    biased = results[(results["split"] == "train_distribution") & (results["metric"] == "accuracy")]
    biased_accuracy = biased.groupby("model_id")["value"].mean()
    assert biased_accuracy["efficientnet_lite0-full-ss1"] > clean["accuracy_mean"]
    assert shortcut["artifact_occlusion_effect_mean"] > 0.1 >= clean["artifact_occlusion_effect_mean"]
    assert "artifact_occlusion_effect" in shortcut["violations"]
    assert summary["selected_model"] != "efficientnet_lite0-full-ss1"
    # After the crop no marker is in view: the artifact metrics are not applicable, not zero.
    assert models.loc[["efficientnet_lite0-crop-ss0", "efficientnet_lite0-crop-ss1"], "artifact_mass_mean"].isna().all()


def test_validation_table_reports_every_metric(known_answer_run):
    out, _, _ = known_answer_run
    validation = pd.read_csv(out / "validation.csv").set_index("metric")
    assert {"lung_mass", "border_mass", "artifact_mass", "artifact_occlusion_effect"} <= set(validation.index)
    row = validation.loc["artifact_occlusion_effect"]
    assert (row["n_shortcut_models"], row["n_clean_models"]) == (1, 1)  # crop models have no artifact in view
    assert row["auroc"] == 1.0 and row["difference"] > 0
