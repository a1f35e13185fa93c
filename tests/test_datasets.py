"""Data set adapters (ieee8023, kermany, manifest), the registry, and ``inspect_dataset``."""
from __future__ import annotations

import os
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditbench.data.datasets import DATASETS, load_dataset
from auditbench.data.ieee8023 import finding_label
from auditbench.data.inspect import format_report, inspect_dataset
from auditbench.data.records import DataError
from auditbench.registry import UnknownNameError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IEEE = SHARED / "ieee8023-covid-chestxray"
KERMANY = SHARED / "kermany-chest-xray-224"

needs_shared = pytest.mark.skipif(
    not (IEEE.is_dir() and KERMANY.is_dir()),
    reason=f"real chest X-ray samples not found at {SHARED} (../shared/data next to the repository)",
)


def _image(path: Path, value: int = 128, size: tuple[int, int] = (64, 48)) -> Path:
    """A non-blank image around ``value`` whose pixels differ from file to file (seeded by its path),
    so that no two test images are duplicates of each other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    pixels = np.clip(value + rng.integers(-40, 41, size), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _mask(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)
    return path


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return path


# -- registry -------------------------------------------------------------------------------------


def test_builtin_adapters_are_registered():
    assert {"ieee8023", "kermany", "manifest"} <= set(DATASETS.names())


def test_unknown_dataset_suggests_close_names(tmp_path):
    with pytest.raises(UnknownNameError, match="did you mean 'kermany'"):
        load_dataset("kermani", tmp_path)


def test_unknown_option_is_named(tmp_path):
    with pytest.raises(DataError, match=r"unknown option 'view' .*did you mean 'views'"):
        load_dataset("ieee8023", tmp_path, {"view": ["PA"]})


@pytest.mark.parametrize("name", ["ieee8023", "kermany", "manifest"])
def test_missing_root_names_the_path(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)):
        load_dataset(name, missing)


# -- manifest -------------------------------------------------------------------------------------


def _write_csv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_loads_rows_masks_and_extra_columns(tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "b.png")
    lung = np.zeros((32, 24), np.uint8)
    lung[8:24, 4:20] = 255
    _mask(tmp_path / "masks" / "a_lung.png", lung)  # half size: resized to the image
    csv = _write_csv(
        tmp_path / "list.csv",
        [
            "path,label,patient_id,lung_mask,artifact_mask,source,hospital",
            "imgs/a.png,covid,p1,masks/a_lung.png,,siteA,north",
            "imgs/b.png,normal,,,,,south",
        ],
    )
    loaded = load_dataset("manifest", csv, max_side=512)
    a, b = loaded.samples
    assert (a.label, a.patient_id, a.source, a.mask_source) == ("covid", "siteA:p1", "siteA", "dataset")
    assert a.lung_mask.shape == a.image.shape == (64, 48) and a.lung_mask.sum() == 32 * 32
    assert a.artifact_mask is None and a.artifact_mask_source == "none"
    assert a.extra == {"manifest_line": 2, "hospital": "north"}
    assert (b.source, b.patient_id, b.mask_source) == ("manifest", "manifest:imgs/b.png", "none")
    assert not loaded.skipped


def test_manifest_in_folder_and_source_option(tmp_path):
    _image(tmp_path / "a.png")
    _write_csv(tmp_path / "manifest.csv", ["path,label", "a.png,viral"])
    loaded = load_dataset("manifest", tmp_path, {"source": "hospital-b"})
    assert loaded.samples[0].source == "hospital-b"


@pytest.mark.parametrize("bad_path", ["../outside.png", "imgs/../../outside.png", "/etc/passwd"])
def test_manifest_rejects_paths_outside_its_folder(tmp_path, bad_path):
    root = tmp_path / "set"
    _image(root / "a.png")
    _image(tmp_path / "outside.png")
    csv = _write_csv(root / "manifest.csv", ["path,label", "a.png,covid", f"{bad_path},covid"])
    with pytest.raises(DataError, match=r"line 3: path .*(outside|absolute)"):
        load_dataset("manifest", csv)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this platform")
def test_manifest_rejects_symlink_escape(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    (root / "link.png").symlink_to(_image(tmp_path / "outside.png"))
    csv = _write_csv(root / "manifest.csv", ["path,label,lung_mask", "link.png,covid,"])
    with pytest.raises(DataError, match="line 2: path 'link.png' resolves outside"):
        load_dataset("manifest", csv)


def test_manifest_rejects_mask_outside_its_folder(tmp_path):
    _image(tmp_path / "set" / "a.png")
    csv = _write_csv(tmp_path / "set" / "manifest.csv", ["path,label,lung_mask", "a.png,covid,../m.png"])
    with pytest.raises(DataError, match="line 2: lung_mask '../m.png' resolves outside"):
        load_dataset("manifest", csv)


def test_manifest_missing_column_is_named(tmp_path):
    csv = _write_csv(tmp_path / "manifest.csv", ["path,class", "a.png,covid"])
    with pytest.raises(DataError, match=r"missing required column\(s\) \['label'\]"):
        load_dataset("manifest", csv)


def test_manifest_duplicate_path_is_an_error(tmp_path):
    _image(tmp_path / "a.png")
    csv = _write_csv(tmp_path / "manifest.csv", ["path,label", "a.png,covid", "a.png,normal"])
    with pytest.raises(DataError, match="line 3: 'a.png' is already listed on line 2"):
        load_dataset("manifest", csv)


def test_manifest_unreadable_files_are_skipped_with_reason(tmp_path):
    _image(tmp_path / "good.png")
    _corrupt(tmp_path / "bad.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    _image(tmp_path / "tiny.png", size=(10, 10))
    csv = _write_csv(
        tmp_path / "manifest.csv",
        ["path,label", "good.png,covid", "bad.jpg,covid", "empty.png,normal", "tiny.png,normal", "gone.png,normal"],
    )
    loaded = load_dataset("manifest", csv)
    assert [s.sample_id for s in loaded.samples] == ["manifest:good.png"]
    reasons = {Path(s.path).name: s.reason for s in loaded.skipped}
    assert set(reasons) == {"bad.jpg", "empty.png", "tiny.png", "gone.png"}
    assert "empty file" in reasons["empty.png"] and "32 px" in reasons["tiny.png"]
    assert reasons["gone.png"] == "file not found"


def test_manifest_with_only_unreadable_files_stops(tmp_path):
    _corrupt(tmp_path / "bad.jpg")
    csv = _write_csv(tmp_path / "manifest.csv", ["path,label", "bad.jpg,covid"])
    with pytest.raises(DataError, match="no usable images.*bad.jpg"):
        load_dataset("manifest", csv)


# -- kermany --------------------------------------------------------------------------------------


def _kermany_tree(root: Path) -> Path:
    folder = root / "chest_xray"
    for split in ("train", "test"):
        _image(folder / split / "NORMAL" / "IM-0117-0001.jpeg")
        _image(folder / split / "NORMAL" / "NORMAL2-IM-0832-0001-0002.jpeg")
        _image(folder / split / "PNEUMONIA" / "person12_virus_44.jpeg")
        _image(folder / split / "PNEUMONIA" / "person12_bacteria_45.jpeg")
    (folder / "train" / "NORMAL" / ".DS_Store").write_bytes(b"junk")
    return folder


def test_kermany_labels_patients_and_splits(tmp_path):
    _kermany_tree(tmp_path)
    loaded = load_dataset("kermany", tmp_path)
    by_id = {s.sample_id: s for s in loaded.samples}
    assert len(by_id) == 8 and not loaded.skipped
    virus = by_id["kermany:train/PNEUMONIA/person12_virus_44.jpeg"]
    assert (virus.label, virus.patient_id, virus.extra["split"]) == ("viral", "kermany:person12", "train")
    assert by_id["kermany:test/PNEUMONIA/person12_bacteria_45.jpeg"].label == "bacterial"
    assert by_id["kermany:test/NORMAL/IM-0117-0001.jpeg"].patient_id == "kermany:IM-0117"
    assert by_id["kermany:train/NORMAL/NORMAL2-IM-0832-0001-0002.jpeg"].patient_id == "kermany:NORMAL2-IM-0832"


def test_kermany_root_may_be_chest_xray_and_splits_option(tmp_path):
    folder = _kermany_tree(tmp_path)
    loaded = load_dataset("kermany", folder, {"splits": ["test"], "source": "pediatric"})
    assert {s.extra["split"] for s in loaded.samples} == {"test"}
    assert {s.source for s in loaded.samples} == {"pediatric"}
    with pytest.raises(DataError, match="split folder .*val not found"):
        load_dataset("kermany", folder, {"splits": ["val"]})
    with pytest.raises(DataError, match="option 'splits'"):
        load_dataset("kermany", folder, {"splits": ["training"]})


def test_kermany_unreadable_and_unparsable_files_are_skipped(tmp_path):
    folder = _kermany_tree(tmp_path)
    _corrupt(folder / "train" / "PNEUMONIA" / "person13_virus_46.jpeg")
    _image(folder / "train" / "PNEUMONIA" / "scan_7.jpeg")
    loaded = load_dataset("kermany", tmp_path)
    assert len(loaded.samples) == 8
    reasons = {Path(s.path).name: s.reason for s in loaded.skipped}
    assert set(reasons) == {"person13_virus_46.jpeg", "scan_7.jpeg"}
    assert "personN_virus" in reasons["scan_7.jpeg"]


def test_kermany_empty_class_stops_naming_the_folders(tmp_path):
    folder = tmp_path / "chest_xray"
    _image(folder / "train" / "PNEUMONIA" / "person1_virus_1.jpeg")
    (folder / "train" / "NORMAL").mkdir()
    with pytest.raises(DataError, match=r"class NORMAL is empty: .*train/NORMAL"):
        load_dataset("kermany", tmp_path)


def test_kermany_wrong_layout_says_what_is_there(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"no train/test/val folders .* holds images/"):
        load_dataset("kermany", tmp_path)


# -- ieee8023 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "finding, label",
    [
        ("COVID-19", "covid"),
        ("COVID-19, ARDS", "covid"),
        ("Pneumonia/Viral/COVID-19", "covid"),
        ("SARS", "viral"),
        ("Pneumonia/Viral/MERS-CoV", "viral"),
        ("Pneumonia/Viral/Influenza/H1N1", "viral"),
        ("Varicella", "viral"),
        ("Streptococcus", "bacterial"),
        ("E.Coli", "bacterial"),
        ("Pneumonia/Bacterial/Mycoplasma", "bacterial"),
        ("Pneumocystis", "fungal"),
        ("Pneumonia/Fungal/Aspergillosis", "fungal"),
        ("No Finding", "normal"),
        ("Lipoid", "other"),
        ("Pneumonia", "other"),
        ("Tuberculosis", "other"),
    ],
)
def test_finding_labels(finding, label):
    assert finding_label(finding) == label


def test_finding_map_overrides_exact_findings():
    assert finding_label("Lipoid", {"lipoid": "lipoid_pneumonia"}) == "lipoid_pneumonia"
    assert finding_label("COVID-19, ARDS", {"COVID-19, ARDS": "ards"}) == "ards"
    assert finding_label("COVID-19", {"COVID-19, ARDS": "ards"}) == "covid"


def _ieee_tree(root: Path) -> Path:
    rows = [
        "patientid,finding,view,modality,folder,filename,clinical_notes",
        '1,COVID-19,PA,X-ray,images,a.png,"notes over\ntwo lines"',
        "1,COVID-19,L,X-ray,images,a_lat.png,",
        "2,Streptococcus,AP,X-ray,images,b.jpg,",
        "3,No Finding,AP Supine,X-ray,images,c.png,",
        "4,COVID-19,,CT,volumes,d.nii.gz,",
        "5,SARS,PA,X-ray,images,e.png,",
    ]
    _write_csv(root / "metadata.csv", rows)
    for name in ("a.png", "a_lat.png", "c.png"):
        _image(root / "images" / name)
    _image(root / "images" / "b.jpg")
    _corrupt(root / "images" / "e.png")
    v7 = np.zeros((64, 48), np.uint8)
    v7[10:50, 5:40] = 255
    v7[0:4, 0:4] = 127
    _mask(root / "annotations" / "v7labs-masks" / "a.png", v7)
    _mask(root / "annotations" / "v7labs-masks" / "a_lat.png", np.zeros((64, 48)))  # unannotated
    vae = np.zeros((16, 12), np.uint8)
    vae[4:12, 2:10] = 255
    _mask(root / "annotations" / "lungVAE-masks" / "a_mask.png", vae)  # V7 takes precedence
    _mask(root / "annotations" / "lungVAE-masks" / "b_mask.png", vae)
    return root


def test_ieee8023_views_labels_and_masks(tmp_path):
    root = _ieee_tree(tmp_path)
    loaded = load_dataset("ieee8023", root)
    by_id = {s.sample_id: s for s in loaded.samples}
    assert set(by_id) == {"ieee8023:images/a.png", "ieee8023:images/b.jpg", "ieee8023:images/c.png"}
    a, b, c = by_id["ieee8023:images/a.png"], by_id["ieee8023:images/b.jpg"], by_id["ieee8023:images/c.png"]
    assert (a.label, a.patient_id, a.view, a.extra["finding"]) == ("covid", "ieee8023:1", "PA", "COVID-19")
    assert (a.mask_source, a.artifact_mask_source) == ("dataset-v7", "dataset-v7")
    assert a.lung_mask.sum() == 40 * 35 and a.artifact_mask.sum() == 16 and a.has_artifact
    assert (b.label, b.mask_source, b.artifact_mask_source) == ("bacterial", "dataset-lungvae", "none")
    assert b.lung_mask.shape == b.image.shape and b.lung_mask.sum() == 32 * 32
    assert (c.label, c.mask_source, c.lung_mask) == ("normal", "none", None)
    assert [Path(s.path).name for s in loaded.skipped] == ["e.png"]  # corrupt: recorded, not fatal
    assert by_id["ieee8023:images/b.jpg"].extra["metadata_line"] == 5  # the notes cell spans two lines


def test_ieee8023_lateral_with_empty_v7_file_has_no_masks(tmp_path):
    root = _ieee_tree(tmp_path)
    loaded = load_dataset("ieee8023", root, {"views": ["L"]})
    (lateral,) = loaded.samples
    assert (lateral.view, lateral.mask_source, lateral.artifact_mask_source) == ("L", "none", "none")


def test_ieee8023_path_leaving_the_root_is_an_error(tmp_path):
    root = tmp_path / "ieee"
    _write_csv(
        root / "metadata.csv",
        ["patientid,finding,view,modality,folder,filename", "1,COVID-19,PA,X-ray,images,../../x.png"],
    )
    with pytest.raises(DataError, match="line 2: image path .* leaves the data root"):
        load_dataset("ieee8023", root)


def test_ieee8023_without_metadata_names_what_is_there(tmp_path):
    _image(tmp_path / "images" / "a.png")
    with pytest.raises(DataError, match=r"metadata.csv not found; .* holds images/"):
        load_dataset("ieee8023", tmp_path)


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_dataset_counts_and_report(tmp_path):
    folder = _kermany_tree(tmp_path)
    _corrupt(folder / "test" / "NORMAL" / "IM-0999-0001.jpeg")
    report = inspect_dataset(tmp_path, "kermany")
    assert report.n_images == 8 and report.n_patients == 3
    assert report.labels == {"normal": 4, "bacterial": 2, "viral": 2}
    assert report.label_patients == {"normal": 2, "bacterial": 1, "viral": 1}
    assert report.splits == {"test": 4, "train": 4}
    assert report.lung_masks == {"none": 8} and len(report.skipped) == 1
    text = format_report(report)
    assert "8 images, 3 patients, 1 skipped" in text and "IM-0999-0001.jpeg" in text


# -- the real samples in ../shared/data -----------------------------------------------------------


@pytest.fixture(scope="module")
def ieee_all():
    return load_dataset("ieee8023", IEEE, {"views": ["PA", "AP", "AP Supine", "L"]}, max_side=256)


@pytest.fixture(scope="module")
def ieee_frontal():
    return load_dataset("ieee8023", IEEE, max_side=256)


@pytest.mark.shared_data
@needs_shared
def test_shared_ieee8023_all_views(ieee_all):
    assert len(ieee_all.samples) == 107
    # The four laterals' V7 files are all zero (V7 did not annotate them): recorded, not used.
    assert len(ieee_all.skipped) == 4
    assert all("V7 mask is empty" in s.reason and s.path.lower().endswith("l.png") for s in ieee_all.skipped)
    findings = Counter(s.extra["finding"] for s in ieee_all.samples)
    assert findings["COVID-19"] == 80  # the README's count
    labels = Counter(s.label for s in ieee_all.samples)
    assert labels == {"covid": 84, "bacterial": 12, "other": 10, "normal": 1}  # + 4 "COVID-19, ARDS"


@pytest.mark.shared_data
@needs_shared
def test_shared_ieee8023_default_views(ieee_frontal):
    samples = ieee_frontal.samples
    assert len(samples) == 98  # the 9 laterals dropped
    assert Counter(s.view for s in samples) == {"PA": 57, "AP Supine": 24, "AP": 17}
    assert Counter(s.label for s in samples) == {"covid": 80, "bacterial": 10, "other": 7, "normal": 1}
    assert len({s.patient_id for s in samples}) == 62
    assert all(s.patient_id.startswith("ieee8023:") for s in samples)
    assert Counter(s.mask_source for s in samples) == {"dataset-v7": 80, "dataset-lungvae": 8, "none": 10}
    v7 = [s for s in samples if s.artifact_mask_source == "dataset-v7"]
    assert len(v7) == 80 and sum(s.has_artifact for s in v7) == 18
    for sample in samples:
        assert max(sample.image.shape) <= 256 and 0.0 <= sample.image.min() <= sample.image.max() <= 1.0
        if sample.lung_mask is not None:
            assert sample.lung_mask.shape == sample.image.shape and 0.1 < sample.lung_mask.mean() < 0.7


@pytest.mark.shared_data
@needs_shared
def test_shared_kermany_counts():
    loaded = load_dataset("kermany", KERMANY, max_side=224)
    samples = loaded.samples
    # 656 files; 5 are pixel-identical copies of another file of the same patient and label
    # (person1481_bacteria_3862/3863, 3864/3865, 3866/3867; person258_bacteria_1207/1208/1209).
    assert len(samples) == 651 and len(loaded.skipped) == 5
    assert all(s.reason.startswith("duplicate of ") and "same pixels" in s.reason for s in loaded.skipped)
    labels = Counter(s.label for s in samples)
    assert labels == {"normal": 166, "bacterial": 314, "viral": 171}  # 485 pneumonia kept of 490
    assert Counter(s.extra["split"] for s in samples) == {"train": 585, "test": 66}
    assert all(s.image.shape == (224, 224) and s.lung_mask is None for s in samples)


# -- bad input: duplicates, masks, blank images, encodings, folds (issue 9) -----------------------


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return target


def test_manifest_same_file_listed_twice_is_kept_once_and_recorded(tmp_path):
    _image(tmp_path / "img" / "x.png")
    _image(tmp_path / "img" / "y.png")
    csv = _write_csv(tmp_path / "manifest.csv", ["path,label", "img/x.png,covid", "img/y.png,normal", "img/../img/x.png,covid"])
    loaded = load_dataset("manifest", csv)
    assert [s.sample_id for s in loaded.samples] == ["manifest:img/x.png", "manifest:img/y.png"]
    (duplicate,) = loaded.skipped
    assert duplicate.path.endswith("img/../img/x.png") and duplicate.reason.startswith("duplicate of line 2 of manifest.csv")


def test_manifest_same_file_with_two_labels_names_both_lines(tmp_path):
    _image(tmp_path / "img" / "x.png")
    csv = _write_csv(tmp_path / "manifest.csv", ["path,label", "img/x.png,covid", "img/../img/x.png,normal"])
    with pytest.raises(DataError, match=r"manifest.csv, line 3: 'img/../img/x.png' is already listed on line 2 "
                                        r"\(the same file\) with label 'covid', here 'normal'"):
        load_dataset("manifest", csv)


def test_same_pixels_in_two_files_same_label_is_kept_once(tmp_path):
    first = _image(tmp_path / "a.png")
    _copy(first, tmp_path / "copy" / "a_again.png")
    _image(tmp_path / "b.png")
    csv = _write_csv(tmp_path / "manifest.csv", ["path,label", "a.png,covid", "b.png,normal", "copy/a_again.png,covid"])
    loaded = load_dataset("manifest", csv)
    assert len(loaded.samples) == 2
    (duplicate,) = loaded.skipped
    assert duplicate.path == str(tmp_path / "copy" / "a_again.png")
    assert duplicate.reason == f"duplicate of {first} (the same pixels, same label 'covid')"


def test_same_pixels_with_two_labels_is_an_error_naming_both_files(tmp_path):
    _copy(_image(tmp_path / "a.png"), tmp_path / "b.png")
    csv = _write_csv(tmp_path / "manifest.csv", ["path,label", "a.png,covid", "b.png,normal"])
    with pytest.raises(DataError, match=r"the same image has two labels: .*b\.png \(label 'normal'.*a\.png \(label 'covid'"):
        load_dataset("manifest", csv)


def _two_sources(tmp_path: Path, second_label: str):
    from auditbench.data.prepare import load_sources
    from auditbench.protocol.schema import DataSpec, SourceSpec

    first = _image(tmp_path / "one" / "a.png")
    _image(tmp_path / "one" / "b.png")
    _write_csv(tmp_path / "one" / "manifest.csv", ["path,label", "a.png,covid", "b.png,normal"])
    _copy(first, tmp_path / "two" / "same_as_a.png")
    _image(tmp_path / "two" / "c.png")
    _write_csv(tmp_path / "two" / "manifest.csv", ["path,label", f"same_as_a.png,{second_label}", "c.png,normal"])
    sources = [SourceSpec(dataset="manifest", root="one", options={"source": "one"}),
               SourceSpec(dataset="manifest", root="two", options={"source": "two"})]
    data = DataSpec(dataset="sources", root=str(tmp_path), sources=sources)
    return lambda: load_sources(sources, data, tmp_path)


def test_duplicate_across_sources_with_same_label_is_recorded(tmp_path):
    loaded = _two_sources(tmp_path, "covid")()
    assert sorted(s.sample_id for s in loaded.samples) == ["one:a.png", "one:b.png", "two:c.png"]
    (duplicate,) = loaded.skipped
    assert duplicate.source == "two" and duplicate.reason.startswith(f"duplicate of {tmp_path / 'one' / 'a.png'}")


def test_duplicate_across_sources_with_another_label_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"two labels: .*two/same_as_a\.png \(label 'normal', source 'two'\) and "
                                        r".*one/a\.png \(label 'covid', source 'one'\) are the same pixels"):
        _two_sources(tmp_path, "normal")()


def test_blank_image_is_recorded(tmp_path):
    _image(tmp_path / "good.png")
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 48), 128, np.uint8)).save(path)
    csv = _write_csv(tmp_path / "manifest.csv", ["path,label", "good.png,covid", "blank.png,normal"])
    loaded = load_dataset("manifest", csv)
    assert len(loaded.samples) == 1
    (skipped,) = loaded.skipped
    assert skipped.path == str(path) and skipped.reason.startswith("blank image: every pixel is 0.502")


def test_manifest_masks_that_cannot_be_used_are_recorded(tmp_path):
    for name in ("a", "b", "c", "d"):
        _image(tmp_path / f"{name}.png")  # 48 wide, 64 high
    square = np.zeros((48, 48), np.uint8)
    square[10:30, 10:30] = 255
    _mask(tmp_path / "square.png", square)  # another aspect ratio
    _mask(tmp_path / "empty.png", np.zeros((64, 48)))
    _mask(tmp_path / "grey.png", np.tile(np.linspace(0, 255, 48), (64, 1)))  # a picture, not a mask
    good = np.zeros((64, 48), np.uint8)
    good[20:40, 10:30] = 255
    _mask(tmp_path / "good.png", good)
    csv = _write_csv(tmp_path / "manifest.csv", [
        "path,label,lung_mask,artifact_mask",
        "a.png,covid,square.png,",
        "b.png,covid,empty.png,empty.png",  # an empty artifact mask is valid: no artifact
        "c.png,normal,grey.png,",
        "d.png,normal,good.png,",
    ])
    loaded = load_dataset("manifest", csv)
    by_name = {Path(s.path).name: s for s in loaded.samples}
    assert set(by_name) == {"a.png", "b.png", "c.png", "d.png"}  # images kept
    assert [by_name[n].mask_source for n in ("a.png", "b.png", "c.png", "d.png")] == ["none", "none", "none", "dataset"]
    assert by_name["b.png"].artifact_mask_source == "dataset" and not by_name["b.png"].has_artifact
    reasons = {Path(s.path).name: s.reason for s in loaded.skipped}
    assert set(reasons) == {"square.png", "empty.png", "grey.png"}
    assert reasons["square.png"] == ("lung mask unusable, image kept without it: mask is 48x48 px, the image 48x64 px: "
                                     "another aspect ratio, so not this image's mask")
    assert reasons["empty.png"] == "lung mask is empty (no foreground pixel), image kept without it"
    assert reasons["grey.png"].startswith("lung mask unusable, image kept without it: mask is not binary")


def test_ieee8023_wrong_size_v7_and_empty_lungvae_masks_are_recorded(tmp_path):
    root = _ieee_tree(tmp_path)
    _mask(root / "annotations" / "v7labs-masks" / "c.png", np.full((40, 40), 255))  # c is 48x64
    _mask(root / "annotations" / "lungVAE-masks" / "b_mask.png", np.zeros((16, 12)))
    loaded = load_dataset("ieee8023", root)
    by_id = {s.sample_id: s for s in loaded.samples}
    assert by_id["ieee8023:images/c.png"].mask_source == "none"
    assert by_id["ieee8023:images/b.jpg"].mask_source == "none"
    reasons = {Path(s.path).name: s.reason for s in loaded.skipped}
    assert "another aspect ratio" in reasons["c.png"] and reasons["c.png"].startswith("V7 mask unusable")
    assert reasons["b_mask.png"] == "lungVAE lung mask is empty (no foreground pixel), image kept without it"


def _dicom_file(path: Path, seed: int = 0) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 48, 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(seed).integers(0, 4096, (64, 48)).astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_images_load_through_every_adapter_and_corrupt_ones_are_recorded(tmp_path):
    # manifest
    _dicom_file(tmp_path / "m" / "good.dcm")
    _corrupt(tmp_path / "m" / "bad.dcm")
    csv = _write_csv(tmp_path / "m" / "manifest.csv", ["path,label", "good.dcm,covid", "bad.dcm,normal"])
    loaded = load_dataset("manifest", csv)
    assert [s.sample_id for s in loaded.samples] == ["manifest:good.dcm"] and loaded.samples[0].image.shape == (64, 48)
    assert [Path(s.path).name for s in loaded.skipped] == ["bad.dcm"]
    # kermany lists .dcm files like any image
    folder = _kermany_tree(tmp_path / "k")
    _dicom_file(folder / "train" / "NORMAL" / "IM-0500-0001.dcm", seed=1)
    _corrupt(folder / "train" / "NORMAL" / "IM-0501-0001.dcm")
    kermany = load_dataset("kermany", tmp_path / "k")
    assert "kermany:train/NORMAL/IM-0500-0001.dcm" in {s.sample_id for s in kermany.samples}
    assert [Path(s.path).name for s in kermany.skipped] == ["IM-0501-0001.dcm"]
    # shenzhen_montgomery: cxr/<name>.dcm with masks/<name>.png
    _dicom_file(tmp_path / "sm" / "cxr" / "CHNCXR_0001_0.dcm", seed=2)
    lung = np.zeros((64, 48), np.uint8)
    lung[10:50, 5:40] = 255
    _mask(tmp_path / "sm" / "masks" / "CHNCXR_0001_0.png", lung)
    (sample,) = load_dataset("shenzhen_montgomery", tmp_path / "sm").samples
    assert sample.mask_source == "dataset" and sample.lung_mask.sum() == 40 * 35


def test_non_utf8_manifest_names_the_line_and_byte(tmp_path):
    _image(tmp_path / "a.png")
    path = tmp_path / "manifest.csv"
    path.write_bytes("path,label,note\na.png,covid,ok\na.png,covid,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"manifest\.csv, line 3: byte 0xe9 at offset 46 \(column 16\) is not UTF-8"):
        load_dataset("manifest", path)


def test_non_utf8_ieee8023_metadata_names_the_line(tmp_path):
    root = tmp_path / "ieee"
    (root / "images").mkdir(parents=True)
    (root / "metadata.csv").write_bytes(b"patientid,finding,view,modality,folder,filename\n1,COVID-19 \xff,PA,X-ray,images,a.png\n")
    with pytest.raises(DataError, match=r"metadata\.csv, line 2: byte 0xff"):
        load_dataset("ieee8023", root)


def _protocol(folds: int = 2, task: str = "covid_vs_viral"):
    from auditbench.protocol.schema import Protocol

    return Protocol.model_validate({
        "name": "t", "task": [task], "training": {"folds": folds},
        "data": {"dataset": "sources", "sources": [{"dataset": "manifest", "root": "x"}]},
        "models": {"backbones": [{"name": "resnet10t", "weights": "none"}]},
    })


def _loaded(counts: dict[str, int], seed: int = 0, folder: str = "x"):
    """Samples with random pixels (image k drawn with seed ``seed + k``), one patient each."""
    from auditbench.data.records import LoadedDataset, Sample

    samples = []
    for label, n in counts.items():
        for i in range(n):
            image = np.random.default_rng(seed + len(samples)).random((40, 40), dtype=np.float32)
            samples.append(Sample(f"{folder}:{label}{i}", image, label, f"{folder}:{label}{i}", folder,
                                  path=f"/{folder}/{label}{i}.png"))
    return LoadedDataset(samples, [])


def test_labels_outside_the_task_are_counted_in_a_note():
    from auditbench.data.prepare import real_task_data

    data = real_task_data(_protocol(), _protocol().task[0], _loaded({"covid": 12, "viral": 12, "normal": 8, "bacterial": 4}),
                          {"ext": _loaded({"viral": 2, "tuberculosis": 3}, seed=100, folder="ext")})
    assert len(data.labels) == 24
    assert data.notes == [
        "Task 'covid_vs_viral', data.sources: 12 of 36 images with labels outside the task (normal 8, bacterial 4) "
        "are not used by it (task classes: viral = ['viral']; covid = ['covid']).",
        "Task 'covid_vs_viral', external set 'ext': 3 of 5 images with labels outside the task (tuberculosis 3) "
        "are not used by it (task classes: viral = ['viral']; covid = ['covid']).",
    ]


def test_external_image_that_is_also_internal_is_removed_from_the_external_set():
    from auditbench.data.prepare import real_task_data

    internal = _loaded({"covid": 12, "viral": 12})
    external = _loaded({"covid": 3}, seed=0, folder="ext")  # pixel copies of the internal covid0..2
    external.samples += _loaded({"viral": 2}, seed=100, folder="ext").samples
    data = real_task_data(_protocol(), _protocol().task[0], internal, {"ext": external})
    samples, labels = data.external["ext"]
    assert [s.sample_id for s in samples] == ["ext:viral0", "ext:viral1"] and list(labels) == [0, 0]
    assert [s.path for s in data.skipped] == ["/ext/covid0.png", "/ext/covid1.png", "/ext/covid2.png"]
    assert data.skipped[0].reason == ("duplicate of /x/covid0.png (the same pixels, same label 'covid') "
                                      "(external set 'ext' vs data.sources)")
    # The pixels of the internal covid0 under another label:
    with pytest.raises(DataError, match=r"two labels \(external set 'ext' vs data.sources\): /ext/viral0.png "
                                        r"\(label 'viral', source 'ext'\) and /x/covid0.png \(label 'covid'"):
        real_task_data(_protocol(), _protocol().task[0], internal, {"ext": _loaded({"viral": 1}, seed=0, folder="ext")})


def test_too_few_patients_per_class_for_the_folds_names_the_class():
    from auditbench.data.prepare import real_task_data

    with pytest.raises(DataError, match=r"class 'covid' has 3 image\(s\) from 3 patient\(s\); training\.folds=2 needs "
                                        r"at least 4 patients per class"):
        real_task_data(_protocol(), _protocol().task[0], _loaded({"covid": 3, "viral": 20}), {})
    with pytest.raises(DataError, match=r"class 'viral' has 3 image\(s\).*training\.folds=4 needs at least 4"):
        real_task_data(_protocol(folds=4), _protocol().task[0], _loaded({"covid": 20, "viral": 3}), {})


def test_make_folds_says_what_is_missing():
    from auditbench.data.splits import make_folds

    labels = np.array([0] * 10 + [1] * 2)
    with pytest.raises(DataError, match=r"class 1 has 2 image\(s\) from 2 patient\(s\); training\.folds=2 needs at least 4"):
        make_folds(labels, np.arange(12), 2, 0.2, 0)
    with pytest.raises(DataError, match=r"8 patients cannot be split into 2 folds whose training images are split again "
                                        r"into 5 parts .* need at least 10"):
        make_folds(np.array([0] * 4 + [1] * 4), np.arange(8), 2, 0.2, 0)
