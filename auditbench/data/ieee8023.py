"""The "COVID-19 image data collection" (github ieee8023/covid-chestxray-dataset) as cloned.

Layout: ``metadata.csv`` + ``images/``, lung masks in ``annotations/v7labs-masks/<stem>.png``
(human, V7 Labs: 255 lung, 127 "Ignore" = artifact; at the image's original size, so a file of
another aspect ratio is recorded and not used) and ``annotations/lungVAE-masks/<stem>_mask.png``
(predicted by lungVAE, any size: stretched to the image).
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from auditbench.data.datasets import (
    DATASETS, csv_rows, inside, list_dir, read_mask_or_skip, read_or_skip, read_utf8, require_dir, require_samples,
)
from auditbench.data.io import ImageReadError, MaskError, read_v7_mask
from auditbench.data.records import DataError, LoadedDataset, Sample, SkippedFile

NAME = "ieee8023"
DEFAULT_VIEWS = ("PA", "AP", "AP Supine")  # frontal views; the lateral "L" is excluded
V7_DIR = Path("annotations/v7labs-masks")
LUNGVAE_DIR = Path("annotations/lungVAE-masks")
REQUIRED_COLUMNS = ("patientid", "finding", "view", "modality", "filename")

# finding -> raw label. Keywords are matched case-insensitively inside the finding text, first
# match wins: COVID-19 before SARS (SARS-CoV-2), specific organisms before the upstream
# hierarchy's generic "Viral"/"Bacterial"/"Fungal" (e.g. "Pneumonia/Viral/Influenza").
# Anything unmatched (Lipoid, Aspiration, Tuberculosis, ARDS alone, plain "Pneumonia") is "other".
FINDING_LABELS: tuple[tuple[str, str], ...] = (
    ("covid-19", "covid"),
    ("covid19", "covid"),
    ("sars-cov-2", "covid"),
    ("sars", "viral"),
    ("mers", "viral"),
    ("influenza", "viral"),
    ("h1n1", "viral"),
    ("varicella", "viral"),
    ("herpes", "viral"),
    ("streptococcus", "bacterial"),
    ("staphylococcus", "bacterial"),
    ("mrsa", "bacterial"),
    ("klebsiella", "bacterial"),
    ("legionella", "bacterial"),
    ("e.coli", "bacterial"),
    ("e. coli", "bacterial"),
    ("escherichia", "bacterial"),
    ("chlamydophila", "bacterial"),
    ("chlamydia", "bacterial"),
    ("mycoplasma", "bacterial"),
    ("nocardia", "bacterial"),
    ("pseudomonas", "bacterial"),
    ("haemophilus", "bacterial"),
    ("pneumocystis", "fungal"),
    ("aspergill", "fungal"),
    ("candida", "fungal"),
    ("histoplasm", "fungal"),
    ("cryptococc", "fungal"),
    ("viral", "viral"),
    ("bacterial", "bacterial"),
    ("fungal", "fungal"),
    ("no finding", "normal"),
)


def finding_label(finding: str, overrides: dict[str, str] | None = None) -> str:
    """Raw label of a ``finding``: an exact (case-insensitive) override, else :data:`FINDING_LABELS`."""
    text = finding.strip().lower()
    for key, label in (overrides or {}).items():
        if key.strip().lower() == text:
            return label
    for keyword, label in FINDING_LABELS:
        if keyword in text:
            return label
    return "other"


def _options(options: dict) -> tuple[set[str], dict[str, str]]:
    views = options.get("views", list(DEFAULT_VIEWS))
    if isinstance(views, str):
        views = [views]
    if not isinstance(views, (list, tuple)) or not all(isinstance(v, str) for v in views):
        raise DataError(f"{NAME}: option 'views' must be a list of view names, got {views!r}")
    finding_map = options.get("finding_map") or {}
    if not isinstance(finding_map, dict) or not all(isinstance(v, str) for v in finding_map.values()):
        raise DataError(f"{NAME}: option 'finding_map' must map finding -> label, got {finding_map!r}")
    return {v.strip() for v in views}, finding_map


def _masks(root: Path, stem: str, shape: tuple[int, int], source: str, skipped: list[SkippedFile]) -> dict:
    """Lung and artifact masks of one image: V7 first, lungVAE for the lungs otherwise.

    A V7 file with no lung and no "Ignore" pixel is an image V7 did not annotate (the laterals):
    it counts as absent and is recorded. A V7 file with "Ignore" pixels but no lung gives the
    artifact mask only (recorded). An empty, non-binary or unreadable lungVAE mask is recorded and
    not used. The image is kept in every case.
    """
    found = {"lung_mask": None, "artifact_mask": None, "mask_source": "none", "artifact_mask_source": "none"}
    v7 = root / V7_DIR / f"{stem}.png"
    if v7.is_file():
        try:
            lung, ignore = read_v7_mask(v7, shape)
        except ImageReadError as exc:
            word = "unusable" if isinstance(exc, MaskError) else "unreadable"
            skipped.append(SkippedFile(str(v7), f"V7 mask {word}, image kept without it: {exc.reason}", source))
        else:
            if lung.any() or ignore.any():
                found.update(artifact_mask=ignore, artifact_mask_source="dataset-v7")
            if lung.any():
                found.update(lung_mask=lung, mask_source="dataset-v7")
            elif ignore.any():
                skipped.append(SkippedFile(str(v7), "V7 mask has no lung pixel: its Ignore (artifact) region is used, not its lungs", source))
            else:
                skipped.append(SkippedFile(str(v7), "V7 mask is empty (no lung or Ignore pixel): not annotated, image kept without it", source))
    vae = root / LUNGVAE_DIR / f"{stem}_mask.png"
    if found["lung_mask"] is None and vae.is_file():
        lung = read_mask_or_skip(vae, shape, "lungVAE lung", source, skipped, any_size=True)
        if lung is not None:
            found.update(lung_mask=lung, mask_source="dataset-lungvae")
    return found


@DATASETS.register(
    NAME,
    options={
        "views": f"views to keep (default {list(DEFAULT_VIEWS)}; 'L' is lateral)",
        "finding_map": "finding -> raw label, exact finding text, overriding the built-in table",
    },
)
def load(root: Path, options: dict, max_side: int | None) -> LoadedDataset:
    """X-ray rows of ``metadata.csv`` in the chosen views, labelled by :func:`finding_label`.

    Patient ids are ``ieee8023:<patientid>`` (the collection's name, so a second load of the
    same collection under another ``source`` keeps its patients together).
    """
    views, finding_map = _options(options)
    source = options["source"]
    require_dir(root, NAME, "metadata.csv and images/")
    metadata = root / "metadata.csv"
    if not metadata.is_file():
        raise DataError(f"{NAME}: {metadata} not found; {root} holds {list_dir(root)}")
    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    with io.StringIO(read_utf8(metadata), newline="") as handle:
        reader = csv.DictReader(handle, restval="")
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{NAME}: {metadata} lacks column(s) {missing}; found {reader.fieldnames}")
        line = reader.line_num + 1  # the line each record starts on (notes may span lines)
        for row in csv_rows(reader, metadata):
            start, line = line, reader.line_num + 1
            if row["modality"].strip() != "X-ray" or row["view"].strip() not in views:
                continue
            relative = Path(row.get("folder") or "images") / row["filename"].strip()
            path = root / relative
            if relative.is_absolute() or not inside(path, root):
                raise DataError(f"{metadata}, line {start}: image path {relative} leaves the data root {root}")
            image = read_or_skip(path, max_side, source, skipped)
            if image is None:
                continue
            samples.append(
                Sample(
                    sample_id=f"{NAME}:{relative.as_posix()}",
                    image=image,
                    label=finding_label(row["finding"], finding_map),
                    patient_id=f"{NAME}:{row['patientid'].strip()}",
                    source=source,
                    path=str(path),
                    view=row["view"].strip(),
                    extra={"finding": row["finding"].strip(), "metadata_line": start},
                    **_masks(root, path.stem, image.shape, source, skipped),
                )
            )
    require_samples(NAME, root, samples, skipped, f"X-ray rows of {metadata.name} with views {sorted(views)}")
    return LoadedDataset(samples, skipped)
