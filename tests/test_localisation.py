"""Localisation as CheXlocalize scores it: IoU and hit worked out by hand on tiny maps, Otsu against a brute-force
Otsu, maps upsampled from a CAM grid with masks mapped from the source image, cropped vs uncropped frames,
threshold tuning and the patient-level summary."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from auditbench.audit.localisation import (
    DEFAULT_THRESHOLDS, binarise, hit_rate, iou, localisation_scores, localisation_summary, tune_threshold,
)
from auditbench.audit.metrics import pointing_game
from auditbench.audit.uncertainty import mean_ci
from auditbench.data.transforms import FrameSpec, mask_to_model_frame, resample
from auditbench.explain.cam_base import upsample_cams

# Scaled already (min 0, max 1). uint8 levels 0, 25, 229 / 255, 12, 242: Otsu splits {0, 12, 25} | {229, 242, 255}.
BIMODAL = np.array([[[0.0, 0.1, 0.9], [1.0, 0.05, 0.95]]])
MASK = np.array([[[False, True, True], [False, False, True]]])  # (0, 1), (0, 2), (1, 2)


def test_otsu_iou_and_hit_by_hand():
    binary, defined = binarise(BIMODAL)
    np.testing.assert_array_equal(binary, [[[False, False, True], [True, False, True]]])
    assert defined.tolist() == [True]
    # B = {(0, 2), (1, 0), (1, 2)}, M = {(0, 1), (0, 2), (1, 2)}: intersection 2, union 4.
    np.testing.assert_allclose(iou(BIMODAL, MASK), [0.5])
    # The maximum (1.0) is at (1, 0), outside the mask.
    np.testing.assert_array_equal(hit_rate(BIMODAL, MASK), [0.0])
    # Scaling per image makes both unchanged by an increasing affine map.
    np.testing.assert_allclose(iou(5 * BIMODAL + 3, MASK), [0.5])


def test_given_threshold_by_hand():
    # > 0.08 keeps 0.1, 0.9, 1.0, 0.95: B = {(0, 1), (0, 2), (1, 0), (1, 2)}; intersection 3, union 4.
    np.testing.assert_allclose(iou(BIMODAL, MASK, threshold=0.08), [0.75])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        iou(BIMODAL, MASK, threshold=1.0)


def test_undefined_cases_are_nan():
    maps = np.stack([BIMODAL[0], np.full((2, 3), 0.7), BIMODAL[0]])
    masks = [MASK[0], MASK[0], None]  # None: no mask for this image
    scores = localisation_scores(maps, masks)
    np.testing.assert_allclose(scores["iou"], [0.5, np.nan, np.nan])
    np.testing.assert_allclose(scores["hit"], [0.0, np.nan, np.nan])
    with pytest.raises(ValueError, match="one grid"):
        iou(BIMODAL, np.zeros((1, 4, 6), bool))


def _brute_force_otsu(levels: np.ndarray) -> int:
    """The integer t maximising the between-class variance w0 w1 (mu0 - mu1)^2 of {<= t} vs {> t}; first maximum."""
    best, best_t = -1.0, None
    for t in range(256):
        low, high = levels[levels <= t], levels[levels > t]
        if len(low) == 0 or len(high) == 0:
            continue
        variance = len(low) * len(high) * (low.mean() - high.mean()) ** 2
        if variance > best + 1e-9:
            best, best_t = variance, t
    return best_t


def test_map_upsampled_from_a_cam_grid_and_mask_from_the_source():
    # A 2x2 CAM upsampled bilinearly (pixel-centred) to 4x4: row and column weights of the first cell are
    # (1, 0.75, 0.25, 0), so the map is their outer product.
    cam = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    maps = upsample_cams(cam, (4, 4)).numpy()
    weights = np.array([1.0, 0.75, 0.25, 0.0])
    np.testing.assert_allclose(maps[0], np.outer(weights, weights))
    # The lung mask drawn on a 2x2 source image, mapped into the 4x4 frame with the image's transform: the same
    # fractions, thresholded at 0.5, give the top-left 2x2 block.
    mask = mask_to_model_frame(np.array([[True, False], [False, False]]), FrameSpec(4, crop=False))
    expected = np.zeros((4, 4), bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(mask, expected)
    # > 0.5 keeps 1, 0.75, 0.75, 0.5625: the block itself.
    np.testing.assert_allclose(iou(maps, mask[None], threshold=0.5), [1.0])
    # > 0.2 adds the two 0.25 pixels: intersection 4, union 6.
    np.testing.assert_allclose(iou(maps, mask[None], threshold=0.2), [4 / 6])
    np.testing.assert_array_equal(hit_rate(maps, mask[None]), [1.0])
    # Otsu: foreground = levels above the threshold of a brute-force Otsu on the same uint8 levels.
    # Levels 255, 191, 191, 143 | 63, 63, 47, 47, 15, 0 x 7: the threshold is 63 and B is the block again.
    levels = (255 * maps[0]).astype(np.uint8)
    assert _brute_force_otsu(levels) == 63
    np.testing.assert_array_equal(binarise(maps)[0][0], levels > 63)
    np.testing.assert_allclose(iou(maps, mask[None]), [1.0])


def test_otsu_agrees_with_a_brute_force_otsu():
    rng = np.random.default_rng(1)
    maps = rng.random((20, 5, 5)) ** 3  # skewed, as CAMs are
    binary, _ = binarise(maps)
    for i in range(20):
        levels = (255 * (maps[i] - maps[i].min()) / (maps[i].max() - maps[i].min())).astype(np.uint8)
        np.testing.assert_array_equal(binary[i], levels > _brute_force_otsu(levels))


def test_cropped_and_uncropped_frames():
    # Source 8x8: the region is rows 0-3, cols 0-3 (16 px); the map is 1 on rows 0-1, cols 0-3 (8 px) with a
    # peak of 3 at the corner (7, 7).
    region = np.zeros((8, 8), bool)
    region[:4, :4] = True
    saliency = np.zeros((8, 8), np.float32)
    saliency[:2, :4] = 1.0
    saliency[7, 7] = 3.0
    whole = FrameSpec(8, crop=False)
    cropped = FrameSpec(6, crop=True, crop_ratio=0.125)  # resize to round(6 / 0.75) = 8, keep rows/cols 1-6
    assert cropped.resize_to == 8
    for frame, want_iou, want_hit in [
        # Uncropped: scaled map 1/3 on the block and 1 at the corner; > 0.2 keeps 8 + 1 px;
        # intersection 8, union 16 + 1 = 17. The peak (7, 7) lies outside the region: a miss.
        (whole, 8 / 17, 0.0),
        # Cropped: the corner is cut away, so the block scales to 1; it keeps source row 1, cols 1-3 (3 px); the
        # region keeps rows 1-3, cols 1-3 (9 px): 3 / 9. The peak is now the block's first pixel: a hit.
        (cropped, 3 / 9, 1.0),
    ]:
        maps = resample(saliency, frame)[None]
        mask = mask_to_model_frame(region, frame)[None]
        np.testing.assert_allclose(iou(maps, mask, threshold=0.2), [want_iou], rtol=1e-6)
        np.testing.assert_array_equal(hit_rate(maps, mask), [want_hit])


def test_hit_is_the_pointing_game_at_zero_tolerance():
    rng = np.random.default_rng(0)
    maps = rng.random((20, 6, 6))
    masks = rng.random((20, 6, 6)) < 0.3
    masks[0] = False
    np.testing.assert_array_equal(hit_rate(maps, masks), pointing_game(maps, masks, tolerance_px=0))


def test_tune_threshold_by_hand():
    # IoU of BIMODAL against MASK: > 0.03 -> 3/5; > 0.08 -> 3/4; > 0.5 -> 2/4; > 0.92 -> 1/4; > 0.97 -> 0.
    tuning = tune_threshold(BIMODAL, MASK, thresholds=(0.97, 0.5, 0.03, 0.08, 0.92))
    assert tuning.thresholds == (0.03, 0.08, 0.5, 0.92, 0.97)
    np.testing.assert_allclose(tuning.mean_iou, [0.6, 0.75, 0.5, 0.25, 0.0])
    assert tuning.threshold == 0.08
    # 0.06 and 0.08 keep the same pixels: the tie goes to the smaller threshold.
    assert tune_threshold(BIMODAL, MASK, thresholds=(0.08, 0.06)).threshold == 0.06
    assert DEFAULT_THRESHOLDS == (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    with pytest.raises(ValueError, match="nothing to tune"):
        tune_threshold(BIMODAL, np.zeros_like(MASK))


def test_summary_is_the_patient_level_bootstrap():
    scores = {"iou": np.array([0.2, 0.4, np.nan, 0.9]), "hit": np.array([1.0, 0.0, 1.0, 1.0])}
    groups = np.array(["a", "a", "b", "c"])
    summary = localisation_summary(scores, groups, n_boot=200, seed=3)
    assert summary["iou"][0] == pytest.approx(0.5)
    assert summary["iou"][1:] == pytest.approx(mean_ci(scores["iou"], groups, 200, 3))
    assert summary["hit"] == pytest.approx((0.75, *mean_ci(scores["hit"], groups, 200, 3)))


def test_registered_localisation_metrics_by_hand_through_attention_metrics():
    """lung_iou, artifact_iou and lung_hit as the run computes them (audit.metrics.attention_metrics):
    8x8 frame, lungs rows/cols 2-5 (16 px), a 2x2 marker at the corner dilated by one cell (cell 1 px:
    the 3x3 corner, 9 px)."""
    import warnings

    from auditbench.audit.metrics import attention_metrics

    maps = np.zeros((3, 8, 8))
    maps[0, 2:4, 2:4] = 1  # 4 px inside the lungs, one of them inside the dilated marker
    maps[2, 0, 0], maps[2, 4:6, 4:6] = 5, 1  # Otsu keeps the peak (255) alone; it sits on the marker
    lungs = np.zeros((3, 8, 8), bool)
    lungs[:, 2:6, 2:6] = True
    marker = np.zeros((3, 8, 8), bool)
    marker[[0, 2], 0:2, 0:2] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # image 1: a zero map, every metric NaN
        values = attention_metrics(maps, lungs, marker, np.zeros_like(lungs), cell_px=1).values
    np.testing.assert_allclose(values["lung_iou"], [4 / 16, np.nan, 0.0])
    np.testing.assert_allclose(values["artifact_iou"], [1 / (4 + 9 - 1), np.nan, 1 / 9])
    np.testing.assert_allclose(values["lung_hit"], [1.0, np.nan, 0.0])
