"""Agreement between explanation methods: do two methods rank the same pixels of an image alike?

Krishna et al., "The disagreement problem in explainable machine learning: a practitioner's
perspective", TMLR 2024 (arXiv 2202.01602): explanation methods often disagree on the same model and
input, and users resolve the disagreement arbitrarily; rank correlation of attributions is one of
their measures. Arun et al. (Radiology: AI 2021) compare saliency maps of chest X-rays the same way.
auditbench reports, per image, the Spearman rank correlation of each method's map with the primary
method's (``method_agreement``): a model whose methods disagree widely has explanations no single
method can be trusted to summarise.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata

from auditbench.audit.metrics import MetricWarning


def rank_agreement(maps: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Spearman rank correlation (average ranks for ties, as ``scipy.stats.spearmanr``) of each map
    with the reference map of the same image: (N, H, W) x (N, H, W) -> (N,). NaN where either map
    is constant (no ranking) or not finite, counted in one :class:`MetricWarning`."""
    a = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    b = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    if a.shape != b.shape:
        raise ValueError(f"map shapes differ: {np.shape(maps)} vs {np.shape(reference)}")
    out = np.full(len(a), np.nan)
    if not len(a):
        return out
    defined = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    defined &= (np.ptp(np.where(np.isfinite(a), a, 0), axis=1) > 0) & (np.ptp(np.where(np.isfinite(b), b, 0), axis=1) > 0)
    if defined.any():
        ra = rankdata(a[defined], axis=1)
        rb = rankdata(b[defined], axis=1)
        ra -= ra.mean(axis=1, keepdims=True)
        rb -= rb.mean(axis=1, keepdims=True)
        out[defined] = (ra * rb).sum(axis=1) / np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    if (~defined).any():
        warnings.warn(f"{int((~defined).sum())} of {len(a)} map pairs have a constant or non-finite map: "
                      "method_agreement is NaN for them", MetricWarning, stacklevel=2)
    return out
