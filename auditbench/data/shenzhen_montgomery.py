"""Shenzhen (CHNCXR_*) and Montgomery County (MCUCXR_*) chest X-rays with human lung masks, in the
pairs layout ``cxr/<name>.png`` + ``masks/<name>.png``; suffix ``_0`` normal, ``_1`` tuberculosis.
Images may be any format :func:`auditbench.data.io.read_xray` reads (e.g. ``cxr/<name>.dcm``); the
mask is ``masks/<name>.png`` (or the image's own file name), with the image's aspect ratio.

Adult screening films from two hospitals: a natural external test set ("normal adults must not be
called COVID").
"""
from __future__ import annotations

from pathlib import Path

from auditbench.data.datasets import DATASETS, read_mask_or_skip, read_or_skip, require_dir, require_samples
from auditbench.data.io import IMAGE_SUFFIXES
from auditbench.data.records import LoadedDataset, Sample, SkippedFile

NAME = "shenzhen_montgomery"
LABELS = {"0": "normal", "1": "tuberculosis"}
HOSPITALS = {"CHNCXR": "shenzhen", "MCUCXR": "montgomery"}


@DATASETS.register(NAME, options={"labels": f"raw labels to keep (default all of {sorted(LABELS.values())})"})
def load(root: Path, options: dict, max_side: int | None) -> LoadedDataset:
    """Every image in ``cxr/`` with its ``masks/`` lung mask; each image is its own patient.

    A mask that cannot be used (unreadable, another aspect ratio, not binary, empty) is recorded in
    ``skipped``; the image is kept without it.
    """
    require_dir(root / "cxr", NAME, "cxr/*.png and masks/*.png")
    keep = set(options.get("labels") or LABELS.values())
    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    source = options["source"]
    files = [p for p in sorted((root / "cxr").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    for path in files:
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
        candidates = [root / "masks" / f"{stem}.png", root / "masks" / path.name]
        mask_path = next((c for c in candidates if c.is_file()), None)
        lung = read_mask_or_skip(mask_path, image.shape, "lung", source, skipped) if mask_path else None
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
    require_samples(NAME, root, samples, skipped, "images in cxr/")
    return LoadedDataset(samples, skipped)
