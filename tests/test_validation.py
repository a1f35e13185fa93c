"""Validation study of the metrics: stratified AUROC / Spearman by hand, and the validation table."""
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from auditbench.audit.validation import (
    SEPARATES_AUROC, VALIDATION_COLUMNS, metric_validation, separation_auroc, stratified_auroc,
    stratified_spearman,
)


def test_stratified_auroc_by_hand():
    # A: relying 0.1 is below both 0.3 and 0.5 -> 2 concordant pairs (higher is better).
    # B: relying 0.6 is above 0.4 -> 1 discordant pair.  Pooled by pairs: 2 / 3.
    values = np.array([0.1, 0.3, 0.5, 0.6, 0.4])
    relies = np.array([True, False, False, True, False])
    strata = np.array(["A", "A", "A", "B", "B"])
    assert stratified_auroc(values, relies, strata, higher_is_better=True) == pytest.approx(2 / 3)
    # Ignoring strata gives a different answer: 0.1 is worse than 3, 0.6 than none -> 3 / 6.
    assert separation_auroc(values[relies], values[~relies], True) == pytest.approx(0.5)
    # Direction: with lower-is-better the same numbers give the complementary pairs.
    assert stratified_auroc(values, relies, strata, higher_is_better=False) == pytest.approx(1 / 3)
    # NaN models are left out; a tie counts 1/2.
    with_nan = stratified_auroc(np.append(values, [np.nan, 0.2, 0.2]), np.append(relies, [True, True, False]),
                                np.append(strata, ["A", "C", "C"]), True)
    assert with_nan == pytest.approx((2 + 0 + 0.5) / 4)


def test_frame_confounding_pooled_vs_stratified():
    # All relying models were trained in frame "U", where every model scores low on lung mass.
    values = np.array([0.10, 0.20, 0.15, 0.60, 0.70, 0.65])
    relies = np.array([True, True, True, False, False, False])
    frame = np.array(["U", "U", "U", "C", "C", "C"])
    assert separation_auroc(values[relies], values[~relies], True) == 1.0  # pooled: "perfect"
    assert np.isnan(stratified_auroc(values, relies, frame, True))  # no within-frame comparison
    # Add non-relying models in frame U that score like the relying ones: pooled still looks
    # strong (12 / 15), within the frame it is chance (3 / 6).
    values = np.append(values, [0.12, 0.18])
    relies = np.append(relies, [False, False])
    frame = np.append(frame, ["U", "U"])
    assert separation_auroc(values[relies], values[~relies], True) == pytest.approx(12 / 15)
    assert stratified_auroc(values, relies, frame, True) == pytest.approx(0.5)


def test_stratified_spearman_by_hand_on_two_strata():
    # A: lung mass falls as reliance rises -> badness ranks match reliance ranks, rho = 1.
    # B: lung mass [0.2, 0.4, 0.3, 0.1] -> badness ranks [3, 1, 2, 4] vs reliance ranks [1, 2, 3, 4]:
    #    sum d^2 = 4 + 1 + 1 + 0 = 6, rho = 1 - 6 * 6 / (4 * 15) = 0.4.
    # C has 2 models and D constant values: both left out. Weighted: (3 * 1 + 4 * 0.4) / 7.
    values = np.array([0.9, 0.5, 0.1, 0.2, 0.4, 0.3, 0.1, 0.5, 0.6, 0.3, 0.3, 0.3])
    reliance = np.array([0.0, 0.2, 0.4, 1, 2, 3, 4, 0.1, 0.9, 0.1, 0.5, 0.9])
    strata = np.array(list("AAABBBBCCDDD"))
    expected = (3 * 1 + 4 * 0.4) / 7
    assert spearmanr(-values[3:7], reliance[3:7]).statistic == pytest.approx(0.4)
    assert stratified_spearman(values, reliance, strata, higher_is_better=True) == pytest.approx(expected)
    # A lower-is-better metric carrying the same information gets the same (positive) score.
    assert stratified_spearman(-values, reliance, strata, higher_is_better=False) == pytest.approx(expected)
    assert np.isnan(stratified_spearman(values[7:], reliance[7:], strata[7:], True))  # C, D only


def _models(seed: int = 0) -> pd.DataFrame:
    """Two frames of 12 models; reliance drives lung mass down, and frame C adds +0.3 to it."""
    rng = np.random.default_rng(seed)
    rows = []
    for frame, offset in [("C224", 0.3), ("U224", 0.0)]:
        reliance = np.linspace(0.0, 0.5, 12)
        for i, r in enumerate(reliance):
            rows.append({
                "model_id": f"{frame}-{i}", "frame": frame, "shortcut_reliance": r, "relies": r > 0.2,
                "lung_mass_mean": offset + 0.5 - r + 0.05 * rng.standard_normal(),
                "border_mass": rng.random(),  # unrelated to reliance
                "artifact_mass_mean": np.nan if frame == "C224" else r + 0.01 * i,
            })
    return pd.DataFrame(rows).set_index("model_id")


def test_metric_validation_table():
    models = _models()
    metrics = ["lung_mass", "border_mass", "artifact_mass"]
    table = metric_validation(models, metrics, n_boot=500, seed=1)
    assert list(table.columns) == VALIDATION_COLUMNS
    assert list(table["frame"]) == ["all", "C224", "U224"] * 3
    assert list(table["metric"]) == [m for m in metrics for _ in range(3)]
    rows = table.set_index(["metric", "frame"])

    lung = rows.loc[("lung_mass", "all")]
    assert lung["higher_is_better"] and lung["kind"] == "attention"
    assert (lung["n_models"], lung["n_relying"], lung["n_not_relying"]) == (24, 14, 10)
    assert lung["auroc"] == pytest.approx(stratified_auroc(
        models["lung_mass_mean"], models["relies"], models["frame"], True))
    assert lung["spearman"] == pytest.approx(stratified_spearman(
        models["lung_mass_mean"], models["shortcut_reliance"], models["frame"], True))
    in_u = models[models["frame"] == "U224"]
    assert rows.loc[("lung_mass", "U224"), "auroc"] == pytest.approx(separation_auroc(
        in_u.loc[in_u["relies"], "lung_mass_mean"], in_u.loc[~in_u["relies"], "lung_mass_mean"], True))
    assert lung["mean_relying"] == pytest.approx(models.loc[models["relies"], "lung_mass_mean"].mean())
    assert lung["auroc"] >= SEPARATES_AUROC and lung["separates"] and lung["spearman"] > 0.8

    finite = table.dropna(subset=["auroc", "spearman"])
    assert len(finite) == 8  # 9 rows less artifact_mass in C224, undefined there
    assert (finite["auroc_ci_low"] <= finite["auroc"]).all() and (finite["auroc"] <= finite["auroc_ci_high"]).all()
    assert (finite["spearman_ci_low"] <= finite["spearman"]).all()
    assert (finite["spearman"] <= finite["spearman_ci_high"]).all()

    assert not rows.loc[("border_mass", "all"), "separates"]
    artifact_c = rows.loc[("artifact_mass", "C224")]
    assert artifact_c["n_models"] == 0 and np.isnan(artifact_c["auroc"]) and not artifact_c["separates"]
    artifact = rows.loc[("artifact_mass", "all")]  # lower is better: only frame U224 counts
    assert artifact["n_models"] == 12 and artifact["auroc"] == 1.0 and artifact["separates"]
    assert (artifact["auroc_ci_low"], artifact["auroc_ci_high"]) == (1.0, 1.0)  # cells keep the design


def test_metric_validation_is_deterministic_and_stratified():
    models = _models(3)
    first = metric_validation(models, ["lung_mass", "border_mass"], n_boot=300, seed=7)
    pd.testing.assert_frame_equal(first, metric_validation(models, ["lung_mass", "border_mass"], n_boot=300, seed=7))
    other = metric_validation(models, ["lung_mass", "border_mass"], n_boot=300, seed=8)
    assert not np.allclose(first["spearman_ci_low"], other["spearman_ci_low"], equal_nan=True)
    pd.testing.assert_series_equal(first["auroc"], other["auroc"])  # point estimates do not depend on seed

    # Frame confounding: put every relying model in U224 (low lung mass by frame).
    confounded = models[(models["frame"] == "U224") == models["relies"]]
    table = metric_validation(confounded, ["lung_mass"], n_boot=100, seed=0).set_index("frame")
    pooled = separation_auroc(confounded.loc[confounded["relies"], "lung_mass_mean"],
                              confounded.loc[~confounded["relies"], "lung_mass_mean"], True)
    assert pooled == 1.0 and np.isnan(table.loc["all", "auroc"]) and not table.loc["all", "separates"]


def test_metric_validation_rule_needs_a_confidence_interval_and_checks_inputs():
    models = _models()
    table = metric_validation(models, ["artifact_mass"], n_boot=0).set_index("frame")
    assert table.loc["all", "auroc"] == 1.0 and np.isnan(table.loc["all", "auroc_ci_low"])
    assert not table.loc["all", "separates"]  # auroc_ci_low > 0.5 is not shown
    single = metric_validation(models, ["lung_mass"], stratum_column=None, n_boot=50)
    assert list(single["frame"]) == ["all"]
    with pytest.raises(KeyError):
        metric_validation(models.drop(columns="frame"), ["lung_mass"], n_boot=10)
    with pytest.raises(KeyError):
        metric_validation(models, ["pointing_game"], n_boot=10)
