"""The CI gate: do the selected model's (or every model's) metrics meet fixed thresholds?"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from auditbench.report.tables import ResultsError, load_metrics, read_tables

Bound = Literal["min", "max"]
SELECTION_METRIC = "selection"
"""CheckFailure.metric when no model was selected, so there is nothing to check."""


class CheckInputError(ValueError):
    """Bad input to the gate (missing folder or file, unknown metric, bad option); CLI exit code 2."""


@dataclass(frozen=True)
class Threshold:
    """``metric``'s mean over folds must be >= ``value`` (bound "min") or <= ``value`` ("max")."""

    metric: str
    bound: Bound
    value: float

    def __post_init__(self) -> None:
        if self.bound not in ("min", "max"):
            raise CheckInputError(f"threshold bound must be 'min' or 'max', got {self.bound!r}")

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


@dataclass
class CheckResult:
    """The gate's verdict: ``passed`` is False when any failure was recorded."""

    passed: bool
    failures: list[CheckFailure] = field(default_factory=list)
    checked_models: list[str] = field(default_factory=list)
    not_applicable: list[tuple[str, str]] = field(default_factory=list)
    """(model_id, metric) pairs whose metric is undefined and not applicable: counted as met."""


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
    return Threshold(metric=metric, bound=bound, value=value)


def _read(out_dir: Path, what: str):
    if not out_dir.exists():
        raise CheckInputError(f"{what} folder {out_dir} does not exist")
    try:
        return read_tables(out_dir)
    except ResultsError as error:
        raise CheckInputError(str(error)) from error


def run_check(
    out_dir: Path | str,
    thresholds: list[Threshold],
    all_models: bool = False,
    baseline: Path | str | None = None,
    regression_metrics: list[str] | None = None,
    tolerance: float = 0.05,
) -> CheckResult:
    """Check the selected model (every model with ``all_models``) of a run's output folder.

    With ``baseline`` (an earlier run's folder) each of ``regression_metrics`` (default: the
    threshold metrics, else accuracy and lung_mass) must not be worse than the baseline's value by
    more than ``tolerance``, in the metric's declared direction. The baseline value is that of the
    baseline's selected model, or with ``all_models`` that of the model with the same id.
    """
    out_dir = Path(out_dir)
    tables = _read(out_dir, "results")
    models = tables.models.sort_values("rank", kind="stable")
    registry = load_metrics()
    known = sorted(set(tables.metrics) | set(registry.names() if registry is not None else []))
    if baseline is not None and not regression_metrics:
        regression_metrics = list(dict.fromkeys(t.metric for t in thresholds)) or ["accuracy", "lung_mass"]
    for threshold in thresholds + [Threshold(m, "min", 0.0) for m in regression_metrics or []]:
        if threshold.metric not in known:
            close = difflib.get_close_matches(threshold.metric, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CheckInputError(f"unknown metric {threshold.metric!r}{hint} (known: {', '.join(known)})")

    if all_models:
        rows = models
    else:
        selected = tables.selected_model
        if selected is None:
            failure = CheckFailure(
                model_id="", metric=SELECTION_METRIC, value=math.nan, bound="min", threshold=math.nan,
                reason="no model was selected (none meets the protocol's constraints); "
                "use --all-models to check every model",
            )
            return CheckResult(passed=False, failures=[failure])
        rows = models[models["model_id"] == selected]
        if rows.empty:
            raise CheckInputError(f"summary.json selects {selected!r}, which models.csv does not list")

    result = CheckResult(passed=True, checked_models=[str(m) for m in rows["model_id"]])
    reference = _baseline_rows(Path(baseline), all_models) if baseline is not None else None
    for _, row in rows.iterrows():
        for threshold in thresholds:
            _check_one(row, threshold, registry, result)
        if reference is not None:
            _check_regression(row, reference, regression_metrics, tolerance, registry, result, Path(baseline))
    result.passed = not result.failures
    return result


def _baseline_rows(baseline: Path, all_models: bool) -> pd.DataFrame:
    """The baseline rows to compare with: every model by id, or its selected model alone."""
    tables = _read(baseline, "baseline")
    if all_models:
        return tables.models.set_index("model_id", drop=False)
    if tables.selected_model is None:
        raise CheckInputError(f"baseline {baseline} selected no model; compare with --all-models")
    return tables.models[tables.models["model_id"] == tables.selected_model]


def _check_regression(
    row: pd.Series, reference: pd.DataFrame, metrics: list[str], tolerance: float, registry: Any,
    result: CheckResult, baseline: Path,
) -> None:
    model_id = str(row["model_id"])
    if reference.index.name == "model_id":
        if model_id not in reference.index:
            return  # a model new in this run has nothing to regress from
        base = reference.loc[model_id]
    else:
        base = reference.iloc[0]
    for metric in metrics:
        column = f"{metric}_mean"
        before = float(pd.to_numeric(pd.Series([base.get(column)]), errors="coerce").iloc[0])
        if math.isnan(before):
            continue  # undefined in the baseline (e.g. not applicable): nothing to hold it to
        higher = registry.get(metric).higher_is_better if registry is not None and metric in registry else True
        bound: Bound = "min" if higher else "max"
        limit = before - tolerance if higher else before + tolerance
        start = len(result.failures)
        _check_one(row, Threshold(metric, bound, limit), registry, result)
        for i in range(start, len(result.failures)):
            if not math.isnan(result.failures[i].value):
                result.failures[i] = dataclasses.replace(
                    result.failures[i],
                    reason=f"regressed from {before:.4g} in baseline {baseline} ({base['model_id']}), tolerance {tolerance:g}",
                )


def _check_one(row: pd.Series, threshold: Threshold, registry: Any, result: CheckResult) -> None:
    model_id, metric = str(row["model_id"]), threshold.metric
    column = f"{metric}_mean"
    if column not in row.index:
        reason = "is not computed in this run"
    else:
        value = float(pd.to_numeric(pd.Series([row[column]]), errors="coerce").iloc[0])
        if not math.isnan(value):
            met = value >= threshold.value if threshold.bound == "min" else value <= threshold.value
            if not met:
                result.failures.append(CheckFailure(model_id, metric, value, threshold.bound, threshold.value))
            return
        if _not_applicable(row, metric, registry):
            result.not_applicable.append((model_id, metric))
            return
        reason = "is undefined (NaN)"
    result.failures.append(CheckFailure(model_id, metric, math.nan, threshold.bound, threshold.value, reason))


def _not_applicable(row: pd.Series, metric: str, registry: Any) -> bool:
    """An undefined metric counts as met only where the run proved its region out of the model's
    view (models.csv ``not_applicable``, e.g. the crop removed every artifact); any other NaN
    (no mask, blank maps) is a failure: the model is unverified on it."""
    listed = row.get("not_applicable", "")
    return isinstance(listed, str) and metric in re.split(r"[,;\s]+", listed)
