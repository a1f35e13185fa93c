"""The CI gate: do the selected model's (or every model's) metrics meet fixed thresholds?

Before any rule, the run folder (and the baseline's) must verify as one complete run
(:func:`auditbench.outputs.verify_run_folder`). Bad input of any kind (a folder that does not
verify, an unknown metric, a non-finite threshold, an ``inf`` in models.csv, a bad policy field)
raises :class:`CheckInputError` with one line naming the file or option: CLI exit code 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from auditbench.report.policy import Policy, PolicyError, Tolerance
from auditbench.report.tables import (
    INTERNAL_SPLIT, MODELS_FILE, ResultsError, ResultTables, as_bool, load_metrics, read_tables,
)

Bound = Literal["min", "max"]
Status = Literal["passed", "failed", "skipped"]
SELECTION_METRIC = "selection"
"""CheckFailure.metric when no model was selected, so there is nothing to check."""
DEFAULT_TOLERANCE = 0.05
_OUT_OF_VIEW = ("out_of_view", "absent")
"""images.csv artifact_status values that prove the artifact out of the model's view (audit.aggregate)."""


class CheckInputError(ValueError):
    """Bad input to the gate (missing folder or file, unknown metric, bad option); CLI exit code 2."""


@dataclass(frozen=True)
class Threshold:
    """``metric``'s mean over folds must be >= ``value`` (bound "min") or <= ``value`` ("max").

    ``source`` (the option or policy field it came from) only names it in error messages."""

    metric: str
    bound: Bound
    value: float
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.bound not in ("min", "max"):
            raise CheckInputError(f"threshold bound must be 'min' or 'max', got {self.bound!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            where = self.source or f"--{self.bound} {self.metric}"
            raise CheckInputError(f"{where}: the threshold must be a finite number, got {self.value!r}")

    def __str__(self) -> str:
        return f"{self.metric} {'>=' if self.bound == 'min' else '<='} {self.value:g}"


@dataclass(frozen=True)
class CheckFailure:
    """One threshold a model does not meet; ``value`` is NaN where the metric is undefined."""

    model_id: str
    metric: str
    value: float
    bound: Bound
    threshold: float
    reason: str = ""

    def __str__(self) -> str:
        if self.metric == SELECTION_METRIC:
            return self.reason
        if math.isnan(self.value):
            return f"{self.model_id}: {self.metric} {self.reason}, required {self.bound} {self.threshold:g}"
        note = f" ({self.reason})" if self.reason else ""
        return f"{self.model_id}: {self.metric} = {self.value:.4g}, required {self.bound} {self.threshold:.4g}{note}"


@dataclass(frozen=True)
class Outcome:
    """One rule on one model: passed, failed (``failure`` says how) or skipped (``message`` says why)."""

    model_id: str
    rule: str
    status: Status
    message: str = ""
    failure: CheckFailure | None = None


@dataclass
class CheckResult:
    """The gate's verdict: ``passed`` is False when any failure was recorded."""

    passed: bool
    failures: list[CheckFailure] = field(default_factory=list)
    checked_models: list[str] = field(default_factory=list)
    not_applicable: list[tuple[str, str]] = field(default_factory=list)
    """(model_id, metric) pairs whose metric is undefined and proven not applicable: counted as met."""
    outcomes: list[Outcome] = field(default_factory=list)
    """Every (model, rule) the gate evaluated, in order: one JUnit testcase each."""
    run_id: str = ""
    protocol_sha256: str = ""
    n_rules: int = 0

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if outcome.failure is not None:
            self.failures.append(outcome.failure)


def parse_threshold_option(text: str, bound: Bound) -> Threshold:
    """``"lung_mass=0.5"`` (a ``--min``/``--max`` option value) -> Threshold; CheckInputError if malformed."""
    option = f"--{bound}"
    metric, sep, number = text.partition("=")
    metric, number = metric.strip(), number.strip()
    if not sep or not metric or not number:
        raise CheckInputError(f"{option} {text!r}: expected METRIC=NUMBER, e.g. {option} lung_mass=0.5")
    try:
        value = float(number)
    except ValueError:
        raise CheckInputError(f"{option} {text!r}: {number!r} is not a number") from None
    if not math.isfinite(value):
        raise CheckInputError(f"{option} {text!r}: the threshold must be a finite number")
    return Threshold(metric=metric, bound=bound, value=value, source=f"{option} {text}")


def check_tolerance(value: float, source: str = "--tolerance") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CheckInputError(f"{source} {value!r}: the tolerance must be a finite number >= 0")
    return float(value)


def _read(out_dir: Path, what: str, verify: bool) -> ResultTables:
    from auditbench.outputs import verify_run_folder

    if not out_dir.exists():
        raise CheckInputError(f"{what} folder {out_dir} does not exist")

    def refuse(problems: list[str]) -> None:
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise CheckInputError(f"{what} folder {out_dir} is not one complete run: {problems[0]}{more}")

    if verify and out_dir.is_dir():  # files first: a stale or changed file is named as such
        refuse(verify_run_folder(out_dir))
    try:
        tables = read_tables(out_dir)
    except ResultsError as error:
        raise CheckInputError(str(error)) from error
    if verify:  # then rows of other runs, unlisted checkpoint files of models.csv's models
        refuse(verify_run_folder(out_dir, set(tables.models["model_id"].astype(str)), tables.provenance, hashes=False))
    return tables


def run_check(
    out_dir: Path | str,
    thresholds: list[Threshold],
    all_models: bool = False,
    baseline: Path | str | None = None,
    regression_metrics: list[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    policy: Policy | None = None,
    verify: bool = True,
) -> CheckResult:
    """Check the selected model (every model with ``all_models``) of a run's output folder.

    With ``baseline`` (an earlier run's folder) each of ``regression_metrics`` (default: the
    threshold metrics, else accuracy and lung_mass) must not be worse than the baseline's value by
    more than ``tolerance``, in the metric's declared direction. The baseline value is that of the
    baseline's selected model, or with ``all_models`` that of the model with the same id.
    ``policy`` adds its thresholds and per-metric regression tolerances and chooses the models
    (``all_models`` wins). ``verify``: refuse a folder that is not one complete run.
    """
    out_dir = Path(out_dir)
    tolerance = check_tolerance(tolerance)
    thresholds = list(thresholds)
    rules: dict[str, Tolerance] = {m: Tolerance("abs", tolerance) for m in regression_metrics or []}
    which: str | list[str] = "all" if all_models else "selected"
    if policy is not None:
        thresholds += [Threshold(m, bound, value, source) for m, bound, value, source in policy.thresholds]
        rules.update(policy.regression)
        if not all_models:
            which = policy.models
        if policy.regression and baseline is None:
            raise CheckInputError(f"{policy.path}: regression: needs --baseline DIR to compare with")
    if regression_metrics and baseline is None:
        raise CheckInputError("--regression-metric needs --baseline DIR to compare with")
    if baseline is not None and not rules:
        defaults = list(dict.fromkeys(t.metric for t in thresholds)) or ["accuracy", "lung_mass"]
        rules = {m: Tolerance("abs", tolerance) for m in defaults}

    tables = _read(out_dir, "results", verify)
    models = tables.models.sort_values("rank", kind="stable")
    registry = load_metrics()
    known = sorted(set(tables.metrics) | set(registry.names() if registry is not None else []))
    named = [(t.metric, t.source) for t in thresholds] + [(m, _rule_source(m, policy)) for m in rules]
    for metric, source in named:
        if metric not in known:
            close = difflib.get_close_matches(metric, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            prefix = f"{source}: " if source else ""
            raise CheckInputError(f"{prefix}unknown metric {metric!r}{hint} (known: {', '.join(known)})")

    result = CheckResult(passed=True, run_id=str(tables.summary.get("run_id", "")),
                         protocol_sha256=str(tables.summary.get("protocol_sha256", "")),
                         n_rules=len(thresholds) + len(rules))
    if which == "selected":
        selected = tables.selected_model
        if selected is None:
            failure = CheckFailure(
                model_id="", metric=SELECTION_METRIC, value=math.nan, bound="min", threshold=math.nan,
                reason="no model was selected (none meets the protocol's constraints); "
                "use --all-models to check every model",
            )
            result.add(Outcome("", "a model is selected", "failed", str(failure), failure))
            result.passed = False
            return result
        rows = models[models["model_id"] == selected]
        if rows.empty:
            raise CheckInputError(f"summary.json selects {selected!r}, which models.csv does not list")
    elif which == "all":
        rows = models
    else:
        missing = [m for m in which if m not in set(models["model_id"].astype(str))]
        if missing:
            raise CheckInputError(f"{policy.path}: models: {missing[0]!r} is not a model of {out_dir / MODELS_FILE} "
                                  f"(models: {', '.join(models['model_id'].astype(str))})")
        rows = models[models["model_id"].astype(str).isin(which)]

    result.checked_models = [str(m) for m in rows["model_id"]]
    internal = tables.images[tables.images["split"] == INTERNAL_SPLIT] if len(tables.images) else tables.images
    context = _Context(out_dir / MODELS_FILE, registry, internal, tables.summary)
    reference = None
    if baseline is not None:
        reference = _baseline_rows(Path(baseline), which != "selected", verify)
    for _, row in rows.iterrows():
        for threshold in thresholds:
            result.add(_check_one(row, threshold, context, result))
        if reference is not None:
            for metric, rule in rules.items():
                result.add(_check_regression(row, reference, metric, rule, context, result, Path(baseline)))
    result.passed = not result.failures
    return result


def _rule_source(metric: str, policy: Policy | None) -> str:
    if policy is not None and metric in policy.regression:
        return f"{policy.path}: regression.{metric}"
    return f"--regression-metric {metric}"


@dataclass
class _Context:
    models_file: Path
    registry: Any
    internal_images: pd.DataFrame
    summary: dict


def _baseline_rows(baseline: Path, by_id: bool, verify: bool) -> tuple[pd.DataFrame, Path]:
    """The baseline rows to compare with: every model by id, or its selected model alone."""
    tables = _read(baseline, "baseline", verify)
    if by_id:
        return tables.models.set_index("model_id", drop=False), baseline / MODELS_FILE
    if tables.selected_model is None:
        raise CheckInputError(f"baseline {baseline} selected no model; compare with --all-models")
    return tables.models[tables.models["model_id"] == tables.selected_model], baseline / MODELS_FILE


def _value(row: pd.Series, column: str, file: Path) -> float:
    """A models.csv cell as a number: NaN where blank; CheckInputError where not finite or not a number."""
    raw = row.get(column)
    value = float(pd.to_numeric(pd.Series([raw]), errors="coerce").iloc[0])
    if math.isnan(value) and raw is not None and not (isinstance(raw, float) and math.isnan(raw)) \
            and str(raw).strip().lower() not in ("", "nan", "none", "na", "null"):
        raise CheckInputError(f"{file}: {column} of model {row['model_id']} is {raw!r}, not a number")
    if math.isinf(value):
        raise CheckInputError(f"{file}: {column} of model {row['model_id']} is {value}; a metric must be finite or blank")
    return value


def _direction(metric: str, context: _Context) -> bool:
    registry = context.registry
    if registry is not None and metric in registry:
        higher = getattr(registry.get(metric), "higher_is_better", None)
        if higher is not None:
            return bool(higher)
    declared = context.summary.get("metric_directions")
    if isinstance(declared, dict) and declared.get(metric) in ("higher", "lower"):
        return declared[metric] == "higher"
    return True


def _check_regression(
    row: pd.Series, reference: tuple[pd.DataFrame, Path], metric: str, rule: Tolerance, context: _Context,
    result: CheckResult, baseline: Path,
) -> Outcome:
    frame, base_file = reference
    model_id = str(row["model_id"])
    higher = _direction(metric, context)
    sign = "-" if higher else "+"
    name = f"{metric} {'>=' if higher else '<='} baseline {sign} {rule}"
    if frame.index.name == "model_id":
        if model_id not in frame.index:
            return Outcome(model_id, name, "skipped", f"{model_id} is not in baseline {baseline}: nothing to regress from")
        base = frame.loc[model_id]
    else:
        base = frame.iloc[0]
    before = _value(base, f"{metric}_mean", base_file)
    if math.isnan(before):
        return Outcome(model_id, name, "skipped", f"{metric} is undefined in baseline {baseline} ({base['model_id']})")
    now = _value(row, f"{metric}_mean", context.models_file) if f"{metric}_mean" in row.index else math.nan
    if rule.kind == "abs" or math.isnan(now):
        margin = rule.value
    else:
        margin = rule.value * math.hypot(_half_width(row, metric, context.models_file),
                                         _half_width(base, metric, base_file))
    limit = before - margin if higher else before + margin
    outcome = _check_one(row, Threshold(metric, "min" if higher else "max", limit), context, result, name=name)
    if outcome.failure is not None and not math.isnan(outcome.failure.value):
        how = f"tolerance {rule}" + (f" = {margin:.4g}" if rule.kind == "ci" else "")
        failure = dataclasses.replace(
            outcome.failure, reason=f"regressed from {before:.4g} in baseline {baseline} ({base['model_id']}), {how}")
        outcome = dataclasses.replace(outcome, message=str(failure), failure=failure)
    return outcome


def _half_width(row: pd.Series, metric: str, file: Path) -> float:
    low_column, high_column = f"{metric}_ci_low", f"{metric}_ci_high"
    if low_column not in row.index or high_column not in row.index:
        raise CheckInputError(f"{file}: has no {low_column}/{high_column} columns; a CI tolerance needs them")
    low, high = _value(row, low_column, file), _value(row, high_column, file)
    if math.isnan(low) or math.isnan(high):
        raise CheckInputError(f"{file}: {low_column}/{high_column} of model {row['model_id']} are blank; a CI "
                              "tolerance needs them (run with metrics.bootstrap > 0)")
    if low > high:
        raise CheckInputError(f"{file}: {low_column} {low:g} is above {high_column} {high:g} for model {row['model_id']}")
    return (high - low) / 2


def _check_one(row: pd.Series, threshold: Threshold, context: _Context, result: CheckResult,
               name: str | None = None) -> Outcome:
    model_id, metric = str(row["model_id"]), threshold.metric
    name = name or str(threshold)
    column = f"{metric}_mean"
    if column not in row.index:
        reason = "is not computed in this run"
    else:
        value = _value(row, column, context.models_file)
        if not math.isnan(value):
            met = value >= threshold.value if threshold.bound == "min" else value <= threshold.value
            if met:
                return Outcome(model_id, name, "passed", f"{metric} = {value:.4g}")
            failure = CheckFailure(model_id, metric, value, threshold.bound, threshold.value)
            return Outcome(model_id, name, "failed", str(failure), failure)
        reason = _unproven(row, metric, context)
        if reason is None:
            result.not_applicable.append((model_id, metric))
            return Outcome(model_id, name, "skipped",
                           f"{metric} is not applicable: its region is out of the model's view (models.csv "
                           "not_applicable, confirmed by images.csv); counted as met")
    failure = CheckFailure(model_id, metric, math.nan, threshold.bound, threshold.value, reason)
    return Outcome(model_id, name, "failed", str(failure), failure)


def _region(metric: str, registry: Any) -> str | None:
    if registry is not None and metric in registry:
        info = registry.get(metric)
        region = getattr(info, "region", None)
        if region is not None or not getattr(info, "not_applicable_when_undefined", False):
            return region
    for region in ("artifact", "border"):  # no registry entry: the metric's name says its region
        if metric.startswith(f"{region}_"):
            return region
    return None


def _unproven(row: pd.Series, metric: str, context: _Context) -> str | None:
    """None when an undefined metric is proven not applicable; otherwise why it is not.

    The proof is the run's: models.csv ``not_applicable`` lists the metric (audit.aggregate writes
    it only when the masks put the region out of view on every internal test image), and
    images.csv agrees for this model: every internal test image has its artifact ``out_of_view``
    or ``absent`` (artifact metrics), or no border in view (border metrics). Any other NaN (no
    mask, blank maps) is a failure: the model is unverified on it."""
    listed = row.get("not_applicable", "")
    if not (isinstance(listed, str) and metric in re.split(r"[,;\s]+", listed)):
        return "is undefined (NaN) and not proven out of view (models.csv not_applicable does not list it)"
    region = _region(metric, context.registry)
    if region not in ("artifact", "border"):
        return "is undefined (NaN); models.csv lists it not applicable, but only artifact and border metrics can be"
    images = context.internal_images
    rows = images[images["model_id"].astype(str) == str(row["model_id"])] if len(images) else images
    if rows.empty:
        return ("is undefined (NaN); models.csv lists it not applicable, but images.csv has no internal test "
                "image of the model to prove it")
    if region == "artifact":
        in_view = int((~rows["artifact_status"].astype(str).isin(_OUT_OF_VIEW)).sum())
    else:
        in_view = int(as_bool(rows["border_in_view"]).sum())
    if in_view:
        return (f"is undefined (NaN); models.csv lists it not applicable, but images.csv has the {region} in view "
                f"(or unknown) on {in_view} internal test image(s)")
    return None


# ----- JUnit ------------------------------------------------------------------------------------


def write_junit(path: Path | str, result: CheckResult | None, out_dir: Path | str, error: str | None = None) -> None:
    """JUnit XML for CI dashboards: one testcase per (model, rule), failures with value and
    threshold, proven not-applicable rules as skipped; with ``error`` (bad input) one erroring testcase."""
    from junit_xml import TestCase, TestSuite, to_xml_report_string

    from auditbench.outputs import write_text_atomic

    cases = []
    if error is not None:
        case = TestCase("auditbench check", classname="auditbench.check")
        case.add_error_info(message=error)
        cases.append(case)
    for outcome in result.outcomes if result is not None else []:
        case = TestCase(outcome.rule, classname=f"auditbench.check.{outcome.model_id or 'run'}")
        if outcome.status == "failed":
            failure = outcome.failure
            kind = "regression" if "regressed" in failure.reason else (
                "undefined" if math.isnan(failure.value) else "threshold")
            case.add_failure_info(message=outcome.message, failure_type=kind)
        elif outcome.status == "skipped":
            case.add_skipped_info(message=outcome.message)
        else:
            case.stdout = outcome.message
        cases.append(case)
    properties = {"out_dir": str(out_dir)}
    if result is not None:
        properties.update({"run_id": result.run_id, "protocol_sha256": result.protocol_sha256})
    suite = TestSuite("auditbench check", cases, properties=properties)
    path = Path(path)
    try:
        write_text_atomic(path, to_xml_report_string([suite], encoding="utf-8"))
    except OSError as error_:
        raise CheckInputError(f"--junit {path}: cannot write: {error_.strerror or error_}") from None


def load_policy_file(path: Path | str) -> Policy:
    from auditbench.report.policy import load_policy

    try:
        return load_policy(path)
    except PolicyError as error:
        raise CheckInputError(str(error)) from None
