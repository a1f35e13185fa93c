"""Model selection: constraints on audit metrics, a primary metric, and a Pareto front.

Works on the one-row-per-model table (``models.csv``) with ``<metric>_mean`` columns. Every
direction (higher or lower is better) comes from ``audit.metrics.METRICS``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from auditbench.audit.metrics import METRICS


class SelectionWarning(UserWarning):
    """No model meets every constraint, so no model is selected."""


@dataclass
class Constraint:
    """``min <= <metric>_mean <= max``; either bound may be None (not both). Bounds are inclusive."""

    metric: str
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        METRICS.get(self.metric)  # unknown names raise UnknownNameError with suggestions
        if self.min is None and self.max is None:
            raise ValueError(f"constraint on {self.metric!r} needs min or max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"constraint on {self.metric!r}: min {self.min} > max {self.max}")

    def violation(self, value: float) -> str | None:
        """Why ``value`` breaks the constraint (e.g. ``lung_mass=0.312 < min 0.5``), or None."""
        if math.isnan(value):
            return f"{self.metric}=NaN (undefined)"
        if self.min is not None and value < self.min:
            return f"{self.metric}={value:.3g} < min {self.min:g}"
        if self.max is not None and value > self.max:
            return f"{self.metric}={value:.3g} > max {self.max:g}"
        return None


@dataclass
class SelectionRule:
    """Rank by ``primary`` (in its declared direction) among models meeting every constraint."""

    primary: str = "accuracy"
    constraints: list[Constraint] = field(default_factory=list)
    pareto: tuple[str, str] = ("accuracy", "lung_mass")

    def __post_init__(self) -> None:
        for name in (self.primary, *self.pareto):
            METRICS.get(name)


def _values(models: pd.DataFrame, metric: str) -> pd.Series:
    column = f"{metric}_mean"
    if column not in models:
        raise KeyError(f"models table has no column {column!r}")
    return models[column].astype(float)


def _goodness(models: pd.DataFrame, metric: str) -> np.ndarray:
    """The metric's values signed so that larger is better."""
    values = _values(models, metric).to_numpy()
    return values if METRICS.get(metric).higher_is_better else -values


def pareto_front(models: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for models no other model dominates on metrics ``x`` and ``y`` (``<metric>_mean``).

    A dominates B when A is at least as good on both, in each metric's declared direction, and
    strictly better on one; identical points do not dominate each other. NaN is never on the front.
    """
    gx, gy = _goodness(models, x), _goodness(models, y)
    defined = ~(np.isnan(gx) | np.isnan(gy))
    gx, gy = np.where(defined, gx, -np.inf), np.where(defined, gy, -np.inf)
    # dominated_by[i, j]: model j dominates model i
    at_least = (gx[None, :] >= gx[:, None]) & (gy[None, :] >= gy[:, None])
    better = (gx[None, :] > gx[:, None]) | (gy[None, :] > gy[:, None])
    dominated = (at_least & better & defined[None, :]).any(axis=1)
    return pd.Series(defined & ~dominated, index=models.index, name="pareto")


def rank_models(models: pd.DataFrame, rule: SelectionRule) -> pd.DataFrame:
    """``models`` sorted by rank with columns meets_constraints, verified, violations, unverified,
    not_applicable, rank, selected and pareto added.

    Each constraint is *met*, *violated*, *not applicable* or *unverified*. A NaN value is not
    applicable only when the run proved the metric's region out of the model's view (the
    ``not_applicable`` column written by ``audit.aggregate``, e.g. the crop removed every artifact);
    it then counts as met. Any other NaN (no artifact mask, blank maps) leaves the constraint
    unverified. Groups, in this order: verified models meeting every constraint; models with no
    violation but some unverified constraint; models with a violation. Within a group: the primary
    metric in its declared direction, then the second Pareto metric in its direction, then
    ``model_id`` (the stated tie rule); NaN sorts last. Only rank 1 is ``selected``, and only when
    it is verified and meets every constraint; otherwise none is and a :class:`SelectionWarning`
    says so. ``violations``, ``unverified`` and ``not_applicable`` are '; '-joined.
    """
    ranked = models.copy()
    proved = [set(filter(None, str(v).split("; "))) if isinstance(v, str) else set()
              for v in ranked.get("not_applicable", pd.Series([""] * len(ranked), index=ranked.index))]
    violations: list[list[str]] = [[] for _ in range(len(ranked))]
    unverified: list[list[str]] = [[] for _ in range(len(ranked))]
    not_applicable: list[list[str]] = [[] for _ in range(len(ranked))]
    for constraint in rule.constraints:
        for i, value in enumerate(_values(ranked, constraint.metric)):
            if math.isnan(value):
                (not_applicable if constraint.metric in proved[i] else unverified)[i].append(constraint.metric)
            elif (text := constraint.violation(value)) is not None:
                violations[i].append(text)
    ranked["meets_constraints"] = [not v for v in violations]
    ranked["verified"] = [not u for u in unverified]
    ranked["violations"] = ["; ".join(v) for v in violations]
    ranked["unverified"] = ["; ".join(u) for u in unverified]
    ranked["not_applicable"] = ["; ".join(sorted(p)) for p in proved]

    tie_metric = rule.pareto[1] if rule.pareto[1] != rule.primary else rule.pareto[0]
    group = np.where(~ranked["meets_constraints"].to_numpy(), 2, np.where(ranked["verified"].to_numpy(), 0, 1))
    order = pd.DataFrame({
        "group": group,
        "key": -_goodness(ranked, rule.primary),  # ascending key = best first; NaN sorts last
        "tie": -_goodness(ranked, tie_metric) if f"{tie_metric}_mean" in ranked else 0.0,
        "model_id": ranked["model_id"].astype(str).to_numpy(),
    })  # positional index: the models table's own index may repeat
    ranked = ranked.iloc[order.sort_values(["group", "key", "tie", "model_id"], na_position="last").index]
    ranked["rank"] = np.arange(1, len(ranked) + 1)
    ranked["selected"] = (ranked["rank"] == 1) & ranked["meets_constraints"] & ranked["verified"]
    ranked["pareto"] = pareto_front(ranked, *rule.pareto).to_numpy()
    if len(ranked) and not ranked["selected"].any():
        warnings.warn(
            f"no model is verified to meet every constraint; none of {len(ranked)} models is selected",
            SelectionWarning, stacklevel=2,
        )
    return ranked
