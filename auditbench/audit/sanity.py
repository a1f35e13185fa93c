"""Sanity checks of saliency maps: does a map depend on the model's weights and on the labels it learned?

Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018; on chest X-rays Arun et al., "Assessing the
Trustworthiness of Saliency Maps for Localizing Abnormalities in Medical Imaging", Radiology: AI 2021.

- **Model parameter randomisation** (:func:`cascading_randomisation`): re-initialise the layers cumulatively
  from the top (the head's logit layer first, then the backbone's stages from the last to the first) and
  explain each copy. A map that stays similar to the trained model's map does not explain the model.
- **Similarity** (:func:`map_similarity`): per image Spearman rank correlation and SSIM of maps scaled to
  [0, 1] per image; :func:`random_pair_baseline` gives the similarity of *different* images' maps (Arun et al.),
  the level that "no longer related" should reach; :func:`randomisation_verdict` compares the two.
- **Data randomisation** (:func:`shuffled_labels`): labels permuted deterministically; the pipeline (not this
  module) trains a head on them, explains it and compares its maps with :func:`map_similarity`.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Sequence, Union

import numpy as np
import timm
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from torch import nn

from auditbench.audit.metrics import MetricWarning
from auditbench.audit.uncertainty import mean_ci
from auditbench.models.classifier import Classifier

__all__ = [
    "MapSimilarity", "RandomPairBaseline", "RandomisationStep", "RandomisationUnit", "SanityVerdict",
    "cascading_randomisation", "map_similarity", "random_pair_baseline", "randomisation_units",
    "randomisation_verdict", "scale_to_unit_range", "shuffled_labels", "ssim_window",
]

Granularity = Literal["stage", "block"]


@dataclass(frozen=True)
class RandomisationUnit:
    """One step of the cascade: a name (``head.fc2``, ``backbone.layer4``) and the parameter names it resets."""

    name: str
    parameters: tuple[str, ...]


@dataclass
class RandomisationStep:
    """The model after resetting units 0..index (``unit``: this step's); ``model`` is a copy the caller owns;
    ``redrawn``: parameters whose module has no ``reset_parameters`` (see :func:`_reinitialise`)."""

    index: int
    unit: RandomisationUnit
    model: nn.Module
    redrawn: tuple[str, ...]


def randomisation_units(model: Classifier, granularity: Granularity = "stage") -> list[RandomisationUnit]:
    """The cascade's units, top first: the head's parameterised layers from the output down (``head.fc2``,
    ``head.fc1``), then the backbone's stages from the last to the first.

    Backbone stages are timm's own layer groups (``group_matcher``, used for layer-wise learning-rate decay),
    coarse for ``"stage"`` (ResNet ``layer4`` .. ``layer1``, EfficientNet ``blocks.6`` .. ``blocks.0``, then the
    stem), fine for ``"block"`` (``layer4.1``, ``blocks.6.0``): no architecture's names live here. Raises
    ``ValueError`` if a backbone parameter falls in no group.
    """
    if granularity not in ("stage", "block"):
        raise ValueError(f"granularity must be 'stage' or 'block', got {granularity!r}")
    head_layers = [name for name, module in model.head.named_children() if any(True for _ in module.parameters())]
    units = [RandomisationUnit(f"head.{name}", tuple(f"head.{name}.{p}" for p, _ in
                               getattr(model.head, name).named_parameters())) for name in reversed(head_layers)]
    return units + [RandomisationUnit(f"backbone.{name}", tuple(f"backbone.body.{p}" for p in params))
                    for name, params in reversed(_backbone_groups(model.backbone, granularity == "stage"))]


def _backbone_groups(backbone: nn.Module, coarse: bool) -> list[tuple[str, list[str]]]:
    """(name, body parameter names) per timm layer group, input side first. A group is named by what its
    matcher's patterns match (``layer4``, ``blocks.6``, ``conv1+bn1``), or, for a callable matcher (Inception),
    by its modules' common prefix (``repeat_1.3``)."""
    with torch.device("meta"):  # structure only: the full model's parameter names and its grouping
        full = timm.create_model(backbone.timm_name)
    matcher = full.group_matcher(coarse=coarse)
    patterns = [] if callable(matcher) else [
        p for v in matcher.values() for p in ([v] if isinstance(v, str) else [q for q, _ in v])]
    grouped = timm.models.group_parameters(full, matcher)
    body_names = dict(backbone.body.named_parameters())
    groups, assigned = [], set()
    for ordinal in sorted(grouped):
        names, labels, modules = [], {}, []
        for name in grouped[ordinal]:
            # timm's feature wrappers keep a name, flatten a first-level Sequential ("features.0" ->
            # "features_0") or nest the model under "body" (FeatureHookNet), as FeatureBackbone._body_module.
            parts = name.split(".")
            for candidate in (name, ".".join(["_".join(parts[:2]), *parts[2:]]), f"body.{name}"):
                if candidate in body_names and candidate not in assigned:
                    names.append(candidate)
                    assigned.add(candidate)
                    modules.append(parts[:-1])
                    match = next((m for m in (re.match(p, name) for p in patterns) if m), None)
                    labels[match.group(0) if match else parts[0]] = None
                    break
        if names:  # groups beyond the CAM level (timm's head, conv_head) are not in the body
            prefix = ".".join(os.path.commonprefix(modules))  # element-wise on lists of components
            groups.append((prefix if callable(matcher) and prefix else "+".join(labels), names))
    missing = sorted(set(body_names) - assigned)
    if missing:
        raise ValueError(f"backbone {backbone.timm_name!r}: parameters in no timm layer group: {missing[:5]}")
    return groups


def cascading_randomisation(model: Union[Classifier, tuple[nn.Module, nn.Module]], *, seed: int = 0,
                            granularity: Granularity = "stage") -> Iterator[RandomisationStep]:
    """Copies of ``model`` with its units (:func:`randomisation_units`) re-initialised cumulatively, top first.

    ``model``: a :class:`Classifier` or a ``(backbone, head)`` pair (wrapped in a Classifier). Never mutated:
    one deep copy is randomised step by step and each step yields its own deep copy (train/eval mode kept).
    Re-initialisation is each module's own ``reset_parameters()`` (PyTorch's default initialisers; BatchNorm
    returns to weight 1, bias 0, running mean 0, variance 1), as Quantus' MPRT does, under
    ``torch.manual_seed`` derived from ``(seed, step)`` inside ``torch.random.fork_rng``: the same seed gives
    the same weights on the same device, and the caller's random state is untouched.
    """
    if isinstance(model, tuple):
        model = Classifier(*model)
    working = copy.deepcopy(model)
    modules = dict(working.named_modules())
    devices = sorted({p.device.index or 0 for p in working.parameters() if p.device.type == "cuda"})
    for index, unit in enumerate(randomisation_units(working, granularity)):
        owners = dict.fromkeys(name.rsplit(".", 1)[0] for name in unit.parameters)
        redrawn = []
        step_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(step_seed)
            for owner in owners:
                redrawn += _reinitialise(modules[owner], owner)
        yield RandomisationStep(index, unit, copy.deepcopy(working), tuple(redrawn))


def _reinitialise(module: nn.Module, owner: str) -> list[str]:
    """``module.reset_parameters()``; without one, each parameter is redrawn i.i.d. from a normal with its own
    mean and standard deviation (random values at the trained scale; e.g. ConvNeXt's layer scale ``gamma``).
    Returns the redrawn names; a scalar parameter cannot be redrawn that way and raises."""
    if callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
        return []
    redrawn = []
    for name, parameter in module.named_parameters(recurse=False):
        if parameter.numel() < 2:
            raise ValueError(f"{owner}.{name}: a scalar parameter in a module without reset_parameters()")
        parameter.normal_(float(parameter.mean()), float(parameter.std()))
        redrawn.append(f"{owner}.{name}")
    return redrawn


# ----------------------------------------------------------------------------------------------- similarity


def _as_maps(maps) -> np.ndarray:
    maps = np.asarray(maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    if maps.ndim not in (2, 3):
        raise ValueError(f"maps must be (N, H, W) or (H, W), got shape {maps.shape}")
    return maps[None] if maps.ndim == 2 else maps


def scale_to_unit_range(maps) -> np.ndarray:
    """Each (H, W) map min-max scaled to [0, 1]: (m - min) / (max - min); NaN maps where max == min or a value
    is not finite (a constant map has no ranking and no structure to compare)."""
    maps = _as_maps(maps)
    low, high = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    defined = np.isfinite(maps).all(axis=(1, 2), keepdims=True) & (high > low)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(defined, (maps - low) / np.where(defined, high - low, 1.0), np.nan)


@dataclass
class MapSimilarity:
    """Per image: ``spearman`` and ``ssim`` (NaN where undefined) and ``reasons`` ('' where defined)."""

    spearman: np.ndarray
    ssim: np.ndarray
    reasons: list[str]


def ssim_window(shape: tuple[int, int]) -> int:
    """SSIM's window: skimage's default 7 (uniform), or the largest odd size that fits a smaller map (>= 3)."""
    side = min(shape)
    size = min(7, side if side % 2 else side - 1)
    if size < 3:
        raise ValueError(f"maps of {shape} are too small for SSIM (3x3 at least): upsample them first")
    return size


def map_similarity(original, other) -> MapSimilarity:
    """Spearman rank correlation (``scipy.stats.spearmanr``, average ranks for ties) and SSIM
    (``skimage.metrics.structural_similarity``: uniform window :func:`ssim_window`, ``data_range=1``, sample
    covariance) of each pair of maps, both scaled to [0, 1] per image (:func:`scale_to_unit_range`).

    Scaling puts every map on SSIM's stated data range and leaves Spearman unchanged. Adebayo et al. report
    rank correlations with and without absolute values; for ReLU maps (>= 0) the two coincide. ``original``,
    ``other``: (N, H, W) or (H, W), arrays or tensors, same shape. A constant or non-finite map gives NaN with
    its reason, counted in one :class:`MetricWarning`.
    """
    a, b = scale_to_unit_range(original), scale_to_unit_range(other)
    if a.shape != b.shape:
        raise ValueError(f"map shapes differ: {a.shape} vs {b.shape}")
    window = ssim_window(a.shape[1:])
    spearman, ssim, reasons = np.full(len(a), np.nan), np.full(len(a), np.nan), []
    for i, (x, y) in enumerate(zip(a, b)):
        reason = " and ".join(f"{which} map is constant or not finite" for which, m in (("original", x), ("other", y))
                              if np.isnan(m).any())
        reasons.append(reason)
        if not reason:
            spearman[i] = stats.spearmanr(x.ravel(), y.ravel()).statistic
            ssim[i] = structural_similarity(x, y, win_size=window, data_range=1.0)
    undefined = sum(bool(r) for r in reasons)
    if undefined:
        warnings.warn(f"{undefined} of {len(a)} map pairs have a constant or non-finite map: similarity is NaN",
                      MetricWarning, stacklevel=2)
    return MapSimilarity(spearman, ssim, reasons)


@dataclass
class RandomPairBaseline:
    """Similarity of ``pairs`` (n, 2) of different images' maps, and its NaN-ignoring means."""

    pairs: np.ndarray
    similarity: MapSimilarity

    mean_ssim = property(lambda self: _nanmean(self.similarity.ssim))
    mean_spearman = property(lambda self: _nanmean(self.similarity.spearman))


def _nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def random_pair_baseline(maps, n_pairs: int = 50, seed: int = 0) -> RandomPairBaseline:
    """Similarity of maps of two *different* images (Arun et al. 2021): the level an explanation unrelated to
    the image content reaches. ``n_pairs`` ordered pairs (i, j), i != j, drawn with replacement:
    i uniform, j = (i + k) mod N with k uniform in 1..N-1 (``default_rng(seed)``)."""
    maps = _as_maps(maps)
    if len(maps) < 2:
        raise ValueError("a random-pair baseline needs maps of at least 2 images")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(maps), size=n_pairs)
    second = (first + rng.integers(1, len(maps), size=n_pairs)) % len(maps)
    return RandomPairBaseline(np.stack([first, second], axis=1), map_similarity(maps[first], maps[second]))


@dataclass(frozen=True)
class SanityVerdict:
    """``passed`` (None when undefined), the two means, their upper CI bounds and a sentence saying why."""

    passed: Optional[bool]
    metric: str
    randomised_mean: float
    randomised_ci_high: float
    baseline_mean: float
    baseline_ci_high: float
    reason: str


def randomisation_verdict(randomised: MapSimilarity, baseline: RandomPairBaseline, *,
                          metric: Literal["ssim", "spearman"] = "ssim", groups: Optional[Sequence] = None,
                          n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> SanityVerdict:
    """Passed iff the upper CI bound of mean(``metric``(original, fully randomised map)) <= the upper CI bound of
    mean(``metric`` of random pairs); ``metric`` is SSIM by default.

    Both are percentile bootstrap intervals at ``level`` (:func:`auditbench.audit.uncertainty.mean_ci`): over
    patients (``groups``; default one per image) for the randomised side, over pairs for the baseline. Why: Arun
    et al. read the random-pair similarity as what "unrelated to the image" looks like, and the maps of a model
    with no learned weights must fall to it. The upper bound on the randomised side makes the data show it (too
    few images fail rather than pass); on the baseline side it allows for the baseline's own sampling error.
    The only free number is ``level``, never tuned. Constant maps (e.g. all-zero ReLU maps) have no similarity
    and are left out (``randomised.reasons``); ``passed`` is None when either side has no defined value.
    """
    values, pairs = getattr(randomised, metric), getattr(baseline.similarity, metric)
    groups = np.arange(len(values)) if groups is None else np.asarray(groups)
    if not np.isfinite(values).any() or not np.isfinite(pairs).any():
        return SanityVerdict(None, metric, np.nan, np.nan, np.nan, np.nan,
                             "undefined: no defined similarity (constant or non-finite maps)")
    mean, base = _nanmean(values), _nanmean(pairs)
    high = mean_ci(values, groups, n_boot, seed, level)[1]
    base_high = mean_ci(pairs, np.arange(len(pairs)), n_boot, seed, level)[1]
    passed = bool(high <= base_high)
    return SanityVerdict(passed, metric, mean, high, base, base_high, f"mean {metric} after full randomisation "
                         f"{mean:.3f} (CI high {high:.3f}) is {'at or below' if passed else 'above'} the "
                         f"random-pair baseline {base:.3f} (CI high {base_high:.3f})")


def shuffled_labels(labels: Sequence, seed: int = 0, strata: Optional[Sequence] = None) -> np.ndarray:
    """Labels permuted at random for the data randomisation test (Adebayo et al. 2018).

    A permutation keeps every class count exactly; with ``strata`` (one value per image, e.g. the fold) labels
    are permuted within each stratum, so every stratum keeps its own class counts. Never stratify by source or
    site: the permuted labels would keep the source-label association, a shortcut. Deterministic: strata in
    sorted order, each permuted by ``default_rng(seed)`` in turn. The caller trains on the result (the
    pipeline trains a head on the cached features) and compares that model's maps with :func:`map_similarity`.
    """
    labels = np.asarray(labels)
    strata = np.zeros(len(labels), int) if strata is None else np.asarray(strata)
    if strata.shape != labels.shape[:1]:
        raise ValueError(f"strata has shape {strata.shape}, expected ({len(labels)},)")
    rng, out = np.random.default_rng(seed), labels.copy()
    for value in np.unique(strata):
        where = np.flatnonzero(strata == value)
        out[where] = labels[where[rng.permutation(len(where))]]
    return out
