"""A method registered as expensive (Score-CAM: a forward pass per feature channel) explains only the first
``explain.expensive_images`` images of each split of a model x fold, and the first ``sanity.expensive_images``
of the sanity checks' images; its metrics are NaN beyond and its model values are means over what it explained."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from auditbench.explain.cam_base import CAM_METHODS
from auditbench.pipeline.predict import bounded_rows
from conftest import TINY_RUN, run_quick

BOUND, SANITY_BOUND = 3, 2


def test_bounded_rows_by_hand():
    scorecam, gradcam = CAM_METHODS.get("scorecam"), CAM_METHODS.get("gradcam")
    # A chunk of 32 images starting at image 0, 32, ...: images 0..7 of the split are explained.
    assert [bounded_rows(scorecam, False, first, 32, 8) for first in (0, 32)] == [8, 0]
    assert bounded_rows(scorecam, False, 5, 32, 8) == 3  # images 5, 6, 7
    assert bounded_rows(scorecam, False, 0, 4, 8) == 4  # fewer images than the bound
    # Never bounded: a method not registered as expensive, and the primary method (selection reads it).
    assert bounded_rows(gradcam, False, 32, 32, 8) == 32
    assert bounded_rows(scorecam, True, 32, 32, 8) == 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return run_quick(tmp_path_factory.mktemp("expensive") / "run", *TINY_RUN,
                     "--set", "training.finetune=[false]",
                     "--set", "data.synthetic.shortcut_strength=[1]",
                     "--set", "explain.method=[gradcam, scorecam]",
                     "--set", f"explain.expensive_images={BOUND}",
                     "--set", "explain.batch_size=2",  # the bound falls inside the second batch
                     "--set", "sanity.images=6",
                     "--set", f"sanity.expensive_images={SANITY_BOUND}",
                     "--set", "report.save_models=none")


def test_score_cam_explains_the_first_images_of_each_split_and_fold(run):
    images = pd.read_csv(run / "images.csv")
    internal = images[images["split"] == "internal"]
    gradcam = internal[internal["method"] == "gradcam"]
    scorecam = internal[internal["method"] == "scorecam"]
    assert len(scorecam) == len(gradcam) > 2 * BOUND
    for fold, rows in scorecam.groupby("fold"):
        explained = rows["lung_mass"].notna().to_numpy()
        assert explained[:BOUND].all() and not explained[BOUND:].any(), fold
        assert not rows["method_agreement"].notna().to_numpy()[BOUND:].any()
        # Shared (not attention) metrics are the model's, computed on every image for every method.
        same = gradcam[gradcam["fold"] == fold]
        np.testing.assert_array_equal(rows["p_positive"].to_numpy(), same["p_positive"].to_numpy())
    # Grad-CAM is not bounded (on this tiny random-init model one fold's Grad-CAM maps are all zero: NaN).
    assert (gradcam.groupby("fold")["lung_mass"].count() > BOUND).any()
    # Agreement with Grad-CAM where both maps rank something (a tiny random-init model makes some constant).
    assert scorecam["method_agreement"].notna().any()

    results = pd.read_csv(run / "results.csv")
    lung = results[(results["method"] == "scorecam") & (results["split"] == "internal")
                   & (results["metric"] == "lung_mass")].set_index("fold")["value"]
    expected = scorecam.groupby("fold")["lung_mass"].apply(lambda values: values.dropna().mean())
    np.testing.assert_allclose(lung.sort_index().to_numpy(), expected.sort_index().to_numpy(), rtol=1e-12)


def test_the_run_says_how_many_evaluations_the_bound_left_out(run):
    images = pd.read_csv(run / "images.csv")
    scorecam = images[(images["method"] == "scorecam") & (images["split"] == "internal")]
    left_out = int(scorecam["lung_mass"].isna().sum())
    notes = json.loads((run / "summary.json").read_text())["notes"]
    line = next(note for note in notes if "registered as expensive" in note)
    explained = len(scorecam) - left_out
    assert line.startswith(f"internal (scorecam): {left_out} image evaluations (all models and folds) have no map "
                           f"beside the {explained} explained"), line
    # The other causes count among the images with a map.
    zero = next((note for note in notes if note.startswith("internal (scorecam): for ")), None)
    assert zero is None or f" of {explained} image evaluations" in zero


def test_sanity_checks_of_score_cam_use_their_own_bound(run):
    sanity = pd.read_csv(run / "sanity.csv")
    assert set(sanity.loc[sanity["method"] == "gradcam", "n_images"]) == {6}
    assert set(sanity.loc[sanity["method"] == "scorecam", "n_images"]) == {SANITY_BOUND}
    assert sanity.loc[sanity["method"] == "scorecam", "ssim"].notna().all()
