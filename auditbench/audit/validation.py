"""Validation study of the metrics themselves: does a metric detect models that rely on the shortcut?

On synthetic data every model has a measured behavioural ground truth, ``shortcut_reliance``
(mean |p(x with marker) - p(x without)| over test images), and a binary label ``relies``
(reliance above a threshold). Each model was trained in a *frame* (cropped or not, an input size),
and the frame alone moves attention metrics (a uniform heatmap scores differently by frame), so
pooling models across frames confounds the comparison. Every statistic here is therefore computed
within a frame (stratum) and pooled over strata afterwards.

Sources: the AUROC as the Mann-Whitney probability of a correct ordering (Hanley & McNeil 1982,
Radiology 143:29-36), stratified by pooling pairs within strata; Spearman's rank correlation;
percentile bootstrap intervals (Efron & Tibshirani 1993, "An Introduction to the Bootstrap",
ch. 13) resampling models within each (stratum, relies) cell (a stratified bootstrap, Davison &
Hinkley 1997, s. 3.2).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from auditbench.audit.metrics import METRICS
from auditbench.audit.uncertainty import percentile_ci

VALIDATION_COLUMNS = [
    "metric", "higher_is_better", "kind", "detector", "frame", "n_models", "n_relying", "n_not_relying",
    "mean_relying", "mean_not_relying", "auroc", "auroc_ci_low", "auroc_ci_high",
    "spearman", "spearman_ci_low", "spearman_ci_high", "separates",
]
SEPARATES_AUROC = 0.9
"""The stated rule: a metric ``separates`` when auroc >= 0.9 and auroc_ci_low > 0.5."""
ALL_FRAMES = "all"
"""``frame`` value of the row stratified over every frame."""


def separation_auroc(shortcut: np.ndarray, clean: np.ndarray, higher_is_better: bool) -> float:
    """P(a random shortcut model scores worse than a random clean one), ties counted 1/2.

    "Worse" is the metric's bad side: lower when higher is better. Equals the Mann-Whitney U of the
    shortcut group / (n_shortcut * n_clean) (Hanley & McNeil 1982); 0.5 = no separation. NaN when
    a group is empty. Unstratified: see :func:`stratified_auroc` for models from several frames.
    """
    if len(shortcut) == 0 or len(clean) == 0:
        return float("nan")
    sign = -1.0 if higher_is_better else 1.0
    diff = sign * (np.asarray(shortcut, float)[:, None] - np.asarray(clean, float)[None, :])
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _pair_scores(bad_relying: np.ndarray, bad_not: np.ndarray) -> np.ndarray:
    """Per row: sum over (relying, not relying) pairs of [relying worse] + [tie] / 2.

    Inputs are (n_rep, k_r) and (n_rep, k_n), signed so that larger = worse."""
    diff = bad_relying[:, :, None] - bad_not[:, None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).sum(axis=(1, 2))


def _rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation (Pearson of average ranks) of each row of x with the same row of y.

    NaN for a row where either is constant."""
    rx = rankdata(x, axis=1)
    ry = rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denominator = np.sqrt((rx ** 2).sum(axis=1) * (ry ** 2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(axis=1) / denominator
    rho[~(denominator > 1e-12)] = np.nan
    return rho


def _badness(values: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """The metric signed so that larger = worse."""
    return -values if higher_is_better else values


def _aligned(values, other, strata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=float)
    other, strata = np.asarray(other), np.asarray(strata)
    if not (values.ndim == 1 and values.shape == other.shape == strata.shape):
        raise ValueError(f"values {values.shape}, labels {other.shape} and strata {strata.shape} "
                         "must be aligned 1-D arrays (one entry per model)")
    return values, other, strata


def stratified_auroc(values: np.ndarray, relies: np.ndarray, strata: np.ndarray, higher_is_better: bool) -> float:
    """Stratified AUROC: P(a relying model scores worse than a non-relying model of the same stratum).

    "Worse" is the metric's bad side (lower when ``higher_is_better``); ties count 1/2. Pooled over
    strata by counting pairs: sum over strata of (concordant + ties / 2) / sum over strata of
    n_relying * n_not_relying, i.e. the Mann-Whitney / Hanley & McNeil (1982) AUROC restricted to
    within-stratum pairs. Models with NaN values are left out; NaN when no stratum has both groups.
    """
    values, relies, strata = _aligned(values, relies, strata)
    defined = ~np.isnan(values)
    bad, relies, strata = _badness(values, higher_is_better)[defined], relies[defined].astype(bool), strata[defined]
    score, pairs = 0.0, 0
    for stratum in pd.unique(strata):
        here = strata == stratum
        relying, not_relying = bad[here & relies], bad[here & ~relies]
        if len(relying) and len(not_relying):
            score += float(_pair_scores(relying[None], not_relying[None])[0])
            pairs += len(relying) * len(not_relying)
    return score / pairs if pairs else float("nan")


def stratified_spearman(values: np.ndarray, reliance: np.ndarray, strata: np.ndarray, higher_is_better: bool) -> float:
    """Weighted mean over strata of Spearman's rho between the metric's badness and the reliance.

    Badness is the metric signed so that larger = worse, so a good detector has rho > 0 whichever
    its direction. Weights are the numbers of models per stratum. Models with a NaN value or
    reliance are left out; strata with fewer than 3 models, or with constant values or reliance,
    are left out; NaN when no stratum is left.
    """
    values, reliance, strata = _aligned(values, reliance, strata)
    reliance = reliance.astype(float)
    defined = ~np.isnan(values) & ~np.isnan(reliance)
    bad, reliance, strata = _badness(values, higher_is_better)[defined], reliance[defined], strata[defined]
    total, weight = 0.0, 0
    for stratum in pd.unique(strata):
        here = strata == stratum
        if here.sum() < 3:
            continue
        rho = float(_rowwise_spearman(bad[here][None], reliance[here][None])[0])
        if not np.isnan(rho):
            total += here.sum() * rho
            weight += int(here.sum())
    return total / weight if weight else float("nan")


def _cell_resamples(strata: np.ndarray, relies: np.ndarray, labels: list[str], n_boot: int,
                    rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per stratum: (n_boot, k_relying) and (n_boot, k_not) model indices drawn with replacement
    within each (stratum, relies) cell, so every replicate keeps the cell sizes."""
    cells = {}
    for label in labels:
        drawn = []
        for flag in (True, False):
            members = np.flatnonzero((strata == label) & (relies == flag))
            picks = rng.integers(0, len(members), size=(n_boot, len(members))) if len(members) else \
                np.zeros((n_boot, 0), dtype=int)
            drawn.append(members[picks])
        cells[label] = (drawn[0], drawn[1])
    return cells


def _replicates(bad: np.ndarray, reliance: np.ndarray, cells: dict, labels: list[str]) -> dict[str, tuple]:
    """(auroc, spearman) replicate arrays for each frame and for ALL_FRAMES."""
    out, scores, pairs, rho_sum, rho_weight = {}, 0.0, 0, 0.0, 0.0
    for label in labels:
        relying, not_relying = cells[label]
        n_pairs = relying.shape[1] * not_relying.shape[1]
        n_rep = relying.shape[0]
        score = _pair_scores(bad[relying], bad[not_relying]) if n_pairs else np.zeros(n_rep)
        auroc = score / n_pairs if n_pairs else np.full(n_rep, np.nan)
        both = np.hstack([relying, not_relying])
        rho = _rowwise_spearman(bad[both], reliance[both]) if both.shape[1] >= 3 else np.full(n_rep, np.nan)
        scores, pairs = scores + score, pairs + n_pairs
        finite = ~np.isnan(rho)
        rho_sum = rho_sum + np.where(finite, rho, 0.0) * both.shape[1]
        rho_weight = rho_weight + finite * both.shape[1]
        out[label] = (auroc, rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled_rho = np.where(rho_weight > 0, rho_sum / np.maximum(rho_weight, 1), np.nan)
    pooled_auroc = scores / pairs if pairs else np.full_like(np.asarray(pooled_rho, float), np.nan)
    out[ALL_FRAMES] = (pooled_auroc, pooled_rho)
    return out


def _value_column(models: pd.DataFrame, name: str) -> np.ndarray:
    column = f"{name}_mean" if f"{name}_mean" in models else name
    if column not in models:
        raise KeyError(f"models table has no column {name + '_mean'!r} or {name!r}")
    return models[column].to_numpy(dtype=float)


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def metric_validation(
    models: pd.DataFrame,
    metrics: list[str],
    reliance_column: str = "shortcut_reliance",
    relies_column: str = "relies",
    stratum_column: str | None = "frame",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> pd.DataFrame:
    """The ``validation.csv`` table: per metric, an ``"all"`` row stratified over every frame, then one
    row per frame (sorted by its string), with columns :data:`VALIDATION_COLUMNS`.

    ``models`` has one row per model: the metric value (``<metric>_mean`` if present, else
    ``<metric>``), the measured reliance, the boolean ``relies`` label and the frame
    (``stratum_column=None``: one frame, only the "all" row). Models whose value or reliance is NaN
    are left out of that metric, so the n_* columns count the models it was defined for. auroc =
    :func:`stratified_auroc`, spearman = :func:`stratified_spearman` (within one frame for a frame
    row); mean_relying / mean_not_relying are plain means over the row's models (pooled across
    frames in the "all" row, so descriptive only). CIs: percentile bootstrap (Efron & Tibshirani
    1993) over models, resampled with replacement within each (frame, relies) cell, ``n_boot``
    replicates from ``default_rng(seed)`` (the same stream for every metric); NaN replicates are
    left out. separates = auroc >= SEPARATES_AUROC and auroc_ci_low > 0.5 (False when NaN).
    """
    for column in (reliance_column, relies_column) + ((stratum_column,) if stratum_column else ()):
        if column not in models:
            raise KeyError(f"models table has no column {column!r}")
    if models[relies_column].isna().any():
        raise ValueError(f"column {relies_column!r} has missing values")
    relies_all = models[relies_column].astype(bool).to_numpy()
    reliance_all = models[reliance_column].to_numpy(dtype=float)
    if stratum_column is None:
        strata_all = np.full(len(models), ALL_FRAMES, dtype=object)
        labels: list[str] = []
    else:
        if models[stratum_column].isna().any():
            raise ValueError(f"column {stratum_column!r} has missing values")
        strata_all = models[stratum_column].astype(str).to_numpy(dtype=object)
        labels = sorted(set(strata_all))
    design = sorted(set(strata_all))
    rows = []
    for name in metrics:
        info = METRICS.get(name)
        values = _value_column(models, name)
        keep = ~np.isnan(values) & ~np.isnan(reliance_all)
        v, reliance, relies, strata = values[keep], reliance_all[keep], relies_all[keep], strata_all[keep]
        bad = _badness(v, info.higher_is_better)
        cells = _cell_resamples(strata, relies, design, n_boot, np.random.default_rng(seed))
        replicates = _replicates(bad, reliance, cells, design)
        for label in [ALL_FRAMES] + labels:
            here = np.ones(len(v), bool) if label == ALL_FRAMES else strata == label
            auroc = stratified_auroc(v[here], relies[here], strata[here], info.higher_is_better)
            spearman = stratified_spearman(v[here], reliance[here], strata[here], info.higher_is_better)
            auroc_ci = percentile_ci(replicates[label][0], level)
            spearman_ci = percentile_ci(replicates[label][1], level)
            rows.append({
                "metric": name, "higher_is_better": info.higher_is_better, "kind": info.kind, "detector": info.detector,
                "frame": label, "n_models": int(here.sum()),
                "n_relying": int((here & relies).sum()), "n_not_relying": int((here & ~relies).sum()),
                "mean_relying": _mean(v[here & relies]), "mean_not_relying": _mean(v[here & ~relies]),
                "auroc": auroc, "auroc_ci_low": auroc_ci[0], "auroc_ci_high": auroc_ci[1],
                "spearman": spearman, "spearman_ci_low": spearman_ci[0], "spearman_ci_high": spearman_ci[1],
                "separates": bool(auroc >= SEPARATES_AUROC and auroc_ci[0] > 0.5),
            })
    return pd.DataFrame(rows, columns=VALIDATION_COLUMNS)
