"""The CI gate (`auditbench check`) on hand-made output folders."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from auditbench.outputs import protocol_yaml, seal
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
RUN_ID = "20260101T000000Z-0000abcd"


def image_rows(model_id: str, artifact_status: str, border_in_view: bool, n: int = 4) -> list[dict]:
    return [{"model_id": model_id, "fold": i % 2, "split": "internal", "sample_id": f"s{i}", "source": "synthetic",
             "patient_id": f"p{i}", "path": f"s{i}.png", "label": "covid" if i % 2 else "normal",
             "label_index": i % 2, "prediction": "covid", "p_positive": 0.6, "correct": bool(i % 2),
             "mask_source": "synthetic", "has_artifact": artifact_status == "in_view",
             "artifact_status": artifact_status, "border_in_view": border_in_view} for i in range(n)]


def write_run(path, selected: str | None = "crop", run_id: str = RUN_ID, models_update=None, images_update=None) -> None:
    """Two models: "crop" (selected, artifact metric undefined: the crop removed every artifact,
    as images.csv shows) and "nocrop" (learned the shortcut; artifacts in view). Written and sealed
    as a run writes its folder: provenance columns, protocol file, manifest."""
    rows = [
        {"model_id": "crop", **GRID, "crop": True, "n_folds": 2, **FRAME, "frame": "128px crop",
         "accuracy_mean": 0.80, "accuracy_std": 0.01, "accuracy_ci_low": 0.76, "accuracy_ci_high": 0.84,
         "lung_mass_mean": 0.62, "lung_mass_std": 0.02, "lung_mass_ci_low": 0.58, "lung_mass_ci_high": 0.66,
         "artifact_mass_mean": math.nan, "artifact_mass_std": math.nan,
         "border_mass_mean": math.nan, "border_mass_std": math.nan,
         "artifact_occlusion_effect_mean": math.nan, "artifact_occlusion_effect_std": math.nan,
         "rank": 1, "selected": selected == "crop", "meets_constraints": True, "violations": "",
         "not_applicable": "artifact_mass; artifact_occlusion_effect", "pareto": True, "verified": True,
         "unverified": ""},
        {"model_id": "nocrop", **GRID, "crop": False, "n_folds": 2, **FRAME,
         "accuracy_mean": 0.90, "accuracy_std": 0.01, "accuracy_ci_low": 0.86, "accuracy_ci_high": 0.94,
         "lung_mass_mean": 0.31, "lung_mass_std": 0.02, "lung_mass_ci_low": 0.27, "lung_mass_ci_high": 0.35,
         "artifact_mass_mean": 0.25, "artifact_mass_std": 0.03, "border_mass_mean": 0.40, "border_mass_std": 0.05,
         "artifact_occlusion_effect_mean": math.nan, "artifact_occlusion_effect_std": math.nan,
         "rank": 2, "selected": selected == "nocrop", "meets_constraints": False,
         "violations": "lung_mass=0.31 < min 0.5", "not_applicable": "", "pareto": True, "verified": True,
         "unverified": "artifact_occlusion_effect"},
    ]
    models = pd.DataFrame(rows)
    if models_update is not None:
        models = models_update(models)
    results = pd.DataFrame([{"model_id": r["model_id"], "split": "internal", "fold": 0, "metric": "accuracy",
                             "value": r["accuracy_mean"]} for r in rows])
    images = pd.DataFrame(image_rows("crop", "out_of_view", False) + image_rows("nocrop", "in_view", True),
                          columns=IMAGE_COLUMNS)
    if images_update is not None:
        images = images_update(images)
    text, digest = protocol_yaml("name: t\nseed: 0\n", run_id)
    tables = ResultTables(results=results, models=models, images=images,
                          summary={"name": "t", "run_id": run_id, "protocol_sha256": digest,
                                   "selected_model": selected, "auditbench_version": "test"})
    write_tables(tables, path)
    (Path(path) / "protocol.resolved.yaml").write_text(text, encoding="utf-8")
    seal(path)


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


# ----- bad input: exit 2, one line naming the option, file or field ----------------------------

from typer.testing import CliRunner  # noqa: E402

from auditbench.cli import app  # noqa: E402

cli = CliRunner()


def gate(*args):
    return cli.invoke(app, ["check", *map(str, args)])


def one_error_line(result) -> str:
    """The single line a bad input gives (exit code 2)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--min-lung-mass", "nan"], "--min-lung-mass nan: the threshold must be a finite number"),
    (["--max-border-mass", "inf"], "--max-border-mass inf: the threshold must be a finite number"),
    (["--max-artifact-mass", "-inf"], "--max-artifact-mass -inf"),
    (["--min", "lung_mass=nan"], "--min 'lung_mass=nan'"),
    (["--max", "lung_mass=inf"], "--max 'lung_mass=inf'"),
    (["--min-accuracy", "0", "--baseline", "{dir}", "--tolerance", "-1"], "--tolerance -1.0: the tolerance must be"),
    (["--min-accuracy", "0", "--baseline", "{dir}", "--tolerance", "nan"], "--tolerance nan"),
    (["--min-accuracy", "0", "--baseline", "{dir}", "--tolerance", "inf"], "--tolerance inf"),
    (["--min-accuracy", "0", "--tolerance", "0.1"], "--tolerance needs --baseline"),
    (["--min-accuracy", "0", "--regression-metric", "accuracy"], "--regression-metric needs --baseline"),
    ([], "no thresholds given"),
])
def test_bad_bounds_are_bad_input(run_dir, args, expected):
    line = one_error_line(gate(run_dir, *[a.replace("{dir}", str(run_dir)) for a in args]))
    assert expected in line


@pytest.mark.parametrize("value", [math.inf, -math.inf, "high"])
def test_non_finite_or_text_metric_value_is_bad_input(tmp_path, value):
    def update(models):
        models["lung_mass_mean"] = models["lung_mass_mean"].astype(object)
        models.loc[models["model_id"] == "crop", "lung_mass_mean"] = value
        return models

    write_run(tmp_path, models_update=update)
    line = one_error_line(gate(tmp_path, "--min-lung-mass", "0.5"))
    assert "models.csv: lung_mass_mean of model crop is" in line


def test_infinite_baseline_value_is_bad_input(tmp_path):
    write_run(tmp_path / "new")
    write_run(tmp_path / "old", models_update=lambda m: m.assign(accuracy_mean=math.inf))
    line = one_error_line(gate(tmp_path / "new", "--baseline", tmp_path / "old"))
    assert str(tmp_path / "old" / "models.csv") in line and "accuracy_mean" in line


# ----- not applicable only with the run's proof -------------------------------------------------


def test_undefined_metric_with_artifacts_in_view_fails_even_when_listed_not_applicable(tmp_path, registry):
    """A blank artifact_occlusion_effect on an uncropped model whose images show the artifact fails,
    whether models.csv is silent about it or (edited by hand) claims it not applicable."""
    write_run(tmp_path / "silent")
    result = run_check(tmp_path / "silent", [Threshold("artifact_occlusion_effect", "max", 0.1)], all_models=True)
    assert result.not_applicable == [("crop", "artifact_occlusion_effect")]
    (failure,) = result.failures
    assert failure.model_id == "nocrop" and "not proven out of view" in str(failure)

    def claim(models):
        models.loc[models["model_id"] == "nocrop", "not_applicable"] = "artifact_occlusion_effect"
        return models

    write_run(tmp_path / "claimed", models_update=claim)
    result = run_check(tmp_path / "claimed", [Threshold("artifact_occlusion_effect", "max", 0.1)], all_models=True)
    assert not result.passed and result.not_applicable == [("crop", "artifact_occlusion_effect")]
    (failure,) = result.failures
    assert failure.model_id == "nocrop"
    assert "images.csv has the artifact in view (or unknown) on 4 internal test image(s)" in str(failure)


def test_not_applicable_claim_without_images_to_prove_it_fails(tmp_path, registry):
    write_run(tmp_path, images_update=lambda images: images[images["model_id"] != "crop"])
    result = run_check(tmp_path, [Threshold("artifact_mass", "max", 0.1)])
    (failure,) = result.failures
    assert failure.model_id == "crop" and "no internal test image" in str(failure)


def test_unknown_artifact_status_is_no_proof(tmp_path, registry):
    def unknown(images):
        images.loc[(images["model_id"] == "crop") & (images["sample_id"] == "s0"), "artifact_status"] = "unknown"
        return images

    write_run(tmp_path, images_update=unknown)
    result = run_check(tmp_path, [Threshold("artifact_mass", "max", 0.1)])
    assert not result.passed and "on 1 internal test image(s)" in str(result.failures[0])


def test_only_regional_metrics_can_be_not_applicable(tmp_path, registry):
    def blank_lungs(models):
        models.loc[models["model_id"] == "crop", ["lung_mass_mean", "not_applicable"]] = [math.nan, "lung_mass"]
        return models

    write_run(tmp_path, models_update=blank_lungs)
    result = run_check(tmp_path, [Threshold("lung_mass", "min", 0.5)])
    assert not result.passed and "only artifact and border metrics" in str(result.failures[0])


# ----- the folder must be one complete run ------------------------------------------------------


def test_intact_folder_passes_verification(run_dir):
    assert gate(run_dir, "--min-lung-mass", "0.5").exit_code == 0


def test_changed_file_is_a_manifest_mismatch(run_dir):
    with open(run_dir / "models.csv", "a") as handle:
        handle.write("\n")
    line = one_error_line(gate(run_dir, "--min-lung-mass", "0.5"))
    assert f"{run_dir / 'models.csv'}: sha256 differs from the manifest of run {RUN_ID}" in line


def test_missing_file_is_named(run_dir):
    (run_dir / "gallery.csv").unlink()
    line = one_error_line(gate(run_dir, "--min-lung-mass", "0.5"))
    assert f"{run_dir / 'gallery.csv'}: missing" in line


def test_stale_validation_csv_of_an_older_run_is_an_extra_file(tmp_path):
    write_run(tmp_path / "old", run_id="20250101T000000Z-00000old")
    write_run(tmp_path / "new")
    (tmp_path / "new" / "validation.csv").unlink()  # a run on real data writes none
    seal(tmp_path / "new")
    assert gate(tmp_path / "new", "--min-lung-mass", "0.5").exit_code == 0
    (tmp_path / "new" / "validation.csv").write_bytes((tmp_path / "old" / "validation.csv").read_bytes())
    line = one_error_line(gate(tmp_path / "new", "--min-lung-mass", "0.5"))
    assert f"{tmp_path / 'new' / 'validation.csv'}: result file not written by run {RUN_ID}" in line


def test_unlisted_checkpoint_of_a_model_of_the_run_is_extra(run_dir):
    (run_dir / "models" / "nocrop").mkdir(parents=True)
    (run_dir / "models" / "nocrop" / "config.json").write_text("{}")
    line = one_error_line(gate(run_dir, "--min-lung-mass", "0.5"))
    assert str(run_dir / "models" / "nocrop" / "config.json") in line


def test_foreign_files_that_are_not_results_are_ignored(run_dir):
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / ".DS_Store").write_bytes(b"\0")
    (run_dir / "models" / "someone-elses").mkdir(parents=True)
    (run_dir / "models" / "someone-elses" / "weights.bin").write_bytes(b"\0")
    assert gate(run_dir, "--min-lung-mass", "0.5").exit_code == 0


def test_rows_of_another_run_are_named_even_when_resealed(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", run_id="20260202T000000Z-0000bbbb")
    (tmp_path / "a" / "images.csv").write_bytes((tmp_path / "b" / "images.csv").read_bytes())
    seal(tmp_path / "a")  # the manifest alone would not notice: the rows still name their run
    line = one_error_line(gate(tmp_path / "a", "--min-lung-mass", "0.5"))
    assert f"{tmp_path / 'a' / 'images.csv'}: rows of run/protocol 20260202T000000Z-0000bbbb" in line


def test_protocol_file_of_another_protocol_is_named(run_dir):
    path = run_dir / "protocol.resolved.yaml"
    path.write_text(path.read_text().replace("seed: 0", "seed: 1"))
    seal(run_dir)
    line = one_error_line(gate(run_dir, "--min-lung-mass", "0.5"))
    assert f"{path}: header or content does not match run {RUN_ID}" in line


def test_folder_without_manifest_cannot_be_verified(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["manifest"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    line = one_error_line(gate(run_dir, "--min-lung-mass", "0.5"))
    assert "has no run_id, protocol_sha256 and manifest" in line


def test_baseline_must_verify_too(tmp_path):
    write_run(tmp_path / "new")
    write_run(tmp_path / "old")
    (tmp_path / "old" / "results.csv").write_text("tampered")
    line = one_error_line(gate(tmp_path / "new", "--baseline", tmp_path / "old"))
    assert line.startswith(f"error: baseline folder {tmp_path / 'old'} is not one complete run")
    assert "results.csv" in line


# ----- policy files -----------------------------------------------------------------------------


def write_policy(path, text: str):
    path.write_text(text)
    return path


def test_policy_thresholds_and_models(tmp_path, run_dir):
    policy = write_policy(tmp_path / "gate.yaml", "models: all\nthresholds:\n  lung_mass: {min: 0.5}\n")
    failing = gate(run_dir, "--policy", policy)
    assert failing.exit_code == 1 and "nocrop: lung_mass = 0.31, required min 0.5" in failing.output
    only_crop = write_policy(tmp_path / "crop.yaml", "models: [crop]\nthresholds:\n  lung_mass: {min: 0.5, max: 0.9}\n")
    passing = gate(run_dir, "--policy", only_crop)
    assert passing.exit_code == 0 and "PASS 1 model(s), 2 rule(s)" in passing.output
    # CLI thresholds add to the policy's; --all-models wins over its model list
    both = gate(run_dir, "--policy", only_crop, "--all-models", "--min-accuracy", "0.85")
    assert both.exit_code == 1 and "crop: accuracy = 0.8, required min 0.85" in both.output


def _accuracy(value, low, high):
    def update(models):
        models.loc[models["model_id"] == "crop", ["accuracy_mean", "accuracy_ci_low", "accuracy_ci_high"]] = [value, low, high]
        return models
    return update


@pytest.mark.parametrize("tolerance, passes", [
    ("0.1", True), ("0.01", False), ("{abs: 0.06}", True),
    ("{ci: 1}", True),     # 0.05 drop < 1 x hypot(0.04, 0.04) = 0.057
    ("{ci: 0.5}", False),  # 0.05 drop > 0.028
])
def test_policy_regression_tolerance_absolute_and_in_ci_half_widths(tmp_path, tolerance, passes):
    write_run(tmp_path / "old")  # crop accuracy 0.80 [0.76, 0.84]
    write_run(tmp_path / "new", models_update=_accuracy(0.75, 0.71, 0.79))
    policy = write_policy(tmp_path / "gate.yaml", f"regression:\n  accuracy: {tolerance}\n")
    result = gate(tmp_path / "new", "--policy", policy, "--baseline", tmp_path / "old")
    assert result.exit_code == (0 if passes else 1), result.output
    if not passes:
        assert "regressed from 0.8" in result.output


def test_ci_tolerance_needs_ci_columns(tmp_path):
    write_run(tmp_path / "old")
    write_run(tmp_path / "new", models_update=_accuracy(0.75, math.nan, math.nan))
    policy = write_policy(tmp_path / "gate.yaml", "regression:\n  accuracy: {ci: 1}\n")
    line = one_error_line(gate(tmp_path / "new", "--policy", policy, "--baseline", tmp_path / "old"))
    assert str(tmp_path / "new" / "models.csv") in line and "accuracy_ci_low/accuracy_ci_high of model crop are blank" in line


@pytest.mark.parametrize("text, expected", [
    ("thresholds:\n  lung_mass: {mn: 0.5}\n", "thresholds.lung_mass.mn: unknown field"),
    ("thresholds:\n  lung_mass: {min: .nan}\n", "thresholds.lung_mass.min: must be a finite number"),
    ("thresholds:\n  lung_mass: {min: .inf}\n", "thresholds.lung_mass.min: must be a finite number"),
    ("thresholds:\n  lung_mass: {min: high}\n", "thresholds.lung_mass.min: expected a number"),
    ("thresholds:\n  lung_mass: {min: true}\n", "thresholds.lung_mass.min: expected a number"),
    ("thresholds:\n  lung_mass: {min: 0.6, max: 0.5}\n", "thresholds.lung_mass: min 0.6 is above max 0.5"),
    ("thresholds:\n  lung_mass: 0.5\n", "thresholds.lung_mass: expected {min: F}"),
    ("thresholds:\n  lung_mas: {min: 0.5}\n", "thresholds.lung_mas.min: unknown metric 'lung_mas'; did you mean lung_mass"),
    ("thresholds:\n  lung_mass: {min: 0.5}\n  lung_mass: {min: 0.1}\n", "key 'lung_mass' is given twice"),
    ("threshold:\n  lung_mass: {min: 0.5}\n", "threshold: unknown field"),
    ("models: best\nthresholds:\n  lung_mass: {min: 0.5}\n", "models: expected 'selected', 'all'"),
    ("models: [ghost]\nthresholds:\n  lung_mass: {min: 0.5}\n", "models: 'ghost' is not a model of"),
    ("version: 2\nthresholds:\n  lung_mass: {min: 0.5}\n", "version: must be 1"),
    ("regression:\n  accuracy: -0.1\n", "regression.accuracy: must be >= 0"),
    ("regression:\n  accuracy: {ci: .nan}\n", "regression.accuracy.ci: must be a finite number"),
    ("regression:\n  accuracy: {sd: 1}\n", "regression.accuracy: expected a number, {abs: F} or {ci: K}"),
    ("regression:\n  accuracy: 0.05\n", "regression: needs --baseline DIR"),
    ("models: all\n", "no rule: give thresholds, regression or both"),
    ("- lung_mass\n", "expected a mapping"),
    ("thresholds: {lung_mass: {min: 0.5}\n", "not valid YAML"),
    ("!!python/object:os.system {}\n", "not valid YAML"),
])
def test_bad_policy_names_file_and_field(tmp_path, run_dir, text, expected):
    policy = write_policy(tmp_path / "policy.yaml", text)
    line = one_error_line(gate(run_dir, "--policy", policy))
    assert str(policy) in line and expected in line


def test_missing_policy_file_is_named(tmp_path, run_dir):
    line = one_error_line(gate(run_dir, "--policy", tmp_path / "nowhere.yaml"))
    assert f"policy file {tmp_path / 'nowhere.yaml'} does not exist" in line


# ----- JUnit ------------------------------------------------------------------------------------


def junit_cases(path):
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    return root, list(root.iter("testcase"))


def test_junit_has_one_testcase_per_model_and_rule(tmp_path, run_dir):
    policy = write_policy(tmp_path / "gate.yaml",
                          "models: all\nthresholds:\n  lung_mass: {min: 0.5}\n  artifact_mass: {max: 0.1}\n")
    report = tmp_path / "check.xml"
    result = gate(run_dir, "--policy", policy, "--junit", report)
    assert result.exit_code == 1
    root, cases = junit_cases(report)
    by_case = {(c.get("classname"), c.get("name")): c for c in cases}
    assert set(by_case) == {(f"auditbench.check.{m}", r) for m in ("crop", "nocrop")
                            for r in ("lung_mass >= 0.5", "artifact_mass <= 0.1")}
    failure = by_case[("auditbench.check.nocrop", "lung_mass >= 0.5")].find("failure")
    assert failure is not None and failure.get("type") == "threshold"
    assert "lung_mass = 0.31" in failure.get("message") and "required min 0.5" in failure.get("message")
    assert by_case[("auditbench.check.nocrop", "artifact_mass <= 0.1")].find("failure") is not None
    skipped = by_case[("auditbench.check.crop", "artifact_mass <= 0.1")].find("skipped")
    assert skipped is not None and "not applicable" in skipped.get("message")
    passed = by_case[("auditbench.check.crop", "lung_mass >= 0.5")]
    assert passed.find("failure") is None and passed.find("skipped") is None
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "2", "1")
    properties = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert properties["run_id"] == RUN_ID


def test_junit_marks_undefined_and_regression_failures(tmp_path):
    write_run(tmp_path / "old")
    write_run(tmp_path / "new", models_update=_accuracy(0.60, 0.56, 0.64))
    report = tmp_path / "check.xml"
    result = gate(tmp_path / "new", "--all-models", "--max", "artifact_occlusion_effect=0.1",
                  "--baseline", tmp_path / "old", "--regression-metric", "accuracy", "--junit", report)
    assert result.exit_code == 1
    _, cases = junit_cases(report)
    types = {(c.get("classname"), c.get("name")): c.find("failure").get("type")
             for c in cases if c.find("failure") is not None}
    assert types == {("auditbench.check.nocrop", "artifact_occlusion_effect <= 0.1"): "undefined",
                     ("auditbench.check.crop", "accuracy >= baseline - 0.05"): "regression"}


def test_junit_on_bad_input_holds_one_error(tmp_path, run_dir):
    report = tmp_path / "check.xml"
    result = gate(run_dir, "--min-lung-mass", "nan", "--junit", report)
    assert result.exit_code == 2
    _, cases = junit_cases(report)
    (case,) = cases
    assert "--min-lung-mass nan" in case.find("error").get("message")


def test_junit_when_no_model_is_selected(tmp_path):
    write_run(tmp_path / "run", selected=None)
    report = tmp_path / "check.xml"
    assert gate(tmp_path / "run", "--min-lung-mass", "0.5", "--junit", report).exit_code == 1
    _, cases = junit_cases(report)
    (case,) = cases
    assert "no model was selected" in case.find("failure").get("message")
