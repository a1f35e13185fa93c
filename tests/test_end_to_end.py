"""End-to-end runs on synthetic phantoms, where the answer is known."""
import json

import pandas as pd
import pytest

from auditbench.protocol.loader import load_protocol
from auditbench.report.tables import GRID_COLUMNS, IMAGE_COLUMNS
from auditbench.run import run_protocol
from conftest import REPO

pytestmark = pytest.mark.slow

# quick.yaml as users apply the audit to real images: phantoms drawn at 160 px and resampled into
# efficientnet_lite0's 224-px frame, with and without the crop, markers in the border band (which
# the crop removes) or inside the crop window (which it does not). Frozen models only, for time.
KNOWN_ANSWER = [
    "models.backbones=[{name: efficientnet_lite0, weights: imagenet}]",
    "training.finetune=[false]",
    "data.synthetic.n_images=96",
    "data.synthetic.image_size=160",
    "preprocessing.input_size=224",
    "data.synthetic.artifact_placement=[border, inside_crop]",
    "metrics.bootstrap=200",
    "validation.bootstrap=200",
    "metrics.faithfulness.images=0",  # tested in tests/test_faithfulness_run.py; costly at 224 px
]
N_MODELS = 8  # shortcut strength {0, 1} x crop {off, on} x placement {border, inside_crop}


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
    axes = ["shortcut_strength", "artifact_placement", "data_seed"]
    assert list(results.columns) == GRID_COLUMNS + axes + ["split", "fold", "metric", "value", "run_id", "protocol_sha256"]
    assert set(results["split"]) == {"internal", "train_distribution"}
    images = pd.read_csv(out / "images.csv")
    assert set(IMAGE_COLUMNS) <= set(images.columns)
    assert (images["split"] == "internal").sum() == N_MODELS * 96  # every image is tested once per model
    for metric in ["accuracy", "lung_mass", "artifact_occlusion_effect", "shortcut_reliance"]:
        assert {f"{metric}_mean", f"{metric}_std", f"{metric}_ci_low", f"{metric}_ci_high"} <= set(models.columns)
    # 224 px at stride 32: a 7x7 map, one cell = 32 frame pixels
    assert (models["cam_map_size"] == 7).all() and (models["cam_stride"] == 32).all()
    saved = json.loads((out / "summary.json").read_text())
    assert saved["selected_model"] == summary["selected_model"]
    assert (out / "models" / summary["selected_model"] / "weights.safetensors").is_file()


def test_known_answer_in_a_resampled_frame_with_and_without_the_crop(known_answer_run):
    """Trained with the marker always on COVID, a model relies on it wherever it can see it, and the
    causal artifact metric flags it: uncropped with border markers, and cropped with markers inside
    the crop window. Where the crop removed every marker, reliance is exactly 0 and the artifact
    metrics are not applicable by construction."""
    _, summary, models = known_answer_run
    for model_id in ("efficientnet_lite0-full-ss1-apborder", "efficientnet_lite0-full-ss1-apinsidecrop",
                     "efficientnet_lite0-crop-ss1-apinsidecrop"):
        row = models.loc[model_id]
        assert row["shortcut_reliance_mean"] > 0.2, model_id
        assert row["artifact_occlusion_effect_mean"] > 0.1, model_id
        assert "artifact_occlusion_effect" in row["violations"], model_id
        assert summary["selected_model"] != model_id
    for model_id in ("efficientnet_lite0-crop-ss0-apborder", "efficientnet_lite0-crop-ss1-apborder"):
        row = models.loc[model_id]
        assert row["shortcut_reliance_mean"] == 0.0  # the crop removed the marker: nothing to rely on
        assert pd.isna(row["artifact_occlusion_effect_mean"]) and pd.isna(row["border_mass_mean"])
        assert {"artifact_occlusion_effect", "artifact_mass", "border_mass"} <= set(row["not_applicable"].split("; "))
        assert row["verified"]
    # Marker-trained models lose accuracy when the marker is decorrelated.
    shortcut = models.loc["efficientnet_lite0-full-ss1-apborder"]
    assert shortcut["shortcut_accuracy_drop_mean"] > 0.1


def test_validation_table_is_behavioural_and_within_frame(known_answer_run):
    out, _, models = known_answer_run
    validation = pd.read_csv(out / "validation.csv")
    assert set(validation["frame"]) == {"all", "224px", "224px crop"}
    row = validation[(validation["metric"] == "artifact_occlusion_effect") & (validation["frame"] == "all")].iloc[0]
    relying = int((models["shortcut_reliance_mean"] > 0.1).sum())
    assert row["n_relying"] + row["n_not_relying"] <= N_MODELS and row["n_relying"] <= relying
    assert row["auroc_ci_low"] <= row["auroc"] <= row["auroc_ci_high"]
