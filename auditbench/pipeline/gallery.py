"""Which test images a model's gallery shows: chosen while the images stream past, a chunk at a
time, and merged over folds by one strict rule.

Per model the gallery holds, each image with its Grad-CAM overlay:

- on the internal split, the image of the highest ("best") and lowest ("worst") lung_mass, and the
  most confident true positive, false positive, false negative and true negative;
- on every external split, its errors: the :data:`EXTERNAL_ERRORS` most confident false positives
  and false negatives (a set of healthy adults gives false positives only), each image once although
  every fold's model scores it;
- on every split, per data source (images.csv's ``source``): the most confident correct decision
  ("source_correct") and the most confident wrong one ("source_wrong"), for the first
  :data:`SOURCE_EXAMPLE_SOURCES` sources of the split by name (a bound on the gallery whatever the
  data holds).

Confidence is the probability of the call the model made: p for a positive call, 1 - p for a
negative one (:meth:`GalleryCandidate.score_of`). A candidate displaces a held one only when it
ranks strictly higher; images arrive in plan order (folds, chunks and rows in order), so ties keep
the earliest. Only the current winners are held, their arrays copied, so memory stays bounded
however large a split is.
"""
from __future__ import annotations

from typing import Callable, Iterable

import json

import numpy as np

from auditbench.pipeline.records import SOURCE_KINDS, THRESHOLD, CellResult, GalleryCandidate

INTERNAL = "internal"
LUNG_MASS_KINDS = ("best", "worst")
DECISION_KINDS = ("tp", "fp", "fn", "tn")
ERROR_KINDS = ("fp", "fn")
INTERNAL_KINDS = LUNG_MASS_KINDS + DECISION_KINDS
EXTERNAL_ERRORS = 2
"""Most confident errors of each kind kept per model and external set."""
SOURCE_EXAMPLE_SOURCES = 8
"""Sources per model and split that get examples (source_correct, source_wrong): the first by name."""


def kinds_shown(split: str) -> tuple[str, ...]:
    return INTERNAL_KINDS if split == INTERNAL else ERROR_KINDS


def capacity(split: str, kind: str) -> int:
    """How many images of ``kind`` the gallery keeps per model on ``split`` (per source for
    :data:`SOURCE_KINDS`)."""
    if kind in SOURCE_KINDS:
        return 1
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


def source_slot(split: str, source: str, kind: str) -> str:
    """The key of a per-source example in :attr:`CellResult.gallery`: JSON, since a split's and a
    source's name may hold any character (it ends with "]", a :func:`slot` key with a digit)."""
    return json.dumps([split, source, kind])


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


def offer_sources(gallery: dict[str, GalleryCandidate], split: str, p: np.ndarray, labels: np.ndarray,
                  sources: np.ndarray, build: Callable[[int, str], GalleryCandidate]) -> None:
    """Offer one chunk to the per-source examples of ``split``: per source, the most confident correct
    and the most confident wrong decision (a candidate displaces the held one only when strictly more
    confident, so ties keep the earliest); then only the first :data:`SOURCE_EXAMPLE_SOURCES` sources
    by name are kept."""
    p = np.asarray(p, dtype=np.float64)
    sources = np.asarray([str(s) for s in sources], dtype=object)
    decisions = decision_kinds(labels, p)
    correct = (decisions == "tp") | (decisions == "tn")
    confidence = GalleryCandidate.score_of(SOURCE_KINDS[0], np.full(len(p), np.nan), p)
    for source in sorted(set(sources)):
        for kind, eligible in zip(SOURCE_KINDS, (correct, ~correct)):
            rows = np.flatnonzero((sources == source) & eligible & np.isfinite(confidence))
            if not len(rows):
                continue
            row = int(rows[np.argmax(confidence[rows])])  # argmax: the first of equals
            key, held = source_slot(split, source, kind), gallery.get(source_slot(split, source, kind))
            if held is None or confidence[row] > held.score:
                gallery[key] = build(row, kind)
    _cap_sources(gallery, split)


def _cap_sources(gallery: dict[str, GalleryCandidate], split: str) -> None:
    """Keep the examples of the first :data:`SOURCE_EXAMPLE_SOURCES` sources of ``split`` by name."""
    names = sorted({c.source for c in gallery.values() if c.split == split and c.kind in SOURCE_KINDS})
    for source in names[SOURCE_EXAMPLE_SOURCES:]:
        for kind in SOURCE_KINDS:
            gallery.pop(source_slot(split, source, kind), None)


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
    negatives, best first; within each split its per-source examples follow, by source name,
    correct before wrong, for the first :data:`SOURCE_EXAMPLE_SOURCES` sources."""
    chosen: dict[str, dict[tuple[str, str, str], list[GalleryCandidate]]] = {}
    for cell in cells:
        groups = chosen.setdefault(cell.model_id, {})
        for candidate in cell.gallery.values():
            key = _group(candidate)
            held, limit = groups.setdefault(key, []), capacity(candidate.split, candidate.kind)
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
    for groups in chosen.values():
        for split in {split for split, kind, _ in groups if kind in SOURCE_KINDS}:
            names = sorted({source for s, kind, source in groups if s == split and kind in SOURCE_KINDS})
            for key in [k for k in groups if k[0] == split and k[1] in SOURCE_KINDS
                        and k[2] in names[SOURCE_EXAMPLE_SOURCES:]]:
                del groups[key]
    return {model_id: [candidate for key in sorted(groups, key=_group_order) for candidate in groups[key]]
            for model_id, groups in chosen.items()}


def _group(candidate: GalleryCandidate) -> tuple[str, str, str]:
    """(split, kind, source): the source counts only for the per-source examples."""
    return candidate.split, candidate.kind, candidate.source if candidate.kind in SOURCE_KINDS else ""


def _group_order(key: tuple[str, str, str]) -> tuple:
    split, kind, source = key
    per_source = kind in SOURCE_KINDS
    index = (SOURCE_KINDS.index(kind) if per_source else
             INTERNAL_KINDS.index(kind) if kind in INTERNAL_KINDS else len(INTERNAL_KINDS))
    return split != INTERNAL, split, per_source, source, index
