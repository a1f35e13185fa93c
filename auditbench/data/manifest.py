"""Any images listed in a CSV: ``path,label[,patient_id,lung_mask,artifact_mask,source,view]``.

Paths are relative to the CSV's folder and must stay inside it. Blank optional cells are fine;
other columns go to ``Sample.extra``. The CSV must be UTF-8. Masks must have their image's aspect
ratio (any size: they are nearest-resized to the image).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path, PureWindowsPath

from auditbench.data.datasets import (
    DATASETS, csv_rows, inside, read_mask_or_skip, read_or_skip, read_utf8, require_samples,
)
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


@DATASETS.register(NAME, options={})
def load(root: Path, options: dict, max_side: int | None) -> LoadedDataset:
    """The rows of the CSV ``root`` (or ``root/manifest.csv``).

    ``source`` per row comes from the ``source`` cell, else the ``source`` option (default
    "manifest"); sample and patient ids are prefixed with it, so set distinct sources when
    combining manifests. A blank ``patient_id`` makes the image its own patient. Masks read from
    the CSV have source "dataset"; a mask that cannot be used (unreadable, another aspect ratio,
    not binary, an empty lung mask) is recorded in ``skipped`` and the image kept without it. The
    same file listed twice (also as ``img/../img/x.png``) is kept once and recorded when both rows
    give the same label, and is an error naming both lines otherwise.
    """
    csv_path = manifest_file(root)
    base = csv_path.parent
    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    n_rows = 0
    listed: dict[Path, tuple[int, str]] = {}  # resolved image file -> (first line, label)
    with io.StringIO(read_utf8(csv_path), newline="") as handle:
        reader = csv.DictReader(handle, restval="")
        columns = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise DataError(f"{csv_path}: missing required column(s) {missing}; found columns {columns}")
        line = reader.line_num + 1
        for raw in csv_rows(reader, csv_path):
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
            n_rows += 1
            masks = {c: _resolve(row[c], base, csv_path, start, c) if row.get(c) else None for c in ("lung_mask", "artifact_mask")}
            resolved = path.resolve()
            if resolved in listed:
                line_before, label_before = listed[resolved]
                if label_before != row["label"]:
                    raise DataError(
                        f"{csv_path}, line {start}: {row['path']!r} is already listed on line {line_before} "
                        f"(the same file) with label {label_before!r}, here {row['label']!r}; one image cannot have two labels"
                    )
                reason = f"duplicate of line {line_before} of {csv_path.name} (line {start}: the same file, same label)"
                skipped.append(SkippedFile(os.path.join(base, row["path"]), reason, source))  # as written: ./x, a/../x
                continue
            listed[resolved] = (start, row["label"])
            image = read_or_skip(path, max_side, source, skipped)
            if image is None:
                continue
            lung = read_mask_or_skip(masks["lung_mask"], image.shape, "lung", source, skipped) if masks["lung_mask"] else None
            artifact = (
                read_mask_or_skip(masks["artifact_mask"], image.shape, "artifact", source, skipped)
                if masks["artifact_mask"] else None
            )
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
    if not n_rows:
        raise DataError(f"{csv_path}: no rows under the header {columns}")
    require_samples(NAME, csv_path, samples, skipped, f"the images listed in {csv_path.name}")
    return LoadedDataset(samples, skipped)
