"""The lung U-Net's file reading goes through the data sets' reader (auditbench.data.io.read_xray):
a greyscale PNG gives the same input and the same mask as the former PIL reader, a DICOM file now
reads at all, and training pairs' masks are read by the data sets' mask reader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from test_io import _dicom

from auditbench.data.io import ImageReadError, read_xray
from auditbench.masks.lungseg import LungSegmenter, _load_pairs, read_grey

SHENZHEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "lung-masks-shenzhen-montgomery-256" / "cxr"


def former_read_grey(path: Path) -> np.ndarray:
    """lungseg.read_grey before it used read_xray (PIL only), kept here as the reference."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im, dtype=np.float32)
            return a / max(float(a.max()), 1.0)
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            flat = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(flat, im)
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def chest(size: int = 160) -> np.ndarray:
    """An 8-bit chest-like phantom: bright body, two dark lungs, a bright spine."""
    yy, xx = np.mgrid[:size, :size] / size
    image = 190 - 60 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    for cx in (0.32, 0.68):
        image -= 110 * (((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1)
    image += 40 * (np.abs(xx - 0.5) < 0.04)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def segmenter() -> LungSegmenter:
    return LungSegmenter.load(device="cpu")


def test_a_greyscale_png_gives_the_same_input_and_mask_as_before(tmp_path, segmenter):
    path = tmp_path / "chest.png"
    Image.fromarray(chest()).save(path)
    new, old = read_grey(path), former_read_grey(path)
    assert new.dtype == np.float32 and new.shape == (160, 160)
    np.testing.assert_array_equal(new, old)  # same values, same [0, 1] range: the U-Net sees no change
    mask, before = segmenter.predict([new])[0], segmenter.predict([old])[0]
    assert mask.any() and np.array_equal(mask, before)


@pytest.mark.shared_data
def test_real_greyscale_pngs_give_the_same_masks_as_before(segmenter):
    if not SHENZHEN.is_dir():
        pytest.skip(f"real chest X-ray samples not found at {SHENZHEN}")
    for path in sorted(SHENZHEN.glob("*.png"))[:4]:
        new, old = read_grey(path), former_read_grey(path)
        np.testing.assert_array_equal(new, old)
        assert np.array_equal(segmenter.predict([new])[0], segmenter.predict([old])[0]), path.name


def test_a_dicom_file_reads_and_gives_the_mask_of_the_same_pixels_as_png(tmp_path, segmenter):
    pixels = chest()
    png, dcm = tmp_path / "chest.png", tmp_path / "chest.dcm"
    Image.fromarray(pixels).save(png)
    _dicom(dcm, pixels.astype(np.uint16), bits_stored=8)
    with pytest.raises(Exception):  # what the former PIL-only reader did with a DICOM file
        former_read_grey(dcm)
    image = read_grey(dcm)
    np.testing.assert_array_equal(image, read_xray(dcm, max_side=None))
    np.testing.assert_allclose(image, read_grey(png), atol=1e-6)
    assert np.array_equal(segmenter.predict([image])[0], segmenter.predict([read_grey(png)])[0])


def test_read_grey_keeps_the_full_size_and_names_a_bad_file(tmp_path):
    path = tmp_path / "large.png"
    Image.fromarray(np.tile(chest(), (5, 5))).save(path)  # 800 px: read_xray's default would shrink it
    assert read_grey(path).shape == (800, 800)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_grey(tmp_path / "broken.png")


def test_training_pairs_masks_read_as_before_and_0_1_masks_too(tmp_path):
    (tmp_path / "cxr").mkdir()
    (tmp_path / "masks").mkdir()
    lungs = chest() < 120
    for name, values in (("a.png", lungs * 255), ("b.png", lungs * 1)):  # 0/255, and 0/1
        Image.fromarray(chest()).save(tmp_path / "cxr" / name)
        Image.fromarray(values.astype(np.uint8)).save(tmp_path / "masks" / name)
    images, masks = _load_pairs(tmp_path, ["a.png", "b.png"])
    np.testing.assert_array_equal(images[0], former_read_grey(tmp_path / "cxr" / "a.png"))
    np.testing.assert_array_equal(masks[0], former_read_grey(tmp_path / "masks" / "a.png") >= 0.5)
    np.testing.assert_array_equal(masks[1], lungs)  # the former threshold at 0.5 read a 0/1 mask as empty
