"""Known-answer validation of the audit: does a metric tell shortcut models from clean ones?"""
from __future__ import annotations

import numpy as np
import pandas as pd

from auditbench.audit.metrics import METRICS

VALIDATION_COLUMNS = [
    "metric", "higher_is_better", "kind", "n_shortcut_models", "n_clean_models",
    "mean_shortcut", "mean_clean", "difference", "auroc", "separates",
]
SEPARATES_AUROC = 0.9  # the stated rule: a metric "separates" when auroc >= 0.9


def separation_auroc(shortcut: np.ndarray, clean: np.ndarray, higher_is_better: bool) -> float:
    """P(a random shortcut model scores worse than a random clean one), ties counted 1/2.

    "Worse" is the metric's bad side: lower when higher is better. Equals the Mann-Whitney U of the
    shortcut group / (n_shortcut * n_clean); 0.5 = no separation. NaN when a group is empty.
    """
    if len(shortcut) == 0 or len(clean) == 0:
        return float("nan")
    sign = -1.0 if higher_is_better else 1.0
    diff = sign * (np.asarray(shortcut, float)[:, None] - np.asarray(clean, float)[None, :])
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def metric_separation(models: pd.DataFrame, is_shortcut: pd.Series, metrics: list[str]) -> pd.DataFrame:
    """One ``validation.csv`` row per metric (columns in docs/tables.md).

    ``models`` holds one row per model with ``<metric>_mean`` columns (or plain ``<metric>``);
    ``is_shortcut`` is aligned on its index (True = trained with the shortcut). Models whose value
    is NaN are left out, so the n_* columns count the models each metric was defined for.
    difference = mean_shortcut - mean_clean; separates = auroc >= 0.9 (False when auroc is NaN).
    """
    flags = is_shortcut.reindex(models.index)
    if flags.isna().any():
        raise ValueError("is_shortcut has no value for some models (it is aligned on the models' index)")
    flags = flags.astype(bool).to_numpy()
    rows = []
    for name in metrics:
        info = METRICS.get(name)
        column = f"{name}_mean" if f"{name}_mean" in models else name
        if column not in models:
            raise KeyError(f"models table has no column {name + '_mean'!r} or {name!r}")
        values = models[column].to_numpy(dtype=float)
        defined = ~np.isnan(values)
        shortcut, clean = values[flags & defined], values[~flags & defined]
        auroc = separation_auroc(shortcut, clean, info.higher_is_better)
        mean_shortcut = float(shortcut.mean()) if len(shortcut) else np.nan
        mean_clean = float(clean.mean()) if len(clean) else np.nan
        rows.append({
            "metric": name,
            "higher_is_better": info.higher_is_better,
            "kind": info.kind,
            "n_shortcut_models": len(shortcut),
            "n_clean_models": len(clean),
            "mean_shortcut": mean_shortcut,
            "mean_clean": mean_clean,
            "difference": mean_shortcut - mean_clean,
            "auroc": auroc,
            "separates": bool(auroc >= SEPARATES_AUROC),
        })
    return pd.DataFrame(rows, columns=VALIDATION_COLUMNS)
