"""What each model did on the test sets other than the internal split, from results.csv and images.csv.

One place for these numbers, so that the external-sets table, the findings box and the model card
say the same thing about the same model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from auditbench.report.tables import INTERNAL_SPLIT, ResultTables

SOURCE_SHORTCUT_SHARE = 0.20
"""A single-class external set raises "source shortcut suspected" when the model assigns at least
this share of its images the other class (one image in five)..."""
SOURCE_SHORTCUT_RATIO = 2.0
"""...and at least this many times the share of internal images of that class it gets wrong the
same way (so a model that errs as often at home is not blamed on the set). Both fixed before any
result was read; docs/report.md states the rule."""
EXTERNAL_DROP = 0.10
"""External accuracy this far (or further) below internal is flagged."""


@dataclass(frozen=True)
class ExternalResult:
    """One model on one external set (all folds' models pooled, as images.csv holds them)."""

    split: str
    model_id: str
    n_images: int  # distinct images of the set seen by this model
    labels: dict[str, int]  # distinct images per label
    single_class: int | None  # label_index shared by every image, None when the set mixes classes
    accuracy: float  # mean over folds (results.csv)
    internal_accuracy: float
    positive_share: float  # share of the set's image evaluations predicted class 1
    internal_error_share: float  # single-class sets: share of internal images of that class assigned the other
    class_names: dict[int, str]

    @property
    def change(self) -> float:
        return self.accuracy - self.internal_accuracy

    @property
    def other_class_share(self) -> float:
        """Single-class sets: the share assigned the class the set does not hold; NaN otherwise."""
        if self.single_class is None or math.isnan(self.positive_share):
            return math.nan
        return self.positive_share if self.single_class == 0 else 1.0 - self.positive_share

    @property
    def source_shortcut_suspected(self) -> bool:
        share, home = self.other_class_share, self.internal_error_share
        if math.isnan(share) or share < SOURCE_SHORTCUT_SHARE:
            return False
        return math.isnan(home) or share >= SOURCE_SHORTCUT_RATIO * home

    @property
    def accuracy_dropped(self) -> bool:
        return not math.isnan(self.change) and self.change <= -EXTERNAL_DROP

    def class_name(self, index: int) -> str:
        return self.class_names.get(index, "positive" if index == 1 else "negative")


def external_splits(tables: ResultTables) -> list[str]:
    """Names of the test sets other than the internal split, in results.csv order."""
    return [s for s in dict.fromkeys(tables.results["split"].astype(str)) if s != INTERNAL_SPLIT]


def mean_accuracy(results: pd.DataFrame) -> pd.Series:
    """Mean accuracy over folds, indexed by (model_id, split)."""
    rows = results[results["metric"] == "accuracy"]
    values = pd.to_numeric(rows["value"], errors="coerce")
    return values.groupby([rows["model_id"], rows["split"]]).mean()


def class_names(images: pd.DataFrame) -> dict[int, str]:
    """label_index -> the labels seen with it on the internal split ("normal / viral" when several)."""
    internal = images[images["split"] == INTERNAL_SPLIT]
    index = pd.to_numeric(internal["label_index"], errors="coerce")
    names: dict[int, str] = {}
    for i in (0, 1):
        labels = sorted(set(internal.loc[index == i, "label"].astype(str)))
        if labels:
            names[i] = " / ".join(labels)
    return names


def predicted_positive(images: pd.DataFrame) -> pd.Series:
    """Whether each image row was predicted as class 1, from ``prediction`` as index or label name."""
    prediction = images["prediction"]
    numeric = pd.to_numeric(prediction, errors="coerce")
    if numeric.notna().all():
        return numeric == 1
    positive = set(images.loc[pd.to_numeric(images["label_index"], errors="coerce") == 1, "label"].astype(str))
    if positive:
        return prediction.astype(str).isin(positive)
    return pd.to_numeric(images["p_positive"], errors="coerce") > 0.5


def external_result(tables: ResultTables, model_id: str, split: str,
                    accuracy: pd.Series | None = None) -> ExternalResult | None:
    """``model_id`` on external set ``split``; None where the model was not evaluated on it."""
    accuracy = mean_accuracy(tables.results) if accuracy is None else accuracy
    images = tables.images[tables.images["model_id"].astype(str) == str(model_id)]
    part = images[images["split"] == split]
    external_accuracy = accuracy.get((model_id, split), math.nan)
    if part.empty and math.isnan(external_accuracy):
        return None
    positive = predicted_positive(images)
    index = pd.to_numeric(part["label_index"], errors="coerce")
    single = int(index.iloc[0]) if len(index) and index.notna().all() and index.nunique() == 1 else None
    home_error = math.nan
    if single is not None:
        internal = images["split"] == INTERNAL_SPLIT
        same_class = internal & (pd.to_numeric(images["label_index"], errors="coerce") == single)
        if same_class.any():
            called_positive = float(positive[same_class].mean())
            home_error = called_positive if single == 0 else 1.0 - called_positive
    labels = part.drop_duplicates("sample_id")["label"].astype(str).value_counts()
    return ExternalResult(
        split=split, model_id=str(model_id), n_images=int(part["sample_id"].nunique()),
        labels={str(k): int(v) for k, v in labels.items()}, single_class=single,
        accuracy=float(external_accuracy), internal_accuracy=float(accuracy.get((model_id, INTERNAL_SPLIT), math.nan)),
        positive_share=float(positive[part.index].mean()) if len(part) else math.nan,
        internal_error_share=home_error, class_names=class_names(images),
    )
