"""Shortcut probes that need no artifact masks (issue 8).

Most chest X-ray collections carry no artifact annotation, so the artifact metrics cannot be computed on
them. These probes need only what every collection has: each image's source (the data set or hospital it
came from), its label, its patient and a lung mask.

- :func:`source_probe`: can a linear probe read the image's *source* from a backbone's pooled features,
  *within one class*? DeGrave, Janizek & Lee ("AI for radiographic COVID-19 detection selects shortcuts
  over signal", Nature Machine Intelligence 3:610-619, 2021) showed that COVID-19 classifiers trained on
  public collections, whose sources differ by class, learn source cues (text, markers, patient position)
  instead of lung findings; Zech et al. (PLoS Medicine 15:e1002683, 2018) found a CNN identifies the
  hospital of a chest radiograph almost perfectly. Within one class the disease is held fixed, so what the
  probe reads is the source, not the disease. A linear probe on frozen features follows Alain & Bengio
  ("Understanding intermediate layers using linear classifier probes", ICLR workshop 2017).
- :func:`outside_lung_probe`: the same probe on features of images whose lungs were filled
  (:func:`fill_lungs`, the fill of ``lung_occlusion_effect``): a source still readable there is written
  outside the lungs.
- :func:`lungs_removed_auc`: a trained model scored on lung-filled images, as Maguolo & Nanni ("A critic
  evaluation of methods for COVID-19 automatic detection from X-ray images", Information Fusion 76:1-7,
  2021) did by blanking the lung fields: a model that still separates the classes reads something else.

What they can and cannot say is in ``docs/metrics.md`` (section "Shortcut probes").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from auditbench.audit.aggregate import rank_auc
from auditbench.audit.metrics import stack_optional_masks
from auditbench.audit.occlusion import occlude
from auditbench.audit.uncertainty import bootstrap_ci

__all__ = [
    "PROBE_C", "PROBE_FOLDS", "LungsRemovedResult", "ProbeClass", "SourceProbeResult", "balanced_accuracy",
    "fill_lungs", "lungs_removed_auc", "outside_lung_probe", "source_probe",
]

PROBE_C = 1.0
"""Inverse L2 strength of the probe's logistic regression on standardised features (sklearn's default),
fixed before any result: the probe asks whether the source is *linearly* readable, not how well a tuned
classifier can do."""
PROBE_FOLDS = 5
"""Cross-validation folds; every source of a class needs at least this many patients."""


def balanced_accuracy(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> float:
    """Mean over the ``n_classes`` codes 0..n_classes-1 of the recall of each; NaN when a code is absent
    from ``true`` (its recall is undefined, and leaving it out would change the chance level)."""
    recalls = [np.mean(predicted[true == k] == k) if np.any(true == k) else np.nan for k in range(n_classes)]
    return float(np.mean(recalls))


@dataclass(frozen=True)
class ProbeClass:
    """The source probe within one class.

    ``balanced_accuracy``: of the out-of-fold predictions pooled over folds. ``chance`` = 1 / number of
    sources. ``adjusted`` = (balanced_accuracy - chance) / (1 - chance): 0 at chance, 1 when every source is
    recognised (sklearn's ``adjusted=True``). ``ci_low`` / ``ci_high``: percentile bootstrap over patients of
    the out-of-fold balanced accuracy (the probes are not refitted: it covers which patients were tested,
    not training variability); ``fold_std`` the spread of the per-fold balanced accuracies (NaN folds,
    which miss a source, left out). Undefined rows are NaN with ``reason``."""

    label: int | str
    sources: tuple[str, ...]
    n_images: int
    n_patients: int
    n_folds: int
    balanced_accuracy: float
    chance: float
    adjusted: float
    ci_low: float
    ci_high: float
    fold_std: float
    reason: str = ""


@dataclass(frozen=True)
class SourceProbeResult:
    """Per-class rows and the summary ``value`` = mean over defined classes of ``adjusted`` (0 = the source
    is not linearly readable within a class, 1 = perfectly readable); NaN with ``reason`` when no class is
    defined. Registered as ``source_probe_accuracy`` / ``outside_lung_probe_accuracy`` (lower is better)."""

    classes: tuple[ProbeClass, ...]
    value: float
    reason: str = ""

    def table(self) -> pd.DataFrame:
        """One row per class, the fields of :class:`ProbeClass`."""
        return pd.DataFrame([asdict(row) for row in self.classes])


def _aligned(pooled, sources, labels, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pooled = np.asarray(pooled, dtype=np.float64)
    sources, labels, groups = (np.asarray(a) for a in (sources, labels, groups))
    if pooled.ndim != 2:
        raise ValueError(f"pooled features must be (N, C), got shape {pooled.shape}")
    if not (sources.shape == labels.shape == groups.shape == (len(pooled),)):
        raise ValueError(f"sources {sources.shape}, labels {labels.shape} and groups {groups.shape} must be 1-D, "
                         f"one entry per row of pooled ({len(pooled)})")
    if not np.isfinite(pooled).all():
        raise ValueError("pooled features contain NaN or infinite values")
    return pooled, sources.astype(str), labels, groups


def _probe_class(x, source, groups, label, seed, n_splits, C, n_boot, level) -> ProbeClass:
    names, y = np.unique(source, return_inverse=True)
    k = len(names)
    head = dict(label=label.item() if hasattr(label, "item") else label, sources=tuple(names),
                n_images=len(y), n_patients=len(np.unique(groups)))
    nan = dict(balanced_accuracy=math.nan, adjusted=math.nan, ci_low=math.nan, ci_high=math.nan,
               fold_std=math.nan)
    if k < 2:
        return ProbeClass(**head, n_folds=0, chance=math.nan, **nan,
                          reason=f"one source only ({names[0]}): there is no source to tell apart")
    patients = {name: len(np.unique(groups[y == j])) for j, name in enumerate(names)}
    few = [f"{name} ({count})" for name, count in patients.items() if count < n_splits]
    if few:
        return ProbeClass(**head, n_folds=0, chance=1 / k, **nan,
                          reason=f"fewer than {n_splits} patients in source {', '.join(few)}: cannot hold out "
                                 f"whole patients in {n_splits} folds")
    predicted = np.empty(len(y), dtype=int)
    per_fold = []
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, groups):
        if len(np.unique(y[train])) < 2:  # the fold's training patients hold one source: predict it
            predicted[test] = y[train][0]
        else:
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=5000))
            predicted[test] = probe.fit(x[train], y[train]).predict(x[test])
        per_fold.append(balanced_accuracy(y[test], predicted[test], k))
    score = balanced_accuracy(y, predicted, k)
    low, high = bootstrap_ci(lambda i: balanced_accuracy(y[i], predicted[i], k), groups, n_boot, seed, level)
    finite = np.array([f for f in per_fold if np.isfinite(f)])
    return ProbeClass(**head, n_folds=n_splits, balanced_accuracy=score, chance=1 / k,
                      adjusted=(score - 1 / k) / (1 - 1 / k), ci_low=low, ci_high=high,
                      fold_std=float(finite.std(ddof=1)) if len(finite) > 1 else math.nan)


def probe_possible(sources: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_splits: int = PROBE_FOLDS) -> bool:
    """Whether :func:`source_probe` can define some class: one with two or more sources, each of at least
    ``n_splits`` patients. Where none can, every class is NaN with its reason whatever the features are."""
    sources, labels, groups = (np.asarray(a) for a in (sources, labels, groups))
    for label in np.unique(labels):
        here = labels == label
        names = np.unique(sources[here])
        if len(names) > 1 and all(len(np.unique(groups[here][sources[here] == name])) >= n_splits for name in names):
            return True
    return False


def source_probe(
    pooled: np.ndarray,
    sources: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    seed: int = 0,
    n_splits: int = PROBE_FOLDS,
    C: float = PROBE_C,
    n_boot: int = 1000,
    level: float = 0.95,
) -> SourceProbeResult:
    """Within each class, how well a linear probe reads the image's source from ``pooled`` features.

    The shortcut precondition of DeGrave, Janizek & Lee (Nature MI 2021): if the source is readable from
    the features within a class, and the classes come from different sources, a classifier on those
    features has a shortcut *available*. Per class (each distinct value of ``labels``): an L2 logistic
    regression (C = :data:`PROBE_C`, lbfgs, ``class_weight="balanced"``) on features standardised on each
    training fold, predicting the source among the class's sources, cross-validated by
    ``StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)`` with ``groups`` = patient ids, so
    no patient is in the training and the test folds at once (images of one patient share more than their
    source, and an ungrouped split would score them as readable).

    Scored by balanced accuracy (mean recall over sources) of the out-of-fold predictions, whose chance
    level is 1/K for K sources whatever their sizes: any prediction that ignores the features (a constant,
    the majority source, a coin) has expected balanced accuracy 1/K, while the majority rate is the chance
    level of plain accuracy only. A class is NaN with its reason when it has one source or a source with
    fewer than ``n_splits`` patients. See :class:`ProbeClass` and :class:`SourceProbeResult`.
    """
    pooled, sources, labels, groups = _aligned(pooled, sources, labels, groups)
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    rows = []
    for label in np.unique(labels):
        here = labels == label
        rows.append(_probe_class(pooled[here], sources[here], groups[here], label, seed, n_splits, C, n_boot, level))
    defined = [row.adjusted for row in rows if not row.reason]
    if defined:
        return SourceProbeResult(tuple(rows), float(np.mean(defined)))
    reason = "; ".join(f"class {row.label}: {row.reason}" for row in rows) or "no images"
    return SourceProbeResult(tuple(rows), math.nan, f"no class has a defined probe ({reason})")


def outside_lung_probe(filled_pooled: np.ndarray, sources: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                       seed: int = 0, **options) -> SourceProbeResult:
    """:func:`source_probe` on pooled features of images whose lungs were filled by :func:`fill_lungs`.

    The lung content is gone, so a source still readable here is written outside the lungs (markers,
    text, collimation, body habitus, exposure); one readable intact but not here was carried by the
    lungs (or by the fill, see ``docs/metrics.md``). Registered as ``outside_lung_probe_accuracy``.
    """
    return source_probe(filled_pooled, sources, labels, groups, seed, **options)


def fill_lungs(images: np.ndarray, lung_masks: np.ndarray, lung_footprints: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W) copies of ``images`` with the lungs filled exactly as for ``lung_occlusion_effect``:
    ``audit.occlusion.occlude``'s lung variant, i.e. :func:`~auditbench.audit.occlusion.fill_lung_median`
    per image (the footprint, default the mask, set to the median of the pixels under the mask), clipped
    to [0, 1]. Every lung mask must be non-empty (an image without lungs has nothing to remove)."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
    masks = stack_optional_masks(lung_masks, images.shape)
    empty = np.flatnonzero(~masks.reshape(len(images), -1).any(axis=1))
    if len(empty):
        raise ValueError(f"{len(empty)} of {len(images)} lung masks are empty (images {empty[:5].tolist()}...): "
                         "nothing to fill; leave those images out")
    return occlude(images, masks, lung_footprints=lung_footprints).filled["lung"]


@dataclass(frozen=True)
class LungsRemovedResult:
    """ROC AUC of p(positive) on lung-filled images, with a percentile bootstrap CI over patients.

    ``separation`` = |auc - 0.5|: an AUC well below 0.5 also separates the classes (inverted). With intact
    scores: ``intact_auc`` and ``auc_drop`` = intact_auc - auc with a paired CI (same resamples)."""

    auc: float
    ci_low: float
    ci_high: float
    n_images: int
    n_patients: int
    intact_auc: float = math.nan
    auc_drop: float = math.nan
    drop_ci_low: float = math.nan
    drop_ci_high: float = math.nan
    reason: str = ""

    @property
    def separation(self) -> float:
        return abs(self.auc - 0.5)


def lungs_removed_auc(
    p_filled: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray | None = None,
    p_intact: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> LungsRemovedResult:
    """Lungs-removed control (Maguolo & Nanni, Information Fusion 2021): ROC AUC of the trained model's
    p(positive) on images whose lung fields were filled (:func:`fill_lungs`).

    AUC near 0.5: without the lungs the model cannot tell the classes apart, it needs them. AUC near the
    intact AUC: it does not need them, it reads something outside (a shortcut, or disease signs outside
    the lung mask). Registered as ``lungs_removed_auc``, lower is better down to 0.5; an AUC well below
    0.5 separates too (inverted), see ``separation``. ``groups``: patient ids for the cluster bootstrap
    (``audit.uncertainty``; default: each image its own patient). ``p_intact``: the same model on the
    intact images, for ``auc_drop``. Ties count 1/2 (Mann-Whitney). NaN with a reason when one class is
    missing; a resample with one class is NaN and left out of the interval.
    """
    p = np.asarray(p_filled, dtype=np.float64)
    y = np.asarray(labels)
    groups = np.arange(len(p)) if groups is None else np.asarray(groups)
    if not (p.ndim == 1 and y.shape == p.shape == groups.shape) or len(p) == 0:
        raise ValueError(f"p_filled {p.shape}, labels {y.shape} and groups {groups.shape} must be aligned, "
                         "non-empty 1-D arrays")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must hold 0 and 1 only, got {np.unique(y)}")
    if not np.isfinite(p).all():
        raise ValueError("p_filled contains NaN or infinite values")
    y = y.astype(int)
    n_patients = len(np.unique(groups))
    if not 0 < y.sum() < len(y):
        return LungsRemovedResult(math.nan, math.nan, math.nan, len(p), n_patients,
                                  reason=f"only class {y[0]} is present: the AUC is undefined")
    auc = rank_auc(p, y)
    low, high = bootstrap_ci(lambda i: rank_auc(p[i], y[i]), groups, n_boot, seed, level)
    if p_intact is None:
        return LungsRemovedResult(auc, low, high, len(p), n_patients)
    q = np.asarray(p_intact, dtype=np.float64)
    if q.shape != p.shape or not np.isfinite(q).all():
        raise ValueError(f"p_intact must be finite and aligned with p_filled {p.shape}, got {q.shape}")
    drop_low, drop_high = bootstrap_ci(lambda i: rank_auc(q[i], y[i]) - rank_auc(p[i], y[i]), groups, n_boot, seed, level)
    intact = rank_auc(q, y)
    return LungsRemovedResult(auc, low, high, len(p), n_patients, intact, intact - auc, drop_low, drop_high)
