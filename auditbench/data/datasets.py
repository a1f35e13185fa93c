"""The data set registry: name -> adapter that loads a public data set in its own layout.

An adapter has ``load(root, options, max_side) -> LoadedDataset``. Built-in adapters
(``ieee8023``, ``kermany``, ``manifest``, ``shenzhen_montgomery``) register on import of this module.
A data set is registered by decorating its load function (:mod:`auditbench.registry`)::

    @DATASETS.register("kermany", options={"splits": "upstream split folders to read"})
    def load(root: Path, options: dict, max_side: int | None) -> LoadedDataset: ...

which becomes a :class:`FunctionAdapter` (the decorator returns it). An object that already has a
matching ``load`` method is registered as it is with the low-level ``DATASETS.add("name", obj)``.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from auditbench.data.io import ImageReadError, MaskError, read_mask, read_xray
from auditbench.data.records import DataError, LoadedDataset, Sample, SkippedFile
from auditbench.registry import Registry

LoadFunction = Callable[[Path, dict, Any], LoadedDataset]  # (root, options, max_side)

# Options every adapter accepts.
COMMON_OPTIONS = {"source": "name written to Sample.source (default: the data set's name)"}


class DatasetAdapter(Protocol):
    def load(self, root: Path, options: dict, max_side: int | None) -> LoadedDataset: ...


@dataclass(frozen=True)
class FunctionAdapter:
    """The entry type of :data:`DATASETS`: a data set made of its function and what it declares.

    A **reader** (the default) has a load function ``(root, options, max_side) -> LoadedDataset`` and
    the options it accepts (name -> description; :data:`COMMON_OPTIONS` are added). ``load`` rejects
    an unknown option (DataError naming it and the accepted ones), defaults ``source`` to the data
    set's name, then calls the function.

    A **generator** (``axes`` given) makes its images: its function is ``(protocol, task, axis_values,
    check_folds) -> TaskData`` (:meth:`task_data`); ``axes(protocol)`` gives the grid axes of its data
    (name -> values), ``axis_fields`` the protocol field each axis is read from, and ``known_answer``
    the behavioural metric it makes measurable (the validation's ground truth), if any.
    """

    name: str
    function: Callable[..., Any]
    options: Mapping[str, str] = field(default_factory=dict)
    axes: Callable[[Any], dict[str, list]] | None = None
    axis_fields: Mapping[str, str] = field(default_factory=dict)
    known_answer: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", {**COMMON_OPTIONS, **self.options})

    @property
    def generates(self) -> bool:
        return self.axes is not None

    def load(self, root: Path, options: dict | None, max_side: int | None) -> LoadedDataset:
        if self.generates:
            raise DataError(f"data set {self.name!r} generates its images and reads no folder: use "
                            f"data.dataset: {self.name}, not a data.sources entry")
        options = dict(options or {})
        check_options(self.name, options, self.options)
        options.setdefault("source", self.name)
        loaded = self.function(Path(root), options, max_side)
        remove_duplicates(loaded)
        return loaded

    def task_data(self, protocol, task, axis_values: dict, check_folds: bool = True):
        """A generator's images of one task and one cell of its data axes (``TaskData``)."""
        if not self.generates:
            raise DataError(f"data set {self.name!r} reads files: list it under data.sources")
        return self.function(protocol, task, axis_values, check_folds)


DATASETS = Registry[DatasetAdapter]("dataset", entry=FunctionAdapter)


def check_options(dataset: str, options: Mapping[str, Any], allowed: Mapping[str, str]) -> None:
    """Raise DataError naming each unknown option, with close names and the accepted list."""
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(
                f"unknown option {key!r} for data set {dataset!r}{hint} (accepted: {', '.join(sorted(allowed))})"
            )


def load_dataset(name: str, root: str | Path, options: dict | None = None, max_side: int | None = 512) -> LoadedDataset:
    """Load data set ``name`` from ``root`` through the registry."""
    return DATASETS.get(name).load(Path(root), dict(options or {}), max_side)


def require_dir(path: Path, dataset: str, expected: str) -> None:
    """Raise DataError naming ``path`` and what is there when it is not a folder."""
    if not path.exists():
        raise DataError(f"{dataset}: data root not found: {path} (expected {expected})")
    if not path.is_dir():
        raise DataError(f"{dataset}: {path} is a file, expected a folder holding {expected}")


def list_dir(path: Path, limit: int = 8) -> str:
    """A short listing of a folder's entries, for error messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()) if path.is_dir() else []
    if not names:
        return "nothing (empty folder)"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def read_utf8(path: Path) -> str:
    """The text of a CSV file (UTF-8, optional BOM), or DataError naming the line and byte that is not UTF-8
    (:mod:`auditbench.textio`, shared with the protocol loader)."""
    from auditbench.textio import NotUtf8, read_utf8_text

    try:
        return read_utf8_text(path, strip_bom=True)
    except NotUtf8 as exc:
        raise DataError(
            f"{exc.where} (column {exc.column}) is not UTF-8; save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def csv_rows(reader, path: Path):
    """The rows of a ``csv`` reader; a malformed CSV becomes DataError naming the file and line."""
    try:
        yield from reader
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: not a readable CSV ({exc})") from None


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def read_or_skip(path: Path, max_side: int | None, source: str, skipped: list[SkippedFile]) -> np.ndarray | None:
    """``read_xray(path)``, or None after recording the file and reason in ``skipped``.

    A blank image (every pixel within one 8-bit grey level of the others) is recorded too: it
    holds nothing to classify or explain.
    """
    try:
        image = read_xray(path, max_side)
        blank_image_check(image, path)
    except ImageReadError as exc:
        skipped.append(SkippedFile(path=str(path), reason=exc.reason, source=source))
        return None
    return image


def blank_image_check(image: np.ndarray, path: Path) -> None:
    """Raise :class:`ImageReadError` for a constant (blank) image."""
    low, high = float(image.min()), float(image.max())
    if high - low < 1.0 / 255.0:
        shown = f"every pixel is {low:.3f}" if high == low else f"every pixel lies in {low:.4f}..{high:.4f}"
        raise ImageReadError(path, f"blank image: {shown} (constant, nothing to see)")


def read_mask_or_skip(
    path: Path, shape: tuple[int, int], kind: str, source: str, skipped: list[SkippedFile],
    any_size: bool = False, empty_ok: bool | None = None,
) -> np.ndarray | None:
    """A ``kind`` mask ("lung", "artifact", ...) for an image of ``shape``, or None after recording
    in ``skipped`` why the mask was not used (the image is kept without it).

    Recorded: unreadable files, another aspect ratio than the image's (unless ``any_size``),
    non-binary values, a mask marking every pixel, and an empty mask unless ``empty_ok``
    (default: only artifact masks may be empty, saying the image has no artifact).
    """
    if empty_ok is None:
        empty_ok = kind == "artifact"
    try:
        mask = read_mask(path, shape, any_size=any_size)
    except ImageReadError as exc:
        word = "unusable" if isinstance(exc, MaskError) else "unreadable"
        skipped.append(SkippedFile(str(path), f"{kind} mask {word}, image kept without it: {exc.reason}", source))
        return None
    if not empty_ok and not mask.any():
        skipped.append(SkippedFile(str(path), f"{kind} mask is empty (no foreground pixel), image kept without it", source))
        return None
    return mask


def pixel_hash(image: np.ndarray) -> str:
    """A digest of an image's pixels and shape: equal for the same picture read twice."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def remove_duplicates(loaded: LoadedDataset, kept: list[Sample] | None = None, where: str = "") -> None:
    """Keep each image once: the same file (symlinks and ``..`` resolved) or the same pixels.

    ``kept``: samples loaded before (another source, the training sources of an external set)
    that win over ``loaded``'s. A later copy with the same label is dropped and recorded in
    ``loaded.skipped`` ("duplicate of <first file>"); the same image with another label raises
    :class:`DataError` naming both files.
    """
    by_path: dict[Path, Sample] = {}
    by_pixels: dict[str, Sample] = {}

    def index(sample: Sample, resolved: Path | None, pixels: str) -> None:
        if resolved is not None:
            by_path.setdefault(resolved, sample)
        by_pixels.setdefault(pixels, sample)

    for sample in kept or []:
        index(sample, Path(sample.path).resolve() if sample.path else None, pixel_hash(sample.image))
    unique = []
    for sample in loaded.samples:
        resolved = Path(sample.path).resolve() if sample.path else None
        pixels = pixel_hash(sample.image)
        first, how = by_path.get(resolved) if resolved is not None else None, "the same file"
        if first is None:
            first, how = by_pixels.get(pixels), "the same pixels"
        if first is None:
            index(sample, resolved, pixels)
            unique.append(sample)
            continue
        if first.label != sample.label:
            raise DataError(
                f"the same image has two labels{where}: {sample.path or sample.sample_id} (label {sample.label!r}, "
                f"source {sample.source!r}) and {first.path or first.sample_id} (label {first.label!r}, source "
                f"{first.source!r}) are {how}; fix the label of one or remove it"
            )
        reason = f"duplicate of {first.path or first.sample_id} ({how}, same label {sample.label!r}){where}"
        loaded.skipped.append(SkippedFile(sample.path or sample.sample_id, reason, sample.source))
    loaded.samples[:] = unique


def require_samples(dataset: str, root: Path, samples: list[Sample], skipped: list[SkippedFile], looked_for: str) -> None:
    """Raise DataError when nothing usable was found, saying where and what was there instead."""
    if samples:
        return
    if skipped:
        reasons = "; ".join(f"{Path(s.path).name}: {s.reason}" for s in skipped[:3])
        found = f"{len(skipped)} file(s), none readable ({reasons}{', ...' if len(skipped) > 3 else ''})"
    else:
        found = list_dir(root)
    raise DataError(f"{dataset}: no usable images under {root} (looked for {looked_for}); found {found}")


def generator_of(protocol) -> FunctionAdapter | None:
    """The generator that makes a protocol's data (``data.dataset``), or None for ``data.sources``."""
    if protocol.data.dataset == "sources":
        return None
    adapter = DATASETS.get(protocol.data.dataset)
    if not getattr(adapter, "generates", False):
        raise DataError(f"data.dataset: {protocol.data.dataset!r} reads files; use data.dataset: sources and list it "
                        f"under data.sources (generators: {', '.join(generator_names()) or 'none'})")
    return adapter


def generator_names() -> list[str]:
    return [name for name, adapter in DATASETS.items() if getattr(adapter, "generates", False)]


def data_axes(protocol) -> dict[str, list]:
    """The grid axes of a protocol's data, as its generator declares them (real data: none)."""
    generator = generator_of(protocol)
    return generator.axes(protocol) if generator is not None else {}


def _register_builtin() -> None:
    for module in ("ieee8023", "kermany", "manifest", "shenzhen_montgomery", "synthetic_adapter"):
        importlib.import_module(f"auditbench.data.{module}")


_register_builtin()
