"""The content-addressed store of backbone passes.

An entry is one image in one model frame through one backbone: its frame and regions, pooled
features, last feature map and occluded copies. Its address is the image's :func:`content_key`
(sample id + image and mask bytes) inside a namespace that hashes everything else the numbers
depend on: backbone, weights (a weights file by its sha256; random init by its seed), frame,
border band, device and precision, and the versions of auditbench, torch and timm. An entry
therefore never serves a pass it does not equal.

Entries live in memory for the run; with a folder (``auditbench run --cache DIR``) they are also
written to disk, one ``.npz`` per entry (no pickle), written atomically, so a second run -- or
a resumed one -- on the same images reads them instead of running the backbone again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from auditbench.audit.occlusion import OCCLUSION_REGIONS
from auditbench.data.prepare import Frames
from auditbench.data.transforms import FrameSpec

STORE_FORMAT = 1  # bump when an entry's layout or meaning changes


@dataclass
class CachedSample:
    frames: Frames  # this one image
    pooled: torch.Tensor  # (1, C)
    feature_map: torch.Tensor | None  # (1, C, h, w)
    occluded: dict[str, tuple[np.ndarray, torch.Tensor]] | None  # region -> (filled image, pooled (1, C))

    def covers(self, keep_maps: bool, occlusion: bool) -> bool:
        return (not keep_maps or self.feature_map is not None) and (not occlusion or self.occluded is not None)


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


class FeatureStore:
    """Entries by content key: in memory, and on disk under ``folder/namespace`` when a folder is given."""

    def __init__(self, folder: Path | None = None, namespace: str = ""):
        self.folder = Path(folder) / namespace if folder is not None else None
        self._memory: dict[str, CachedSample] = {}
        self.read_from_disk = 0
        self.written_to_disk = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npz"

    def get(self, key: str) -> CachedSample | None:
        entry = self._memory.get(key)
        if entry is None and self.folder is not None and self._path(key).is_file():
            entry = self._memory[key] = _read_entry(self._path(key))
            self.read_from_disk += 1
        return entry

    def has(self, key: str, keep_maps: bool, occlusion: bool) -> bool:
        entry = self.get(key)
        return entry is not None and entry.covers(keep_maps, occlusion)

    def put(self, key: str, entry: CachedSample) -> None:
        self._memory[key] = entry
        if self.folder is not None:
            _write_entry(self._path(key), entry)
            self.written_to_disk += 1


_FRAME_FIELDS = [f.name for f in dataclasses.fields(Frames)]


def _write_entry(path: Path, entry: CachedSample) -> None:
    arrays = {f"frame_{name}": getattr(entry.frames, name) for name in _FRAME_FIELDS}
    arrays["frame_artifact_status"] = arrays["frame_artifact_status"].astype(str)
    arrays["pooled"] = entry.pooled.numpy()
    if entry.feature_map is not None:
        arrays["feature_map"] = entry.feature_map.numpy()
    for region, (image, pooled) in (entry.occluded or {}).items():
        arrays[f"occluded_{region}_image"] = image
        arrays[f"occluded_{region}_pooled"] = pooled.numpy()
    arrays["has_occlusion"] = np.array(entry.occluded is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: a reader (a resumed run, a second worker) sees the whole entry or none.
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_entry(path: Path) -> CachedSample:
    with np.load(path, allow_pickle=False) as data:
        frames = Frames(*(data[f"frame_{name}"] for name in _FRAME_FIELDS))
        occluded = None
        if bool(data["has_occlusion"]):
            occluded = {
                region: (data[f"occluded_{region}_image"], torch.from_numpy(data[f"occluded_{region}_pooled"]))
                for region in OCCLUSION_REGIONS if f"occluded_{region}_image" in data.files
            }
        feature_map = torch.from_numpy(data["feature_map"]) if "feature_map" in data.files else None
        return CachedSample(frames, torch.from_numpy(data["pooled"]), feature_map, occluded)
