"""The selection rule and metric directions as summary.json records them, read defensively: a
report renders whatever an older or hand-edited summary.json holds."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

from auditbench.report.formatting import number
from auditbench.report.tables import load_metrics


class Constraint(NamedTuple):
    metric: str
    bound: str  # "min" | "max"
    value: Any  # as written in summary.json

    @property
    def sign(self) -> str:
        return "≥" if self.bound == "min" else "≤"

    def describe(self) -> str:
        """``lung_mass ≥ 0.5``."""
        return f"{self.metric} {self.sign} {self.value}"


def selection_rule(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json's ``selection`` {primary, constraints, pareto}; {} when absent or malformed."""
    rule = summary.get("selection")
    return rule if isinstance(rule, dict) else {}


def constraints(rule: dict[str, Any]) -> list[Constraint]:
    """The constraints of ``{metric: {min, max}}`` or ``[{metric, min, max}, ...]``, one per bound."""
    declared = rule.get("constraints")
    if isinstance(declared, dict):
        entries = [{"metric": metric, **bounds} for metric, bounds in declared.items() if isinstance(bounds, dict)]
    elif isinstance(declared, list):
        entries = [c for c in declared if isinstance(c, dict) and "metric" in c]
    else:
        return []
    return [Constraint(str(c["metric"]), bound, c[bound]) for c in entries for bound in ("min", "max")
            if c.get(bound) is not None]


def directions(summary: dict[str, Any]) -> dict[str, bool]:
    """metric -> higher is better; the metric registry wins over summary.json's copy."""
    declared = summary.get("metric_directions")
    declared = declared if isinstance(declared, dict) else {}
    result = {str(k): v == "higher" for k, v in declared.items() if v in ("higher", "lower")}
    registry = load_metrics()
    if registry is not None:
        result.update({name: bool(info.higher_is_better) for name, info in registry.items()})
    return result


def descriptions() -> dict[str, str]:
    registry = load_metrics()
    return {name: str(info.description) for name, info in registry.items()} if registry is not None else {}


def shortfall(mean: Any, constraint: Constraint) -> float:
    """How far ``mean`` lies on the wrong side of the bound, in the metric's units: > 0 when the
    constraint is violated, 0 when met, NaN when either number is undefined."""
    mean, bound = number(mean), number(constraint.value)
    if math.isnan(mean) or math.isnan(bound):
        return math.nan
    gap = bound - mean if constraint.bound == "min" else mean - bound
    return max(gap, 0.0)


def violates(mean: Any, constraint: Constraint) -> bool:
    return shortfall(mean, constraint) > 0
