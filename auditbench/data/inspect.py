"""What a data set root holds, as the adapter sees it: for ``auditbench data check ROOT --dataset NAME``."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from auditbench.data.datasets import load_dataset
from auditbench.data.records import SkippedFile


@dataclass
class DatasetReport:
    """Counts of one loaded data set. Mask counts are images per mask source ("none" = no mask)."""

    dataset: str
    root: str
    n_images: int
    n_patients: int
    labels: dict[str, int]
    label_patients: dict[str, int]
    sources: dict[str, int]
    views: dict[str, int]
    splits: dict[str, int]  # upstream split folder (extra["split"]); empty where the set has none
    lung_masks: dict[str, int]
    artifact_masks: dict[str, int]
    artifact_pixels: dict[str, int]  # per artifact mask source: images whose mask marks any pixel
    skipped: list[SkippedFile] = field(default_factory=list)


def _counts(values) -> dict[str, int]:
    return dict(sorted(Counter(values).items(), key=lambda item: (-item[1], item[0])))


def inspect_dataset(root: str | Path, dataset: str, options: dict | None = None, max_side: int | None = 128) -> DatasetReport:
    """Load ``dataset`` from ``root`` (images at ``max_side``, enough to count) and count what it holds.

    Raises what the adapter raises for a missing root or an empty class (DataError) or an
    unknown data set name (UnknownNameError).
    """
    loaded = load_dataset(dataset, root, options, max_side)
    samples = loaded.samples
    patients_per_label: dict[str, set[str]] = {}
    for sample in samples:
        patients_per_label.setdefault(sample.label, set()).add(sample.patient_id)
    labels = _counts(s.label for s in samples)
    return DatasetReport(
        dataset=dataset,
        root=str(root),
        n_images=len(samples),
        n_patients=len({s.patient_id for s in samples}),
        labels=labels,
        label_patients={label: len(patients_per_label[label]) for label in labels},
        sources=_counts(s.source for s in samples),
        views=_counts(s.view or "(not given)" for s in samples),
        splits=_counts(s.extra["split"] for s in samples if "split" in s.extra),
        lung_masks=_counts(s.mask_source for s in samples),
        artifact_masks=_counts(s.artifact_mask_source for s in samples),
        artifact_pixels=_counts(s.artifact_mask_source for s in samples if s.has_artifact),
        skipped=list(loaded.skipped),
    )


def _table(title: str, header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    cells = [tuple(map(str, header))] + [tuple(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title]
    for row in cells:
        first, *numbers = row
        lines.append("  " + first.ljust(widths[0]) + "".join("  " + n.rjust(w) for n, w in zip(numbers, widths[1:])))
    return lines + [""]


def format_report(report: DatasetReport) -> str:
    """The report as plain text tables (labels, sources, views, splits, masks, skipped files)."""
    lines = [
        f"{report.dataset} at {report.root}: {report.n_images} images, {report.n_patients} patients, "
        f"{len(report.skipped)} skipped",
        "",
    ]
    lines += _table(
        "Labels", ("label", "images", "patients"),
        [(label, n, report.label_patients[label]) for label, n in report.labels.items()],
    )
    lines += _table("Sources", ("source", "images"), list(report.sources.items()))
    lines += _table("Views", ("view", "images"), list(report.views.items()))
    if report.splits:
        lines += _table("Upstream split folders", ("split", "images"), list(report.splits.items()))
    lines += _table("Lung masks", ("mask source", "images"), list(report.lung_masks.items()))
    lines += _table(
        "Artifact masks", ("mask source", "images", "with artifact pixels"),
        [(name, n, report.artifact_pixels.get(name, 0)) for name, n in report.artifact_masks.items()],
    )
    if report.skipped:
        lines.append(f"Skipped files ({len(report.skipped)})")
        lines += [f"  {s.path}: {s.reason}" for s in report.skipped]
    else:
        lines.append("Skipped files: none")
    return "\n".join(lines)
