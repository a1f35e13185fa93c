"""Which test images a model's gallery shows: chosen while the images stream past, a chunk at a
time, and merged over folds by one strict rule.

Per model the gallery holds, each image with its Grad-CAM overlay:

- on the internal split, the image of the highest ("best") and lowest ("worst") lung_mass, and the
  most confident true positive, false positive, false negative and true negative;
- on every external split, its errors: the :data:`EXTERNAL_ERRORS` most confident false positives
  and false negatives (a set of healthy adults gives false positives only), each image once although
  every fold's model scores it.

Confidence is the probability of the call the model made: p for a positive call, 1 - p for a
negative one (:meth:`GalleryCandidate.score_of`). A candidate displaces a held one only when it
ranks strictly higher; images arrive in plan order (folds, chunks and rows in order), so ties keep
the earliest. Only the current winners are held, their arrays copied, so memory stays bounded
however large a split is.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from auditbench.pipeline.records import THRESHOLD, CellResult, GalleryCandidate

INTERNAL = "internal"
LUNG_MASS_KINDS = ("best", "worst")
DECISION_KINDS = ("tp", "fp", "fn", "tn")
ERROR_KINDS = ("fp", "fn")
INTERNAL_KINDS = LUNG_MASS_KINDS + DECISION_KINDS
EXTERNAL_ERRORS = 2
"""Most confident errors of each kind kept per model and external set."""


def kinds_shown(split: str) -> tuple[str, ...]:
    return INTERNAL_KINDS if split == INTERNAL else ERROR_KINDS


def capacity(split: str, kind: str) -> int:
    """How many images of ``kind`` the gallery keeps per model on ``split``."""
    if kind not in kinds_shown(split):
        return 0
    return 1 if split == INTERNAL else EXTERNAL_ERRORS


def decision_kinds(labels: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The decision on each image, "tp", "fp", "fn" or "tn" (class index 1 is the positive class;
    an image is called positive when p > 0.5)."""
    called = np.asarray(p) > THRESHOLD
    positive = np.asarray(labels) == 1
    return np.where(called, np.where(positive, "tp", "fp"), np.where(positive, "fn", "tn"))


def place(held: list[GalleryCandidate], score: float, limit: int) -> int | None:
    """Where a candidate of ``score`` enters ``held`` (best first): after every held one it does not
    strictly beat, so ties keep the earlier; None where that is at or past ``limit``."""
    at = next((i for i, other in enumerate(held) if score > other.score), len(held))
    return at if at < limit else None


def slot(split: str, kind: str, rank: int) -> str:
    """The key of a candidate in :attr:`CellResult.gallery` (``split|kind|rank``; kinds and ranks hold
    no "|", so ``rsplit("|", 2)`` reads it back whatever the split's name). The candidate carries
    its split and kind itself: nothing needs to parse the key."""
    return f"{split}|{kind}|{rank}"


def held_winners(gallery: dict[str, GalleryCandidate], split: str, kind: str) -> list[GalleryCandidate]:
    held = []
    for rank in range(1, capacity(split, kind) + 1):
        if slot(split, kind, rank) not in gallery:
            break
        held.append(gallery[slot(split, kind, rank)])
    return held


def offer_chunk(gallery: dict[str, GalleryCandidate], split: str, lung_mass: np.ndarray, p: np.ndarray,
                labels: np.ndarray, build: Callable[[int, str], GalleryCandidate]) -> None:
    """Offer one chunk of ``split``'s images to a cell's ``gallery``; ``build(row, kind)`` makes the
    candidate of a chunk row (copying its arrays), called only for the rows that enter."""
    # float64 throughout, so a score here equals the score the built candidate recomputes from its floats.
    lung_mass, p = np.asarray(lung_mass, dtype=np.float64), np.asarray(p, dtype=np.float64)
    decisions = decision_kinds(labels, p)
    for kind in kinds_shown(split):
        scores = GalleryCandidate.score_of(kind, lung_mass, p)
        eligible = np.isfinite(scores) & ((decisions == kind) if kind in DECISION_KINDS else True)
        rows = np.flatnonzero(eligible)
        rows = rows[np.argsort(-scores[rows], kind="stable")]  # best first, ties in row order
        limit, held, changed = capacity(split, kind), held_winners(gallery, split, kind), False
        for row in rows[:limit]:
            at = place(held, float(scores[row]), limit)
            if at is None:
                break  # the rows after it score no higher
            held.insert(at, build(int(row), kind))
            del held[limit:]
            changed = True
        if changed:
            _store(gallery, split, kind, held)


def _store(gallery: dict[str, GalleryCandidate], split: str, kind: str, held: list[GalleryCandidate]) -> None:
    # Removed and inserted again in rank order: a kind's entries iterate best first (the merge relies on it).
    for rank in range(1, capacity(split, kind) + 1):
        gallery.pop(slot(split, kind, rank), None)
    for rank, candidate in enumerate(held, start=1):
        gallery[slot(split, kind, rank)] = candidate


def merge_folds(cells: Iterable[CellResult]) -> dict[str, list[GalleryCandidate]]:
    """Per model, its gallery over all its folds, by the same strict rule (``cells`` in plan order,
    so ties keep the earlier fold), each image at most once per kind: internal kinds first
    (:data:`INTERNAL_KINDS` order), then the external splits by name, false positives before false
    negatives, best first."""
    chosen: dict[str, dict[tuple[str, str], list[GalleryCandidate]]] = {}
    for cell in cells:
        groups = chosen.setdefault(cell.model_id, {})
        for candidate in cell.gallery.values():
            key = (candidate.split, candidate.kind)
            held, limit = groups.setdefault(key, []), capacity(*key)
            # Every fold's model scores the whole external set: an image is shown once, with the map
            # of the fold most confident about it (ties: the earlier fold).
            twin = next((i for i, other in enumerate(held) if other.sample_id == candidate.sample_id), None)
            if twin is not None:
                if not candidate.score > held[twin].score:
                    continue
                del held[twin]
            at = place(held, candidate.score, limit)
            if at is not None:
                held.insert(at, candidate)
                del held[limit:]
    return {model_id: [candidate for key in sorted(groups, key=_group_order) for candidate in groups[key]]
            for model_id, groups in chosen.items()}


def _group_order(key: tuple[str, str]) -> tuple:
    split, kind = key
    return split != INTERNAL, split, INTERNAL_KINDS.index(kind) if kind in INTERNAL_KINDS else len(INTERNAL_KINDS)
