"""The data set registry: name -> adapter that loads a public data set in its own layout.

An adapter has ``load(root, options, max_side) -> LoadedDataset``. Built-in adapters
(``ieee8023``, ``kermany``, ``manifest``) register on import of this module; other modules add
theirs with ``@dataset_adapter("name", options={...})`` on a load function, or
``DATASETS.add("name", obj)`` for any object with a matching ``load`` method.
"""
from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from auditbench.data.io import ImageReadError, read_xray
from auditbench.data.records import DataError, LoadedDataset, Sample, SkippedFile
from auditbench.registry import Registry

LoadFunction = Callable[[Path, dict, Any], LoadedDataset]  # (root, options, max_side)

# Options every adapter accepts.
COMMON_OPTIONS = {"source": "name written to Sample.source (default: the data set's name)"}


class DatasetAdapter(Protocol):
    def load(self, root: Path, options: dict, max_side: int | None) -> LoadedDataset: ...


DATASETS = Registry[DatasetAdapter]("dataset")


@dataclass(frozen=True)
class FunctionAdapter:
    """An adapter made of a load function and the options it accepts (name -> description).

    ``load`` rejects an unknown option (DataError naming it and the accepted ones), defaults
    ``source`` to the data set's name, then calls the function.
    """

    name: str
    function: LoadFunction
    options: Mapping[str, str]

    def load(self, root: Path, options: dict | None, max_side: int | None) -> LoadedDataset:
        options = dict(options or {})
        check_options(self.name, options, self.options)
        options.setdefault("source", self.name)
        return self.function(Path(root), options, max_side)


def dataset_adapter(name: str, options: Mapping[str, str]) -> Callable[[LoadFunction], LoadFunction]:
    """Register ``function(root, options, max_side)`` as data set ``name``; returns it unchanged."""

    def decorator(function: LoadFunction) -> LoadFunction:
        DATASETS.add(name, FunctionAdapter(name, function, {**COMMON_OPTIONS, **options}))
        return function

    return decorator


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


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def read_or_skip(path: Path, max_side: int | None, source: str, skipped: list[SkippedFile]) -> np.ndarray | None:
    """``read_xray(path)``, or None after recording the file and reason in ``skipped``."""
    try:
        return read_xray(path, max_side)
    except ImageReadError as exc:
        skipped.append(SkippedFile(path=str(path), reason=exc.reason, source=source))
        return None


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


def _register_builtin() -> None:
    for module in ("ieee8023", "kermany", "manifest", "shenzhen_montgomery"):
        importlib.import_module(f"auditbench.data.{module}")


_register_builtin()
