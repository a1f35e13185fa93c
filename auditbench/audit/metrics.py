"""Metric registry, per-image attention metrics and classification metrics.

Every metric the pipeline reports is declared once in :data:`METRICS` with its direction
(``higher_is_better``); ranking, validation and ``check`` read directions from there. Each is registered by
decorating the function that computes it (``@METRICS.register(name, higher_is_better=..., kind=...,
description=...)``, see :mod:`auditbench.registry`), which becomes its :class:`MetricInfo`.
Confusion-matrix counts (tn, fp, fn, tp) are reported by :func:`classification_metrics` but are
not registered: they are counts, not scores, so they can be neither ranked nor constrained.

Attention metrics take raw heatmaps H >= 0 (ReLU maps, upsampled to the model frame, never
min-max normalised: subtracting the minimum changes every mass ratio). Undefined cases are NaN,
never 0 or 1, and each cause is counted and warned about.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from auditbench.data.transforms import border_band  # noqa: F401  (re-exported: metrics' border region)
from auditbench.registry import Registry

# "probe": one value per data set (and backbone or model), not a mean of per-image values, computed by
# ``audit.probes`` outside a cell's per-image evaluation; its uncertainty comes with its own result.
# "faithfulness": per image, how well the map's pixel ranking predicts the model's response to removing pixels
# (audit.faithfulness); a property of the explanation, not of the model's reliance on a shortcut.
MetricKind = Literal["classification", "attention", "occlusion", "behaviour", "probe", "agreement", "faithfulness"]
Region = Literal["lung", "border", "artifact"]


class MetricWarning(UserWarning):
    """A metric is undefined (NaN) for some inputs; the message gives the count and the cause."""


@dataclass(frozen=True)
class MetricInfo:
    """What a metric means, which direction is better, and (where this module can) how it is computed.

    ``compute``: attention metrics ``(AttentionInputs) -> (N,)`` per-image values; classification metrics
    ``(y_true, p_positive, threshold) -> float`` on checked arrays (:func:`classification_metrics`); None for
    the kinds computed elsewhere. ``detector`` (default: attention and occlusion metrics) marks a metric that
    claims to detect shortcut reliance, which the validation table scores against the behavioural label.

    ``region``: the image region the metric measures. Where that region is out of the model's view
    by construction (the crop removed the border band, or every artifact), the metric is "not
    applicable" and a selection constraint on it counts as met. Any other NaN (no mask, blank maps)
    leaves the constraint *unverified* (``selection.ranking``).
    """

    name: str
    compute: Callable[..., Any] | None
    higher_is_better: bool
    kind: MetricKind
    description: str
    citation: str = ""
    region: Region | None = None
    detector: bool | None = None

    def __post_init__(self) -> None:
        if self.detector is None:
            object.__setattr__(self, "detector", self.kind in ("attention", "occlusion"))
        if self.kind in ("attention", "classification") and self.compute is None:
            raise ValueError(f"{self.kind} metric {self.name!r} needs its compute function")

    @property
    def not_applicable_when_undefined(self) -> bool:
        """Whether NaN can mean "out of view by construction" (border and artifact metrics)."""
        return self.region in ("border", "artifact")


METRICS = Registry[MetricInfo]("metric", entry=MetricInfo)


def metric_names(kind: MetricKind) -> list[str]:
    """Registered metric names of one kind, sorted."""
    return [name for name, info in METRICS.items() if info.kind == kind]


_ARRAS = "Arras, Osman, Samek, Information Fusion 2022 (relevance mass accuracy)"
_ZHANG = "Zhang et al., Top-down neural attention by excitation backprop, IJCV 2018 (pointing game)"
_OCCLUSION = (
    "Zeiler & Fergus, ECCV 2014 (occlusion sensitivity); region removal as in RISE (Petsiuk et al., "
    "BMVC 2018) and ROAD (Rong et al., ICML 2022)"
)

# ------------------------------------------------- classification: (y_true, p_positive, threshold) -> score


def confusion_counts(y_true: np.ndarray, p_positive: np.ndarray, threshold: float) -> tuple[float, float, float, float]:
    """(tn, fp, fn, tp) as floats; an image is predicted positive when p > threshold."""
    positive, predicted = np.asarray(y_true) == 1, np.asarray(p_positive) > threshold
    return tuple(float(np.sum(a & b)) for a, b in
                 ((~positive, ~predicted), (~positive, predicted), (positive, ~predicted), (positive, predicted)))


def _recall(hits: float, misses: float) -> float:
    return hits / (hits + misses) if hits + misses > 0 else np.nan


@METRICS.register("accuracy", higher_is_better=True, kind="classification",
                  description="fraction of images classified correctly (positive when p > threshold)")
def accuracy(y_true: np.ndarray, p_positive: np.ndarray, threshold: float) -> float:
    tn, _, _, tp = confusion_counts(y_true, p_positive, threshold)
    return (tp + tn) / len(y_true)


@METRICS.register("balanced_accuracy", higher_is_better=True, kind="classification",
                  description="(sensitivity + specificity) / 2")
def balanced_accuracy(y_true: np.ndarray, p_positive: np.ndarray, threshold: float) -> float:
    # sensitivity and specificity are registered below (after roc_auc, the order of every table's columns)
    return (sensitivity.compute(y_true, p_positive, threshold) + specificity.compute(y_true, p_positive, threshold)) / 2


@METRICS.register("roc_auc", higher_is_better=True, kind="classification",
                  description="area under the ROC curve of p(positive)")
def roc_auc(y_true: np.ndarray, p_positive: np.ndarray, threshold: float) -> float:
    both_classes = 0 < np.sum(np.asarray(y_true) == 1) < len(y_true)
    return float(roc_auc_score(y_true, p_positive)) if both_classes else np.nan


@METRICS.register("sensitivity", higher_is_better=True, kind="classification",
                  description="tp / (tp + fn), recall of the positive class")
def sensitivity(y_true: np.ndarray, p_positive: np.ndarray, threshold: float) -> float:
    _, _, fn, tp = confusion_counts(y_true, p_positive, threshold)
    return _recall(tp, fn)


@METRICS.register("specificity", higher_is_better=True, kind="classification",
                  description="tn / (tn + fp), recall of the negative class")
def specificity(y_true: np.ndarray, p_positive: np.ndarray, threshold: float) -> float:
    tn, fp, _, _ = confusion_counts(y_true, p_positive, threshold)
    return _recall(tn, fp)


# ------------------------------------------------------------------- attention: (AttentionInputs) -> (N,)

_CELL = "scored on the artifact mask dilated by one map cell (the map cannot place mass more finely)"


@METRICS.register(
    "lung_mass", higher_is_better=True, kind="attention", citation=_ARRAS, region="lung",
    description="sum(H over lung mask) / sum(H): share of Grad-CAM mass on the lungs",
)
def lung_mass(a: AttentionInputs) -> np.ndarray:
    return relevance_mass(a.heatmaps, a.lungs)


@METRICS.register(
    "border_mass", higher_is_better=False, kind="attention", citation=_ARRAS, region="border",
    description="sum(H over the border band) / sum(H); the band is defined on the source image (the generator's "
    "marker band), NaN (not applicable) where the crop removed it",
)
def border_mass(a: AttentionInputs) -> np.ndarray:
    return relevance_mass(a.heatmaps, a.border)


@METRICS.register(
    "artifact_mass", higher_is_better=False, kind="attention", citation=_ARRAS, region="artifact",
    description=f"sum(H over artifacts) / sum(H), {_CELL}; NaN (not applicable) without an artifact in view",
)
def artifact_mass(a: AttentionInputs) -> np.ndarray:
    return relevance_mass(a.heatmaps, a.artifacts)


@METRICS.register(
    "artifact_enrichment", higher_is_better=False, kind="attention", citation=_ARRAS, region="artifact",
    description=f"artifact_mass / (artifact area / image area), {_CELL}: 1.0 = no preference, above 1 = drawn "
    "to the artifact",
)
def artifact_enrichment(a: AttentionInputs) -> np.ndarray:
    return enrichment(a.values["artifact_mass"], a.artifacts)  # registered before: computed before


@METRICS.register(
    "lung_enrichment", higher_is_better=True, kind="attention", citation=_ARRAS, region="lung",
    description="lung_mass / (lung area / image area): 1.0 = no preference for the lungs",
)
def lung_enrichment(a: AttentionInputs) -> np.ndarray:
    return enrichment(a.values["lung_mass"], a.lungs)


@METRICS.register(
    "pointing_game", higher_is_better=True, kind="attention", citation=_ZHANG, region="lung",
    description="1 if the argmax of H lies within one map cell of the lung mask, else 0 (the original allows 15 px)",
)
def lung_pointing_game(a: AttentionInputs) -> np.ndarray:  # not "pointing_game": that is the function below
    return pointing_game(a.heatmaps, a.lungs, tolerance_px=a.cell_px)


# Localisation as CheXlocalize scores it (audit.localisation): the map scaled to [0, 1] per image and
# binarised by Otsu, unlike the mass metrics above, which weigh the raw map (docs/metrics.md says why
# both exist). audit.localisation imports this module, so it is imported where it is used.
_CHEXLOCALIZE = ("Saporta et al., Benchmarking saliency methods for chest X-ray interpretation (CheXlocalize), "
                 "Nature Machine Intelligence 2022")


@METRICS.register(
    "lung_iou", higher_is_better=True, kind="attention", citation=_CHEXLOCALIZE, region="lung",
    description="|B and L| / |B or L|, B = the map scaled to [0, 1] and binarised by Otsu, L = the lung mask",
)
def lung_iou(a: AttentionInputs) -> np.ndarray:
    from auditbench.audit.localisation import iou

    return iou(a.heatmaps, a.lungs)


@METRICS.register(
    "artifact_iou", higher_is_better=False, kind="attention", citation=_CHEXLOCALIZE, region="artifact",
    description=f"IoU of the Otsu-binarised map with the artifact mask, {_CELL}; NaN without an artifact in view",
)
def artifact_iou(a: AttentionInputs) -> np.ndarray:
    from auditbench.audit.localisation import iou

    return iou(a.heatmaps, a.artifacts)


@METRICS.register(
    "lung_hit", higher_is_better=True, kind="attention", citation=_CHEXLOCALIZE, region="lung",
    description="1 if the map's maximum pixel lies in the lung mask, else 0: CheXlocalize's hit (the pointing "
    "game without pointing_game's one-cell tolerance)",
)
def lung_hit(a: AttentionInputs) -> np.ndarray:
    from auditbench.audit.localisation import hit_rate

    return hit_rate(a.heatmaps, a.lungs)


# ---------------------------------------------------------------- occlusion, behaviour and probe metrics
# Their values are computed by modules that import this one (audit.occlusion, audit.probes, the run's evaluate
# stage): registering their functions here would make an import cycle. So the decorator is applied to None
# (compute=None) and the entry carries direction, region and description only.

METRICS.register(
    "artifact_occlusion_effect", higher_is_better=False, kind="occlusion", citation=_OCCLUSION, region="artifact",
    description="|p(x) - p(x with the artifacts' resampling footprint inpainted from outside it)|; NaN without an "
    "artifact in view",
)(None)
METRICS.register(
    "border_occlusion_effect", higher_is_better=False, kind="occlusion", citation=_OCCLUSION, region="border",
    description="|p(x) - p(x with the border band inpainted from the pixels inside it)|; NaN where the crop removed "
    "the band",
)(None)
METRICS.register(
    "lung_occlusion_effect", higher_is_better=True, kind="occlusion", citation=_OCCLUSION, region="lung",
    description="|p(x) - p(x with the lungs filled with their median intensity)|",
)(None)
METRICS.register(
    "shortcut_reliance", higher_is_better=False, kind="behaviour", region="artifact",
    citation="Geirhos et al., Shortcut learning in deep neural networks, Nature MI 2020 (counterfactual test)",
    description="synthetic data: mean |p(x) - p(clean twin of x)| over decorrelated test images with a marker: how "
    "much the model's output depends on the marker (the validation's ground truth)",
)(None)
METRICS.register(
    "shortcut_accuracy_drop", higher_is_better=False, kind="behaviour", detector=True,
    citation="DeGrave, Janizek, Lee, Nature MI 2021 (accuracy lost when the shortcut is decorrelated)",
    description="synthetic data: accuracy on test images drawn with the training bias minus accuracy on "
    "decorrelated test images",
)(None)
_SOURCE_PROBE = (
    "DeGrave, Janizek, Lee, AI for radiographic COVID-19 detection selects shortcuts over signal, Nature MI 2021; "
    "Zech et al., PLoS Medicine 2018 (CNNs identify the hospital); Alain & Bengio 2017 (linear probes)"
)
METRICS.register(
    "source_probe_accuracy", higher_is_better=False, kind="probe", citation=_SOURCE_PROBE,
    description="within each class, chance-adjusted balanced accuracy ((BA - 1/K) / (1 - 1/K), K sources) of a "
    "patient-grouped cross-validated linear probe predicting the image's source from pooled backbone features, "
    "averaged over classes: 0 = the source is not readable, 1 = perfectly readable (a shortcut is available)",
)(None)
METRICS.register(
    "outside_lung_probe_accuracy", higher_is_better=False, kind="probe", citation=_SOURCE_PROBE,
    description="source_probe_accuracy on features of the images with the lungs filled with their median "
    "intensity (the lung_occlusion_effect fill): the source is readable from outside the lungs",
)(None)
METRICS.register(
    "lungs_removed_auc", higher_is_better=False, kind="probe", region="lung", detector=True,
    citation="Maguolo & Nanni, A critic evaluation of methods for COVID-19 automatic detection from X-ray "
    "images, Information Fusion 2021",
    description="ROC AUC of p(positive) on the test images with the lungs filled with their median intensity: "
    "0.5 = the model needs the lungs, near the intact AUC = it does not (lower is better down to 0.5; well "
    "below 0.5 also separates, inverted)",
)(None)
# Computed by pipeline.evaluate from two methods' maps (audit.agreement.rank_agreement, which imports this module).
METRICS.register(
    "method_agreement", higher_is_better=True, kind="agreement",
    citation="Krishna et al., The disagreement problem in explainable machine learning, TMLR 2024; Arun et al., "
    "Radiology: AI 2021",
    description="per image, Spearman rank correlation of this method's map with the primary explanation method's "
    "map (explain.method[0]): 1 = the same pixel ranking; NaN on the primary method's own rows",
)(None)
# Computed by pipeline.faithfulness_pass (audit.faithfulness.faithfulness_scores, which that module imports with
# this one) on the first metrics.faithfulness.images internal test images of each fold. Not detectors: they score
# whether the map is faithful to the model (its pixel ranking predicts what the model responds to), whatever the
# model reads.
_RISE = "Petsiuk, Das & Saenko, RISE: Randomized Input Sampling for Explanation of Black-box Models, BMVC 2018"
_ROAD = ("Rong, Leemann, Borisov, Kasneci & Kasneci, A Consistent and Efficient Evaluation Strategy for Attribution "
         "Methods (ROAD), ICML 2022")
METRICS.register(
    "deletion_auc", higher_is_better=False, kind="faithfulness", citation=_RISE,
    description="faithfulness of the map to the model: mean p(the class the map explains) while the map's most "
    "relevant pixels are set to black, 0 to 100% of them in metrics.faithfulness.steps steps: low = p falls fast = "
    "the map ranks first what the model uses (whatever that is: not a shortcut detector)",
)(None)
METRICS.register(
    "insertion_auc", higher_is_better=True, kind="faithfulness", citation=_RISE,
    description="faithfulness of the map to the model: mean p(the explained class) while the map's most relevant "
    "pixels are put back into a blurred copy (sigma 5 px), 0 to 100% of them: high = p recovers fast (not a "
    "shortcut detector)",
)(None)
METRICS.register(
    "road_morf_auc", higher_is_better=False, kind="faithfulness", citation=_ROAD,
    description="faithfulness of the map to the model: mean p(the explained class) with the 20, 40, 60, 80% most "
    "relevant pixels removed and filled by noisy linear imputation (no sharp mask edges for the model to react "
    "to): low = faithful (not a shortcut detector)",
)(None)
METRICS.register(
    "road_lerf_auc", higher_is_better=True, kind="faithfulness", citation=_ROAD,
    description="faithfulness of the map to the model: mean p(the explained class) with the 20, 40, 60, 80% least "
    "relevant pixels removed by noisy linear imputation: high = the pixels the map ranks last do not matter (not a "
    "shortcut detector)",
)(None)


# ----------------------------------------------------------------------------- attention metrics


def relevance_mass(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Relevance mass accuracy (Arras et al. 2022): sum_{p in M} H_p / sum_p H_p, per image.

    ``heatmaps`` (N, H, W) >= 0; ``masks`` bool (N, H, W) or one (H, W) mask for all images.
    NaN where sum(H) is 0 or not finite, or where the mask is empty.
    """
    flat = heatmaps.reshape(len(heatmaps), -1)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite maps are undefined below
        total = flat.sum(axis=1, dtype=np.float64)
        if masks.ndim == 2:
            inside = flat[:, masks.ravel()].sum(axis=1, dtype=np.float64)
            empty = np.full(len(flat), not masks.any())
        else:
            mask_flat = masks.reshape(len(masks), -1)
            # einsum avoids materialising H * M; float64 accumulation keeps ratios near 0 and 1 exact
            inside = np.einsum("np,np->n", flat, mask_flat, dtype=np.float64, casting="unsafe")
            empty = ~mask_flat.any(axis=1)
    undefined = empty | ~(np.isfinite(total) & (total > 0))
    return np.where(undefined, np.nan, inside / np.where(undefined, 1.0, total))


def pointing_game(heatmaps: np.ndarray, masks: np.ndarray, tolerance_px: float = 0.0) -> np.ndarray:
    """Pointing game (Zhang et al. 2018): 1.0 if argmax_p H_p lies within ``tolerance_px`` (Euclidean)
    of a pixel of M, else 0.0. The original allows 15 px; the run uses one map cell.

    Ties go to the first maximum in row-major order (``np.argmax``). NaN where sum(H) is 0 or not
    finite, or where the mask is empty (an empty mask is not a hit).
    """
    flat = heatmaps.reshape(len(heatmaps), -1)
    mask_flat = masks.reshape(len(masks), -1)
    peak = np.argmax(flat, axis=1)
    hit = mask_flat[np.arange(len(flat)), peak].astype(np.float64)
    if tolerance_px > 0:
        width = heatmaps.shape[-1]
        for i in np.flatnonzero(hit == 0):
            rows, cols = np.divmod(np.flatnonzero(mask_flat[i]), width)
            if len(rows):
                r, c = divmod(int(peak[i]), width)
                hit[i] = float(np.min((rows - r) ** 2 + (cols - c) ** 2) <= tolerance_px**2)
    total = flat.sum(axis=1, dtype=np.float64)
    undefined = ~mask_flat.any(axis=1) | ~(np.isfinite(total) & (total > 0))
    return np.where(undefined, np.nan, hit)


def dilate_by_cells(masks: np.ndarray, cell_px: int) -> np.ndarray:
    """Each (N, H, W) mask grown by ``cell_px`` pixels in every direction (a square of one map cell)."""
    if cell_px <= 0:
        return masks
    size = (1, 2 * cell_px + 1, 2 * cell_px + 1)
    return ndimage.maximum_filter(masks.astype(np.uint8), size=size, mode="constant") > 0


def enrichment(mass: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Mass enrichment: mass / (|M| / |P|); a uniform map scores 1.0. NaN where |M| = 0 or mass is NaN."""
    area = masks.reshape(len(masks), -1).mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, mass / np.where(area > 0, area, 1.0), np.nan)


@dataclass
class AttentionInputs:
    """What an attention metric's ``compute`` gets: raw maps and region masks in the model frame
    (artifacts already dilated by one map cell), the cell size, and the values of the metrics
    registered before it (an enrichment reads its mass)."""

    heatmaps: np.ndarray
    lungs: np.ndarray
    artifacts: np.ndarray
    border: np.ndarray
    cell_px: int
    values: dict[str, np.ndarray]


@dataclass
class AttentionResult:
    """Per-image attention metrics and how many images were undefined for each cause.

    ``values``: metric name -> (N,) float64 with NaN where undefined.
    ``nan_counts``: ``zero_map`` (sum(H) is 0 or not finite: every attention metric is NaN),
    ``empty_lung_mask`` (lung metrics NaN), ``no_artifact`` (artifact metrics NaN), ``no_border``
    (border band out of view). An image can count under several causes.
    """

    values: dict[str, np.ndarray]
    nan_counts: dict[str, int]


def stack_optional_masks(
    masks: np.ndarray | Sequence[np.ndarray | None] | None, shape: tuple[int, int, int]
) -> np.ndarray:
    """(N, H, W) bool masks from an array, a per-image list with None for "no mask", or None."""
    if masks is None:
        return np.zeros(shape, dtype=bool)
    if not isinstance(masks, np.ndarray):
        if len(masks) != shape[0]:
            raise ValueError(f"expected {shape[0]} masks, got {len(masks)}")
        masks = np.stack([np.zeros(shape[1:], bool) if m is None else np.asarray(m, bool) for m in masks])
    if masks.ndim == 2:
        masks = np.broadcast_to(masks, shape)
    if masks.shape != shape:
        raise ValueError(f"mask shape {masks.shape} differs from image/heatmap shape {shape}")
    return masks.astype(bool, copy=False)


def attention_metrics(
    heatmaps: np.ndarray,
    lung_masks: np.ndarray,
    artifact_masks: np.ndarray | Sequence[np.ndarray | None] | None = None,
    border_masks: np.ndarray | None = None,
    cell_px: int = 0,
) -> AttentionResult:
    """Every registered attention metric per image (lung_mass, border_mass, artifact_mass,
    artifact_enrichment, lung_enrichment, pointing_game), in registration order.

    ``heatmaps`` (N, H, W) raw maps H >= 0 in the model frame; ``lung_masks`` bool (N, H, W);
    ``artifact_masks`` bool (N, H, W), a list with None for images without one, or None for none;
    ``border_masks`` the border band in the frame, (N, H, W) or one (H, W) for all (None: no band in
    view). ``cell_px`` is the size of one map cell in frame pixels (frame side / map side): the
    artifact metrics use the artifact mask dilated by one cell, and the pointing game accepts a
    peak within one cell of the lungs, because a map of stride s cannot place mass more finely
    than s pixels. Emits one :class:`MetricWarning` per cause (all-zero/non-finite maps, empty lung
    masks) with its count; images without an artifact or band in view are expected and only counted.

    >>> h = np.zeros((1, 4, 4)); h[0, 1, 1] = 3.0; h[0, 2, 2] = 1.0
    >>> lungs = np.zeros((1, 4, 4), bool); lungs[0, 1, 1] = True
    >>> attention_metrics(h, lungs).values["lung_mass"]
    array([0.75])
    """
    heatmaps = np.asarray(heatmaps)
    if heatmaps.ndim != 3:
        raise ValueError(f"heatmaps must be (N, H, W), got shape {heatmaps.shape}")
    if np.any(heatmaps < 0):
        raise ValueError(f"heatmaps must be raw ReLU maps >= 0, got minimum {np.nanmin(heatmaps):.3g}")
    lung_masks = stack_optional_masks(lung_masks, heatmaps.shape)
    artifact_masks = dilate_by_cells(stack_optional_masks(artifact_masks, heatmaps.shape), cell_px)
    border_masks = stack_optional_masks(border_masks, heatmaps.shape)
    n = len(heatmaps)

    total = heatmaps.reshape(n, -1).sum(axis=1, dtype=np.float64)
    counts = {
        "zero_map": int(np.sum(~(np.isfinite(total) & (total > 0)))),
        "empty_lung_mask": int(np.sum(~lung_masks.reshape(n, -1).any(axis=1))),
        "no_artifact": int(np.sum(~artifact_masks.reshape(n, -1).any(axis=1))),
        "no_border": int(np.sum(~border_masks.reshape(n, -1).any(axis=1))),
    }
    if counts["zero_map"]:
        warnings.warn(
            f"{counts['zero_map']} of {n} heatmaps are all zero or non-finite: "
            "attention metrics are NaN for them",
            MetricWarning, stacklevel=2,
        )
    if counts["empty_lung_mask"]:
        warnings.warn(
            f"{counts['empty_lung_mask']} of {n} lung masks are empty: lung metrics are NaN for them",
            MetricWarning, stacklevel=2,
        )

    inputs = AttentionInputs(heatmaps, lung_masks, artifact_masks, border_masks, cell_px, values={})
    for name, info in METRICS.in_registration_order():
        if info.kind == "attention":
            inputs.values[name] = info.compute(inputs)
    return AttentionResult(values=inputs.values, nan_counts=counts)


# ------------------------------------------------------------------------ classification metrics


def classification_metrics(
    y_true: np.ndarray, p_positive: np.ndarray, threshold: float = 0.5
) -> dict[str, float]:
    """Every registered classification metric (accuracy, balanced_accuracy, roc_auc, sensitivity,
    specificity, in registration order), then the unregistered counts tn, fp, fn, tp.

    An image is predicted positive when p > threshold (the argmax of two softmax outputs at 0.5).
    With one class only, roc_auc, balanced_accuracy and the recall of the missing class are NaN and
    a :class:`MetricWarning` says so. Counts are returned as floats so the dict is uniform.
    """
    y_true = np.asarray(y_true)
    p_positive = np.asarray(p_positive, dtype=np.float64)
    if y_true.ndim != 1 or y_true.shape != p_positive.shape or len(y_true) == 0:
        raise ValueError(f"need two equal non-empty 1-D arrays, got {y_true.shape} and {p_positive.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError(f"y_true must hold 0 and 1 only, got {np.unique(y_true)}")
    if not np.isfinite(p_positive).all():
        raise ValueError("p_positive contains NaN or infinite values")
    tn, fp, fn, tp = confusion_counts(y_true, p_positive, threshold)
    if not (tp + fn > 0 and tn + fp > 0):
        warnings.warn(
            f"only class {int(y_true[0])} is present in {len(y_true)} labels: roc_auc, balanced_accuracy "
            f"and {'sensitivity' if y_true[0] == 0 else 'specificity'} are NaN",
            MetricWarning, stacklevel=2,
        )
    scores = {name: info.compute(y_true, p_positive, threshold)
              for name, info in METRICS.in_registration_order() if info.kind == "classification"}
    return {**scores, "tn": tn, "fp": fp, "fn": fn, "tp": tp}
