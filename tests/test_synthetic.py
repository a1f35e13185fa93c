"""The synthetic phantoms: determinism, exact ground truth, artifact placement and the shortcut law."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from auditbench.data.synthetic import (
    ARTIFACT_PLACEMENTS,
    SYNTHETIC_CLASSES,
    SyntheticConfig,
    _place_inside,
    generate,
    render_phantom,
)
from auditbench.data.transforms import STUDY_CROP_RATIO, FrameSpec, mask_to_model_frame

SMALL = SyntheticConfig(n_images=24, image_size=64, classes=SYNTHETIC_CLASSES, seed=3)


@pytest.fixture(scope="module")
def small_train():
    return generate(SMALL, 0.5, "train").samples


def _band(config: SyntheticConfig) -> np.ndarray:
    """Pixels whose whole area lies within artifact_band * side of an edge."""
    size = config.image_size
    width = math.floor(config.artifact_band * size)
    k = np.arange(size)
    near = (k < width) | (k >= size - width)
    return near[:, None] | near[None, :]


def _lung_halves(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image-left and image-right lung; the mediastinum keeps both well away from the centre column."""
    half = mask.shape[1] // 2
    left, right = mask.copy(), mask.copy()
    left[:, half:] = False
    right[:, :half] = False
    return left, right


def test_same_inputs_give_bit_identical_outputs(small_train):
    again = generate(SMALL, 0.5, "train").samples
    for a, b in zip(small_train, again, strict=True):
        assert (a.sample_id, a.label, a.patient_id) == (b.sample_id, b.label, b.patient_id)
        assert a.image.tobytes() == b.image.tobytes()
        assert np.array_equal(a.lung_mask, b.lung_mask)
        assert np.array_equal(a.artifact_mask, b.artifact_mask)


def test_another_seed_gives_other_images(small_train):
    other = generate(SyntheticConfig(n_images=24, image_size=64, classes=SYNTHETIC_CLASSES, seed=4), 0.5).samples
    assert all(not np.array_equal(a.image, b.image) for a, b in zip(small_train, other))
    assert all(not np.array_equal(a.lung_mask, b.lung_mask) for a, b in zip(small_train, other))


def test_records_labels_and_ids(small_train):
    assert [s.label for s in small_train] == [SYNTHETIC_CLASSES[i % 4] for i in range(24)]
    assert [s.sample_id for s in small_train] == [f"synthetic-{i:05d}" for i in range(24)]
    assert [s.patient_id for s in small_train] == [s.sample_id for s in small_train]
    for s in small_train:
        assert (s.source, s.mask_source, s.artifact_mask_source) == ("synthetic", "synthetic", "synthetic")
        assert s.image.dtype == np.float32 and s.image.shape == (64, 64)
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        assert s.lung_mask.dtype == bool and s.artifact_mask.dtype == bool
        assert s.lung_mask.shape == s.artifact_mask.shape == (64, 64)
    odd = generate(SyntheticConfig(n_images=7, image_size=48, classes=("normal", "covid", "viral")), 0.0).samples
    counts = [sum(s.label == c for s in odd) for c in ("normal", "covid", "viral")]
    assert counts == [3, 2, 2]


def test_lungs_are_two_dark_fields_inside_the_body():
    config = SyntheticConfig(n_images=12, image_size=96)
    right_areas, left_areas = [], []
    for i in range(config.n_images):
        phantom = render_phantom(config, i, "normal")
        lungs, body = phantom.lung_mask, phantom.body_mask
        assert lungs.any() and not (lungs & ~body).any()
        image_left, image_right = _lung_halves(lungs)
        assert image_left.sum() > 0.05 * lungs.size and image_right.sum() > 0.05 * lungs.size
        assert phantom.image[lungs].mean() < phantom.image[body & ~lungs].mean() - 0.1
        right_areas.append(image_left.sum())  # the patient's right lung is on the image left
        left_areas.append(image_right.sum())
    # The heart takes room from the patient's left lung.
    assert np.mean(left_areas) < 0.95 * np.mean(right_areas)


@pytest.mark.parametrize("size,band", [(64, 0.12), (128, 0.12), (96, 0.2)])
def test_artifacts_lie_in_the_band_and_clear_of_the_lungs(size, band):
    config = SyntheticConfig(n_images=40, image_size=size, artifact_band=band, base_artifact_rate=1.0)
    samples = generate(config, 0.0).samples
    outside_band = ~_band(config)
    for s in samples:
        assert s.has_artifact
        assert not (s.artifact_mask & outside_band).any()
        assert not (s.artifact_mask & ndimage.binary_dilation(s.lung_mask)).any()  # not even touching
        assert s.image[s.artifact_mask].min() >= 0.9  # bright, burned in
    kinds = {kind for s in samples for kind in s.extra["artifacts"]}
    assert kinds == {"laterality", "text", "arrow", "wire", "marker"}


@pytest.mark.parametrize("input_size", [224, 96])
def test_the_study_crop_removes_every_artifact(input_size):
    config = SyntheticConfig(n_images=30, image_size=128, base_artifact_rate=1.0)
    frame = FrameSpec(input_size, crop=True)
    for s in generate(config, 0.0).samples:
        assert not mask_to_model_frame(s.artifact_mask, frame).any()


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_artifact_rate_per_class_follows_the_shortcut_law(strength):
    config = SyntheticConfig(n_images=400, image_size=48, base_artifact_rate=0.3, seed=11)
    samples = generate(config, strength).samples
    r = config.base_artifact_rate
    for label, expected in (("covid", r + strength * (1 - r)), ("normal", r * (1 - strength))):
        flags = [s.has_artifact for s in samples if s.label == label]
        n = len(flags)
        tolerance = 4 * math.sqrt(expected * (1 - expected) / n)  # 4 binomial sd; 0 where p is 0 or 1
        assert abs(np.mean(flags) - expected) <= tolerance, (label, np.mean(flags), expected)


def test_full_shortcut_marks_every_positive_and_no_negative():
    config = SyntheticConfig(n_images=40, image_size=48, classes=SYNTHETIC_CLASSES, positive_class="viral")
    for s in generate(config, 1.0, "test").samples:
        assert s.has_artifact == (s.label == "viral"), s.sample_id


def test_only_artifacts_change_between_variants_and_strengths():
    config = SyntheticConfig(n_images=40, image_size=64, seed=5)
    views = {
        (variant, strength): generate(config, strength, variant).samples
        for variant in ("train", "test")
        for strength in (0.0, 1.0)
    }
    reference = views["train", 0.0]
    for samples in views.values():
        for a, b in zip(reference, samples, strict=True):
            assert (a.label, a.patient_id) == (b.label, b.patient_id)
            assert np.array_equal(a.lung_mask, b.lung_mask)
            clean = ~(a.artifact_mask | b.artifact_mask)
            assert np.array_equal(a.image[clean], b.image[clean])
    train, test = views["train", 0.0], views["test", 0.0]
    assert sum(not np.array_equal(a.artifact_mask, b.artifact_mask) for a, b in zip(train, test)) > 10
    # The presence draw u_i is shared across strengths: a positive marked at s=0 keeps the very
    # same marks at s=1, a negative unmarked at s=0 stays unmarked.
    for a, b in zip(views["train", 0.0], views["train", 1.0]):
        if a.label == "covid" and a.has_artifact or a.label == "normal" and not a.has_artifact:
            assert np.array_equal(a.artifact_mask, b.artifact_mask)


def test_disease_changes_pixels_only_inside_the_lungs():
    config = SyntheticConfig(n_images=6, image_size=64)
    for i in range(config.n_images):
        normal = render_phantom(config, i, "normal")
        for label in ("covid", "viral", "bacterial"):
            sick = render_phantom(config, i, label)
            assert np.array_equal(sick.lung_mask, normal.lung_mask)
            changed = sick.image != normal.image
            assert changed.any(), (i, label)
            assert not (changed & ~normal.lung_mask).any(), (i, label)


def test_disease_strength_scales_the_pattern():
    def mean_change(strength):
        config = SyntheticConfig(n_images=4, image_size=64, disease_strength=strength)
        return np.mean([
            np.abs(render_phantom(config, i, "covid").image - render_phantom(config, i, "normal").image).mean()
            for i in range(4)
        ])

    assert mean_change(0.0) == 0.0
    assert 0 < mean_change(0.25) < mean_change(0.5) < mean_change(1.0)


def test_disease_patterns_have_their_distribution():
    config = SyntheticConfig(n_images=8, image_size=96)
    for i in range(config.n_images):
        lungs = render_phantom(config, i, "normal").lung_mask
        left, right = _lung_halves(lungs)
        rows = np.indices(lungs.shape)[0]
        inner = ndimage.distance_transform_edt(lungs)

        covid = render_phantom(config, i, "covid").disease
        assert min(covid[left].sum(), covid[right].sum()) > 0.15 * covid.sum()  # bilateral
        assert np.average(rows, weights=covid) > rows[lungs].mean()  # lower zones
        assert np.average(inner, weights=covid) < inner[lungs].mean()  # peripheral

        viral = render_phantom(config, i, "viral").disease
        assert min(viral[left].sum(), viral[right].sum()) > 0.25 * viral.sum()  # diffuse, bilateral
        assert (viral[lungs] > 0).mean() > 0.9

        bacterial = render_phantom(config, i, "bacterial").disease
        assert min(bacterial[left].sum(), bacterial[right].sum()) == 0  # one lung
        assert 0.1 < (bacterial > 0).sum() / lungs.sum() < 0.45  # one lobe-sized region


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(classes=("covid", "flu")), "allowed: covid, viral, bacterial, normal"),
        (dict(classes=("normal", "viral")), "positive_class 'covid' is not one of classes"),
        (dict(base_artifact_rate=1.2), "base_artifact_rate"),
        (dict(image_size=40), "too thin"),
        (dict(artifact_placement="centre"), "artifact_placement must be one of border, inside_crop, anywhere"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)


@pytest.mark.parametrize(
    "strength,variant,message",
    [
        (1.5, "train", r"shortcut_strength must lie in \[0, 1\]"),
        (-0.1, "train", "shortcut_strength"),
        (0.5, "val", "variant must be one of train, test"),
    ],
)
def test_bad_generate_arguments_are_refused(strength, variant, message):
    with pytest.raises(ValueError, match=message):
        generate(SyntheticConfig(n_images=2, image_size=48), strength, variant)


# --- artifact placement --------------------------------------------------------------------------

PLACEMENT_SIZES = {128: 6, 256: 3, 448: 2}  # image size -> images: few, the large ones are slow


@pytest.fixture(scope="module")
def placed():
    """(placement, size) -> samples, every image marked; rendered once for all placement tests."""
    out = {}
    for placement in ARTIFACT_PLACEMENTS:
        for size, n in PLACEMENT_SIZES.items():
            config = SyntheticConfig(
                n_images=n, image_size=size, base_artifact_rate=1.0, artifact_placement=placement, seed=2
            )
            out[placement, size] = (config, generate(config, 0.0).samples)
    return out


def _inset_rule(size: int) -> int:
    """The promised least distance of an inside-crop marker pixel to every edge: crop line plus max(2 px, 2%)."""
    return math.ceil(STUDY_CROP_RATIO * size) + max(2, math.ceil(0.02 * size))


def _distance_to_edge(size: int) -> np.ndarray:
    """Whole pixels between each pixel and the nearest image edge (0 on the outermost ring)."""
    k = np.arange(size)
    d = np.minimum(k, size - 1 - k)
    return np.minimum(d[:, None], d[None, :])


def test_placement_defaults_to_border_and_is_listed():
    assert ARTIFACT_PLACEMENTS == ("border", "inside_crop", "anywhere")
    assert SyntheticConfig().artifact_placement == "border"
    a = generate(SyntheticConfig(n_images=4, image_size=64, base_artifact_rate=1.0), 0.0).samples
    b = generate(SyntheticConfig(n_images=4, image_size=64, base_artifact_rate=1.0, artifact_placement="border"), 0.0).samples
    for x, y in zip(a, b, strict=True):
        assert x.image.tobytes() == y.image.tobytes()
        assert x.extra["artifact_regions"] == ("border",) * len(x.extra["artifacts"])


@pytest.mark.parametrize("size", sorted(PLACEMENT_SIZES))
@pytest.mark.parametrize("placement", ARTIFACT_PLACEMENTS)
def test_each_placement_puts_markers_where_it_says_clear_of_the_lungs(placed, placement, size):
    config, samples = placed[placement, size]
    assert config.crop_inset_px >= _inset_rule(size)
    in_band = _band(config)
    inside = _distance_to_edge(size) >= _inset_rule(size)
    for s in samples:
        mask = s.artifact_mask
        assert s.has_artifact and len(s.extra["artifact_regions"]) == len(s.extra["artifacts"]) >= 1
        assert set(s.extra["artifact_regions"]) <= {"border", "inside_crop"}
        assert not (mask & ndimage.binary_dilation(s.lung_mask, iterations=2)).any()  # the 2-px gap
        assert s.image[mask].min() >= 0.9
        if placement == "border":
            assert not (mask & ~in_band).any()
        elif placement == "inside_crop":
            assert not (mask & ~inside).any()
            assert set(s.extra["artifact_regions"]) == {"inside_crop"}
        else:
            assert not (mask & ~(in_band | inside)).any()
            # each region named is used, and only those
            assert (mask & in_band).any() == ("border" in s.extra["artifact_regions"])
            assert (mask & inside).any() == ("inside_crop" in s.extra["artifact_regions"])
        # markers never overlap or touch, so there are at least as many 8-connected pieces as markers
        assert ndimage.label(mask, np.ones((3, 3)))[1] >= len(s.extra["artifacts"])


def test_anywhere_uses_both_regions(placed):
    regions = [r for size in PLACEMENT_SIZES for s in placed["anywhere", size][1] for r in s.extra["artifact_regions"]]
    assert set(regions) == {"border", "inside_crop"}


@pytest.mark.parametrize("size", sorted(PLACEMENT_SIZES))
def test_no_resampling_carries_an_inside_marker_into_the_cropped_border(placed, size):
    """Resized as the model frame is (antialiased bilinear or bicubic), no weight of a marker lands outside the crop."""
    _, samples = placed["inside_crop", size]
    for s in samples[:2]:
        mask = torch.from_numpy(s.artifact_mask.astype(np.float32))[None, None]
        for input_size in (112, 299):
            resize_to = FrameSpec(input_size, crop=True).resize_to
            top = (resize_to - input_size) // 2
            for mode in ("bilinear", "bicubic"):
                out = F.interpolate(mask, size=(resize_to, resize_to), mode=mode, align_corners=False, antialias=True)
                out = out[0, 0].abs()
                out[top : top + input_size, top : top + input_size] = 0
                assert out.max() == 0, (s.sample_id, input_size, mode)
        frame = FrameSpec(224, crop=True)
        assert mask_to_model_frame(s.artifact_mask, frame).any()  # the crop keeps them


@pytest.mark.parametrize("placement", ARTIFACT_PLACEMENTS)
def test_same_seed_same_images_for_every_placement(placed, placement):
    config, samples = placed[placement, 128]
    again = generate(replace(config, n_images=4), 0.0).samples
    for a, b in zip(samples, again):
        assert a.image.tobytes() == b.image.tobytes()
        assert np.array_equal(a.artifact_mask, b.artifact_mask)
        assert a.extra["artifact_regions"] == b.extra["artifact_regions"]


@pytest.mark.parametrize("placement", ARTIFACT_PLACEMENTS)
def test_placement_changes_only_the_artifacts_and_the_clean_twin_is_the_phantom(placement):
    config = SyntheticConfig(
        n_images=6, image_size=64, classes=SYNTHETIC_CLASSES, artifact_placement=placement, seed=9
    )
    for variant in ("train", "test"):
        marked = generate(config, 1.0, variant).samples
        clean = generate(replace(config, base_artifact_rate=0), 0.0, variant).samples
        for i, (m, c) in enumerate(zip(marked, clean, strict=True)):
            phantom = render_phantom(config, i, c.label)
            assert c.image.tobytes() == phantom.image.tobytes()
            assert not c.artifact_mask.any() and c.extra["artifact_regions"] == ()
            assert np.array_equal(m.image[~m.artifact_mask], phantom.image[~m.artifact_mask])


def test_no_room_inside_the_crop_is_a_clear_error():
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="no free place for a marker artifact inside the crop window"):
        _place_inside(rng, "marker", 128, 20, np.ones((128, 128), bool))
