from pathlib import Path

import pandas as pd

from auditbench.audit.aggregate import aggregate_models
from auditbench.pipeline.findings import external_findings
from auditbench.pipeline.records import stable_seed

REPO = Path(__file__).resolve().parents[1]


def _rows(model, split, fold, method="gradcam", **metrics):
    return [{"model_id": model, "method": method, "split": split, "fold": fold, "metric": k, "value": v}
            for k, v in metrics.items()]


def test_external_findings_uses_best_ranked_model_evaluated_on_the_set():
    results = pd.DataFrame(
        _rows("a", "internal", 0, accuracy=1.0)
        + _rows("b", "internal", 0, accuracy=0.9)
        + _rows("b", "ext", 0, accuracy=0.5, tn=3, fp=1, fn=0, tp=0)
        + _rows("b", "ext", 1, accuracy=0.25, tn=1, fp=3, fn=0, tp=0)
    )
    models = pd.DataFrame({"model_id": ["a", "b"], "rank": [1, 2], "accuracy_mean": [1.0, 0.9]})
    (line,) = external_findings(results, models)
    # model a has no rows on "ext"; b: accuracy mean(0.5, 0.25) = 0.375, positive calls 4 of 8 = 50%
    assert "'ext'" in line and ", b," in line
    assert "0.375" in line and "0.900" in line and "50%" in line


def test_aggregate_models_mean_and_std_over_folds_of_the_internal_split():
    from auditbench.protocol.grid import ModelSpec
    from auditbench.protocol.schema import BUILTIN_TASKS

    spec = ModelSpec("m", "resnet18", "none", 256, False, False, False, BUILTIN_TASKS["covid_vs_viral"])
    results = pd.DataFrame(
        _rows("m", "internal", 0, accuracy=0.5, lung_mass=0.2) + _rows("m", "internal", 1, accuracy=1.0, lung_mass=0.4)
        + _rows("m", "ext", 0, accuracy=0.0, lung_mass=0.1)
        + _rows("m", "internal", 0, "eigencam", accuracy=0.5, lung_mass=0.6)
        + _rows("m", "internal", 1, "eigencam", accuracy=1.0, lung_mass=0.8)
    )
    images = pd.DataFrame({
        "model_id": "m", "method": ["gradcam"] * 2 + ["eigencam"] * 2, "split": "internal",
        "patient_id": ["p1", "p2"] * 2, "label_index": [0, 1] * 2, "correct": [True, False] * 2,
        "p_positive": [0.2, 0.3] * 2, "lung_mass": [0.2, 0.4, 0.6, 0.8], "artifact_status": "absent",
        "border_in_view": False,
    })
    geometry = {("m", "gradcam"): {"input_size": 64, "frame": "64px", "cam_layer": "last", "cam_map_size": 2,
                                   "cam_stride": 32},
                ("m", "eigencam"): {"input_size": 64, "frame": "64px", "cam_layer": "last", "cam_map_size": 2,
                                    "cam_stride": 32}}
    models = aggregate_models(results, images, pd.DataFrame([spec.grid_row()]), 2, geometry, n_boot=50)
    # One row per model and method, in the order the methods first appear; only the maps' metrics differ.
    assert models["method"].tolist() == ["gradcam", "eigencam"]
    assert models["lung_mass_mean"].round(12).tolist() == [0.3, 0.7]
    assert models["accuracy_mean"].tolist() == [0.75, 0.75]
    row = models.iloc[0]
    assert row["accuracy_mean"] == 0.75
    assert abs(row["accuracy_std"] - 0.3535533906) < 1e-9  # sample std of (0.5, 1.0)
    assert row["n_folds"] == 2 and row["task"] == "covid_vs_viral"
    assert (row["cam_map_size"], row["cam_stride"], row["frame"]) == (2, 32, "64px")
    # accuracy CI over 2 patients, one right and one wrong: replicate accuracies lie in {0, 0.5, 1}
    assert row["accuracy_ci_low"] == 0.0 and row["accuracy_ci_high"] == 1.0
    assert row["not_applicable"] == ""


def test_stable_seed_is_fixed_text_hash():
    assert stable_seed(0, "m", 1) == stable_seed(0, "m", 1)
    assert stable_seed(0, "m", 1) != stable_seed(0, "m", 2)


def test_content_key_follows_image_and_masks_not_object_identity():
    import dataclasses

    import numpy as np

    from auditbench.data.records import Sample, content_key

    image = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    lungs = np.zeros((8, 8), bool)
    lungs[2:6, 2:6] = True
    a = Sample("s1", image, "covid", "p1", "synthetic", lung_mask=lungs)
    twin = Sample("s1", image.copy(), "normal", "p9", "other", lung_mask=lungs.copy())  # same pixels and masks
    assert content_key(a) == content_key(twin)
    changed_pixel = image.copy()
    changed_pixel[0, 0] += 1e-6
    changed_mask = lungs.copy()
    changed_mask[0, 0] = True
    marker = np.zeros((8, 8), bool)
    others = [
        dataclasses.replace(a, sample_id="s2"),
        dataclasses.replace(a, image=changed_pixel),
        dataclasses.replace(a, lung_mask=changed_mask),
        dataclasses.replace(a, lung_mask=None),
        dataclasses.replace(a, artifact_mask=marker),  # "no marker" (empty mask) differs from "unknown" (None)
    ]
    keys = {content_key(s) for s in others}
    assert len(keys) == len(others) and content_key(a) not in keys


def test_backbone_passes_run_once_per_distinct_image(tmp_path, monkeypatch):
    """Two views holding the same images (every training strength's decorrelated test view) share
    one backbone pass; a view with a changed image computes that image only; a view read back from
    the store equals what was computed, chunk by chunk."""
    import dataclasses

    import numpy as np

    import auditbench.pipeline.passes as passes_module
    from auditbench.data.prepare import to_frames
    from auditbench.data.synthetic import SyntheticConfig, generate
    from auditbench.pipeline.store import FeatureStore
    from auditbench.protocol.loader import load_protocol
    from auditbench.training.device import select_accelerator

    protocol = load_protocol(REPO / "protocols" / "quick.yaml", [
        "models.backbones=[{name: resnet10t, weights: none}]", "preprocessing.input_size=32",
    ])
    passes = []
    real_extract = passes_module.extract_features
    monkeypatch.setattr(passes_module, "extract_features", lambda backbone, images, *a, **k: passes.append(len(images)) or real_extract(backbone, images, *a, **k))
    monkeypatch.setattr(passes_module, "CHUNK", 4)  # 6 images: two chunks
    backbone = passes_module.load_backbone(protocol, "resnet10t", "none")
    frame = passes_module.model_frame(protocol, backbone, False)
    cache = passes_module.BackbonePasses(protocol, backbone, frame, select_accelerator("cpu", "auto"),
                                         FeatureStore(tmp_path, "ns"))
    config = SyntheticConfig(n_images=6, image_size=48, seed=0)
    view = generate(config, 0.0, "test").samples
    same_images = generate(config, 0.0, "test").samples  # new objects, same content
    assert view[0] is not same_images[0]
    first = cache.view(view, keep_maps=True, occlusion=False)
    cache.view(same_images, keep_maps=True, occlusion=False)
    assert passes == [4, 2]
    edited = [dataclasses.replace(view[0], image=view[0].image * 0.5)] + same_images[1:]
    features = cache.view(edited, keep_maps=False, occlusion=False)
    assert passes == [4, 2, 1] and features.pooled.shape[0] == 6
    rows = np.array([5, 0, 3])
    expected = to_frames([view[i] for i in rows], frame, protocol.border_fraction)
    np.testing.assert_array_equal(first.frames(rows).images, expected.images)
    np.testing.assert_array_equal(first.frames(rows).lungs, expected.lungs)
    direct = real_extract(backbone, expected.images, backbone.data_config["mean"], backbone.data_config["std"],
                          select_accelerator("cpu", "auto"), 32, keep_maps=True)
    assert np.allclose(first.maps(rows).numpy(), direct.maps.numpy(), atol=1e-6)
    assert np.allclose(first.pooled[rows].numpy(), direct.pooled.numpy(), atol=1e-6)


def test_data_fingerprint_ignores_order_and_repeats_but_not_pixels():
    import dataclasses

    import numpy as np

    from auditbench.data.records import Sample, data_fingerprint

    images = [np.full((4, 4), v, np.float32) for v in (0.1, 0.2)]
    a, b = (Sample(f"s{i}", image, "covid", f"p{i}", "synthetic") for i, image in enumerate(images))
    assert data_fingerprint([a, b]) == data_fingerprint([b, a, a])
    changed = dataclasses.replace(b, image=images[1] + 1e-6)
    assert data_fingerprint([a, changed]) != data_fingerprint([a, b])
    assert data_fingerprint([a]) != data_fingerprint([a, b])


def test_lungs_removed_auc_leaves_out_images_without_lungs():
    """By hand: of (0.1, 0), (0.4, 0), (0.35, 1), (0.8, 1) three of four positive-negative pairs are
    ordered right (0.35 < 0.4 is not): 0.75; the image without lungs in view (NaN) is left out."""
    import numpy as np

    from auditbench.audit.aggregate import lungs_removed_auc_value

    p = np.array([0.1, np.nan, 0.4, 0.35, 0.8])
    assert lungs_removed_auc_value(p, np.array([0, 1, 0, 1, 1])) == 0.75
    assert np.isnan(lungs_removed_auc_value(p, np.array([1, 0, 1, 1, 1])))  # one class among defined images
