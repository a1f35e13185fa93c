"""The study's augmentation: masks follow the image, seeded, no flips or brightness changes."""
from __future__ import annotations

import numpy as np
import pytest

from auditbench.data.augment import AugmentConfig, augment_minority_once, augment_sample
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


def test_no_brightness_change_and_black_fill():
    image = np.full((80, 80), 0.7, np.float32)
    for seed in range(5):
        out, _, _ = augment_sample(image, None, None, AugmentConfig(), seed)
        assert out[40, 40] == pytest.approx(0.7)  # the centre stays inside the image
        assert out.max() <= 0.7 + 1e-6
        assert out.min() == 0.0  # exposed corners are black


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
