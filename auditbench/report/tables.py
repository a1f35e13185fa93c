"""The run's output tables (docs/tables.md): column names, reading with clear errors, writing."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditbench.report.csv_cells import PROVENANCE_COLUMNS, is_text, restore_cell, write_csv

GRID_COLUMNS = ["model_id", "method", "backbone", "weights", "hidden", "finetune", "augment", "crop", "task"]
"""Grid columns every protocol has; data axes (e.g. ``shortcut_strength``) follow them. ``method``: the
explanation method of the row (``explain.method``; one row per model and method)."""

RESULTS_COLUMNS = ["split", "fold", "metric", "value"]
"""results.csv: after the grid columns."""

MODEL_COLUMNS = ["n_folds", "input_size", "frame", "cam_layer", "cam_map_size", "cam_stride"]
"""models.csv: after the grid columns, before the ``<metric>_mean``/``_std``/``_ci_low``/``_ci_high`` groups."""

MODEL_TAIL_COLUMNS = [
    "not_applicable", "meets_constraints", "verified", "violations", "unverified", "rank", "selected", "pareto",
]
"""models.csv: after the metric pairs."""

IMAGE_COLUMNS = [
    "model_id", "method", "fold", "split", "sample_id", "source", "patient_id", "path", "label", "label_index",
    "prediction", "p_positive", "correct", "mask_source", "has_artifact", "artifact_status", "border_in_view",
]
"""images.csv: before one column per attention and occlusion metric."""

VALIDATION_COLUMNS = [
    "metric", "higher_is_better", "kind", "frame", "n_models", "n_relying", "n_not_relying", "mean_relying",
    "mean_not_relying", "auroc", "auroc_ci_low", "auroc_ci_high", "spearman", "spearman_ci_low", "spearman_ci_high",
    "separates",
]
SKIPPED_COLUMNS = ["path", "reason", "source"]
PROBE_REQUIRED_COLUMNS = [
    "backbone", "weights", "frame", "features", "probe", "label", "sources", "n_images", "n_patients",
    "balanced_accuracy", "chance", "adjusted", "ci_low", "ci_high", "adjusted_ci_low", "reason",
]
"""probes.csv (pipeline/probes.py): the columns the report reads."""
GALLERY_COLUMNS = ["model_id", "sample_id", "fold", "split", "kind", "label", "prediction", "p_positive",
                   "lung_mass", "file", "source"]
GALLERY_ADDED_COLUMNS = ["split", "prediction", "source"]
"""gallery.csv columns an older run lacks: before the gallery of decisions (its rows are internal
best / worst) ``split`` and ``prediction``; before the per-source examples ``source``."""

SUMMARY_KEYS = [
    "name", "run_id", "protocol_sha256", "seed", "selected_model", "selection", "metric_directions", "n_models", "n_images",
    "n_skipped", "warnings", "notes", "cam_layers", "device", "package_versions", "stage_seconds",
    "started", "finished", "auditbench_version", "manifest",
]

INTERNAL_SPLIT = "internal"
METHOD_KINDS = ("attention", "agreement", "faithfulness")
"""Metric kinds computed from one explanation method's maps (``audit.metrics``): their rows differ per method;
every other kind has the same value on each method's rows."""
SEPARATES_AUROC = 0.9
"""validation.csv: a metric ``separates`` shortcut-trained from clean models when auroc >= this."""

RESULTS_FILE = "results.csv"
MODELS_FILE = "models.csv"
IMAGES_FILE = "images.csv"
VALIDATION_FILE = "validation.csv"
SANITY_FILE = "sanity.csv"
PROBES_FILE = "probes.csv"
SKIPPED_FILE = "skipped.csv"
GALLERY_FILE = "gallery.csv"
SUMMARY_FILE = "summary.json"
GALLERY_DIR = "gallery"

# Identifiers and names stay text: pandas would turn a sample id "NA" into NaN or "007" into 7.
_TEXT_COLUMNS = {
    "model_id", "backbone", "weights", "task", "split", "metric", "sample_id", "source", "patient_id",
    "path", "label", "prediction", "mask_source", "violations", "not_applicable", "kind", "file", "reason",
    "unverified", "artifact_status", "frame", "cam_layer", "artifact_placement", "probe", "sources", "features",
    *PROVENANCE_COLUMNS,
}
_BOOL_COLUMNS = {
    "finetune", "augment", "crop", "selected", "meets_constraints", "pareto", "correct",
    "has_artifact", "higher_is_better", "separates", "verified", "border_in_view",
}

# file -> (columns it must have, whether the file may be absent or empty)
_FILES: dict[str, tuple[list[str], bool]] = {
    RESULTS_FILE: (["model_id", *RESULTS_COLUMNS], False),
    MODELS_FILE: (["model_id", *MODEL_COLUMNS, *MODEL_TAIL_COLUMNS], False),
    IMAGES_FILE: ([c for c in IMAGE_COLUMNS if c != "method"], False),  # a run before the method axis has none
    VALIDATION_FILE: (VALIDATION_COLUMNS, True),
    SKIPPED_FILE: (SKIPPED_COLUMNS, True),
    GALLERY_FILE: ([c for c in GALLERY_COLUMNS if c not in GALLERY_ADDED_COLUMNS], True),
    PROBES_FILE: (PROBE_REQUIRED_COLUMNS, True),
}


class ResultsError(ValueError):
    """A run's output folder lacks a required file, or a file is unreadable or malformed."""


@dataclass
class ResultTables:
    """All tables of one output folder; optional files are empty frames with their columns."""

    results: pd.DataFrame
    models: pd.DataFrame
    images: pd.DataFrame
    validation: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=VALIDATION_COLUMNS))
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SKIPPED_COLUMNS))
    gallery: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=GALLERY_COLUMNS))
    probes: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PROBE_REQUIRED_COLUMNS))
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None
    provenance: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    """CSV file -> the (run_id, protocol_sha256) pairs of its rows; the columns themselves are
    dropped from the frames. A file without provenance columns (an older run) is absent."""
    by_method: pd.DataFrame | None = None
    """models.csv whole: one row per model and explanation method. ``models``, ``results`` and
    ``images`` hold the primary method's rows only (``explain.method[0]``): what the ranking,
    the report's model sections and ``check`` read."""

    @property
    def methods(self) -> list[str]:
        """The explanation methods of the run, the primary first."""
        frame = self.by_method if self.by_method is not None else self.models
        return list(dict.fromkeys(frame["method"].astype(str))) if "method" in frame else []

    @property
    def grid_columns(self) -> list[str]:
        """models.csv columns before ``n_folds``: the grid columns plus the protocol's data axes."""
        columns = list(self.models.columns)
        return columns[: columns.index("n_folds")]

    @property
    def data_axes(self) -> list[str]:
        return [c for c in self.grid_columns if c not in GRID_COLUMNS]

    @property
    def metrics(self) -> list[str]:
        """Metric names that have a ``<metric>_mean`` column in models.csv, in column order."""
        return [c[: -len("_mean")] for c in self.models.columns if c.endswith("_mean")]

    @property
    def selected_model(self) -> str | None:
        """summary.json's ``selected_model``; models.csv's ``selected`` flag when the key is absent."""
        if "selected_model" in self.summary:
            chosen = self.summary["selected_model"]
            return str(chosen) if chosen not in (None, "") else None
        flagged = self.models.loc[self.models["selected"], "model_id"]
        return str(flagged.iloc[0]) if len(flagged) else None


def read_tables(out_dir: Path | str) -> ResultTables:
    """Read an output folder; raise ResultsError naming the missing or malformed file."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ResultsError(f"results folder {out_dir} does not exist or is not a folder")
    frames = {name: _read_csv(out_dir / name, columns, optional) for name, (columns, optional) in _FILES.items()}
    provenance = {}
    for name, frame in frames.items():
        if all(c in frame.columns for c in PROVENANCE_COLUMNS):
            provenance[name] = set(zip(frame["run_id"].astype(str), frame["protocol_sha256"].astype(str)))
            frames[name] = frame.drop(columns=PROVENANCE_COLUMNS)
    by_method = frames[MODELS_FILE]
    if by_method.empty:
        raise ResultsError(f"{out_dir / MODELS_FILE} has no models")
    keys = ["model_id", "method"] if "method" in by_method else ["model_id"]
    if by_method.duplicated(keys).any():
        duplicates = sorted(set(by_method.loc[by_method.duplicated(keys), "model_id"]))
        raise ResultsError(f"{out_dir / MODELS_FILE} lists models more than once: {', '.join(duplicates)}")
    primary = str(by_method["method"].iloc[0]) if "method" in by_method else None  # written primary first
    return ResultTables(
        results=primary_method_rows(frames[RESULTS_FILE], primary),
        models=primary_method_rows(by_method, primary),
        images=primary_method_rows(frames[IMAGES_FILE], primary),
        by_method=by_method,
        validation=frames[VALIDATION_FILE],
        skipped=frames[SKIPPED_FILE],
        gallery=frames[GALLERY_FILE],
        probes=frames[PROBES_FILE],
        summary=_read_summary(out_dir / SUMMARY_FILE),
        out_dir=out_dir,
        provenance=provenance,
    )


def primary_method_rows(frame: pd.DataFrame, primary: str | None) -> pd.DataFrame:
    """The rows of the primary explanation method (a table without ``method``: all of them)."""
    if primary is None or "method" not in frame:
        return frame
    return frame[frame["method"].astype(str) == primary].reset_index(drop=True)


def write_tables(tables: ResultTables, out_dir: Path | str) -> None:
    """Write every table and summary.json to ``out_dir`` (created); empty tables keep their header.

    Where ``tables.summary`` holds ``run_id`` and ``protocol_sha256``, every CSV carries them as its
    last columns, as a run writes them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = {
        RESULTS_FILE: tables.results,
        MODELS_FILE: tables.by_method if tables.by_method is not None else tables.models,
        IMAGES_FILE: tables.images,
        VALIDATION_FILE: tables.validation,
        SKIPPED_FILE: tables.skipped,
        GALLERY_FILE: tables.gallery,
        PROBES_FILE: tables.probes,
    }
    provenance = {c: tables.summary[c] for c in PROVENANCE_COLUMNS if tables.summary.get(c)}
    for name, frame in frames.items():
        write_csv(frame, out_dir / name, provenance if len(provenance) == len(PROVENANCE_COLUMNS) else None)
    text = json.dumps(_json_safe(tables.summary), indent=2, allow_nan=False)
    (out_dir / SUMMARY_FILE).write_text(text + "\n", encoding="utf-8")


def load_metrics() -> Any | None:
    """The ``audit.metrics.METRICS`` registry, or None where the audit stage is not installed."""
    try:
        from auditbench.audit.metrics import METRICS
    except ImportError:
        return None
    return METRICS


def as_bool(values: pd.Series) -> pd.Series:
    """Booleans from a CSV column that may hold True/False, true/false, 1/0 or blanks (False)."""
    if values.dtype == bool:
        return values
    text = values.astype(str).str.strip().str.lower()
    return text.isin(["true", "1", "1.0", "yes"])


def _read_csv(path: Path, required: list[str], optional: bool) -> pd.DataFrame:
    if not path.is_file():
        if optional:
            return pd.DataFrame(columns=required)
        raise ResultsError(f"missing results file {path}")
    try:
        raw = pd.read_csv(path, nrows=0).columns
        names = {c: restore_cell(c) for c in raw}  # column names are neutralised like cells
        # Default NA parsing only for non-text columns; text columns keep "", "NA", "None" as written.
        na_values = {c: ["", "nan", "NaN", "NA", "N/A", "null"] for c in raw if names[c] not in _TEXT_COLUMNS}
        dtype = {c: str for c in raw if names[c] in _TEXT_COLUMNS}
        frame = pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=na_values).rename(columns=names)
        for column in frame.columns:
            if is_text(frame[column]):
                frame[column] = frame[column].map(restore_cell)
    except pd.errors.EmptyDataError:
        if optional:
            return pd.DataFrame(columns=required)
        raise ResultsError(f"results file {path} is empty") from None
    except ValueError as error:  # pandas' ParserError and UnicodeDecodeError are ValueErrors
        raise ResultsError(f"cannot read results file {path}: {error}") from error
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ResultsError(f"results file {path} lacks column(s) {', '.join(missing)}")
    for column in _BOOL_COLUMNS & set(frame.columns):
        frame[column] = as_bool(frame[column])
    return frame.copy()  # one block per dtype again after the per-column rewrites (pandas' fragmentation warning)


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ResultsError(f"missing results file {path}")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsError(f"cannot read {path}: {error}") from error
    if not isinstance(summary, dict):
        raise ResultsError(f"{path} must hold a JSON object, found {type(summary).__name__}")
    return summary


def _json_safe(value: Any) -> Any:
    """NumPy scalars to Python, NaN/inf to null: summary.json stays strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
