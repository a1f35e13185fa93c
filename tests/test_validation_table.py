"""The validation table a run writes (pipeline/validate.py): which metrics it scores and within which strata.
The statistics themselves are tested in tests/test_validation.py."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from auditbench.pipeline.validate import validation_table
from auditbench.protocol.loader import load_protocol
from auditbench.report.sections.comparisons import validation_row
from conftest import REPO


def test_validation_scores_every_metric_but_classification_and_says_which_claim_detection():
    """Four models in one frame, two relying. deletion_auc (lower is better, not a detector) is higher for
    both relying models: AUROC 1 by hand (4 of 4 pairs ordered). source_probe_accuracy is NaN for all (one
    source): its row has no models and the report calls it undefined."""
    models = pd.DataFrame({
        "model_id": list("abcd"), "method": "gradcam", "frame": "64px",
        "shortcut_reliance_mean": [0.5, 0.3, 0.01, 0.02], "accuracy_mean": [0.9, 0.8, 0.7, 0.6],
        "lung_mass_mean": [0.2, 0.4, 0.3, 0.5], "deletion_auc_mean": [0.6, 0.5, 0.2, 0.1],
        "source_probe_accuracy_mean": np.nan,
    })
    protocol = load_protocol(REPO / "protocols" / "quick.yaml", ["validation.bootstrap=20"])
    table = validation_table(models, protocol, []).set_index("metric")
    assert sorted(set(table.index)) == ["deletion_auc", "lung_mass", "source_probe_accuracy"]  # no accuracy, no answer
    overall = table[table["frame"] == "all"]
    assert overall.loc["lung_mass", "detector"] and not overall.loc["deletion_auc", "detector"]
    assert overall.loc["deletion_auc", "auroc"] == 1.0
    # lung_mass (higher is better): relying 0.2, 0.4 vs not 0.3, 0.5 -> pairs where relying is lower: 3 of 4
    assert overall.loc["lung_mass", "auroc"] == 0.75
    probe = overall.reset_index().set_index("metric", drop=False).loc["source_probe_accuracy"]
    assert probe["n_models"] == 0 and math.isnan(probe["auroc"])
    assert validation_row(probe, "all")["verdict"] == "undefined for every model"


def test_models_are_compared_within_a_backbone_not_across():
    """Backbone B (random init) never relies and scores low on the metric whatever the marker does. AUROC =
    P(a relying model scores worse, here higher, than a non-relying one). Pooled within the frame: relying
    0.6 beats B's 0.1 and 0.2, 0.8 beats 0.7, 0.1 and 0.2: 5 of 8 pairs = 0.625, a detector by confounding.
    Within A alone: 0.6 beats neither 0.7 nor 0.9, 0.8 beats 0.7: 1 of 4 = 0.25. The table must say 0.25."""
    models = pd.DataFrame({
        "model_id": list("abcdef"), "method": "gradcam", "frame": "64px",
        "backbone": ["A"] * 4 + ["B"] * 2, "weights": ["imagenet"] * 4 + ["none"] * 2,
        "shortcut_reliance_mean": [0.5, 0.4, 0.01, 0.02, 0.0, 0.0],
        "border_mass_mean": [0.6, 0.8, 0.7, 0.9, 0.1, 0.2],  # lower is better: a relying model scores high
    })
    protocol = load_protocol(REPO / "protocols" / "quick.yaml", ["validation.bootstrap=0"])
    table = validation_table(models, protocol, []).set_index("frame")
    assert list(table.index) == ["all", "64px · A (imagenet)", "64px · B (none)"]
    assert table.loc["all", "auroc"] == 0.25 and table.loc["64px · A (imagenet)", "auroc"] == 0.25
    assert math.isnan(table.loc["64px · B (none)", "auroc"])  # no relying model there: no comparison
    one_backbone = validation_table(models.iloc[:4], protocol, []).set_index("frame")
    assert list(one_backbone.index) == ["all", "64px"]  # one backbone: the frame alone names the stratum
