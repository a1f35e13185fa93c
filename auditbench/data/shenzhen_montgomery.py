"""Shenzhen (CHNCXR_*) and Montgomery County (MCUCXR_*) chest X-rays with human lung masks, in the
pairs layout ``cxr/<name>.png`` + ``masks/<name>.png``; suffix ``_0`` normal, ``_1`` tuberculosis.

Adult screening films from two hospitals: a natural external test set ("normal adults must not be
called COVID").
"""
from __future__ import annotations

from pathlib import Path

from auditbench.data.datasets import dataset_adapter, read_or_skip, require_dir, require_samples
from auditbench.data.io import ImageReadError, read_mask
from auditbench.data.records import LoadedDataset, Sample, SkippedFile

NAME = "shenzhen_montgomery"
LABELS = {"0": "normal", "1": "tuberculosis"}
HOSPITALS = {"CHNCXR": "shenzhen", "MCUCXR": "montgomery"}


@dataset_adapter(NAME, options={"labels": f"raw labels to keep (default all of {sorted(LABELS.values())})"})
def load(root: Path, options: dict, max_side: int | None) -> LoadedDataset:
    """Every ``cxr/*.png`` with its ``masks/*.png`` lung mask; each image is its own patient."""
    require_dir(root / "cxr", NAME, "cxr/*.png and masks/*.png")
    keep = set(options.get("labels") or LABELS.values())
    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    source = options["source"]
    for path in sorted((root / "cxr").glob("*.png")):
        stem = path.stem
        label = LABELS.get(stem.rsplit("_", 1)[-1])
        if label is None:
            skipped.append(SkippedFile(str(path), "file name does not end in _0 (normal) or _1 (tuberculosis)", source))
            continue
        if label not in keep:
            continue
        image = read_or_skip(path, max_side, source, skipped)
        if image is None:
            continue
        mask_path = root / "masks" / path.name
        lung = None
        if mask_path.is_file():
            try:
                lung = read_mask(mask_path, image.shape)
            except ImageReadError as error:
                skipped.append(SkippedFile(str(mask_path), f"{error.reason} (image kept without its mask)", source))
        samples.append(
            Sample(
                sample_id=f"{NAME}:{stem}",
                image=image,
                label=label,
                patient_id=f"{NAME}:{stem}",
                source=source,
                lung_mask=lung,
                mask_source="dataset" if lung is not None else "none",
                path=str(path),
                view="PA",
                extra={"hospital": HOSPITALS.get(stem.split("_")[0], "unknown")},
            )
        )
    require_samples(NAME, root, samples, skipped, "cxr/*.png")
    return LoadedDataset(samples, skipped)
