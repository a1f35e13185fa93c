"""Protocol data section -> the samples of one task, with a training view and a test view."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from auditbench.data.records import DataError, LoadedDataset, Sample, SkippedFile
from auditbench.data.transforms import FrameSpec, border_band, region_to_frame, to_model_frame
from auditbench.protocol.schema import DataSpec, Protocol, SourceSpec, TaskSpec


@dataclass
class TaskData:
    """The images of one task. ``test_view[i]`` is the same image and patient as ``train_view[i]``;
    they differ only where the data set draws test images apart (the synthetic decorrelated test)."""

    train_view: list[Sample]
    test_view: list[Sample]
    labels: np.ndarray  # 0/1 task labels
    groups: np.ndarray  # patient ids
    external: dict[str, tuple[list[Sample], np.ndarray]] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)
    clean_view: list[Sample] | None = None  # synthetic: test_view[i] without markers (its clean twin)
    notes: list[str] = field(default_factory=list)  # for the run's notes, e.g. images outside the task


# Per-image state of the artifact region in a frame (Frames.artifact_status).
ARTIFACT_IN_VIEW = "in_view"  # some artifact influences the frame
ARTIFACT_OUT_OF_VIEW = "out_of_view"  # the source has artifacts; the crop removed all of them
ARTIFACT_ABSENT = "absent"  # the source's artifact mask exists and is empty
ARTIFACT_UNKNOWN = "unknown"  # no artifact mask: nothing can be said
ARTIFACT_STATUSES = (ARTIFACT_IN_VIEW, ARTIFACT_OUT_OF_VIEW, ARTIFACT_ABSENT, ARTIFACT_UNKNOWN)


@dataclass
class Frames:
    """Samples mapped into one model frame, stacked for batching.

    Every region is defined on the source image and mapped with the image's own sampling grid
    (``data.transforms.region_to_frame``): ``*_footprint`` holds every frame pixel the region
    influences (what occlusion fills), the plain mask the pixels it covers (what metrics score).
    The border band is ``border_fraction`` of each source side, so a cropped frame, which shows
    none of it, has an empty band: border metrics are out of view by construction there.
    """

    images: np.ndarray  # (N, S, S) float32 [0, 1]
    lungs: np.ndarray  # (N, S, S) bool
    artifacts: np.ndarray  # (N, S, S) bool, all False where no artifact is in view
    border: np.ndarray  # (N, S, S) bool
    lung_footprint: np.ndarray  # (N, S, S) bool
    artifact_footprint: np.ndarray  # (N, S, S) bool
    border_footprint: np.ndarray  # (N, S, S) bool
    artifact_status: np.ndarray  # (N,) str, one of ARTIFACT_STATUSES

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> "Frames":
        return Frames(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    @staticmethod
    def concatenate(parts: list["Frames"]) -> "Frames":
        return Frames(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Frames)))


def to_frames(samples: list[Sample], frame: FrameSpec, border_fraction: float) -> Frames:
    """Each sample's image and regions on the frame's sampling grid (see :class:`Frames`)."""
    size = frame.input_size
    images = np.empty((len(samples), size, size), np.float32)
    masks = {name: np.zeros((len(samples), size, size), bool) for name in (
        "lungs", "artifacts", "border", "lung_footprint", "artifact_footprint", "border_footprint")}
    status = np.empty(len(samples), dtype=object)
    for i, sample in enumerate(samples):
        image, lung_mask, artifact_mask = sample.pixels()  # once: a rendered sample renders per access
        images[i] = to_model_frame(image, frame)
        regions = {"lung": lung_mask, "artifact": artifact_mask, "border": border_band(image.shape, border_fraction)}
        for name, source in regions.items():
            if source is None or not source.any():
                continue
            mapped = region_to_frame(source, frame)
            # A band in view only as a sliver (no pixel mostly band) is that sliver, so the border
            # is in view exactly where its footprint is.
            region = mapped.footprint if name == "border" and not mapped.mask.any() else mapped.mask
            masks["lungs" if name == "lung" else "artifacts" if name == "artifact" else "border"][i] = region
            masks[f"{name}_footprint"][i] = mapped.footprint
        if artifact_mask is None:
            status[i] = ARTIFACT_UNKNOWN
        elif not artifact_mask.any():
            status[i] = ARTIFACT_ABSENT
        else:
            status[i] = ARTIFACT_IN_VIEW if masks["artifact_footprint"][i].any() else ARTIFACT_OUT_OF_VIEW
    return Frames(images, masks["lungs"], masks["artifacts"], masks["border"], masks["lung_footprint"],
                  masks["artifact_footprint"], masks["border_footprint"], status.astype(str))


def select_task(samples: list[Sample], task: TaskSpec) -> tuple[list[int], np.ndarray]:
    keep, labels = [], []
    for i, sample in enumerate(samples):
        index = task.label_index(sample.label)
        if index is not None:
            keep.append(i)
            labels.append(index)
    return keep, np.asarray(labels, dtype=np.int64)


def balance_classes(keep: list[int], labels: np.ndarray, data: DataSpec, seed: int) -> tuple[list[int], np.ndarray]:
    """``cap``: at most cap_per_class images per class; ``balance``: down-sample to the smallest class."""
    if data.balance == "none":
        return keep, labels
    counts = np.bincount(labels, minlength=2)
    limit = data.cap_per_class if data.balance == "cap" else int(counts.min())
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        if len(members) > limit:
            members = np.sort(rng.choice(members, size=limit, replace=False))
        chosen.extend(members.tolist())
    chosen.sort()
    return [keep[i] for i in chosen], labels[chosen]


def check_classes(labels: np.ndarray, task: TaskSpec, where: str, found: dict[str, int]) -> None:
    counts = np.bincount(labels, minlength=2) if len(labels) else np.zeros(2, int)
    for index, name in enumerate(task.class_names):
        if counts[index] == 0:
            raise DataError(
                f"{where}: task {task.name!r} class {name!r} (raw labels {task.classes[name]}) has no images; "
                f"raw labels found: {found or 'none'}"
            )


def outside_task_note(samples: list[Sample], task: TaskSpec, where: str) -> str | None:
    """One line counting the images whose raw label the task leaves out, per label; None if none."""
    outside = raw_label_counts([s for s in samples if task.label_index(s.label) is None])
    if not outside:
        return None
    counts = ", ".join(f"{label} {n}" for label, n in sorted(outside.items(), key=lambda kv: (-kv[1], kv[0])))
    total = sum(outside.values())
    return (
        f"Task {task.name!r}, {where}: {total} of {len(samples)} images with labels outside the task "
        f"({counts}) are not used by it (task classes: "
        + "; ".join(f"{name} = {labels}" for name, labels in task.classes.items()) + ")."
    )


def check_fold_sizes(protocol: Protocol, task: TaskSpec, labels: np.ndarray, groups: np.ndarray, where: str) -> None:
    from auditbench.data.splits import check_fold_counts

    check_fold_counts(labels, groups, protocol.training.folds, protocol.training.val_fraction,
                      task.class_names, f"{where}, task {task.name!r}")


def raw_label_counts(samples: list[Sample]) -> dict[str, int]:
    values, counts = np.unique([s.label for s in samples], return_counts=True) if samples else ([], [])
    return dict(zip(map(str, values), map(int, counts)))


def _source_root(data: DataSpec, source: SourceSpec, base: Path) -> Path:
    root = Path(source.root)
    if not root.is_absolute():
        root = Path(data.root) / root
        if not root.is_absolute():
            root = base / root
    return root


def load_sources(sources: list[SourceSpec], data: DataSpec, base: Path) -> LoadedDataset:
    """Load real data sets via the data set registry; unreadable files are recorded, not fatal.

    Each image is kept once across the sources (``datasets.remove_duplicates``): a later copy with
    the same label is recorded in ``skipped``, one with another label is a DataError.
    """
    from auditbench.data.datasets import DATASETS, remove_duplicates

    loaded = LoadedDataset(samples=[], skipped=[])
    for source in sources:
        adapter = DATASETS.get(source.dataset)
        root = _source_root(data, source, base)
        if not root.exists():
            raise DataError(
                f"data root for {source.dataset!r} not found: {root} "
                f"(set data.root or data.sources[].root, e.g. --set data.root=/path/to/data)"
            )
        part = adapter.load(root, dict(source.options), data.max_side)
        if source.source:
            for sample in part.samples:
                sample.source = source.source
        remove_duplicates(part, kept=loaded.samples)
        loaded.extend(part)
    return loaded


def fill_missing_masks(samples: list[Sample], data: DataSpec) -> None:
    """Predicted lung masks and detected artifact masks where a data set has none (recorded)."""
    needs_lungs = [s for s in samples if s.lung_mask is None or data.masks.lung == "predicted"]
    if needs_lungs and data.masks.lung != "dataset":
        from auditbench.masks.lungseg import build_segmenter

        segmenter = build_segmenter(data.masks.lung_model)
        for sample, mask in zip(needs_lungs, segmenter.predict([s.image for s in needs_lungs])):
            sample.lung_mask = mask
            sample.mask_source = "predicted"
    needs_artifacts = [s for s in samples if s.artifact_mask is None or data.masks.artifacts == "detected"]
    if needs_artifacts and data.masks.artifacts in ("dataset_or_detected", "detected"):
        from auditbench.masks.artifacts import detect_artifacts

        for sample in needs_artifacts:
            sample.artifact_mask = detect_artifacts(sample.image, sample.lung_mask)
            sample.artifact_mask_source = "detected"


def real_task_data(protocol: Protocol, task: TaskSpec, internal: LoadedDataset, external: dict[str, LoadedDataset],
                   check_folds: bool = True) -> TaskData:
    """The task's images of the internal sources and of each external set.

    An external image that is also an internal one (same file or pixels) is removed from the
    external set and recorded (a test image must not be a training image); with another label it
    is a DataError. Images with labels outside the task are counted in ``notes``. Too few patients
    per class for ``training.folds`` is a DataError naming the class (unless ``check_folds=False``:
    images that are only tested, as in ``auditbench audit``, need no folds).
    """
    from auditbench.data.datasets import remove_duplicates

    for name, loaded in external.items():
        remove_duplicates(loaded, kept=internal.samples, where=f" (external set {name!r} vs data.sources)")
    keep, labels = select_task(internal.samples, task)
    check_classes(labels, task, "data.sources", raw_label_counts(internal.samples))
    notes = [outside_task_note(internal.samples, task, "data.sources")]
    keep, labels = balance_classes(keep, labels, protocol.data, protocol.seed)
    samples = [internal.samples[i] for i in keep]
    groups = np.array([s.patient_id for s in samples])
    if check_folds:
        check_fold_sizes(protocol, task, labels, groups, "data.sources")
    task_external = {}
    for name, loaded in external.items():
        ext_keep, ext_labels = select_task(loaded.samples, task)
        notes.append(outside_task_note(loaded.samples, task, f"external set {name!r}"))
        if ext_keep:
            task_external[name] = ([loaded.samples[i] for i in ext_keep], ext_labels)
    skipped = internal.skipped + [s for loaded in external.values() for s in loaded.skipped]
    return TaskData(
        train_view=samples,
        test_view=samples,
        labels=labels,
        groups=groups,
        external=task_external,
        skipped=skipped,
        notes=[note for note in notes if note],
    )
