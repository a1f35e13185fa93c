"""The study's augmentation: masks follow the image, seeded, no flips or brightness changes, and
no constant-valued fill (reflection) that could become a label-linked shortcut."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from auditbench.data.augment import (
    AffineParams,
    AugmentConfig,
    apply_affine,
    augment_frames,
    augment_minority_once,
    augment_sample,
    augmented_copy,
    copies_to_make,
    draw_params,
)
from auditbench.data.records import Sample


def _blocks(size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric lung-like mask (two blocks of different size) and a small artifact block."""
    lung = np.zeros((size, size), bool)
    lung[20:76, 12:40] = True
    lung[30:70, 56:84] = True
    artifact = np.zeros((size, size), bool)
    artifact[8:16, 70:90] = True
    return lung, artifact


@pytest.mark.parametrize("seed", range(6))
def test_masks_follow_the_image(seed):
    lung, artifact = _blocks()
    image = lung.astype(np.float32) * 0.8 + artifact.astype(np.float32) * 0.2
    out, out_lung, out_artifact = augment_sample(image, lung, artifact, AugmentConfig(), seed)
    assert out.shape == image.shape and out_lung.dtype == bool and out_artifact.dtype == bool
    # Bilinear image vs nearest mask may differ only at edges.
    assert np.mean((out > 0.4) == out_lung) > 0.98
    artifact_region = (out > 0.1) & (out < 0.3)
    assert np.mean(artifact_region == out_artifact) > 0.99
    assert out_lung.sum() > 0.5 * lung.sum()  # the lungs were moved, not lost


def test_same_seed_same_result_other_seed_differs():
    lung, artifact = _blocks()
    image = np.random.default_rng(0).random(lung.shape, dtype=np.float32)
    first = augment_sample(image, lung, artifact, AugmentConfig(), 7)
    again = augment_sample(image, lung, artifact, AugmentConfig(), 7)
    other = augment_sample(image, lung, artifact, AugmentConfig(), 8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("seed", range(5))
def test_zero_ranges_give_the_identity_no_flip_no_brightness(seed):
    lung, artifact = _blocks()
    image = np.random.default_rng(seed).random(lung.shape, dtype=np.float32)
    out, out_lung, out_artifact = augment_sample(image, lung, artifact, AugmentConfig(0.0, 0.0, 0.0), seed)
    np.testing.assert_allclose(out, image, atol=1e-4)  # grid_sample rounding at the identity
    np.testing.assert_array_equal(out_lung, lung)
    np.testing.assert_array_equal(out_artifact, artifact)


def test_no_brightness_change_and_no_black_fill():
    image = np.full((80, 80), 0.7, np.float32)
    for seed in range(5):
        out, _, _ = augment_sample(image, None, None, AugmentConfig(), seed)
        # Reflection continues a constant image as itself: no black (or any other) corners.
        np.testing.assert_allclose(out, 0.7, atol=1e-6)


def test_constant_fill_mode_reproduces_the_old_black_corners():
    image = np.full((80, 80), 0.7, np.float32)
    for seed in range(5):
        out, _, _ = augment_sample(image, None, None, AugmentConfig(fill_mode="constant"), seed)
        assert out[40, 40] == pytest.approx(0.7)  # the centre stays inside the image
        assert out.max() <= 0.7 + 1e-6
        assert out.min() == 0.0  # exposed corners are black


def test_unknown_fill_mode_is_refused():
    with pytest.raises(ValueError, match="fill_mode"):
        AugmentConfig(fill_mode="nearest")


def test_missing_masks_stay_missing():
    image = np.ones((64, 64), np.float32)
    _, lung, artifact = augment_sample(image, None, None, AugmentConfig(), 1)
    assert lung is None and artifact is None


def _sample(index: int, label: str) -> Sample:
    lung, artifact = _blocks(64)
    image = np.random.default_rng(index).random((64, 64), dtype=np.float32)
    return Sample(
        sample_id=f"s{index}", image=image, label=label, patient_id=f"p{index // 2}", source="test",
        lung_mask=lung, artifact_mask=artifact, mask_source="dataset", extra={"k": index},
    )


def test_minority_class_is_augmented_once():
    samples = [_sample(0, "normal"), _sample(1, "covid"), _sample(2, "normal"), _sample(3, "normal")]
    labels = [0, 1, 0, 0]
    out = augment_minority_once(samples, labels, seed=3)
    assert out[:4] == samples
    (copy,) = out[4:]
    assert copy.sample_id == "s1#aug1"
    assert (copy.label, copy.patient_id, copy.source, copy.mask_source) == ("covid", "p0", "test", "dataset")
    assert copy.extra == {"k": 1, "augmented_from": "s1"}
    assert copy.image.shape == (64, 64) and not np.array_equal(copy.image, samples[1].image)
    assert copy.lung_mask.shape == (64, 64) and copy.artifact_mask is not None
    again = augment_minority_once(samples, labels, seed=3)[4]
    np.testing.assert_array_equal(again.image, copy.image)
    # The per-image seed depends on the id, not on the list order.
    reordered = augment_minority_once(samples[::-1], labels[::-1], seed=3)[4]
    np.testing.assert_array_equal(reordered.image, copy.image)


def test_balanced_classes_are_left_alone():
    samples = [_sample(0, "normal"), _sample(1, "covid")]
    assert augment_minority_once(samples, [0, 1], seed=0) == samples


def test_labels_must_match_samples():
    with pytest.raises(ValueError, match="1 samples but 2 labels"):
        augment_minority_once([_sample(0, "covid")], [0, 1], seed=0)


# ----- no constant-valued fill -------------------------------------------------------------------

def _noise(shape=(64, 80), seed=0) -> np.ndarray:
    """Every pixel distinct and none 0: values are a permutation of evenly spaced levels in [0.05, 1]."""
    levels = np.linspace(0.05, 1.0, shape[0] * shape[1], dtype=np.float64)
    return np.random.default_rng(seed).permutation(levels).reshape(shape).astype(np.float32)


def _flat_pixels(image: np.ndarray) -> int:
    """Pixels whose whole 3x3 neighbourhood holds one identical value (a constant-valued patch)."""
    centre = image[1:-1, 1:-1]
    same = np.ones_like(centre, dtype=bool)
    h, w = image.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= image[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] == centre
    return int(same.sum())


LARGE = [AugmentConfig(), AugmentConfig(shift=0.4, zoom=0.3, rotation=90.0), AugmentConfig(0.5, 0.0, 180.0)]


@pytest.mark.parametrize("config", LARGE, ids=["study", "large", "extreme"])
def test_reflection_adds_no_constant_region(config):
    image = _noise()
    assert len(np.unique(image)) == image.size and _flat_pixels(image) == 0 and (image == 0).sum() == 0
    for seed in range(40):
        out, _, _ = augment_sample(image, None, None, config, seed)
        assert _flat_pixels(out) == 0, seed
        assert (out == 0).sum() == 0, seed
        assert out.min() >= image.min() - 1e-6 and out.max() <= image.max() + 1e-6


@pytest.mark.parametrize("config", LARGE, ids=["study", "large", "extreme"])
def test_the_same_check_catches_the_old_constant_fill(config):
    """The checks above can fail: with the old 0 fill every large transform leaves flat black wedges."""
    image = _noise()
    constant = dataclasses.replace(config, fill_mode="constant")
    flagged = 0
    for seed in range(40):
        out, _, _ = augment_sample(image, None, None, constant, seed)
        flagged += _flat_pixels(out) > 0 and (out == 0).sum() > 0
    assert flagged >= 30  # nearly every draw; a few small shifts/rotations may expose only slivers


def test_reflection_is_the_mirror_image_about_the_edge():
    """A pure shift by 3 pixels right shows columns 2, 1, 0 mirrored at the left (d c b a | a b c d)."""
    image = _noise((16, 20))
    out, _ = apply_affine(image, [], AffineParams(angle=0.0, dx=3.0, dy=0.0, scale=1.0))
    np.testing.assert_allclose(out[:, 3:], image[:, :-3], atol=1e-6)
    np.testing.assert_allclose(out[:, :3], image[:, [2, 1, 0]], atol=1e-6)
    out, _ = apply_affine(image, [], AffineParams(angle=0.0, dx=3.0, dy=0.0, scale=1.0), "constant")
    assert (out[:, :3] == 0).all()


# ----- masks follow the image exactly ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_mask_equals_the_transformed_image_of_the_mask(seed):
    """An image that is the mask itself (0/1) and its transformed mask agree wherever the bilinear
    image is crisp (> 0.999 or < 0.001, so the nearest source pixel is certain), including in the
    reflected margins."""
    lung, artifact = _blocks(96)
    pattern = lung ^ artifact
    config = AugmentConfig(shift=0.4, zoom=0.3, rotation=90.0)
    out, out_lung, out_pattern = augment_sample(pattern.astype(np.float32), lung, pattern, config, seed)
    crisp = (out > 0.999) | (out < 0.001)
    assert crisp.mean() > 0.8
    np.testing.assert_array_equal(out_pattern[crisp], out[crisp] > 0.5)
    assert out_lung.dtype == bool and out_pattern.dtype == bool


def test_masks_reflect_with_the_image():
    """A marker at the left edge, shifted 2 pixels right, shows its mirror image in the exposed
    columns, in the image and in its mask alike (a reflected marker is still a marker)."""
    image = np.full((40, 40), 0.3, np.float32)
    marker = np.zeros((40, 40), bool)
    marker[5:10, 0:4] = True
    image[marker] = 0.9
    out, (moved,) = apply_affine(image, [marker], AffineParams(angle=0.0, dx=2.0, dy=0.0, scale=1.0))
    np.testing.assert_array_equal(moved, out > 0.6)
    expected = np.zeros_like(marker)
    expected[5:10, 0:6] = True  # columns 0-1 are the reflection of columns 1-0, columns 2-5 the marker
    np.testing.assert_array_equal(moved, expected)


# ----- which images get a copy -------------------------------------------------------------------

def test_copies_to_make():
    np.testing.assert_array_equal(copies_to_make([0, 1, 0, 1], "minority_once"), [])
    np.testing.assert_array_equal(copies_to_make([0, 0, 1], "minority_once"), [2])
    np.testing.assert_array_equal(copies_to_make([1, 1, 0, 0, 0], "minority_once"), [0, 1])
    np.testing.assert_array_equal(copies_to_make(np.array([0, 1, 1]), "minority_once"), [0])
    np.testing.assert_array_equal(copies_to_make([1, 1, 1], "minority_once"), [])  # one class only
    np.testing.assert_array_equal(copies_to_make([], "minority_once"), [])
    np.testing.assert_array_equal(copies_to_make([0, 1, 0, 1], "online"), [0, 1, 2, 3])
    np.testing.assert_array_equal(copies_to_make([1, 1, 0], "online"), [0, 1, 2])
    assert copies_to_make([0, 0, 1], "minority_once").dtype == np.int64
    with pytest.raises(ValueError, match="unknown augment mode"):
        copies_to_make([0, 1], "twice")


def test_augmented_copy():
    sample = _sample(5, "covid")
    copy = augmented_copy(sample, AugmentConfig(), seed=11)
    assert copy.sample_id == "s5#aug1"
    assert (copy.label, copy.patient_id, copy.source, copy.mask_source) == ("covid", "p2", "test", "dataset")
    assert copy.extra == {"k": 5, "augmented_from": "s5"} and sample.extra == {"k": 5}
    expected = augment_sample(sample.image, sample.lung_mask, sample.artifact_mask, AugmentConfig(), 11)
    for got, want in zip((copy.image, copy.lung_mask, copy.artifact_mask), expected):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(copy.lung_mask, sample.lung_mask)


# ----- determinism -------------------------------------------------------------------------------

def test_parameters_come_from_the_seed_only():
    torch.manual_seed(0)
    first = draw_params(AugmentConfig(), 64, 80, 123)
    torch.manual_seed(1)
    torch.rand(10)
    assert draw_params(AugmentConfig(), 64, 80, 123) == first
    assert draw_params(AugmentConfig(), 64, 80, 124) != first
    assert abs(first.angle) <= 50 and abs(first.dx) <= 16 and abs(first.dy) <= 12.8
    assert 0.9 <= first.scale <= 1.1


def test_augment_frames_is_deterministic_and_per_frame():
    frames = np.stack([_noise((32, 32), seed=i) for i in range(4)])
    out = augment_frames(frames, 7)
    assert out.shape == frames.shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, augment_frames(frames, 7))
    assert not np.array_equal(out, augment_frames(frames, 8))
    # Frames of the same content get different transforms within one call.
    same = np.stack([frames[0]] * 3)
    moved = augment_frames(same, 7)
    assert not np.array_equal(moved[0], moved[1]) and not np.array_equal(moved[1], moved[2])
    assert _flat_pixels(out[0]) == 0 and (out == 0).sum() == 0
