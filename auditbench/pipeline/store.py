"""The content-addressed store of backbone passes, on disk in chunks, so a run's memory is bounded
by its batch, not its data.

An entry is one image in one model frame through one backbone: its frame and regions, pooled
features, last feature map and occluded copies. Its address is the image's :func:`content_key`
(sample id + image and mask bytes) inside a namespace that hashes everything else the numbers
depend on: backbone, weights (a weights file by its sha256; random init by its seed), frame,
border band, device and precision, and the versions of auditbench, torch and timm. An entry
therefore never serves a pass it does not equal.

Entries are written in chunks of up to :data:`CHUNK` images: one folder of ``.npy`` arrays per
chunk (no pickle), made in a temporary folder and renamed into place, so a reader -- a resumed run,
another worker, a later run with the same ``--cache`` -- sees a whole chunk or none. Readers map a
chunk, copy the rows they need and let it go: only pooled features (a few KB per image) stay in
memory. Without ``--cache`` the store lives in the run's staging folder and goes when the run ends.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from auditbench.data.prepare import Frames
from auditbench.data.transforms import FrameSpec

STORE_FORMAT = 2  # bump when a chunk's layout or meaning changes
CHUNK = 256  # images per chunk: the unit of writing and of memory while computing
FRAME_FIELDS = [f.name for f in dataclasses.fields(Frames)]


def store_namespace(backbone: str, weights: str, init_seed: int, frame: FrameSpec, border_fraction: float,
                    device: str) -> str:
    """The hash of everything besides the image that a backbone pass depends on."""
    weights_id = weights
    if weights not in ("imagenet", "none"):
        digest = hashlib.sha256()
        with open(weights, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        weights_id = f"sha256:{digest.hexdigest()}"
    versions = {}
    for package in ("auditbench", "torch", "timm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    description = {
        "format": STORE_FORMAT, "backbone": backbone, "weights": weights_id,
        "init_seed": init_seed if weights == "none" else None, "frame": dataclasses.asdict(frame),
        "border_fraction": border_fraction, "device": device, "versions": versions,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]


@dataclasses.dataclass(frozen=True)
class Location:
    chunk: str
    row: int
    has_maps: bool
    has_occlusion: bool

    def covers(self, maps: bool, occlusion: bool) -> bool:
        return (self.has_maps or not maps) and (self.has_occlusion or not occlusion)


class FeatureStore:
    """Entries by content key in chunk folders under ``folder/namespace``."""

    def __init__(self, folder: Path, namespace: str):
        self.folder = Path(folder) / namespace
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, Location] = {}
        self.entries_read = 0
        self.entries_written = 0
        for chunk in sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            self._add_to_index(chunk.name)
        self._preexisting = set(self.index)

    def _add_to_index(self, chunk: str) -> None:
        meta = json.loads((self.folder / chunk / "meta.json").read_text(encoding="utf-8"))
        for row, key in enumerate(meta["keys"]):
            held = self.index.get(key)
            location = Location(chunk, row, meta["maps"], meta["occlusion"])
            # A chunk with more (maps, occlusion) supersedes one with less.
            if held is None or (location.has_maps >= held.has_maps and location.has_occlusion >= held.has_occlusion):
                self.index[key] = location

    def missing(self, keys: list[str], maps: bool, occlusion: bool) -> list[str]:
        """Keys without an entry covering what is asked (each once, in order)."""
        return list(dict.fromkeys(k for k in keys if k not in self.index or not self.index[k].covers(maps, occlusion)))

    def note_reads(self, keys: list[str]) -> None:
        self.entries_read += len(set(keys) & self._preexisting)
        self._preexisting -= set(keys)

    # ----- writing ----------------------------------------------------------------------------

    def write_chunk(self, keys: list[str], frames: Frames, pooled: torch.Tensor, maps: torch.Tensor | None,
                    occluded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None) -> None:
        """One chunk: ``occluded[region] = (rows, filled images, pooled features)`` of its images that
        have the region in view."""
        name = hashlib.sha256("\0".join(keys).encode() + bytes([maps is not None, occluded is not None])).hexdigest()[:24]
        temporary = Path(tempfile.mkdtemp(dir=self.folder, prefix=f".{name}."))
        try:
            for field in FRAME_FIELDS:
                values = getattr(frames, field)
                np.save(temporary / f"{field}.npy", values.astype(str) if field == "artifact_status" else values)
            np.save(temporary / "pooled.npy", pooled.numpy())
            if maps is not None:
                np.save(temporary / "maps.npy", maps.numpy())
            for region, (rows, images, region_pooled) in (occluded or {}).items():
                np.save(temporary / f"occluded_{region}_rows.npy", rows)
                np.save(temporary / f"occluded_{region}_images.npy", images)
                np.save(temporary / f"occluded_{region}_pooled.npy", region_pooled)
            meta = {"format": STORE_FORMAT, "keys": keys, "maps": maps is not None, "occlusion": occluded is not None}
            (temporary / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
            try:
                os.rename(temporary, self.folder / name)
            except OSError:  # the same chunk written by another worker: theirs is equal
                shutil.rmtree(temporary, ignore_errors=True)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        self._add_to_index(name)
        self.entries_written += len(keys)

    # ----- reading ----------------------------------------------------------------------------

    def _by_chunk(self, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """chunk -> (positions in ``keys``, rows in the chunk)."""
        groups: dict[str, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            location = self.index[key]
            groups.setdefault(location.chunk, []).append((position, location.row))
        return {chunk: tuple(np.array(v, dtype=np.int64) for v in zip(*pairs)) for chunk, pairs in groups.items()}

    def gather(self, keys: list[str], array: str) -> np.ndarray:
        """Rows of one array (a frame field, ``pooled`` or ``maps``) for ``keys``, in order."""
        out = None
        for chunk, (positions, rows) in self._by_chunk(keys).items():
            values = np.load(self.folder / chunk / f"{array}.npy", mmap_mode="r")
            if out is None:
                out = np.empty((len(keys), *values.shape[1:]), dtype=values.dtype)
            out[positions] = values[rows]
            del values  # unmapped: only the rows asked for stay in memory
        if out is None:
            raise ValueError("gather of no keys")
        return out

    def gather_occluded(self, keys: list[str], region: str, with_images: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(positions in ``keys`` that have the region, their filled images or None, pooled features)."""
        positions, images, pooled = [], [], []
        for chunk, (chunk_positions, rows) in self._by_chunk(keys).items():
            folder = self.folder / chunk
            held_rows = np.load(folder / f"occluded_{region}_rows.npy")
            where = {row: i for i, row in enumerate(held_rows)}
            take = [(p, where[r]) for p, r in zip(chunk_positions, rows) if r in where]
            if not take:
                continue
            position, local = (np.array(v, dtype=np.int64) for v in zip(*take))
            positions.append(position)
            pooled.append(np.load(folder / f"occluded_{region}_pooled.npy", mmap_mode="r")[local])
            if with_images:
                images.append(np.load(folder / f"occluded_{region}_images.npy", mmap_mode="r")[local])
        if not positions:
            return np.empty(0, np.int64), None, np.empty((0, 0), np.float32)
        order = np.argsort(np.concatenate(positions), kind="stable")
        return (np.concatenate(positions)[order], np.concatenate(images)[order] if with_images else None,
                np.concatenate(pooled)[order])
