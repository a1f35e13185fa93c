"""Reading real-world image files: formats, bit depths, orientation, sizes and broken files."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditbench.data.io import ImageReadError, read_mask, read_v7_mask, read_xray


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
    resized = read_mask(path, (100, 80))
    assert resized.dtype == bool and resized.shape == (100, 80)
    assert resized[:, :40].all() and not resized[:, 40:].any()


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
