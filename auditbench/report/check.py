"""The CI gate: do the selected model's (or every model's) metrics meet fixed thresholds?"""
from __future__ import annotations

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
        shown = self.reason if math.isnan(self.value) else f"= {self.value:.4g}"
        return f"{self.model_id}: {self.metric} {shown}, required {self.bound} {self.threshold:g}"


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


def run_check(out_dir: Path | str, thresholds: list[Threshold], all_models: bool = False) -> CheckResult:
    """Check the selected model (every model with ``all_models``) of a run's output folder."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        raise CheckInputError(f"results folder {out_dir} does not exist")
    try:
        tables = read_tables(out_dir)
    except ResultsError as error:
        raise CheckInputError(str(error)) from error
    models = tables.models.sort_values("rank", kind="stable")
    registry = load_metrics()
    known = sorted(set(tables.metrics) | set(registry.names() if registry is not None else []))
    for threshold in thresholds:
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
    for _, row in rows.iterrows():
        for threshold in thresholds:
            _check_one(row, threshold, registry, result)
    result.passed = not result.failures
    return result


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
    """An undefined metric counts as met when the metric declares it (e.g. no artifact in view)."""
    if registry is not None and metric in registry:
        return bool(registry.get(metric).not_applicable_when_undefined)
    # Without the metric registry, trust the run's own record of not-applicable metrics.
    listed = row.get("not_applicable", "")
    return isinstance(listed, str) and metric in re.split(r"[,;\s]+", listed)
