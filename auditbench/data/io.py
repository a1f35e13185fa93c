"""Reading real-world X-ray files and mask files into the pipeline's arrays.

Images come back float32 greyscale in [0, 1], shape (H, W); masks come back bool at a given shape.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
MIN_SIDE = 32  # below this an image cannot be a usable chest X-ray (icons, thumbnails, bad crops)

# ITU-R 601-2 luma, the weights PIL's convert("L") uses; kept in float to avoid a second rounding.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


class ImageReadError(Exception):
    """A file that cannot be used as an image; ``reason`` goes to skipped.csv and the report."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"cannot read {path}: {reason}")
        self.path = str(path)
        self.reason = reason


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return path


def read_xray(path: str | Path, max_side: int | None = 512) -> np.ndarray:
    """Read an X-ray as float32 greyscale in [0, 1], shape (H, W), longest side <= ``max_side``.

    Handles jpg/png/bmp/tiff; 8- and 16-bit data (scaled by the file's bit depth, PNG ``sBIT``
    when present, not by the image's own min/max); greyscale, RGB (luminance), palette; RGBA is
    composited on black (a transparent pixel reads as background, 0); EXIF orientation is
    applied. Larger images are downsampled with antialiasing (huge JPEGs are first reduced in the
    decoder). Raises :class:`ImageReadError` for missing, empty, corrupt, truncated or too small
    (< 32 px on a side) files. ``max_side=None`` keeps the full size.
    """
    path = _existing_file(path)
    try:
        image, bit_depth = _decode(path, max_side)
    except ImageReadError:
        raise
    # PIL signals corrupt input with many exception types (OSError, SyntaxError, ValueError,
    # struct.error, ...); this block only decodes, so any of them means "unreadable file".
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc
    array = _to_unit_grey(image, bit_depth, path)
    if max_side is not None and max(array.shape) > max_side:
        array = _downsample(array, max_side)
    return np.ascontiguousarray(array, dtype=np.float32)


def _decode(path: Path, max_side: int | None) -> tuple[Image.Image, int]:
    """The decoded, upright image (a copy, the file closed) and its bit depth."""
    with Image.open(path) as image:
        width, height = image.size
        if min(width, height) < MIN_SIDE:
            raise ImageReadError(path, f"image is {width}x{height} px; need at least {MIN_SIDE} px on each side")
        if max_side is not None and max(width, height) > max_side:
            # JPEG DCT scaling (1/2, 1/4, 1/8) in the decoder; keep 2x the target so the final
            # antialiased resize still has detail to average (as PIL's thumbnail does).
            scale = 2 * max_side / max(width, height)
            image.draft("L", (max(1, int(width * scale)), max(1, int(height * scale))))
        image.load()
        return ImageOps.exif_transpose(image), _bit_depth(image, path)


def _bit_depth(image: Image.Image, path: Path) -> int:
    """Significant bits of a >8-bit greyscale file (16 unless the file says fewer)."""
    if image.mode not in _HIGH_BIT_MODES:
        return 8
    if image.format == "PNG":
        return _png_significant_bits(path) or 16
    if image.format == "TIFF":
        bits = image.tag_v2.get(258)
        return int(bits[0] if isinstance(bits, tuple) else bits or 16)
    return 16


def _png_significant_bits(path: Path) -> int | None:
    """The greyscale value of a PNG's sBIT chunk (e.g. 12 for 12-bit data in 16-bit samples)."""
    with open(path, "rb") as handle:
        if handle.read(8) != _PNG_SIGNATURE:
            return None
        while True:
            head = handle.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                return handle.read(1)[0] or None
            if kind in (b"IDAT", b"IEND"):  # sBIT must precede the image data
                return None
            handle.seek(length + 4, 1)  # chunk data + CRC


def _to_unit_grey(image: Image.Image, bit_depth: int, path: Path) -> np.ndarray:
    mode = image.mode
    if mode in _HIGH_BIT_MODES:
        peak = float(2**bit_depth - 1)
        return np.clip(np.asarray(image, dtype=np.float32) / peak, 0.0, 1.0)
    if mode == "F":  # float TIFFs carry no range; map their own min..max to [0, 1]
        array = np.asarray(image, dtype=np.float32)
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        return np.zeros_like(array) if high <= low else (np.nan_to_num(array, nan=low) - low) / (high - low)
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if mode == "LA":
        grey_alpha = np.asarray(image, dtype=np.float32) / 255.0
        return grey_alpha[..., 0] * grey_alpha[..., 1]
    if mode in ("P", "PA"):
        # Palette entries may be colours or carry transparency (tRNS); expand, then composite.
        image = image.convert("RGBA" if mode == "PA" or "transparency" in image.info else "RGB")
    elif mode not in ("RGB", "RGBA"):
        try:
            image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
        except ValueError as exc:
            raise ImageReadError(path, f"unsupported image mode {mode}") from exc
    array = np.asarray(image, dtype=np.float32) / 255.0
    grey = array[..., :3] @ _LUMA
    if array.shape[-1] == 4:
        grey = grey * array[..., 3]  # composite on black
    return grey


def _downsample(array: np.ndarray, max_side: int) -> np.ndarray:
    height, width = array.shape
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Lanczos in PIL's float mode is antialiased; reducing_gap box-reduces first for speed.
    small = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32), mode="F").resize(
        size, Image.Resampling.LANCZOS, reducing_gap=3.0
    )
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


def _read_label_image(path: str | Path, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """A mask file's raw values nearest-resized to ``shape``, and whether they are palette indices."""
    path = _existing_file(path)
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
        palette = upright.mode == "P"
        if not palette and upright.mode not in ("L", *_HIGH_BIT_MODES):
            upright = upright.convert("L")  # RGB(A) masks: drawn in any colour, luminance is enough
        values = np.asarray(upright)
    except Exception as exc:  # noqa: BLE001  (see read_xray: PIL's corrupt-file errors vary)
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc
    if values.shape != tuple(shape):
        # Nearest neighbour at pixel centres: labels are never blended.
        rows = ((np.arange(shape[0]) + 0.5) * values.shape[0] / shape[0]).astype(np.int64)
        cols = ((np.arange(shape[1]) + 0.5) * values.shape[1] / shape[1]).astype(np.int64)
        values = values[rows[:, None], cols[None, :]]
    return values, palette


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A binary mask file as bool at ``shape`` (nearest resize).

    Foreground is a value of at least half the bit depth's range (128 for 8-bit, robust to JPEG
    noise), or any non-zero value when the file only holds 0/1 values or palette indices.
    Raises :class:`ImageReadError` like :func:`read_xray`.
    """
    values, palette = _read_label_image(path, shape)
    if palette or values.max(initial=0) <= 1:
        return values > 0
    peak = 255 if values.dtype == np.uint8 else 65535  # 8-bit, else 16-bit ("I" modes)
    return values >= (peak + 1) // 2


def read_v7_mask(path: str | Path, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A V7 Labs annotation (0 background, 255 lung, 127 "Ignore") as (lung, ignore) bool at ``shape``.

    "Ignore" marks instruments, markup and text drawn over the image: an artifact mask.
    """
    values = _read_label_image(path, shape)[0].astype(np.int32)
    return values >= 192, (values >= 64) & (values < 192)
