"""The CI gate (`auditbench check`) on hand-made output folders."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pandas as pd
import pytest

from auditbench.registry import Registry
from auditbench.report import check as check_module
from auditbench.report.check import (
    SELECTION_METRIC,
    CheckFailure,
    CheckInputError,
    Threshold,
    parse_threshold_option,
    run_check,
)
from auditbench.report.tables import IMAGE_COLUMNS, ResultTables, write_tables

GRID = {"backbone": "resnet18", "weights": "none", "hidden": 256, "finetune": False, "augment": False,
        "task": "covid_vs_non_covid"}


FRAME = {"input_size": 128, "frame": "128px", "cam_layer": "last", "cam_map_size": 4, "cam_stride": 32}


def write_run(path, selected: str | None = "crop") -> None:
    """Two models: "crop" (selected, artifact metric undefined) and "nocrop" (learned the shortcut)."""
    rows = [
        {"model_id": "crop", **GRID, "crop": True, "n_folds": 2, **FRAME, "frame": "128px crop",
         "accuracy_mean": 0.80, "accuracy_std": 0.01, "lung_mass_mean": 0.62, "lung_mass_std": 0.02,
         "artifact_mass_mean": math.nan, "artifact_mass_std": math.nan,
         "border_mass_mean": math.nan, "border_mass_std": math.nan,
         "rank": 1, "selected": selected == "crop", "meets_constraints": True, "violations": "",
         "not_applicable": "artifact_mass", "pareto": True, "verified": True, "unverified": ""},
        {"model_id": "nocrop", **GRID, "crop": False, "n_folds": 2, **FRAME,
         "accuracy_mean": 0.90, "accuracy_std": 0.01, "lung_mass_mean": 0.31, "lung_mass_std": 0.02,
         "artifact_mass_mean": 0.25, "artifact_mass_std": 0.03, "border_mass_mean": 0.40, "border_mass_std": 0.05,
         "rank": 2, "selected": selected == "nocrop", "meets_constraints": False,
         "violations": "lung_mass=0.31 < min 0.5", "not_applicable": "", "pareto": True, "verified": True,
         "unverified": ""},
    ]
    results = pd.DataFrame([{"model_id": r["model_id"], "split": "internal", "fold": 0, "metric": "accuracy",
                             "value": r["accuracy_mean"]} for r in rows])
    tables = ResultTables(results=results, models=pd.DataFrame(rows), images=pd.DataFrame(columns=IMAGE_COLUMNS),
                          summary={"name": "t", "selected_model": selected})
    write_tables(tables, path)


@pytest.fixture
def run_dir(tmp_path):
    write_run(tmp_path)
    return tmp_path


@pytest.fixture(params=["fallback", "registry"])
def registry(request, monkeypatch):
    """Run each test without the metric registry (models.csv's record) and with a stand-in one."""
    if request.param == "fallback":
        monkeypatch.setattr(check_module, "load_metrics", lambda: None)
        return
    fake = Registry("metric")
    for name in ("accuracy", "lung_mass", "border_mass", "artifact_mass", "artifact_occlusion_effect"):
        fake.add(name, SimpleNamespace(name=name, not_applicable_when_undefined=name.startswith("artifact_")))
    monkeypatch.setattr(check_module, "load_metrics", lambda: fake)


def test_selected_model_passes(run_dir, registry):
    result = run_check(run_dir, [Threshold("lung_mass", "min", 0.5), Threshold("accuracy", "min", 0.8)])
    assert result.passed and result.failures == [] and result.checked_models == ["crop"]


def test_failure_reports_model_metric_value_and_threshold(run_dir, registry):
    result = run_check(run_dir, [Threshold("lung_mass", "min", 0.5), Threshold("accuracy", "max", 0.85)],
                       all_models=True)
    assert not result.passed
    assert result.checked_models == ["crop", "nocrop"]
    assert result.failures == [
        CheckFailure("nocrop", "lung_mass", 0.31, "min", 0.5),
        CheckFailure("nocrop", "accuracy", 0.90, "max", 0.85),
    ]
    assert str(result.failures[0]) == "nocrop: lung_mass = 0.31, required min 0.5"


def test_undefined_artifact_metric_is_not_applicable_and_counts_as_met(run_dir, registry):
    result = run_check(run_dir, [Threshold("artifact_mass", "max", 0.1)], all_models=True)
    assert result.not_applicable == [("crop", "artifact_mass")]
    assert result.failures == [CheckFailure("nocrop", "artifact_mass", 0.25, "max", 0.1)]


def test_undefined_other_metric_fails(run_dir, registry):
    result = run_check(run_dir, [Threshold("border_mass", "max", 0.5)])
    assert not result.passed and result.not_applicable == []
    (failure,) = result.failures
    assert (failure.model_id, failure.metric, failure.bound, failure.threshold) == ("crop", "border_mass", "max", 0.5)
    assert math.isnan(failure.value) and "undefined" in str(failure)


def test_no_selected_model_fails_the_gate_unless_all_models(tmp_path, registry):
    write_run(tmp_path, selected=None)
    result = run_check(tmp_path, [Threshold("lung_mass", "min", 0.5)])
    assert not result.passed and result.checked_models == []
    (failure,) = result.failures
    assert failure.metric == SELECTION_METRIC and "no model was selected" in str(failure)
    assert run_check(tmp_path, [Threshold("accuracy", "min", 0.5)], all_models=True).passed


def test_unknown_metric_is_bad_input_with_suggestion(run_dir, registry):
    with pytest.raises(CheckInputError, match="unknown metric 'lung_mas'; did you mean lung_mass"):
        run_check(run_dir, [Threshold("lung_mas", "min", 0.5)])


def test_missing_folder_or_file_is_bad_input(tmp_path, run_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckInputError, match="nowhere"):
        run_check(missing, [])
    (run_dir / "summary.json").unlink()
    with pytest.raises(CheckInputError, match="summary.json"):
        run_check(run_dir, [])


def test_selected_model_absent_from_models_csv_is_bad_input(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["selected_model"] = "ghost"
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(CheckInputError, match="ghost"):
        run_check(run_dir, [])


def test_parse_threshold_option():
    assert parse_threshold_option("lung_mass=0.5", "min") == Threshold("lung_mass", "min", 0.5)
    assert parse_threshold_option(" border_mass = 1e-1 ", "max") == Threshold("border_mass", "max", 0.1)
    for bad, message in [("lung_mass", "expected METRIC=NUMBER"), ("=0.5", "expected METRIC=NUMBER"),
                         ("lung_mass=", "expected METRIC=NUMBER"), ("lung_mass=high", "'high' is not a number"),
                         ("lung_mass=nan", "finite")]:
        with pytest.raises(CheckInputError, match=message):
            parse_threshold_option(bad, "min")
