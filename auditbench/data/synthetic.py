"""Synthetic chest X-ray phantoms with exact ground truth: the audit's known-answer benchmark.

Each image is a PA chest phantom (body outline, lungs, ribs, clavicles, spine, heart and
mediastinum, diaphragm domes, lung vessels) with per-image variation of pose, size, contrast,
gamma and noise. Classes differ only by a disease pattern drawn inside the lungs. Bright burned-in
artifacts (laterality letters, text, arrows, wires, markers) are drawn where
``SyntheticConfig.artifact_placement`` says, and their presence is correlated with the label by
``shortcut_strength``:

- ``"border"`` (default): in the outer band (``artifact_band``) that the study's centre crop removes;
- ``"inside_crop"``: inside the crop window, at least ``SyntheticConfig.crop_inset_px`` from every
  edge, so that no resampling into a model frame carries them into the removed border: over the
  abdomen, the mediastinum and neck, the shoulders, the corners of the window, wherever there is room;
- ``"anywhere"``: each marker independently in the band or inside the window, half and half.

With border placement alone the crop would remove every shortcut by construction; real markers,
text, arrows and ECG electrodes also lie inside the crop window. In every placement artifacts keep a
two-pixel gap to the lungs and never overlap one another.

Everything about image ``i`` except its artifacts is fixed by ``(seed, i)``; the artifacts are
fixed by ``(seed, i, variant)``. So ``generate(config, 1.0, "train")`` and
``generate(config, 0.0, "test")`` are two views of the same patients that differ only in the
burned-in marks, and the clean twin of any image is the same config with ``base_artifact_rate=0``:
``generate(replace(config, base_artifact_rate=0), 0.0, variant)`` gives exactly
``render_phantom(config, i, label).image``.

Example::

    data = generate(SyntheticConfig(n_images=8), shortcut_strength=1.0)
    data.samples[0].label, data.samples[0].has_artifact   # ('covid', True)
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal
from skimage import draw

from auditbench.data.records import LoadedDataset, RenderedSample
from auditbench.data.transforms import STUDY_CROP_RATIO

SYNTHETIC_CLASSES = ("covid", "viral", "bacterial", "normal")
VARIANTS = ("train", "test")
ARTIFACT_PLACEMENTS = ("border", "inside_crop", "anywhere")

# Each image draws from independent streams, so that rendering it as another class or with
# another variant's artifacts leaves every other random choice unchanged.
_STREAM_ANATOMY, _STREAM_DISEASE = 0, 1
_STREAM_ARTIFACT = {"train": 2, "test": 3}

# Peak opacity of each pattern at disease_strength 1, as the fraction of the lung's own darkening
# that it undoes: 1.0 would make the lung as dense as soft tissue. Ground glass leaves vessels
# visible (about half), consolidation nearly fills the air spaces.
_PEAK_OPACITY = {"covid": 0.5, "viral": 0.4, "bacterial": 0.9, "normal": 0.0}

_MIN_BAND_PX = 5  # leaves a 3-px strip inside the margins, the least that still holds a mark
_MARGIN_PX = 1  # artifacts keep this gap to the image edge and the band's inner edge
_PLACEMENT_TRIES = 200
# Inside the crop window, markers keep this extra margin beyond the crop line: bilinear and bicubic
# resampling (antialiased, any model frame of 112-299 px) spread a pixel over up to ~1.5 source px
# when enlarging and over ~1% of the side when shrinking; max(3 px, 2%) covers both with room to spare.
_INSIDE_MARGIN_PX = 3
_INSIDE_MARGIN_FRACTION = 0.02
_MIN_STAMP_ROOM = 3  # the least strip a stamp is shrunk to before the placement gives up


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the phantom set; see the module docstring for what depends on what.

    ``disease_strength`` scales every disease pattern's opacity (1 = radiologically typical, see
    ``_PEAK_OPACITY``). The default 0.5 stands for mild disease: at its peak a ground-glass patch
    undoes a quarter of the lung's darkening, about the contrast of one rib shadow. That is
    visible on a close look, while a burned-in marker jumps to near 1.0 with sharp edges: the
    easier cue, as with the real data sets. The value was chosen on these grounds, not tuned
    against any model or metric. ``noise`` is the mean standard
    deviation of the per-pixel Gaussian noise on the [0, 1] image (each image draws 0.5x-1.5x).
    ``artifact_band`` is the width of the outer band, as a fraction of the side, that holds the
    border artifacts; the default 0.12 lies inside the 38/300 band that the study's crop removes.
    ``artifact_placement`` (one of ``ARTIFACT_PLACEMENTS``) says where the artifacts go: ``"border"``
    in that band only, ``"inside_crop"`` inside the crop window only (each pixel at least
    ``crop_inset_px`` from every edge), ``"anywhere"`` each artifact in either, half and half. With
    border placement the crop removes every shortcut by construction, which real data does not
    grant: burned-in text, arrows and ECG electrodes also lie inside the crop window, and an audit of
    the crop as a remedy needs shortcuts that it does not remove. ``"border"`` renders exactly the
    images it always has.
    """

    n_images: int = 200
    image_size: int = 128
    classes: tuple[str, ...] = ("covid", "normal")
    positive_class: str = "covid"
    disease_strength: float = 0.5
    base_artifact_rate: float = 0.5
    artifact_band: float = 0.12
    artifact_placement: str = "border"
    noise: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))  # YAML gives lists
        unknown = [c for c in self.classes if c not in SYNTHETIC_CLASSES]
        if unknown or not self.classes:
            raise ValueError(
                f"unknown synthetic class(es) {unknown or '(none given)'}; allowed: {', '.join(SYNTHETIC_CLASSES)}"
            )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"synthetic classes must not repeat, got {list(self.classes)}")
        if self.positive_class not in self.classes:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of classes {list(self.classes)}")
        if self.n_images < 1:
            raise ValueError(f"n_images must be at least 1, got {self.n_images}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if not 0 <= self.disease_strength <= 2:
            raise ValueError(f"disease_strength must lie in [0, 2], got {self.disease_strength}")
        if not 0 <= self.base_artifact_rate <= 1:
            raise ValueError(f"base_artifact_rate must lie in [0, 1], got {self.base_artifact_rate}")
        if not 0 < self.artifact_band < 0.5:
            raise ValueError(f"artifact_band must lie in (0, 0.5), got {self.artifact_band}")
        if self.band_px < _MIN_BAND_PX:
            raise ValueError(
                f"artifact_band * image_size = {self.artifact_band * self.image_size:.1f} px is too thin to "
                f"draw artifacts in; it must be at least {_MIN_BAND_PX} px"
            )
        if self.artifact_placement not in ARTIFACT_PLACEMENTS:
            raise ValueError(
                f"artifact_placement must be one of {', '.join(ARTIFACT_PLACEMENTS)}, got {self.artifact_placement!r}"
            )
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def band_px(self) -> int:
        """Width of the artifact band in whole pixels: pixel k (from any edge) is in it iff k < band_px."""
        return math.floor(self.artifact_band * self.image_size)

    @property
    def crop_inset_px(self) -> int:
        """Least distance, in pixels, of every pixel of an inside-crop artifact to every image edge.

        ``ceil(STUDY_CROP_RATIO * size)`` (the crop line) plus a margin of ``max(3, ceil(0.02 * size))``
        pixels, so that resizing into any model frame of 112-299 px (bilinear or bicubic,
        antialiased) leaves none of the artifact's influence in the border that the crop removes.
        """
        size = self.image_size
        margin = max(_INSIDE_MARGIN_PX, math.ceil(_INSIDE_MARGIN_FRACTION * size))
        return math.ceil(STUDY_CROP_RATIO * size) + margin


def generate(config: SyntheticConfig, shortcut_strength: float, variant: str = "train") -> LoadedDataset:
    """Render ``config.n_images`` phantoms; image i has label ``classes[i % len(classes)]``.

    An image shows artifacts when ``u_i < p``, with ``u_i`` uniform from ``(seed, i, variant)`` and
    ``p = r + s (1 - r)`` for the positive class, ``p = r (1 - s)`` for the others
    (``r = base_artifact_rate``, ``s = shortcut_strength``).
    """
    if not 0 <= shortcut_strength <= 1:
        raise ValueError(f"shortcut_strength must lie in [0, 1], got {shortcut_strength}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    r = config.base_artifact_rate
    samples = []
    for index in range(config.n_images):
        label = config.classes[index % len(config.classes)]
        rate = r + shortcut_strength * (1 - r) if label == config.positive_class else r * (1 - shortcut_strength)
        render = functools.partial(_render_pixels, config, index, label, variant, rate)
        # Kinds and regions are small; the pixels are rendered again whenever they are read.
        _, _, kinds, regions = _artifacts(config, index, variant, rate, _phantom_pixels(
            config.seed, index, label, config.image_size, config.noise, config.disease_strength)[1])
        samples.append(
            RenderedSample(
                render,
                sample_id=f"synthetic-{index:05d}",
                label=label,
                patient_id=f"synthetic-{index:05d}",
                source="synthetic",
                mask_source="synthetic",
                artifact_mask_source="synthetic",
                extra={"index": index, "variant": variant, "artifacts": kinds, "artifact_regions": regions},
            )
        )
    return LoadedDataset(samples=samples)


def _render_pixels(config: SyntheticConfig, index: int, label: str, variant: str, rate: float):
    """Image (artifacts inked in), lung mask and artifact mask of one generated sample."""
    image, lung_mask = _phantom_pixels(config.seed, index, label, config.image_size, config.noise, config.disease_strength)
    artifact_mask, ink, _, _ = _artifacts(config, index, variant, rate, lung_mask)
    return np.where(artifact_mask, ink, image), lung_mask.copy(), artifact_mask


@functools.lru_cache(maxsize=512)
def _phantom_pixels(seed: int, index: int, label: str, size: int, noise: float, disease_strength: float):
    """Image and lung mask of :func:`render_phantom`, memoised by value (read-only arrays): every
    shortcut strength, placement and variant of a data set draws its artifacts on the same phantoms,
    so a validation grid renders each phantom once instead of once per view."""
    config = SyntheticConfig(n_images=index + 1, image_size=size, noise=noise, disease_strength=disease_strength, seed=seed)
    phantom = render_phantom(config, index, label)
    for array in (phantom.image, phantom.lung_mask):
        array.setflags(write=False)
    return phantom.image, phantom.lung_mask


# --- anatomy and disease -------------------------------------------------------------------------


@dataclass(frozen=True)
class Phantom:
    """One rendered image before artifacts, with the ground truth used to draw it."""

    image: np.ndarray  # float32 (S, S) in [0, 1]
    lung_mask: np.ndarray  # bool, both lungs
    body_mask: np.ndarray  # bool, soft tissue outline
    disease: np.ndarray  # float (S, S): density added by the disease, 0 outside the lungs


@dataclass(frozen=True)
class _Anatomy:
    density: np.ndarray  # X-ray density before disease (higher = brighter)
    body: np.ndarray
    lungs: tuple[np.ndarray, np.ndarray]  # image-left (patient's right) lung, image-right lung
    inner: np.ndarray  # distance of each lung pixel to the lung's edge, in pixels; 0 outside
    u: np.ndarray  # anatomical coordinates of each pixel: u to the image right, v down,
    v: np.ndarray  # in half-frame units of the standard (unrotated, unscaled) phantom
    px_per_unit: float
    lung_contrast: float  # how much the lungs are darker than soft tissue
    window: tuple[float, float, float]  # (low, high, gamma) of the display transform
    noise: np.ndarray


def render_phantom(config: SyntheticConfig, index: int, label: str) -> Phantom:
    """Image ``index`` drawn with the disease of ``label`` (any of SYNTHETIC_CLASSES), no artifacts.

    The anatomy, noise and disease randomness depend on ``(seed, index)`` only, so the same index
    rendered as two classes differs only inside the lungs.
    """
    if label not in SYNTHETIC_CLASSES:
        raise ValueError(f"unknown synthetic class {label!r}; allowed: {', '.join(SYNTHETIC_CLASSES)}")
    anatomy = _anatomy(_rng(config.seed, index, _STREAM_ANATOMY), config.image_size, config.noise)
    disease = _disease(_rng(config.seed, index, _STREAM_DISEASE), anatomy, label)
    disease *= config.disease_strength * _PEAK_OPACITY[label] * anatomy.lung_contrast
    low, high, gamma = anatomy.window
    image = np.clip((anatomy.density + disease - low) / (high - low), 0, 1) ** gamma
    image = np.clip(image + anatomy.noise, 0, 1).astype(np.float32)
    lung_mask = anatomy.lungs[0] | anatomy.lungs[1]
    return Phantom(image=image, lung_mask=lung_mask, body_mask=anatomy.body, disease=disease)


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The generator of one stream of one image, independent of every other (seed, index, stream)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, stream)))


def _superellipse(u, v, cu, cv, ru, rv, p):
    """Below 1 inside the superellipse of centre (cu, cv), radii (ru, rv) and exponent p."""
    return np.abs((u - cu) / ru) ** p + np.abs((v - cv) / rv) ** p


def _segment_distance(u, v, a, b):
    """Distance of each (u, v) to the segment a-b."""
    d = np.subtract(b, a)
    t = np.clip(((u - a[0]) * d[0] + (v - a[1]) * d[1]) / (d @ d), 0, 1)
    return np.hypot(u - a[0] - t * d[0], v - a[1] - t * d[1])


def _anatomy(rng: np.random.Generator, size: int, noise: float) -> _Anatomy:
    """Draw the body in anatomical coordinates (u, v), then map pixels into them by a random pose."""
    centres = (np.arange(size) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(centres, centres)
    shift_x, shift_y = rng.uniform(-0.03, 0.03, 2)
    zoom = rng.uniform(0.9, 1.02)
    angle = np.deg2rad(rng.uniform(-4, 4))
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * (x - shift_x) + sin * (y - shift_y)) / zoom
    v = (-sin * (x - shift_x) + cos * (y - shift_y)) / zoom
    px_per_unit = zoom * size / 2
    res = size / 128  # pixel-sized details scale with the image

    def to_pixel(pu, pv):
        """(row, col) of anatomical points."""
        px = shift_x + zoom * (cos * pu - sin * pv)
        py = shift_y + zoom * (sin * pu + cos * pv)
        return (py + 1) * size / 2 - 0.5, (px + 1) * size / 2 - 0.5

    # Soft tissue: torso and neck, thickest in the middle.
    torso = _superellipse(u, v, 0, 0.4, rng.uniform(0.95, 1.05), 1.35, 3.5)
    neck = _superellipse(u, v, 0, -1.0, rng.uniform(0.22, 0.28), 0.7, 2)
    body = (torso < 1) | (neck < 1)
    density = 0.62 * np.clip(1 - np.minimum(torso, neck), 0, 1) ** 0.3

    # Lungs: apex rounded, bases broad, cut by the mediastinum, the heart and the diaphragm: two
    # domes (the patient's right one, on the image left, higher) that fall off laterally into
    # the costophrenic angles.
    lung_v, lung_rv = rng.uniform(-0.12, -0.04), rng.uniform(0.58, 0.64)
    dome = lung_v + lung_rv * rng.uniform(0.88, 0.98) + 0.6 * np.clip(np.abs(u) - 0.72, 0, None)
    lungs = []
    for side in (-1, 1):
        cu, ru = side * rng.uniform(0.39, 0.43), rng.uniform(0.29, 0.33)
        height = rng.uniform(0.15, 0.22) + 0.04 * (side < 0)
        dome = dome - height * np.sqrt(np.clip(1 - ((u - cu + side * 0.03) / (1.05 * ru)) ** 2, 0, 1))
        lung = _superellipse(u, v, cu, lung_v, ru, lung_rv, np.where(v < lung_v, 2.2, 3)) < 1
        lungs.append(lung & (side * u > 0))
    heart_u, heart_v = rng.uniform(0.1, 0.16), lung_v + lung_rv * rng.uniform(0.42, 0.5)
    hu, hv, tilt = u - heart_u, v - heart_v, np.deg2rad(25)  # apex down and to the image right
    heart = ((hu * np.cos(tilt) + hv * np.sin(tilt)) / rng.uniform(0.36, 0.42)) ** 2 + (
        (-hu * np.sin(tilt) + hv * np.cos(tilt)) / rng.uniform(0.26, 0.3)
    ) ** 2 < 1
    mediastinum = np.abs(u - 0.01) < 0.11 + 0.06 * np.clip(v + 0.5, 0, 1)
    aortic_knob = np.hypot(u - 0.1, v + 0.32) < 0.07
    abdomen = body & (v > dome)
    free = body & ~(mediastinum | heart | aortic_knob | abdomen)
    lungs = [lung & free for lung in lungs]
    lung_mask = lungs[0] | lungs[1]
    density += 0.18 * body * (mediastinum | heart | aortic_knob | abdomen)
    spine = (np.abs(u) < 0.055) * (0.85 + 0.15 * np.cos(2 * np.pi * v / 0.085))
    density += body * (0.05 * spine - 0.1 * ((np.abs(u) < 0.025) & (v < -0.3)))  # minus tracheal air

    # Ribs: posterior arcs rising from the spine and sweeping down laterally, with bright
    # cortices; fainter anterior ribs sloping down towards the midline. Clearest over the lungs.
    spacing = rng.uniform(0.1, 0.12)
    a = np.abs(u)
    phase = (v + 0.84 - (a - 0.2) ** 2) / spacing
    offset = np.abs(phase - np.round(phase))  # distance to the nearest rib centre, in spacings
    posterior = (offset < 0.28) * (0.7 + 0.3 * (offset / 0.28) ** 4) * (np.round(phase) >= 0) * (np.round(phase) < 10)
    phase = (v + 0.62 - 0.4 * (0.8 - a)) / (1.5 * spacing)
    offset = np.abs(phase - np.round(phase))
    anterior = (offset < 0.15) * (np.round(phase) >= 0) * (np.round(phase) < 6) * (a > 0.22)
    rib = np.maximum(posterior * np.clip((a - 0.05) / 0.1, 0, 1), 0.5 * anterior) * (v < dome + 0.15)
    density += 0.1 * rib * body * np.where(lung_mask, 1.0, 0.4)
    for side in (-1, 1):
        clavicle = _segment_distance(u, v, (side * 0.1, -0.56), (side * 0.66, -0.72 + rng.uniform(-0.04, 0.04)))
        density += 0.15 * body * np.clip(1 - clavicle / 0.035, 0, 1) ** 0.3

    # Lungs darker than soft tissue, less so at their edge where the chest wall overlaps; vessels
    # branch out from the hila and a faint mottle stands for the parenchyma.
    lung_contrast = 0.38 * rng.uniform(0.85, 1.1)
    starts, stops, weights = [], [], []  # vessel segments in anatomical coordinates
    for side in (-1, 1):
        hilum = np.array((side * 0.18, lung_v + 0.1))
        direction, length = rng.uniform(-1.4, 1.4, 10), rng.uniform(0.3, 0.6, 10)
        fork_at, turn = rng.uniform(0.3, 0.6, 10), direction + rng.uniform(0.3, 0.7, 10) * rng.choice((-1, 1), 10)
        ends = hilum + length[:, None] * np.column_stack((side * np.cos(direction), np.sin(direction)))
        forks = hilum + fork_at[:, None] * (ends - hilum)
        twigs = forks + 0.5 * length[:, None] * np.column_stack((side * np.cos(turn), np.sin(turn)))
        starts += [np.broadcast_to(hilum, ends.shape), forks]
        stops += [ends, twigs]
        weights += [np.full(10, 1.0), np.full(10, 0.6)]
    r0, c0 = np.round(to_pixel(*np.vstack(starts).T)).astype(int)
    r1, c1 = np.round(to_pixel(*np.vstack(stops).T)).astype(int)
    lines = [draw.line_aa(*ends) for ends in zip(r0, c0, r1, c1)]
    segment = np.repeat(np.arange(len(lines)), [len(line[0]) for line in lines])
    rr, cc, val = (np.concatenate(parts) for parts in zip(*lines))
    along = np.hypot(rr - r0[segment], cc - c0[segment]) / np.maximum(np.hypot(r1 - r0, c1 - c0), 1)[segment]
    val *= np.concatenate(weights)[segment] * (1 - 0.8 * np.clip(along, 0, 1))  # vessels taper outwards
    keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
    vessels = np.zeros((size, size))
    np.maximum.at(vessels, (rr[keep], cc[keep]), val[keep])
    # The lungs lie apart, so one transform gives each lung pixel its distance to its own lung's edge.
    inner = ndimage.distance_transform_edt(lung_mask)
    edge_ramp = np.clip(inner / (0.05 * px_per_unit), 0, 1) ** 0.7
    mottle = ndimage.gaussian_filter(rng.standard_normal((size, size)), 2.5 * res)
    mottle /= mottle.std()
    density -= lung_mask * (lung_contrast * edge_ramp - 0.015 * mottle)
    density += 0.3 * ndimage.gaussian_filter(vessels, 0.5 * res) * lung_mask
    density += 0.1 * np.exp(-(np.hypot(a - 0.17, v - lung_v - 0.12) / 0.08) ** 2)  # hila
    density = ndimage.gaussian_filter(density, 0.6 * res)  # the detector's blur

    window = (rng.uniform(-0.04, 0.06), rng.uniform(0.92, 1.08), rng.uniform(0.8, 1.25))
    noise_field = noise * rng.uniform(0.5, 1.5) * rng.standard_normal((size, size))
    return _Anatomy(
        density=density, body=body, lungs=(lungs[0], lungs[1]), inner=inner, u=u, v=v,
        px_per_unit=px_per_unit, lung_contrast=lung_contrast, window=window, noise=noise_field,
    )


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Smooth random field rescaled to [0, 1]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.min()) / (field.max() - field.min())


def _disease(rng: np.random.Generator, anatomy: _Anatomy, label: str) -> np.ndarray:
    """Disease pattern in [0, 1], exactly 0 outside the lungs and fading over ~1.5 px inside them."""
    shape = anatomy.density.shape
    if label == "normal":
        return np.zeros(shape)
    res = shape[0] / 128
    unit = anatomy.px_per_unit
    rows, cols = np.indices(shape)
    u, v = anatomy.u, anatomy.v
    if label == "covid":
        # Ground glass: 2-3 hazy patches per lung, centred near the lateral edge of the lower zone.
        blobs = np.zeros(shape)
        for side, lung in zip((-1, 1), anatomy.lungs):
            lung_u, lung_v = u[lung].mean(), np.median(v[lung])
            where = lung & (anatomy.inner < 0.1 * unit) & (side * (u - lung_u) > 0) & (v > lung_v)
            for centre in rng.choice(np.flatnonzero(where), rng.integers(2, 4)):
                r0, c0 = divmod(centre, shape[1])
                sigma = rng.uniform(0.08, 0.14) * unit
                blobs += np.exp(-((rows - r0) ** 2 + (cols - c0) ** 2) / (2 * sigma**2))
        pattern = np.clip(blobs, 0, 1) * np.exp(-anatomy.inner / (0.2 * unit))  # hugs the pleura
        pattern *= 0.55 + 0.45 * _smooth_noise(rng, shape, 1.5 * res)
    elif label == "viral":
        # Reticular net: thin ridges along the zero set of a smooth random field, in both lungs,
        # patchy and heavier towards the bases.
        field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.4 * res)
        net = np.exp(-((field / (0.3 * field.std())) ** 2))
        pattern = (0.2 + 0.8 * ndimage.gaussian_filter(net, 0.5 * res))
        pattern *= (0.5 + 0.5 * np.clip((v + 0.4) / 0.8, 0, 1)) * (0.5 + 0.5 * _smooth_noise(rng, shape, 6 * res))
    else:  # bacterial
        # Lobar consolidation: one lung, above or below a fissure-like line, nearly uniform.
        side = int(rng.integers(2))
        lung = anatomy.lungs[side]
        lung_u, top, bottom = u[lung].mean(), v[lung].min(), v[lung].max()
        fissure = top + rng.uniform(0.4, 0.6) * (bottom - top) + rng.uniform(-0.3, 0.3) * (u - lung_u)
        lobe = lung & ((v > fissure) if rng.random() < 0.6 else (v < fissure))
        pattern = np.clip(ndimage.distance_transform_edt(lobe) / (0.04 * unit), 0, 1)
        pattern *= 0.8 + 0.2 * _smooth_noise(rng, shape, 2 * res)
    edge = np.clip(anatomy.inner / (1.5 * res), 0, 1)
    return pattern / pattern.max() * edge


# --- artifacts -----------------------------------------------------------------------------------

_FONT = {  # 5x7 bitmap glyphs for the letters the burned-in texts use
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "N": ("#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
}
_TEXTS = ("PA", "AP", "PORT", "SUPINE", "ERECT", "ICU")
_ARTIFACT_KINDS = ("laterality", "text", "arrow", "wire", "marker")


def _text_bitmap(text: str, height: int) -> np.ndarray:
    """``text`` in the 5x7 font, one blank column between letters, scaled (nearest) to ``height`` rows."""
    glyphs = [np.array([[c == "#" for c in row] for row in _FONT[ch]]) for ch in text]
    spaced = [np.pad(g, ((0, 0), (0, 1))) for g in glyphs[:-1]] + glyphs[-1:]
    bitmap = np.hstack(spaced)
    width = max(1, round(bitmap.shape[1] * height / 7))
    rows = np.arange(height) * 7 // height
    cols = np.arange(width) * bitmap.shape[1] // width
    return bitmap[np.ix_(rows, cols)]


def _arrow_stamp(rng: np.random.Generator, size: int, room: int) -> np.ndarray:
    """An arrow in one of 8 directions, shrunk until it fits a strip ``room`` pixels wide.

    The filled outline is drawn over its 1-px skeleton, so that even a tiny arrow has pixels.
    """
    direction = rng.integers(8) * np.pi / 4
    length = rng.uniform(0.07, 0.11) * size
    while True:
        t, head = length / 10, 0.4 * length  # shaft half-thickness, head length
        outline = np.array(
            [(0, -t), (length - head, -t), (length - head, -2.5 * t), (length, 0),
             (length - head, 2.5 * t), (length - head, t), (0, t)]
        )
        skeleton = np.array([(0, 0), (length, 0), (length - head, -2.5 * t), (length - head, 2.5 * t)])
        points = np.vstack([outline, skeleton])
        x = points[:, 0] * np.cos(direction) - points[:, 1] * np.sin(direction)
        y = points[:, 0] * np.sin(direction) + points[:, 1] * np.cos(direction)
        x, y = np.round(x - x.min(), 6), np.round(y - y.min(), 6)  # so that ceil() keeps whole numbers
        shape = (int(np.ceil(y.max())) + 1, int(np.ceil(x.max())) + 1)
        stamp = np.zeros(shape, bool)
        stamp[draw.polygon(y[:7], x[:7], shape)] = True
        tail, tip, barb1, barb2 = np.round(np.column_stack([y[7:], x[7:]])).astype(int)
        for end in (tail, barb1, barb2):
            stamp[draw.line(*end, *tip)] = True
        if min(stamp.shape) <= room:
            return stamp
        length *= 0.9


def _wire_stamp(rng: np.random.Generator, size: int, room: int, max_length: int | None = None) -> np.ndarray:
    """A thin wavy lead ending in a ring electrode, lying along a strip ``room`` pixels wide.

    ``max_length`` caps the lead's length (the border strips never need it).
    """
    length = int(rng.uniform(0.2, 0.4) * size)
    if max_length is not None:
        length = max(2, min(length, max_length))
    height = min(room, max(3, round(0.08 * size)))
    radius = max(1, min(3, (height - 1) // 2))
    amplitude = (height - 1) / 2
    xs = np.arange(length)
    wavelength, phase = rng.uniform(0.15, 0.3) * size, rng.uniform(0, 2 * np.pi)
    ys = amplitude + (amplitude - 0.5) * np.sin(2 * np.pi * xs / wavelength + phase)
    stamp = np.zeros((height, length + 2 * radius + 1), bool)
    ys = np.round(ys).astype(int)
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        stamp[draw.line(y0, x0, y1, x1)] = True
    centre = (int(np.clip(ys[-1], radius, height - 1 - radius)), length + radius)
    stamp[draw.circle_perimeter(*centre, radius, shape=stamp.shape)] = True
    return stamp if rng.random() < 0.5 else stamp.T


def _marker_stamp(rng: np.random.Generator, size: int, room: int) -> np.ndarray:
    """A small disc, ring or square: ECG electrodes, skin markers, lead beads."""
    radius = int(min(rng.uniform(0.012, 0.03) * size + 1, (room - 1) // 2))
    side = 2 * radius + 1
    stamp = np.zeros((side, side), bool)
    shape = rng.integers(3)
    if shape == 0:
        stamp[draw.disk((radius, radius), radius + 0.5, shape=stamp.shape)] = True
    elif shape == 1:
        stamp[draw.circle_perimeter(radius, radius, radius, shape=stamp.shape)] = True
    else:
        stamp[:] = True
    return stamp


def _stamp(rng: np.random.Generator, kind: str, size: int, room: int, max_length: int | None = None) -> np.ndarray:
    if kind == "laterality":
        return _text_bitmap("LR"[rng.integers(2)], min(room, max(7, round(0.075 * size))))
    if kind == "text":
        return _text_bitmap(_TEXTS[rng.integers(len(_TEXTS))], min(room, max(5, round(0.055 * size))))
    if kind == "arrow":
        return _arrow_stamp(rng, size, room)
    if kind == "wire":
        return _wire_stamp(rng, size, room, max_length)
    return _marker_stamp(rng, size, room)


def _place(rng: np.random.Generator, stamp: np.ndarray, size: int, band: int, forbidden: np.ndarray):
    """Top-left corner for ``stamp`` inside one edge strip of the band, clear of ``forbidden``.

    Half of the draws go to the strip's ends (the image corners), where real markers cluster.
    """
    h, w = stamp.shape
    room = band - 2 * _MARGIN_PX
    sides = [s for s, across in (("top", h), ("bottom", h), ("left", w), ("right", w)) if across <= room]
    for _ in range(_PLACEMENT_TRIES):
        side = sides[rng.integers(len(sides))]
        across_len, along_len = (h, w) if side in ("top", "bottom") else (w, h)
        along_max = size - _MARGIN_PX - along_len
        if rng.random() < 0.5:
            jitter = int(rng.integers(band))
            along = _MARGIN_PX + jitter if rng.random() < 0.5 else along_max - jitter
        else:
            along = int(rng.integers(_MARGIN_PX, along_max + 1))
        across = int(rng.integers(_MARGIN_PX, band - _MARGIN_PX - across_len + 1))
        if side in ("bottom", "right"):
            across = size - across - across_len
        r0, c0 = (across, along) if side in ("top", "bottom") else (along, across)
        if not (forbidden[r0 : r0 + h, c0 : c0 + w] & stamp).any():
            return r0, c0
    raise RuntimeError(f"no free place for a {h}x{w} artifact in a {band}-px band of a {size}-px image")


def _place_inside(rng: np.random.Generator, kind: str, size: int, inset: int, forbidden: np.ndarray):
    """A ``kind`` stamp and its top-left corner, all of it at least ``inset`` px from every edge, clear of ``forbidden``.

    The corner is drawn uniformly among all the places where the stamp fits (the abdomen below the
    diaphragm, the mediastinum and neck, the shoulders, the window's corners, as the anatomy
    leaves room). Where the stamp fits nowhere it is drawn again, smaller, down to a
    ``_MIN_STAMP_ROOM``-px strip; only then does the placement give up.
    """
    window = size - 2 * inset
    blocked = forbidden[inset : size - inset, inset : size - inset].astype(np.float64)
    room = window
    while True:
        stamp = _stamp(rng, kind, size, room, max_length=4 * room)
        h, w = stamp.shape
        if h <= window and w <= window:
            # hits[r, c]: blocked pixels under the stamp with its corner at (r, c) of the window.
            hits = signal.fftconvolve(blocked, stamp[::-1, ::-1].astype(np.float64), mode="valid")
            spots = np.flatnonzero(hits < 0.5)
            if spots.size:
                r, c = divmod(int(spots[rng.integers(spots.size)]), window - w + 1)
                return stamp, (inset + r, inset + c)
        if room <= _MIN_STAMP_ROOM:
            raise RuntimeError(
                f"no free place for a {kind} artifact inside the crop window of a {size}-px image "
                f"({inset} px from each edge, {window} px wide): the lungs and the other artifacts leave "
                f"no room even for a {_MIN_STAMP_ROOM}-px stamp"
            )
        smallest = min(room, h, w)
        room = max(_MIN_STAMP_ROOM, min(smallest - 1, int(0.8 * smallest)))


def _artifacts(config: SyntheticConfig, index: int, variant: str, rate: float, lung_mask: np.ndarray):
    """Artifact mask, its grey values, and the kinds and regions drawn; the mask is empty unless u_i < rate.

    "border" placement draws from the stream exactly as before the other placements existed.
    """
    size, band = config.image_size, config.band_px
    placement = config.artifact_placement
    rng = _rng(config.seed, index, _STREAM_ARTIFACT[variant])
    mask = np.zeros((size, size), bool)
    ink = np.zeros((size, size), np.float32)
    if rng.random() >= rate:
        return mask, ink, (), ()
    # Keep a two-pixel gap to the lungs so that no artifact touches them even after resizing.
    forbidden = ndimage.binary_dilation(lung_mask, iterations=2)
    kinds = tuple(_ARTIFACT_KINDS[k] for k in rng.integers(len(_ARTIFACT_KINDS), size=1 + (rng.random() < 0.4)))
    regions = []
    for kind in kinds:
        region = placement
        if placement == "anywhere":
            region = "border" if rng.random() < 0.5 else "inside_crop"
        if region == "border":
            stamp = _stamp(rng, kind, size, band - 2 * _MARGIN_PX)
            r0, c0 = _place(rng, stamp, size, band, forbidden)
        else:
            stamp, (r0, c0) = _place_inside(rng, kind, size, config.crop_inset_px, forbidden)
        regions.append(region)
        placed = np.zeros_like(mask)
        placed[r0 : r0 + stamp.shape[0], c0 : c0 + stamp.shape[1]] = stamp
        ink[placed] = rng.uniform(0.92, 1.0)
        mask |= placed
        forbidden |= ndimage.binary_dilation(placed)
    return mask, ink, kinds, tuple(regions)
