"""Cross-validation folds grouped by patient, stratified by label."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


@dataclass(frozen=True)
class Fold:
    index: int
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def make_folds(labels: np.ndarray, groups: np.ndarray, n_folds: int, val_fraction: float, seed: int) -> list[Fold]:
    """Stratified k-fold grouped by patient: each fold's test part is one of k parts; the rest is
    split again, grouped and stratified, into training and validation (for early stopping).

    No patient appears in two parts of the same fold.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_folds < 2:
        raise ValueError(f"training.folds must be >= 2, got {n_folds}")
    if n_groups < n_folds:
        raise ValueError(f"{n_groups} patients cannot be split into {n_folds} folds")
    outer = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    n_inner = max(2, int(round(1.0 / val_fraction)))
    folds = []
    for index, (rest, test) in enumerate(outer.split(np.zeros(len(labels)), labels, groups)):
        inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed + 1 + index)
        train_part, val_part = next(inner.split(np.zeros(len(rest)), labels[rest], groups[rest]))
        folds.append(Fold(index, np.sort(rest[train_part]), np.sort(rest[val_part]), np.sort(test)))
    return folds
