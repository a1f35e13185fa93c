"""Reading real-world image files: formats, bit depths, orientation, sizes and broken files."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from auditbench.data.io import ImageReadError, MaskError, read_mask, read_v7_mask, read_xray, same_frame


def _ramp(height: int = 64, width: int = 80) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))


def _with_sbit(png: Path, bits: int) -> None:
    """Insert a greyscale sBIT chunk right after IHDR (PIL cannot write one)."""
    data = png.read_bytes()
    ihdr_end = 8 + 8 + 13 + 4
    chunk = struct.pack(">I4sB", 1, b"sBIT", bits) + struct.pack(">I", zlib.crc32(b"sBIT" + bytes([bits])))
    png.write_bytes(data[:ihdr_end] + chunk + data[ihdr_end:])


def test_8bit_greyscale_png_is_scaled_by_255(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(_ramp()).save(path)
    image = read_xray(path)
    assert image.dtype == np.float32 and image.shape == (64, 80)
    np.testing.assert_allclose(image, _ramp() / 255.0, atol=1e-6)


def test_16bit_png_is_scaled_by_its_bit_depth(tmp_path):
    values = np.array([[0, 32768, 65535] * 20] * 40, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"
    image = read_xray(path)
    np.testing.assert_allclose(image[0, :3], [0.0, 32768 / 65535, 1.0], atol=1e-6)


def test_16bit_png_with_sbit_12_uses_12_bits(tmp_path):
    values = np.full((40, 40), 4095, dtype=np.uint16)
    values[:, :20] = 2048
    path = tmp_path / "twelve.png"
    Image.fromarray(values).save(path)
    _with_sbit(path, 12)
    image = read_xray(path)
    np.testing.assert_allclose(image[0, [0, 39]], [2048 / 4095, 1.0], atol=1e-6)


def test_16bit_tiff(tmp_path):
    values = np.full((40, 40), 65535, dtype=np.uint16)
    values[:20] = 0
    path = tmp_path / "deep.tiff"
    Image.fromarray(values).save(path)
    image = read_xray(path)
    assert image[0, 0] == 0.0 and image[-1, 0] == pytest.approx(1.0)


def test_rgb_becomes_luminance(tmp_path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :20, 0] = 255  # red
    rgb[:, 20:40, 1] = 255  # green
    rgb[:, 40:] = 255  # white
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    image = read_xray(path)
    np.testing.assert_allclose(image[0, [0, 20, 40]], [0.299, 0.587, 1.0], atol=1e-5)


def test_rgba_is_composited_on_black(tmp_path):
    rgba = np.full((40, 40, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:, :20, 3] = 0  # transparent half
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    image = read_xray(path)
    assert image[:, :20].max() == 0.0
    np.testing.assert_allclose(image[:, 20:], 200 / 255.0, atol=1e-5)


def test_palette_image_reads_its_colours(tmp_path):
    palette_image = Image.fromarray(_ramp(40, 64)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    path = tmp_path / "palette.png"
    palette_image.save(path)
    with Image.open(path) as stored:
        assert stored.mode == "P"
    expected = np.asarray(palette_image.convert("L"), np.float32) / 255.0
    np.testing.assert_allclose(read_xray(path), expected, atol=1 / 255.0)


def test_bmp(tmp_path):
    path = tmp_path / "grey.bmp"
    Image.fromarray(_ramp()).save(path)
    np.testing.assert_allclose(read_xray(path), _ramp() / 255.0, atol=1e-6)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((40, 80), np.uint8)  # 80 wide, 40 high; the left part bright
    stored[:, :40] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    shown = read_xray(path)
    assert shown.shape == (80, 40)  # portrait after rotation
    assert shown[:35].mean() > 0.9 and shown[45:].mean() < 0.1  # the stored left is now the top


def test_huge_jpeg_is_downsampled_with_antialiasing(tmp_path):
    stripes = np.zeros((4000, 5000), np.uint8)
    stripes[:, ::2] = 255  # 1-px stripes: aliasing would give 0/1 stripes, averaging gives grey
    path = tmp_path / "huge.jpg"
    Image.fromarray(stripes).save(path, quality=90)
    image = read_xray(path, max_side=512)
    assert image.shape == (410, 512)
    assert 0.35 < image[50:-50, 50:-50].mean() < 0.65
    assert image[50:-50, 50:-50].std() < 0.1
    assert read_xray(path, max_side=None).shape == (4000, 5000)


def test_large_png_keeps_aspect_and_content(tmp_path):
    values = np.zeros((1200, 600), np.uint8)
    values[:600] = 255
    path = tmp_path / "tall.png"
    Image.fromarray(values).save(path)
    image = read_xray(path, max_side=300)
    assert image.shape == (300, 150)
    assert image[:140].min() > 0.99 and image[160:].max() < 0.01


def test_tiny_image_is_refused(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((20, 100), np.uint8)).save(path)
    with pytest.raises(ImageReadError, match="100x20 px; need at least 32 px"):
        read_xray(path)


@pytest.mark.parametrize("kind", ["truncated_jpeg", "truncated_png", "corrupt", "zero_byte", "missing"])
def test_broken_files_raise_image_read_error(tmp_path, kind):
    path = _broken_file(tmp_path, kind)
    with pytest.raises(ImageReadError) as info:
        read_xray(path)
    assert info.value.path == str(path) and info.value.reason
    if kind == "zero_byte":
        assert "empty file" in info.value.reason


def _broken_file(folder: Path, kind: str) -> Path:
    """A file of the given brokenness in ``folder``."""
    if kind in ("truncated_jpeg", "truncated_png"):
        suffix = ".jpg" if kind == "truncated_jpeg" else ".png"
        path = folder / f"{kind}{suffix}"
        noise = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt":
        path = folder / "corrupt.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif kind == "zero_byte":
        path = folder / "zero.jpeg"
        path.write_bytes(b"")
    else:
        path = folder / "missing.png"
    return path


def test_read_mask_resizes_with_nearest(tmp_path):
    mask = np.zeros((50, 50), np.uint8)
    mask[:, :25] = 255
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    resized = read_mask(path, (100, 100))
    assert resized.dtype == bool and resized.shape == (100, 100)
    assert resized[:, :50].all() and not resized[:, 50:].any()
    stretched = read_mask(path, (100, 80), any_size=True)  # lungVAE's rule: any size, stretched
    assert stretched.shape == (100, 80) and stretched[:, :40].all() and not stretched[:, 40:].any()


def test_read_mask_accepts_0_1_and_palette_masks(tmp_path):
    ones = np.zeros((40, 40), np.uint8)
    ones[10:20] = 1
    Image.fromarray(ones).save(tmp_path / "binary.png")
    palette = Image.fromarray(ones).convert("P")
    palette.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # index 1 drawn dark red
    palette.save(tmp_path / "palette.png")
    for name in ("binary.png", "palette.png"):
        np.testing.assert_array_equal(read_mask(tmp_path / name, (40, 40)), ones > 0)


def test_read_v7_mask_splits_lung_and_ignore(tmp_path):
    values = np.zeros((40, 40), np.uint8)
    values[5:20] = 255
    values[30:35, 30:35] = 127
    path = tmp_path / "v7.png"
    Image.fromarray(values).save(path)
    lung, ignore = read_v7_mask(path, (80, 80))
    assert lung.sum() == 15 * 40 * 4 and ignore.sum() == 25 * 4
    assert not (lung & ignore).any()


def test_broken_mask_raises(tmp_path):
    with pytest.raises(ImageReadError):
        read_mask(_broken_file(tmp_path, "corrupt"), (40, 40))


# -- masks that cannot be the image's mask ----------------------------------------------------------


def _save(path: Path, values: np.ndarray, **kwargs) -> Path:
    Image.fromarray(values).save(path, **kwargs)
    return path


def test_mask_of_another_aspect_ratio_is_refused_naming_both_sizes(tmp_path):
    mask = np.zeros((50, 50), np.uint8)
    mask[10:40, 10:40] = 255
    path = _save(tmp_path / "square.png", mask)
    with pytest.raises(MaskError, match=r"mask is 50x50 px, the image 80x100 px: another aspect ratio"):
        read_mask(path, (100, 80))
    with pytest.raises(MaskError, match="another aspect ratio"):
        read_v7_mask(path, (100, 80))


def test_same_frame_allows_the_rounding_of_a_downsized_image():
    assert same_frame((750, 1000), (384, 512))  # 1000x750 read at max_side 512
    assert same_frame((2200, 1992), (512, 464))  # round(1992 * 512 / 2200) = 464
    assert same_frame((513, 401), (256, 200))
    assert not same_frame((750, 1000), (512, 512))
    assert not same_frame((1000, 750), (384, 512))  # transposed


def test_non_binary_masks_are_refused(tmp_path):
    grey = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))  # a picture, not a mask
    with pytest.raises(MaskError, match=r"not binary: \d+% of its pixels are mid-grey"):
        read_mask(_save(tmp_path / "grey.png", grey), (64, 64))
    labels = np.zeros((64, 64), np.uint8)
    labels[:, 20:40], labels[:, 40:] = 1, 2  # a label map: background, left lung, right lung
    with pytest.raises(MaskError, match=r"not binary: 3 values \(0, 1, 2\), a label map"):
        read_mask(_save(tmp_path / "labels.png", labels), (64, 64))


def test_mask_marking_every_pixel_is_refused(tmp_path):
    with pytest.raises(MaskError, match="marks every pixel"):
        read_mask(_save(tmp_path / "full.png", np.full((40, 40), 255, np.uint8)), (40, 40))


def test_two_valued_mask_in_any_colour_and_noisy_jpeg_mask_are_binary(tmp_path):
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[10:30, 10:30, 0] = 255  # drawn in red: luminance 76, below the old 128 threshold
    red = read_mask(_save(tmp_path / "red.png", rgb), (40, 40))
    assert red.sum() == 400 and red[10:30, 10:30].all()
    mask = np.zeros((80, 80), np.uint8)
    mask[20:60, 20:60] = 255
    noisy = read_mask(_save(tmp_path / "noisy.jpg", mask, quality=75), (80, 80))
    assert abs(int(noisy.sum()) - 1600) < 80


def test_empty_mask_reads_as_all_false(tmp_path):
    assert not read_mask(_save(tmp_path / "empty.png", np.zeros((40, 40), np.uint8)), (40, 40)).any()


# -- DICOM ---------------------------------------------------------------------------------------

def _dicom(path: Path, stored: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12, **elements) -> Path:
    """A single-frame DX DICOM file with 16-bit allocated, ``bits_stored`` stored, uncompressed."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelData = stored.astype("<u2").tobytes()
    for name, value in elements.items():
        setattr(ds, name, value)
    try:
        ds.save_as(path, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(path, write_like_original=False)  # pydicom 2.x
    return path


# Stored values in the columns of a 40x40 image (12 bits: 0..4095).
_STORED = [0, 1, 2048, 2049, 4095, 300, 450, 451, 600]


def _columns() -> np.ndarray:
    stored = np.zeros((40, 40), np.uint16)
    stored[:, : len(_STORED)] = _STORED
    return stored


def test_dicom_monochrome2_12_bit_keeps_its_precision(tmp_path):
    image = read_xray(_dicom(tmp_path / "m2.dcm", _columns()))
    assert image.dtype == np.float32 and image.shape == (40, 40)
    # Scaled by BitsStored (4095), not by 16 bits or the image's own max; 2048 and 2049 stay apart.
    np.testing.assert_allclose(image[0, : len(_STORED)], np.array(_STORED) / 4095, atol=1e-6)
    assert image[0, 3] - image[0, 2] == pytest.approx(1 / 4095, abs=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    image = read_xray(_dicom(tmp_path / "m1.dcm", _columns(), photometric="MONOCHROME1"))
    np.testing.assert_allclose(image[0, : len(_STORED)], 1 - np.array(_STORED) / 4095, atol=1e-6)
    assert image[0, 0] == pytest.approx(1.0) and image[0, 4] == pytest.approx(0.0)


def test_dicom_rescale_slope_and_intercept(tmp_path):
    # slope -1, intercept 4095: stored s -> 4095 - s over the output range [0, 4095].
    image = read_xray(_dicom(tmp_path / "inverse.dcm", _columns(), RescaleSlope=-1, RescaleIntercept=4095))
    np.testing.assert_allclose(image[0, :5], [1.0, 4094 / 4095, 2047 / 4095, 2046 / 4095, 0.0], atol=1e-6)
    # slope 2, intercept -1024: stored 1000 -> 976 in [-1024, 7166], i.e. (976 + 1024) / 8190.
    stored = _columns()
    stored[:, 9] = 1000
    image = read_xray(_dicom(tmp_path / "linear.dcm", stored, RescaleSlope=2, RescaleIntercept=-1024))
    assert image[0, 9] == pytest.approx(2000 / 8190, abs=1e-6)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_window_after_rescale(tmp_path, photometric):
    # Rescale 2 s + 100, then the linear window of PS3.3 C.11.2.1.2 with centre 1000, width 501:
    # x <= 749.5 -> 0, x > 1249.5 -> 1, else (x - 999.5) / 500 + 0.5.
    path = _dicom(tmp_path / "window.dcm", _columns(), photometric, RescaleSlope=2, RescaleIntercept=100,
                  WindowCenter=1000, WindowWidth=501)
    image = read_xray(path)[0]
    expected = {5: 0.0, 6: 0.501, 7: 0.505, 8: 1.0, 0: 0.0, 4: 1.0}  # stored 300, 450, 451, 600, 0, 4095
    for column, value in expected.items():
        want = value if photometric == "MONOCHROME2" else 1 - value
        assert image[column] == pytest.approx(want, abs=1e-6), column


def test_dicom_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.add_new(0x00283002, "US", [4, 100, 10])  # LUT Descriptor: 4 entries from input 100, 10-bit output
    item.add_new(0x00283006, "US", [0, 341, 682, 1023])  # LUT Data
    stored = np.zeros((40, 40), np.uint16)
    stored[:, 1], stored[:, 2], stored[:, 3], stored[:, 4] = 100, 101, 103, 4000
    image = read_xray(_dicom(tmp_path / "lut.dcm", stored, VOILUTSequence=Sequence([item])))
    np.testing.assert_allclose(image[0, :5], [0.0, 0.0, 341 / 1023, 1.0, 1.0], atol=1e-6)


def test_large_dicom_is_downsampled(tmp_path):
    stored = np.zeros((600, 400), np.uint16)
    stored[:300] = 4095
    image = read_xray(_dicom(tmp_path / "big.dcm", stored), max_side=300)
    assert image.shape == (300, 200)
    assert image[:140].min() > 0.99 and image[160:].max() < 0.01


@pytest.mark.parametrize("kind", ["garbage", "truncated", "no_pixels", "tiny"])
def test_broken_dicom_raises_image_read_error(tmp_path, kind):
    path = tmp_path / f"{kind}.dcm"
    if kind == "garbage":
        path.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 3)
    elif kind == "truncated":
        data = _dicom(path, _columns()).read_bytes()
        path.write_bytes(data[: len(data) - 1000])
    elif kind == "no_pixels":
        _dicom(path, _columns())
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
    else:
        _dicom(path, np.full((20, 100), 7, np.uint16))
    with pytest.raises(ImageReadError) as info:
        read_xray(path)
    assert info.value.path == str(path) and info.value.reason
    if kind == "no_pixels":
        assert "no PixelData" in info.value.reason
    if kind == "tiny":
        assert "100x20 px" in info.value.reason
