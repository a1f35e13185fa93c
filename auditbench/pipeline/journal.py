"""The run's journal: each finished model x fold (:class:`CellResult`) written atomically as it
finishes, so that a run killed at any point -- even by SIGKILL -- resumes without recomputing a
finished cell, and its tables come out byte for byte as an uninterrupted run's.

One ``.npz`` per cell (no pickle): the rows and counters as JSON text (Python's float repr round-
trips every double exactly, NaN included), the gallery images as arrays. The journal's header names
the protocol hash and run id: a journal of another protocol is never resumed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from auditbench.pipeline.records import CellKey, CellResult, GalleryCandidate

JOURNAL_DIR = "cells"
HEADER_FILE = "journal.json"
JOURNAL_FORMAT = 7  # 2: cells carry sanity_rows; 3: gallery candidates carry their source; 4: rows per explanation method;
# 5: rows carry the faithfulness metrics (deletion, insertion, ROAD); 6: cells carry probe_rows; 7: probe rows name
# their model (fine-tuned models are probed on their own backbone), expensive methods' maps are bounded
_ARRAYS = ("image", "heatmap", "lung", "artifact")


def _array_key(index: int, name: str) -> str:
    """The npz key of one array of the ``index``-th gallery candidate (the record's gallery keeps its
    order): a gallery key holds a split's name, which may hold any character, so it is not used."""
    return f"gallery{index}_{name}"


class CellJournal:
    """``identity``: what a journalled cell's numbers depend on besides the protocol -- run id,
    data fingerprint, code version. A journal whose identity differs is emptied, not resumed."""

    def __init__(self, staging: Path, identity: dict[str, str]):
        self.folder = Path(staging) / JOURNAL_DIR
        self.identity = {"format": JOURNAL_FORMAT, **identity}

    # ----- header -----------------------------------------------------------------------------

    def open(self) -> str | None:
        """Create the journal or keep a matching one; where an interrupted run's journal does not
        match (changed data or code), drop its cells and return a line saying why."""
        self.folder.mkdir(exist_ok=True)
        message = None
        try:
            held = json.loads((self.folder / HEADER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            held = None
        if held is not None and held != self.identity:
            changed = sorted(k for k in set(held) | set(self.identity) if held.get(k) != self.identity.get(k))
            cells = list(self.folder.glob("cell-*.npz"))
            for path in cells:
                path.unlink()
            message = (f"not resuming the {len(cells)} finished cells of the interrupted run: its "
                       f"{', '.join(changed)} differ from this run's; starting over")
        _write_atomic(self.folder / HEADER_FILE, json.dumps(self.identity, sort_keys=True).encode())
        return message

    def remove(self) -> None:
        """Delete the journal (the run wrote every file in it)."""
        for path in self.folder.glob("*"):
            path.unlink()
        self.folder.rmdir()

    @staticmethod
    def resumable(staging: Path, protocol_sha256: str) -> str | None:
        """The run id of the journal in ``staging`` if it records this protocol; else None."""
        try:
            header = json.loads((Path(staging) / JOURNAL_DIR / HEADER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if header.get("format") != JOURNAL_FORMAT or header.get("protocol_sha256") != protocol_sha256:
            return None
        return header.get("run_id") if isinstance(header.get("run_id"), str) else None

    # ----- cells ------------------------------------------------------------------------------

    def _path(self, key: CellKey) -> Path:
        name = hashlib.sha256(f"{key.model_id}\0{key.fold}".encode()).hexdigest()[:24]
        return self.folder / f"cell-{name}.npz"

    def write(self, result: CellResult) -> None:
        record = {
            "model_id": result.model_id, "fold": result.fold, "results_rows": result.results_rows,
            "image_rows": result.image_rows, "cam_geometry": result.cam_geometry, "cam_layer": result.cam_layer,
            "warnings": dict(result.warnings), "heatmaps_evaluated": dict(result.heatmaps_evaluated),
            "undefined_heatmaps": dict(result.undefined_heatmaps), "stage_seconds": result.stage_seconds,
            "sanity_rows": result.sanity_rows,
            "probe_rows": result.probe_rows,
            "gallery": {kind: {k: v for k, v in vars(c).items() if k not in _ARRAYS} for kind, c in result.gallery.items()},
        }
        arrays = {"record": np.array(json.dumps(record))}
        for index, candidate in enumerate(result.gallery.values()):
            arrays.update({_array_key(index, name): getattr(candidate, name) for name in _ARRAYS})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _write_atomic(self._path(result.key), buffer.getvalue())

    def read(self, key: CellKey) -> CellResult | None:
        """The journalled result of ``key``, or None where it is absent or unreadable (recomputed)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                record = json.loads(str(data["record"]))
                gallery = {
                    key: GalleryCandidate(**meta, **{name: data[_array_key(index, name)] for name in _ARRAYS})
                    for index, (key, meta) in enumerate(record["gallery"].items())
                }
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if (record["model_id"], record["fold"]) != (key.model_id, key.fold):
            return None
        return CellResult(
            record["model_id"], record["fold"], record["results_rows"], record["image_rows"], gallery,
            record["cam_geometry"], record["cam_layer"], Counter(record["warnings"]),
            Counter(record["heatmaps_evaluated"]), Counter(record["undefined_heatmaps"]), record["stage_seconds"],
            record["sanity_rows"], record["probe_rows"],
        )


def _write_atomic(path: Path, payload: bytes) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
