"""Findings in plain words that a reader must not miss, from the result tables."""
from __future__ import annotations

import pandas as pd

from auditbench.audit.uncertainty import paired_bootstrap
from auditbench.protocol.schema import Protocol


def external_findings(results: pd.DataFrame, models: pd.DataFrame) -> list[str]:
    """One line per non-internal split (external sets, train_distribution) for the best-ranked model
    evaluated on it: internal vs that split's accuracy and the share of its images called positive
    (a model 99% accurate inside that calls healthy external images COVID is the audit's most
    important finding)."""
    ranks = models.set_index("model_id")["rank"]
    lines = []
    for split, rows in results[results["split"] != "internal"].groupby("split", sort=False):
        model_id = min(rows["model_id"].unique(), key=lambda m: ranks[m])
        by_metric = rows[rows["model_id"] == model_id].groupby("metric")["value"]
        counts = by_metric.sum()
        called_positive = (counts["fp"] + counts["tp"]) / counts[["tn", "fp", "fn", "tp"]].sum()
        internal_accuracy = models.set_index("model_id").loc[model_id, "accuracy_mean"]
        lines.append(
            f"Test set {split!r}: the best-ranked model evaluated on it, {model_id}, has accuracy "
            f"{by_metric.mean()['accuracy']:.3f} there vs {internal_accuracy:.3f} on the internal test split, "
            f"and calls {called_positive:.0%} of its images the positive class."
        )
    return lines


def runner_up_comparison(models: pd.DataFrame, images: pd.DataFrame, protocol: Protocol) -> list[str]:
    """A paired patient-level bootstrap of the primary metric between rank 1 and rank 2, on the
    internal test images both saw (same task); one line saying whether they can be told apart."""
    if len(models) < 2 or protocol.metrics.bootstrap == 0 or protocol.selection.primary != "accuracy":
        return []
    first, second = models.iloc[0], models.iloc[1]
    internal = images[images["split"] == "internal"]
    pair = [internal[internal["model_id"] == m["model_id"]].set_index(["sample_id", "fold"]) for m in (first, second)]
    common = pair[0].index.intersection(pair[1].index)
    if not len(common):
        return []
    a, b = (frame.loc[common] for frame in pair)
    result = paired_bootstrap(a["correct"].to_numpy(float), b["correct"].to_numpy(float),
                              a["patient_id"].astype(str).to_numpy(), protocol.metrics.bootstrap, protocol.seed)
    verdict = "can be told apart" if result.distinguishable else "cannot be told apart on these images"
    return [
        f"Rank 1 ({first['model_id']}) vs rank 2 ({second['model_id']}): accuracy difference {result.difference:+.3f} "
        f"[95% CI {result.ci_low:+.3f}, {result.ci_high:+.3f}], paired bootstrap over patients: they {verdict}."
    ]
