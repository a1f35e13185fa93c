"""The shortcut probes in a run (pipeline/probes.py): once per backbone pass on the group's features,
internal and external images together, into probes.csv and the frozen models' rows; the report's section
and finding. The probes themselves are tested in tests/test_probes.py."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch

from auditbench.data.records import Sample
from auditbench.pipeline.probes import PROBE_COLUMNS, add_probe_columns, probe_notes, probe_rows
from auditbench.protocol.grid import ModelSpec
from auditbench.protocol.loader import load_protocol
from auditbench.protocol.schema import BUILTIN_TASKS
from auditbench.report.findings import Finding
from auditbench.report.html import render_html
from auditbench.report.sections.probes import probe_findings
from conftest import REPO
from test_report import make_tables

TASK = BUILTIN_TASKS["covid_vs_non_covid"]  # class 0 non_covid, class 1 covid
SOURCE_MEANS = {"ieee8023": 0.0, "kermany": 10.0, "shenzhen_montgomery": 20.0}


def _samples(source: str, label: str, n: int) -> list[Sample]:
    # Patient ids repeat across sources ("p0", "p1", ...): the probe must keep them apart.
    return [Sample(f"{source}:{i}", np.zeros((4, 4), np.float32), label, f"p{i}", source) for i in range(n)]


class _View(SimpleNamespace):
    def __len__(self):
        return self.n


def _view(samples: list[Sample], lungs_in_view: np.ndarray, seed: int):
    """A stand-in for pipeline.records.ViewPass: pooled features that carry the source (its mean on every
    channel, noise 0.1), and lung-filled copies whose features are pure noise (nothing left to read)."""
    rng = np.random.default_rng(seed)
    pooled = np.stack([SOURCE_MEANS[s.source] + 0.1 * rng.standard_normal(8) for s in samples]).astype(np.float32)
    filled = rng.standard_normal((len(lungs_in_view), 8)).astype(np.float32)

    def occlusion(rows, with_images):
        assert not with_images and list(rows) == list(range(len(samples)))
        return SimpleNamespace(images=SimpleNamespace(indices={"lung": lungs_in_view}),
                               pooled={"lung": torch.from_numpy(filled)})

    return _View(pooled=torch.from_numpy(pooled), has_occlusion=True, occlusion=occlusion, n=len(samples))


def test_probe_rows_of_a_group_worked_by_hand():
    """Internal: non-COVID from ieee8023 (10 patients) and kermany (10), COVID from ieee8023 only (10);
    external: 10 non-COVID from shenzhen_montgomery. Each source's features sit at their own mean, so within
    non-COVID the probe recognises all three sources: balanced accuracy 1, chance 1/3, adjusted 1. COVID has
    one source: undefined, and the group's value is non-COVID's alone. With the lungs filled the features
    are noise; the two internal images without lungs in view are left out of that probe."""
    internal = _samples("ieee8023", "No Finding", 10) + _samples("kermany", "normal", 10) + _samples("ieee8023", "covid", 10)
    external = _samples("shenzhen_montgomery", "normal", 10)
    internal_lungs = np.array([i for i in range(30) if i not in (0, 10)])
    views = {name: _view(samples, lungs, seed)
             for name, samples, lungs, seed in (("internal", internal, internal_lungs, 0),
                                                ("external", external, np.arange(10), 1))}
    labels = np.array([0] * 20 + [1] * 10)
    data = SimpleNamespace(test_view=internal, labels=labels, external={"adult-normal": (external, np.zeros(10, int))})
    inputs = SimpleNamespace(test=views["internal"], external={"adult-normal": views["external"]},
                             frame=SimpleNamespace(input_size=64, crop=True))
    spec = ModelSpec("m", "resnet10t", "none", 256, False, False, True, TASK)
    protocol = load_protocol(REPO / "protocols" / "quick.yaml", ["metrics.bootstrap=50"])
    rows = pd.DataFrame(probe_rows(protocol, spec, inputs, data))
    assert list(rows.columns) == ["task", "backbone", "weights", "crop", *PROBE_COLUMNS]
    assert set(rows["frame"]) == {"64px crop"} and set(rows["task"]) == {"covid_vs_non_covid"}
    source = rows[rows["probe"] == "source"].set_index("label")
    non_covid, covid = source.loc["non_covid"], source.loc["covid"]
    assert non_covid["sources"] == "ieee8023; kermany; shenzhen_montgomery"
    assert (non_covid["n_images"], non_covid["n_patients"]) == (30, 30)  # "p0" of two sources: two patients
    assert (non_covid["balanced_accuracy"], non_covid["adjusted"]) == (1.0, 1.0)
    assert math.isclose(non_covid["chance"], 1 / 3)
    assert (non_covid["ci_low"], non_covid["adjusted_ci_low"]) == (1.0, 1.0)
    assert covid["reason"].startswith("one source only (ieee8023)") and math.isnan(covid["adjusted"])
    assert set(source["value"]) == {1.0} and set(source["metric"]) == {"source_probe_accuracy"}
    outside = rows[rows["probe"] == "outside_lung"].set_index("label")
    assert outside.loc["non_covid", "n_images"] == 28  # images 0 and 10 have no lungs in view
    assert outside.loc["covid", "n_images"] == 10
    assert abs(outside.loc["non_covid", "adjusted"]) < 0.4  # noise: far from the intact 1.0


def test_probe_rows_without_occlusion_say_why():
    samples = _samples("ieee8023", "No Finding", 6) + _samples("kermany", "normal", 6)
    view = _view(samples, np.arange(12), 0)
    view.has_occlusion = False
    data = SimpleNamespace(test_view=samples, labels=np.zeros(12, int), external={})
    inputs = SimpleNamespace(test=view, external={}, frame=SimpleNamespace(input_size=64, crop=False))
    spec = ModelSpec("m", "resnet10t", "none", 256, False, False, False, TASK, {"seed": 1})
    rows = probe_rows(load_protocol(REPO / "protocols" / "quick.yaml", ["metrics.bootstrap=0"]), spec, inputs, data)
    assert [r["probe"] for r in rows] == ["source", "outside_lung"]
    assert rows[0]["seed"] == 1 and rows[0]["adjusted"] == 1.0  # the data axes name the group too
    assert rows[1]["reason"] == "no lung-filled copies: metrics.occlusion is off" and math.isnan(rows[1]["value"])


def _probes_table() -> pd.DataFrame:
    """Group (crop False): source probe defined on one class of two (adjusted CI [0.2, 0.8]), outside-lung
    probe defined on both classes (value 0.3: the mean of 0.2 and 0.4, no interval)."""
    base = {"task": "t", "backbone": "r", "weights": "none", "crop": False, "frame": "64px", "features": "pretrained",
            "model_id": "", "n_folds": 5,
            "n_images": 20, "n_patients": 20, "chance": 0.5, "fold_std": 0.1, "sources": "a; b"}
    rows = [
        {**base, "probe": "source", "metric": "source_probe_accuracy", "value": 0.5, "label": "neg", "adjusted": 0.5,
         "balanced_accuracy": 0.75, "ci_low": 0.6, "ci_high": 0.9, "adjusted_ci_low": 0.2, "adjusted_ci_high": 0.8,
         "reason": ""},
        {**base, "probe": "source", "metric": "source_probe_accuracy", "value": 0.5, "label": "pos",
         "adjusted": math.nan, "balanced_accuracy": math.nan, "ci_low": math.nan, "ci_high": math.nan,
         "adjusted_ci_low": math.nan, "adjusted_ci_high": math.nan, "reason": "one source only (a)"},
        {**base, "probe": "outside_lung", "metric": "outside_lung_probe_accuracy", "value": 0.3, "label": "neg",
         "adjusted": 0.2, "balanced_accuracy": 0.6, "ci_low": 0.45, "ci_high": 0.75, "adjusted_ci_low": -0.1,
         "adjusted_ci_high": 0.5, "reason": ""},
        {**base, "probe": "outside_lung", "metric": "outside_lung_probe_accuracy", "value": 0.3, "label": "pos",
         "adjusted": 0.4, "balanced_accuracy": 0.7, "ci_low": 0.55, "ci_high": 0.85, "adjusted_ci_low": 0.1,
         "adjusted_ci_high": 0.7, "reason": ""},
    ]
    return pd.DataFrame(rows)[["task", "backbone", "weights", "crop", *PROBE_COLUMNS]]


def test_frozen_models_get_the_groups_values_and_a_fine_tuned_model_its_own():
    models = pd.DataFrame({
        "model_id": ["frozen-a", "frozen-b", "tuned", "other-frame", "tuned-2"], "task": "t", "backbone": "r",
        "weights": "none", "crop": [False, False, False, True, False], "finetune": [False, False, True, False, True],
    })
    probes = _probes_table()
    own = probes[probes["probe"] == "source"].assign(features="model", model_id="tuned-2", value=0.9)
    out = add_probe_columns(models, pd.concat([probes, own], ignore_index=True)).set_index("model_id")
    for model in ("frozen-a", "frozen-b"):
        assert out.loc[model, "source_probe_accuracy_mean"] == 0.5
        assert (out.loc[model, "source_probe_accuracy_ci_low"], out.loc[model, "source_probe_accuracy_ci_high"]) == (0.2, 0.8)
        assert out.loc[model, "outside_lung_probe_accuracy_mean"] == 0.3
        assert math.isnan(out.loc[model, "outside_lung_probe_accuracy_ci_low"])  # two classes: no interval
    for model in ("tuned", "other-frame"):  # not probed: a fine-tuned model never gets the pretrained value
        assert out.loc[model, ["source_probe_accuracy_mean", "outside_lung_probe_accuracy_mean"]].isna().all()
    assert out.loc["tuned-2", "source_probe_accuracy_mean"] == 0.9  # its own backbone's rows
    assert out.loc["tuned-2", "source_probe_accuracy_ci_low"] == 0.2
    assert math.isnan(out.loc["tuned-2", "outside_lung_probe_accuracy_mean"])
    assert len(models.columns) == 6  # the input is not changed


def test_notes_and_findings_name_readable_classes_only():
    probes = _probes_table()
    models = pd.DataFrame({"finetune": [False, True]})
    notes = probe_notes(models, probes)
    assert notes[0].startswith("Shortcut probes read the pretrained backbone's features for the frozen models")
    # neg intact (adjusted CI [0.2, 0.8]) and pos lung-filled ([0.1, 0.7]) are readable; neg lung-filled is not.
    assert len(notes) == 3
    assert "within class neg in the intact images" in notes[1] and "0.75 [0.60, 0.90] vs chance 0.50" in notes[1]
    assert "within class pos with the lungs filled" in notes[2]
    tables = make_tables()
    tables.probes = probes
    found = [Finding(*f) for f in probe_findings(tables)]
    assert [f.headline for f in found] == [
        "The image's source is readable within a class from the backbone's features:",
        "The image's source is readable within a class even with the lungs filled:",
    ]
    assert all(f.level == "warn" for f in found) and "class neg on r (64px)" in found[0].detail


def test_report_shows_the_probes_escaped():
    tables = make_tables()
    probes = _probes_table()
    probes.loc[0, "sources"] = "<script>alert(1)</script>; b"
    tables.probes = probes
    html = render_html(tables)
    assert '<section id="probes">' in html and 'href="#probes"' in html
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "one source only (a)" in html and "source readable" in html
    assert '<section id="probes">' not in render_html(make_tables())  # a run without probes.csv



class _SourceBrightness(torch.nn.Module):
    """A stand-in backbone: every channel of its (N, 8, 2, 2) map is the image's mean intensity."""

    num_features = 8

    def forward(self, x):
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 8, 2, 2)


def _image_view(samples: list[Sample], brightness: dict[str, float], seed: int):
    """A stand-in ViewPass with frames: each source's images at its own brightness (+ noise 0.01), and
    lung-filled copies all at 0.5 (nothing left to read)."""
    rng = np.random.default_rng(seed)
    images = np.stack([np.full((4, 4), brightness[s.source]) + 0.01 * rng.standard_normal((4, 4)) for s in samples])

    def occlusion(rows, with_images):
        assert with_images
        return SimpleNamespace(images=SimpleNamespace(indices={"lung": np.arange(len(rows))},
                                                      filled={"lung": np.full((len(rows), 4, 4), 0.5, np.float32)}))

    return _View(images=lambda rows: images[rows].astype(np.float32), has_occlusion=True, occlusion=occlusion,
                 n=len(samples))


def test_a_fine_tuned_model_is_probed_on_its_own_backbone():
    """The model's backbone reads each source's brightness: within non-COVID (ieee8023 vs kermany) the probe
    on its features recognises the source (balanced accuracy 1); with the lungs filled every image looks the
    same and the probe is at chance. The rows name the model."""
    from auditbench.pipeline.records import ModelFold
    from auditbench.training.device import Accelerator

    samples = _samples("ieee8023", "No Finding", 10) + _samples("kermany", "normal", 10) + _samples("ieee8023", "covid", 10)
    view = _image_view(samples, {"ieee8023": 0.2, "kermany": 0.8}, 0)
    data = SimpleNamespace(test_view=samples, labels=np.array([0] * 20 + [1] * 10), external={})
    inputs = SimpleNamespace(test=view, external={}, frame=SimpleNamespace(input_size=4, crop=False),
                             mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    spec = ModelSpec("tuned", "resnet10t", "none", 256, True, False, False, TASK)
    model = ModelFold(SimpleNamespace(backbone=_SourceBrightness()), frozen=False)
    protocol = load_protocol(REPO / "protocols" / "quick.yaml", ["metrics.bootstrap=0", "explain.batch_size=7"])
    rows = pd.DataFrame(probe_rows(protocol, spec, inputs, data, model=model,
                                   accelerator=Accelerator(torch.device("cpu"), None)))
    assert set(rows["features"]) == {"model"} and set(rows["model_id"]) == {"tuned"}
    rows = rows.set_index(["probe", "label"])
    assert rows.loc[("source", "non_covid"), "balanced_accuracy"] == 1.0
    assert rows.loc[("outside_lung", "non_covid"), "adjusted"] <= 0.0  # identical features: no better than chance
    assert rows.loc[("source", "covid"), "reason"].startswith("one source only")


def test_no_pass_of_a_fine_tuned_backbone_where_no_class_has_two_sources():
    class Refuses(torch.nn.Module):
        num_features = 8

        def forward(self, x):
            raise AssertionError("the backbone ran although no probe can be defined")

    from auditbench.pipeline.records import ModelFold

    samples = _samples("ieee8023", "No Finding", 6) + _samples("kermany", "covid", 6)  # one source per class
    view = _image_view(samples, {"ieee8023": 0.2, "kermany": 0.8}, 0)
    data = SimpleNamespace(test_view=samples, labels=np.array([0] * 6 + [1] * 6), external={})
    inputs = SimpleNamespace(test=view, external={}, frame=SimpleNamespace(input_size=4, crop=False))
    spec = ModelSpec("tuned", "resnet10t", "none", 256, True, False, False, TASK)
    rows = probe_rows(load_protocol(REPO / "protocols" / "quick.yaml", ["metrics.bootstrap=0"]), spec, inputs, data,
                      model=ModelFold(SimpleNamespace(backbone=Refuses()), frozen=False), accelerator=None)
    assert [r["probe"] for r in rows] == ["source", "source", "outside_lung", "outside_lung"]
    assert all(r["reason"].startswith("one source only") for r in rows)


def test_a_models_own_features_equal_the_store_where_its_backbone_is_the_pretrained_one(tmp_path, monkeypatch):
    """The fine-tuned path reads a real view's frames and lung-filled copies (chunk by chunk) through the model's
    backbone; with the pretrained backbone itself it must give the store's pooled features and copies."""
    import auditbench.pipeline.passes as passes_module
    import auditbench.pipeline.probes as probes_module
    from auditbench.data.synthetic import SyntheticConfig, generate
    from auditbench.models.classifier import Classifier, Head
    from auditbench.pipeline.records import ModelFold
    from auditbench.pipeline.store import FeatureStore
    from auditbench.training.device import select_accelerator

    protocol = load_protocol(REPO / "protocols" / "quick.yaml", [
        "models.backbones=[{name: resnet10t, weights: none}]", "preprocessing.input_size=32",
    ])
    accelerator = select_accelerator("cpu", "auto")
    backbone = passes_module.load_backbone(protocol, "resnet10t", "none")
    frame = passes_module.model_frame(protocol, backbone, False)
    passes = passes_module.BackbonePasses(protocol, backbone, frame, accelerator, FeatureStore(tmp_path, "ns"))
    view = passes.view(generate(SyntheticConfig(n_images=10, image_size=48, seed=0), 0.0, "test").samples,
                       keep_maps=False, occlusion=True)
    monkeypatch.setattr(probes_module, "CHUNK", 4)  # 10 images: three chunks
    model = ModelFold(Classifier(backbone, Head(backbone.num_features, 8, 0.0, num_classes=2)), frozen=False)
    inputs = SimpleNamespace(mean=backbone.data_config["mean"], std=backbone.data_config["std"])
    own, (own_kept, own_filled) = probes_module._model_features(model, inputs, [view, view], True, accelerator, 3)
    store, (store_kept, store_filled) = probes_module._store_features([view, view], True)
    assert own.shape == store.shape == (20, backbone.num_features)
    np.testing.assert_allclose(own, store, atol=1e-5)
    np.testing.assert_array_equal(own_kept, store_kept)
    assert len(own_kept) and own_kept.max() >= 10  # the second view's rows are numbered after the first's
    np.testing.assert_allclose(own_filled, store_filled, atol=1e-5)
