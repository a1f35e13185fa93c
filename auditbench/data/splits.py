"""Cross-validation folds grouped by patient, stratified by label."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from auditbench.data.records import DataError


@dataclass(frozen=True)
class Fold:
    index: int
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray


def inner_parts(val_fraction: float) -> int:
    """How many parts the rest of each fold is split into; one of them is the validation part."""
    return max(2, int(round(1.0 / val_fraction)))


def _least_for(n_folds: int, need_in_rest: int) -> int:
    """The fewest patients that put ``need_in_rest`` of them outside every fold's test part."""
    n = n_folds
    while n - -(-n // n_folds) < need_in_rest:  # n minus the largest test part, ceil(n / k)
        n += 1
    return n


def _class_name(index: int, class_names: list[str] | None) -> str:
    """``'covid'`` when the classes are named, else the label index."""
    return repr(class_names[index]) if class_names and index < len(class_names) else str(index)


def check_fold_counts(
    labels: np.ndarray, groups: np.ndarray, n_folds: int, val_fraction: float,
    class_names: list[str] | None = None, where: str = "",
) -> None:
    """Raise :class:`DataError` when the images cannot fill ``n_folds`` grouped, stratified folds.

    Each class needs patients in every fold's test part and in every fold's training part (at
    least ``n_folds`` patients, and two outside the largest test part); all patients together must
    fill the ``inner_parts(val_fraction)`` parts the rest of each fold is split into. The message
    names the class, its images and patients, and the number needed.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    prefix = f"{where}: " if where else ""
    if n_folds < 2:
        raise DataError(f"{prefix}training.folds must be >= 2, got {n_folds}")
    per_class = _least_for(n_folds, 2)
    for index in np.unique(np.concatenate([labels, np.arange(len(class_names or []))])).astype(int):
        name = _class_name(index, class_names)
        members = labels == index
        images, patients = int(members.sum()), len(np.unique(groups[members]))
        if patients < per_class:
            raise DataError(
                f"{prefix}class {name} has {images} image(s) from {patients} patient(s); training.folds={n_folds} "
                f"needs at least {per_class} patients per class (each fold tests and trains on the class): "
                f"add images of class {name} or lower training.folds"
            )
    parts = inner_parts(val_fraction)
    need = _least_for(n_folds, parts)
    hint = "add images, lower training.folds or raise training.val_fraction"
    n_groups = len(np.unique(groups))
    if n_groups < need:
        raise DataError(
            f"{prefix}{n_groups} patients cannot be split into {n_folds} folds whose training images are split again "
            f"into {parts} parts (training.val_fraction={val_fraction:g}): need at least {need} patients; {hint}"
        )
    values, counts = np.unique(labels, return_counts=True)
    if len(counts) and counts.max() < need:
        largest = _class_name(int(values[np.argmax(counts)]), class_names)
        raise DataError(
            f"{prefix}each fold's training images are split again into {parts} parts (training.val_fraction="
            f"{val_fraction:g}), which needs at least {need} images of one class with training.folds={n_folds}; "
            f"the largest class, {largest}, has {int(counts.max())}: {hint}"
        )


def make_folds(
    labels: np.ndarray, groups: np.ndarray, n_folds: int, val_fraction: float, seed: int,
    class_names: list[str] | None = None,
) -> list[Fold]:
    """Stratified k-fold grouped by patient: each fold's test part is one of k parts; the rest is
    split again, grouped and stratified, into training and validation (for early stopping).

    No patient appears in two parts of the same fold. Too few patients overall or in a class
    raise :class:`DataError` (a ValueError) saying what is needed (:func:`check_fold_counts`), as
    does a fold whose training part would lack a class.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_folds < 2:
        raise DataError(f"training.folds must be >= 2, got {n_folds}")
    if n_groups < n_folds:
        raise DataError(f"{n_groups} patients cannot be split into {n_folds} folds (training.folds)")
    check_fold_counts(labels, groups, n_folds, val_fraction, class_names)
    outer = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    n_inner = inner_parts(val_fraction)
    folds = []
    for index, (rest, test) in enumerate(outer.split(np.zeros(len(labels)), labels, groups)):
        inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed + 1 + index)
        try:
            train_part, val_part = next(inner.split(np.zeros(len(rest)), labels[rest], groups[rest]))
        except ValueError as error:  # too few images or patients left after this fold's test part
            raise DataError(
                f"fold {index}: its {len(rest)} training images ({len(np.unique(groups[rest]))} patients) cannot be split "
                f"into {n_inner} parts for validation (training.val_fraction={val_fraction:g}): {error} Add images, lower "
                "training.folds or raise training.val_fraction"
            ) from None
        fold = Fold(index, np.sort(rest[train_part]), np.sort(rest[val_part]), np.sort(test))
        for cls in np.unique(labels):
            for part in ("train", "test"):
                if not (labels[getattr(fold, part)] == cls).any():
                    name = _class_name(cls, class_names)
                    members = labels == cls
                    raise DataError(
                        f"fold {index}'s {part} part has no image of class {name} ({int(members.sum())} image(s) from "
                        f"{len(np.unique(groups[members]))} patient(s), grouped by patient into {n_folds} folds): "
                        f"add images of class {name} or lower training.folds"
                    )
        folds.append(fold)
    return folds
