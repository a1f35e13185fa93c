"""Stage 4 helper: deletion, insertion and ROAD (audit/faithfulness.py) of each explanation method on the
first ``metrics.faithfulness.images`` internal test images of a model x fold, in test-set order.

The bound is the point: per image and method the curves cost 2 x (``steps`` + 1) + 8 forward passes of the
whole model (backbone included, also for a frozen model) and 8 sparse solves (ROAD's imputation), against
one pass for the image's explanation. An image's values depend on the model, its own map, its position in
the fold's test set (ROAD's noise seed, with the protocol's seed) and nothing else: not on how the split is
chunked or which other methods run.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from auditbench.audit.faithfulness import faithfulness_scores
from auditbench.audit.metrics import METRICS
from auditbench.data.prepare import Frames
from auditbench.pipeline.predict import Explained
from auditbench.pipeline.records import THRESHOLD
from auditbench.protocol.schema import Protocol

FAITHFULNESS_METRICS = [name for name, info in METRICS.in_registration_order() if info.kind == "faithfulness"]
"""The registered faithfulness metrics, in registration order: the columns the run writes."""


def explained_class(p: np.ndarray, target: str, threshold: float = 0.5) -> np.ndarray:
    """The class each map explains (``explain.target``): 1 for "positive", else the predicted class
    (p > threshold, the argmax of the two logits with ties to class 0, as predict_and_explain)."""
    p = np.asarray(p)
    return np.ones(len(p), dtype=int) if target == "positive" else (p > threshold).astype(int)


def faithfulness_values(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                        heatmaps: dict[str, np.ndarray], classes: np.ndarray, first: int, bound: int, steps: int,
                        seed: int, batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Per method, each of :data:`FAITHFULNESS_METRICS` (N,) for a chunk of ``images`` (N, H, W) in [0, 1]
    whose first image is number ``first`` of the split: computed for the numbers below ``bound``, NaN for
    the rest (and, as audit.faithfulness, for a constant map). A method whose maps cover fewer rows than
    the chunk (``explain.expensive_images``) is scored on the rows it has.

    ``predict`` maps frames (n, H, W) to p(positive). The frames go to audit.faithfulness as one greyscale
    channel, so deletion (into 0, black), the blurred insertion substrate and ROAD's noise (sd 0.01) are in the
    frame's [0, 1] intensities. ``classes`` (N,) is the class each map explains: where it is 0 the score is
    1 - AUC, the AUC of p(negative) = 1 - p (every AUC is the curve's mean height, linear in the curve).
    """
    n = len(images)
    take = max(0, min(n, bound - first))
    out = {method: {name: np.full(n, np.nan) for name in FAITHFULNESS_METRICS} for method in heatmaps}
    if not take:
        return out
    frames = np.asarray(images[:take], dtype=np.float32)[:, None]  # (take, 1, H, W)

    def greyscale(x: np.ndarray) -> np.ndarray:
        return predict(x[:, 0])

    negative = np.asarray(classes[:take]) == 0
    for method, maps in heatmaps.items():
        rows = min(take, len(maps))  # a method bounded by explain.expensive_images has maps for fewer rows
        if not rows:
            continue
        scores = faithfulness_scores(greyscale, frames[:rows], np.asarray(maps[:rows]), n_steps=steps,
                                     seed=seed % 2**32, batch_size=batch_size, first_index=first)
        for name in FAITHFULNESS_METRICS:
            out[method][name][:rows] = np.where(negative[:rows], 1.0 - scores[name], scores[name])
    return out


def chunk_faithfulness(protocol: Protocol, predict: Callable[[np.ndarray], np.ndarray], explained: Explained,
                       frames: Frames, first: int, batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """:func:`faithfulness_values` of one chunk of the internal split (number ``first`` onwards) for every
    method in ``explained``, under ``protocol.metrics.faithfulness`` and ``explain.target``."""
    bound = protocol.metrics.faithfulness
    classes = explained_class(explained.p, protocol.explain.target, THRESHOLD)
    return faithfulness_values(predict, frames.images, explained.heatmaps, classes, first, bound.images, bound.steps,
                               protocol.seed, batch_size)
