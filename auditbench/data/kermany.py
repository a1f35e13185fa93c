""""Chest X-Ray Images (Pneumonia)" (Kermany et al. 2018) in its layout
``chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}/``; no lung masks.
"""
from __future__ import annotations

import re
from pathlib import Path

from auditbench.data.datasets import DATASETS, list_dir, read_or_skip, require_dir, require_samples
from auditbench.data.io import IMAGE_SUFFIXES
from auditbench.data.records import DataError, LoadedDataset, Sample, SkippedFile

NAME = "kermany"
SPLITS = ("train", "test", "val")
_PNEUMONIA = re.compile(r"^(person\d+)_(virus|bacteria)_", re.IGNORECASE)
_PNEUMONIA_LABELS = {"virus": "viral", "bacteria": "bacterial"}
_NORMAL = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


def data_folder(root: Path) -> Path:
    """The folder holding the split folders: ``root/chest_xray`` or ``root`` itself."""
    for candidate in (root / "chest_xray", root):
        if any((candidate / split).is_dir() for split in SPLITS):
            return candidate
    raise DataError(
        f"{NAME}: no {'/'.join(SPLITS)} folders in {root} or {root / 'chest_xray'}; {root} holds {list_dir(root)}"
    )


def label_and_patient(class_folder: str, file_name: str) -> tuple[str, str] | None:
    """(raw label, patient) from the class folder and file name; None where the name says neither.

    ``personN_virus_K`` -> viral, ``personN_bacteria_K`` -> bacterial (patient personN);
    NORMAL ``IM-xxxx-yyyy`` -> patient IM-xxxx, ``NORMAL2-IM-xxxx-yyyy`` -> NORMAL2-IM-xxxx, any
    other normal name -> the file stem (its own patient).
    """
    if class_folder.upper() == "PNEUMONIA":
        match = _PNEUMONIA.match(file_name)
        return (_PNEUMONIA_LABELS[match.group(2).lower()], match.group(1).lower()) if match else None
    match = _NORMAL.match(file_name)
    return "normal", match.group(1) if match else Path(file_name).stem


def _splits(option: object, folder: Path) -> list[str]:
    if option is None:
        return [split for split in SPLITS if (folder / split).is_dir()]
    chosen = [option] if isinstance(option, str) else option
    if not isinstance(chosen, (list, tuple)) or any(split not in SPLITS for split in chosen):
        raise DataError(f"{NAME}: option 'splits' must list names from {list(SPLITS)}, got {option!r}")
    for split in chosen:
        if not (folder / split).is_dir():
            raise DataError(f"{NAME}: split folder {folder / split} not found; {folder} holds {list_dir(folder)}")
    return list(chosen)


@DATASETS.register(NAME, options={"splits": f"upstream split folders to read (default: those present of {list(SPLITS)})"})
def load(root: Path, options: dict, max_side: int | None) -> LoadedDataset:
    """All images of the chosen split folders; the upstream split is kept in ``extra["split"]``.

    Patient ids are ``kermany:<patient>``; the same personN in two split folders is one patient
    (grouping too coarsely cannot leak, too finely can).
    """
    require_dir(root, NAME, "chest_xray/{train,test,val}/{NORMAL,PNEUMONIA}")
    folder = data_folder(root)
    source = options["source"]
    samples: list[Sample] = []
    skipped: list[SkippedFile] = []
    found: dict[str, int] = {"NORMAL": 0, "PNEUMONIA": 0}
    splits = _splits(options.get("splits"), folder)
    for split in splits:
        for class_folder in found:
            directory = folder / split / class_folder
            files = sorted(directory.iterdir()) if directory.is_dir() else []
            for path in files:
                if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue  # OS metadata (.DS_Store, ._*), readme files
                parsed = label_and_patient(class_folder, path.name)
                if parsed is None:
                    skipped.append(SkippedFile(str(path), "file name is not personN_virus_* or personN_bacteria_*", source))
                    continue
                image = read_or_skip(path, max_side, source, skipped)
                if image is None:
                    continue
                found[class_folder] += 1
                samples.append(
                    Sample(
                        sample_id=f"{NAME}:{split}/{class_folder}/{path.name}",
                        image=image,
                        label=parsed[0],
                        patient_id=f"{NAME}:{parsed[1]}",
                        source=source,
                        path=str(path),
                        extra={"split": split},
                    )
                )
    require_samples(NAME, folder, samples, skipped, "images in {split}/{NORMAL,PNEUMONIA}")
    for class_folder, count in found.items():
        if count == 0:
            raise DataError(
                f"{NAME}: class {class_folder} is empty: no readable image in "
                f"{', '.join(str(folder / split / class_folder) for split in splits)}; "
                f"found {found} ({len(skipped)} file(s) skipped)"
            )
    return LoadedDataset(samples, skipped)
