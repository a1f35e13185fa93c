import numpy as np
import pytest

from auditbench.data.splits import make_folds
from auditbench.data.transforms import STUDY_CROP_RATIO, FrameSpec, mask_to_model_frame, normalise, to_model_frame


def test_study_crop_numbers():
    # The study: resize to 300, centre-crop 224, i.e. 38 px per side.
    frame = FrameSpec(224, crop=True)
    assert frame.resize_to == 300
    assert round(STUDY_CROP_RATIO * 300) == 38
    # Scaled with a smaller input: the same ratio of the side is removed.
    assert FrameSpec(112, crop=True).resize_to == 150


def test_crop_removes_outer_band_and_masks_follow_the_image():
    image = np.zeros((300, 300), np.float32)
    image[:38, :] = 1.0  # a band the crop must remove
    image[100:200, 120:180] = 0.5
    mask = image == 0.5
    frame = FrameSpec(224, crop=True)
    out = to_model_frame(image, frame)
    out_mask = mask_to_model_frame(mask, frame)
    assert out.shape == out_mask.shape == (224, 224)
    assert out[:10].max() < 1e-3  # the top band is gone
    # the mask lands exactly where the image's 0.5 block lands (nearest vs bilinear: inner pixels)
    inner = out_mask & np.roll(out_mask, 2, 0) & np.roll(out_mask, -2, 0) & np.roll(out_mask, 2, 1) & np.roll(out_mask, -2, 1)
    assert np.allclose(out[inner], 0.5, atol=1e-3)
    assert out_mask.sum() == pytest.approx(100 * 60, rel=0.02)  # no scaling at 300 -> 300


def test_no_crop_resizes_whole_image():
    image = np.ones((50, 80), np.float32)
    out = to_model_frame(image, FrameSpec(32, crop=False))
    assert out.shape == (32, 32)
    assert np.allclose(out, 1.0)


def test_normalise_replicates_grey_to_three_channels():
    x = normalise(np.full((2, 4, 4), 0.5, np.float32), (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert x.shape == (2, 3, 4, 4)
    assert float(x[0, 0, 0, 0]) == 0.0


def test_folds_are_grouped_stratified_and_cover_everything():
    labels = np.array([0] * 30 + [1] * 30)
    groups = np.repeat(np.arange(20), 3)  # three images per patient, one label per patient
    folds = make_folds(labels, groups, n_folds=3, val_fraction=0.2, seed=1)
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(60))
    for fold in folds:
        parts = [set(groups[fold.train]), set(groups[fold.validation]), set(groups[fold.test])]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        assert 0 < labels[fold.test].mean() < 1
    again = make_folds(labels, groups, n_folds=3, val_fraction=0.2, seed=1)
    assert all((a.test == b.test).all() and (a.train == b.train).all() for a, b in zip(folds, again))


def test_too_few_patients_for_folds():
    with pytest.raises(ValueError, match="cannot be split into 4 folds"):
        make_folds(np.array([0, 1, 0]), np.array(["a", "b", "c"]), 4, 0.2, 0)
