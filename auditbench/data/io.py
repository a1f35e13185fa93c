"""Reading real-world X-ray files and mask files into the pipeline's arrays.

:func:`read_xray` is the one image reader of every data set adapter (PIL formats and DICOM).
Images come back float32 greyscale in [0, 1], shape (H, W); masks come back bool at a given shape.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}) | DICOM_SUFFIXES
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


class MaskError(ImageReadError):
    """A mask file that reads but cannot be the image's mask: another aspect ratio, not binary, or
    marking every pixel. ``reason`` says which."""


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
    applied. DICOM (``.dcm``/``.dicom`` or a ``DICM`` preamble) goes through :func:`read_dicom`.
    Larger images are downsampled with antialiasing (huge JPEGs are first reduced in the
    decoder). Raises :class:`ImageReadError` for missing, empty, corrupt, truncated or too small
    (< 32 px on a side) files. ``max_side=None`` keeps the full size.
    """
    path = _existing_file(path)
    if is_dicom(path):
        array = read_dicom(path)
        height, width = array.shape
        if min(width, height) < MIN_SIDE:
            raise ImageReadError(path, f"image is {width}x{height} px; need at least {MIN_SIDE} px on each side")
        if max_side is not None and max(array.shape) > max_side:
            array = _downsample(array.astype(np.float32), max_side)
        return np.ascontiguousarray(array, dtype=np.float32)
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


# ----- DICOM --------------------------------------------------------------------------------------


def is_dicom(path: Path) -> bool:
    """A ``.dcm``/``.dicom`` name, or the ``DICM`` magic after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        head = handle.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _dicom_luts():
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def read_dicom(path: str | Path) -> np.ndarray:
    """A single-frame DICOM X-ray as float64 greyscale in [0, 1], shape (H, W), at full size.

    Greyscale (MONOCHROME1/2) goes through the display pipeline of DICOM PS3.3 C.11 in float64:
    the modality LUT (rescale slope/intercept, or a Modality LUT Sequence), then the first VOI
    transform (VOI LUT Sequence, else window centre/width with its VOI LUT Function), then the
    presentation: MONOCHROME1 is inverted, so bright is dense tissue as in MONOCHROME2. The result
    is scaled by the transform's output range, never by the image's own min/max: without a VOI
    transform that is the stored bit depth (``BitsStored``, e.g. 12 of 16 allocated bits) mapped
    through the rescale; with a window, the window's output range; with a VOI LUT, 0..2^n - 1 of
    its descriptor. RGB DICOM becomes luminance. Raises :class:`ImageReadError` for files that
    are not DICOM, hold no or several frames, or whose pixel data cannot be decoded.
    """
    path = Path(path)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:  # a dependency; only a broken install lacks it
        raise ImageReadError(path, "reading DICOM needs pydicom (pip install 'pydicom>=2.4')") from exc
    try:
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, force=True)  # old files without the 128-byte preamble
    except Exception as exc:  # noqa: BLE001  (pydicom's parse errors vary like PIL's)
        raise ImageReadError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        if "SOPClassUID" not in ds and "Rows" not in ds:  # what force=True makes of arbitrary bytes
            raise ImageReadError(path, "not a DICOM file (no image elements; corrupt or another format)")
        raise ImageReadError(path, "DICOM file holds no image (no PixelData element)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(path, f"DICOM file holds {frames} frames; expected one X-ray image")
    try:
        stored = ds.pixel_array
        bits = int(ds.BitsStored)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except Exception as exc:  # noqa: BLE001  (missing elements, truncated or compressed data)
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        name = f" ({getattr(syntax, 'name', syntax)})" if syntax else ""
        raise ImageReadError(path, f"cannot decode DICOM pixel data{name}: {type(exc).__name__}: {exc}") from exc
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if stored.ndim == 3 and stored.shape[-1] == 3:  # RGB; pydicom converts YBR to RGB
            return np.clip(stored.astype(np.float64) @ _LUMA.astype(np.float64) / (2**bits - 1), 0.0, 1.0)
        raise ImageReadError(path, f"unsupported DICOM photometric interpretation {photometric}")
    if stored.ndim != 2:
        raise ImageReadError(path, f"DICOM pixel data has shape {stored.shape}; expected one greyscale image")
    if not signed:
        stored = stored & np.asarray(2**bits - 1, dtype=stored.dtype)  # bits above BitsStored (old overlays)
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    try:
        modality = np.asarray(apply_modality_lut(stored, ds))
        values = modality.astype(np.float64)
        low, high = _modality_range(ds, bits, signed)
        if "VOILUTSequence" in ds:
            # A LUT is indexed by whole values (a rescale's output is whole for whole intercepts).
            index = modality if modality.dtype.kind in "iu" else np.rint(modality).astype(np.int64)
            values = np.asarray(apply_voi_lut(index, ds, index=0), dtype=np.float64)
            low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            # The window's output range, whatever pydicom scales it to: the two extremes mapped.
            with np.errstate(over="ignore"):
                low, high = np.asarray(apply_voi_lut(np.array([-1e300, 1e300]), ds, index=0), dtype=np.float64)
            values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001  (bad LUT descriptors, zero window width, ...)
        raise ImageReadError(path, f"cannot apply the DICOM modality/VOI transform: {type(exc).__name__}: {exc}") from exc
    if not high > low:
        raise ImageReadError(path, f"DICOM output range is empty ({low:g} to {high:g})")
    unit = np.clip((values - low) / (high - low), 0.0, 1.0)
    return 1.0 - unit if photometric == "MONOCHROME1" else unit


def _modality_range(ds, bits: int, signed: bool) -> tuple[float, float]:
    """The range of the modality LUT's output over every storable value."""
    if "ModalityLUTSequence" in ds:
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return float(ends[0]), float(ends[1])


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


def same_frame(mask_shape: tuple[int, int], image_shape: tuple[int, int]) -> bool:
    """Whether two pixel grids can show the same picture at different sizes: their aspect ratios
    agree within the rounding of each side to whole pixels (an image read downsized by
    :func:`read_xray` still matches its mask at the original size)."""
    (h, w), (height, width) = mask_shape, image_shape
    low = max((h - 0.5) / (w + 0.5), (height - 0.5) / (width + 0.5))
    high = min((h + 0.5) / max(w - 0.5, 0.5), (height + 0.5) / max(width - 0.5, 0.5))
    return low <= high


def _read_label_values(path: Path) -> tuple[np.ndarray, bool]:
    """A mask file's raw values at its own size, and whether they are palette indices."""
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
        palette = upright.mode == "P"
        if not palette and upright.mode not in ("L", *_HIGH_BIT_MODES):
            upright = upright.convert("L")  # RGB(A) masks: drawn in any colour, luminance is enough
        return np.asarray(upright), palette
    except Exception as exc:  # noqa: BLE001  (see read_xray: PIL's corrupt-file errors vary)
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc


def _read_label_image(path: str | Path, shape: tuple[int, int], any_size: bool = False) -> tuple[np.ndarray, bool]:
    """A mask file's raw values nearest-resized to ``shape``, and whether they are palette indices.

    Raises :class:`MaskError` when the file's aspect ratio is not the image's (:func:`same_frame`),
    unless ``any_size``: then it is stretched to ``shape`` whatever its size.
    """
    path = _existing_file(path)
    values, palette = _read_label_values(path)
    if values.ndim != 2:
        raise MaskError(path, f"mask has shape {values.shape}; expected a single-channel image")
    if not any_size and not same_frame(values.shape, shape):
        raise MaskError(
            path,
            f"mask is {values.shape[1]}x{values.shape[0]} px, the image {shape[1]}x{shape[0]} px: "
            "another aspect ratio, so not this image's mask",
        )
    if values.shape != tuple(shape):
        # Nearest neighbour at pixel centres: labels are never blended.
        rows = ((np.arange(shape[0]) + 0.5) * values.shape[0] / shape[0]).astype(np.int64)
        cols = ((np.arange(shape[1]) + 0.5) * values.shape[1] / shape[1]).astype(np.int64)
        values = values[rows[:, None], cols[None, :]]
    return values, palette


# A grey-level mask counts as binary (JPEG noise, antialiased edges) while at most this share of its
# pixels lies in the middle half of the value range.
MAX_MID_GREY = 0.05


def binary_foreground(values: np.ndarray, palette: bool = False, path: str | Path = "mask") -> np.ndarray:
    """The foreground of a mask's raw values, or :class:`MaskError` saying why they are not binary.

    Two distinct values (0/255, 0/1, any colour on black): the higher one is foreground. Palette
    indices: any non-zero index, when there are at most two. More values: a grey-level mask whose
    pixels lie near 0 and near the top of the bit depth (at most 5% in the middle half of the
    range) is thresholded at half the range; a label map of small values (0/1/2...) or a grey
    picture is refused. A mask marking every pixel is refused too: it marks no region.
    """
    distinct = np.unique(values)
    shown = ", ".join(str(v) for v in distinct[:6]) + (", ..." if len(distinct) > 6 else "")
    if len(distinct) == 1:
        if distinct[0] != 0:
            raise MaskError(path, f"mask marks every pixel (constant value {distinct[0]}): no region")
        return np.zeros(values.shape, bool)
    if len(distinct) == 2:
        return values == distinct[1]
    peak = 255 if values.dtype == np.uint8 else 65535
    if palette or distinct[-1] < peak // 2:
        kind = "palette indices" if palette else "values"
        raise MaskError(path, f"mask is not binary: {len(distinct)} {kind} ({shown}), a label map; expected two values (0/255 or 0/1)")
    mid = float(((values > peak // 4) & (values < peak - peak // 4)).mean())
    if mid > MAX_MID_GREY:
        raise MaskError(
            path,
            f"mask is not binary: {mid:.0%} of its pixels are mid-grey ({len(distinct)} values: {shown}); "
            "expected 0/255 (or 0/1)",
        )
    return values >= (peak + 1) // 2


def read_mask(path: str | Path, shape: tuple[int, int], any_size: bool = False) -> np.ndarray:
    """A binary mask file as bool at ``shape`` (nearest resize); may be empty.

    The file must have the image's aspect ratio (any size; ``any_size=True`` stretches any size).
    Foreground: see :func:`binary_foreground`. Raises :class:`ImageReadError` like
    :func:`read_xray`, and its subclass :class:`MaskError` for another aspect ratio, non-binary
    values or a mask marking every pixel.
    """
    path = Path(path)
    values, palette = _read_label_image(path, shape, any_size)
    return binary_foreground(values, palette, path)


def read_v7_mask(path: str | Path, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A V7 Labs annotation (0 background, 255 lung, 127 "Ignore") as (lung, ignore) bool at ``shape``.

    "Ignore" marks instruments, markup and text drawn over the image: an artifact mask. V7 files
    have the image's original size: another aspect ratio raises :class:`MaskError`.
    """
    values = _read_label_image(path, shape)[0].astype(np.int32)
    return values >= 192, (values >= 64) & (values < 192)
