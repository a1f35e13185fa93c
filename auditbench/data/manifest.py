"""Any images listed in a CSV: ``path,label[,patient_id,lung_mask,artifact_mask,source,view]``.

Paths are relative to the CSV's folder and must stay inside it. Blank optional cells are fine;
other columns go to ``Sample.extra``.
"""
from __future__ import annotations

import csv
from pathlib import Path, PureWindowsPath

import numpy as np

from auditbench.data.datasets import dataset_adapter, inside, read_or_skip, require_samples
from auditbench.data.io import ImageReadError, read_mask
from auditbench.data.records import DataError, LoadedDataset, Sample, SkippedFile

NAME = "manifest"
DEFAULT_FILE = "manifest.csv"
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("patient_id", "lung_mask", "artifact_mask", "source", "view")


def manifest_file(root: Path) -> Path:
    """``root`` itself when it is a CSV file, else ``root/manifest.csv``."""
    path = root / DEFAULT_FILE if root.is_dir() else root
    if not path.is_file():
        where = f"{root} holds no {DEFAULT_FILE}" if root.is_dir() else f"{root} not found"
        raise DataError(f"{NAME}: manifest CSV not found: {where}")
    return path


def _resolve(cell: str, base: Path, csv_path: Path, line: int, column: str) -> Path:
    """``base / cell``, or DataError naming the CSV line when the path leaves ``base``."""
    relative = Path(cell)
    if relative.is_absolute() or PureWindowsPath(cell).drive:
        raise DataError(f"{csv_path}, line {line}: {column} {cell!r} is absolute; paths must be relative to {base}")
    path = base / relative
    if not inside(path, base):  # '..' or a symlink that points elsewhere
        raise DataError(f"{csv_path}, line {line}: {column} {cell!r} resolves outside the manifest's folder {base}")
    return path


def _mask(path: Path | None, shape: tuple[int, int], kind: str, source: str, skipped: list[SkippedFile]) -> np.ndarray | None:
    if path is None:
        return None
    try:
        return read_mask(path, shape)
    except ImageReadError as exc:
        skipped.append(SkippedFile(str(path), f"{kind} mask unreadable, image kept: {exc.reason}", source))
        return None


@dataset_adapter(NAME, options={})
def load(root: Path, options: dict, max_side: int | None) -> LoadedDataset:
    """The rows of the CSV ``root`` (or ``root/manifest.csv``).

    ``source`` per row comes from the ``source`` cell, else the ``source`` option (default
    "manifest"); sample and patient ids are prefixed with it, so set distinct sources when
    combining manifests. A blank ``patient_id`` makes the image its own patient. Masks read from
    the CSV have source "dataset"; an all-false lung mask counts as none.
    """
    csv_path = manifest_file(root)
    base = csv_path.parent
    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    first_line: dict[str, int] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, restval="")
        columns = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"{csv_path}: missing required column(s) {missing}; found columns {columns}")
        line = reader.line_num + 1
        for raw in reader:
            start, line = line, reader.line_num + 1
            # Cells past the header land under key None as a list; they carry no column name.
            row = {(k or "").strip(): v.strip() if isinstance(v, str) else "" for k, v in raw.items()}
            if not any(row.values()):
                continue  # blank line
            for column in REQUIRED_COLUMNS:
                if not row[column]:
                    raise DataError(f"{csv_path}, line {start}: empty {column!r}")
            path = _resolve(row["path"], base, csv_path, start, "path")
            source = row.get("source") or options["source"]
            sample_id = f"{source}:{Path(row['path']).as_posix()}"
            if sample_id in first_line:
                raise DataError(f"{csv_path}, line {start}: {row['path']!r} is already listed on line {first_line[sample_id]}")
            first_line[sample_id] = start
            masks = {c: _resolve(row[c], base, csv_path, start, c) if row.get(c) else None for c in ("lung_mask", "artifact_mask")}
            image = read_or_skip(path, max_side, source, skipped)
            if image is None:
                continue
            lung = _mask(masks["lung_mask"], image.shape, "lung", source, skipped)
            lung = lung if lung is not None and lung.any() else None
            artifact = _mask(masks["artifact_mask"], image.shape, "artifact", source, skipped)
            samples.append(
                Sample(
                    sample_id=sample_id,
                    image=image,
                    label=row["label"],
                    patient_id=f"{source}:{row.get('patient_id') or row['path']}",
                    source=source,
                    lung_mask=lung,
                    artifact_mask=artifact,
                    mask_source="dataset" if lung is not None else "none",
                    artifact_mask_source="dataset" if artifact is not None else "none",
                    path=str(path),
                    view=row.get("view", ""),
                    extra={
                        "manifest_line": start,
                        **{k: v for k, v in row.items() if k and k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS},
                    },
                )
            )
    if not first_line:
        raise DataError(f"{csv_path}: no rows under the header {columns}")
    require_samples(NAME, csv_path, samples, skipped, f"the images listed in {csv_path.name}")
    return LoadedDataset(samples, skipped)
