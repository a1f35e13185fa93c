"""Selection and Pareto front on small tables worked out by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from auditbench.registry import UnknownNameError
from auditbench.selection.ranking import (
    Constraint, SelectionRule, SelectionWarning, pareto_front, rank_models,
)

RULE = SelectionRule(
    primary="accuracy",
    constraints=[Constraint("lung_mass", min=0.5), Constraint("artifact_occlusion_effect", max=0.1)],
)


def _models():
    return pd.DataFrame({
        "model_id": ["a", "b", "c", "d", "e"],
        "accuracy_mean": [0.90, 0.95, 0.85, 0.90, 0.97],
        "lung_mass_mean": [0.60, 0.3125, 0.70, np.nan, 0.80],
        "artifact_occlusion_effect_mean": [0.05, 0.50, np.nan, 0.02, np.nan],
        # c: the crop removed every artifact (proved by the masks); e: no artifact mask at all
        "not_applicable": ["", "", "artifact_occlusion_effect", "", ""],
    })


def test_rank_models_orders_flags_and_selects():
    ranked = rank_models(_models(), RULE).set_index("model_id")
    # verified and meeting all: a (0.90), c (0.85); unverified: e (0.97), d (0.90); violating: b
    assert ranked.index.tolist() == ["a", "c", "e", "d", "b"]
    assert ranked["rank"].tolist() == [1, 2, 3, 4, 5]
    assert ranked["meets_constraints"].tolist() == [True, True, True, True, False]
    assert ranked["verified"].tolist() == [True, True, False, False, True]
    assert ranked["selected"].tolist() == [True, False, False, False, False]
    assert ranked.loc["b", "violations"] == (
        "lung_mass=0.312 < min 0.5; artifact_occlusion_effect=0.5 > max 0.1")
    assert ranked.loc["d", "unverified"] == "lung_mass"  # NaN without proof: unverified, not met
    assert ranked.loc["e", "unverified"] == "artifact_occlusion_effect"  # the most accurate cannot win unverified
    assert ranked.loc["c", "not_applicable"] == "artifact_occlusion_effect" and ranked.loc["c", "unverified"] == ""
    assert ranked.loc["a", "violations"] == "" and ranked.loc["a", "not_applicable"] == ""
    # accuracy vs lung_mass: e dominates a, b and c; d has no lung_mass
    assert ranked["pareto"].tolist() == [False, False, True, False, False]


def test_ties_follow_the_second_pareto_metric_then_model_id_and_nan_primary_goes_last():
    models = pd.DataFrame({"model_id": ["m2", "m3", "m1", "m0"], "accuracy_mean": [0.8, np.nan, 0.8, 0.8],
                           "lung_mass_mean": [0.5, 0.5, 0.5, 0.4]})
    assert rank_models(models, SelectionRule())["model_id"].tolist() == ["m1", "m2", "m0", "m3"]


def test_lower_is_better_primary():
    models = pd.DataFrame({"model_id": ["a", "b", "c"], "border_mass_mean": [0.2, 0.1, 0.3],
                           "accuracy_mean": [0.9, 0.8, 0.7], "lung_mass_mean": [0.5, 0.5, 0.5]})
    ranked = rank_models(models, SelectionRule(primary="border_mass"))
    assert ranked["model_id"].tolist() == ["b", "a", "c"]
    assert ranked["selected"].tolist() == [True, False, False]


def test_no_model_meets_the_constraints_so_none_is_selected():
    rule = SelectionRule(constraints=[Constraint("lung_mass", min=0.99)])
    with pytest.warns(SelectionWarning, match="none of 5 models is selected"):
        ranked = rank_models(_models(), rule)
    assert not ranked["selected"].any()
    # d violates nothing but is unverified; the others violate and follow by accuracy
    assert ranked["model_id"].tolist() == ["d", "e", "b", "a", "c"]
    assert ranked["meets_constraints"].tolist() == [True, False, False, False, False]


def test_pareto_front_uses_declared_directions():
    models = pd.DataFrame({
        "accuracy_mean": [0.9, 0.8, 0.9, 0.7, 0.95],
        "lung_mass_mean": [0.6, 0.5, 0.6, 0.9, np.nan],
        "border_mass_mean": [0.2, 0.1, 0.3, 0.4, 0.25],
    })
    # row 1 is dominated by row 0; rows 0 and 2 are identical, so neither dominates; NaN is never on it
    assert pareto_front(models, "accuracy", "lung_mass").tolist() == [True, False, True, True, False]
    # border_mass is lower-is-better: (0.9, 0.3) and (0.7, 0.4) are dominated by (0.95, 0.25)
    assert pareto_front(models, "accuracy", "border_mass").tolist() == [True, True, False, False, True]


def test_unknown_and_malformed_rules_fail_clearly():
    with pytest.raises(UnknownNameError, match="did you mean 'lung_mass'"):
        Constraint("lung_mas", min=0.5)
    with pytest.raises(UnknownNameError, match="accuracy"):
        SelectionRule(primary="acuracy")
    with pytest.raises(ValueError, match="needs min or max"):
        Constraint("lung_mass")
    with pytest.raises(KeyError, match="border_mass_mean"):
        rank_models(_models(), SelectionRule(constraints=[Constraint("border_mass", max=0.2)]))
