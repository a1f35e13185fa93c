"""Deletion / insertion (RISE) and ROAD: curves and AUCs worked out by hand, the noisy linear imputation against
linear functions, by hand at the image edge and against ROAD's reference code, determinism, MoRF vs LeRF."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from auditbench.audit.faithfulness import (
    deletion_insertion, faithfulness_scores, noisy_linear_impute, normalised_auc, pixel_order, road,
)

# A 4x4 image of ones; the "model" is the mean of the 4 pixels S = {(0, 0), (0, 1), (3, 2), (3, 3)}
# over all channels, so p(image) = 1 and p falls by 1/4 for every pixel of S removed.
S = ([0, 0, 3, 3], [0, 1, 2, 3])


def mean_of_s(images: np.ndarray) -> np.ndarray:
    return images[:, :, S[0], S[1]].astype(np.float64).mean(axis=(1, 2))


def _map(s_first: bool) -> np.ndarray:
    ranks = np.arange(16, dtype=float).reshape(4, 4) / 16  # distinct values: no ties
    m = np.where(np.isin(np.arange(16).reshape(4, 4), [0, 1, 14, 15]), 2.0, ranks)
    return m if s_first else np.where(m == 2.0, -1.0, m)


def test_deletion_and_insertion_by_hand():
    images = np.ones((2, 3, 4, 4), dtype=np.float32)
    maps = np.stack([_map(True), _map(False)])
    result = deletion_insertion(mean_of_s, images, maps, n_steps=8, insertion_substrate=0.0)
    np.testing.assert_allclose(result.fractions, np.arange(9) / 8)
    # 2 pixels per step. S first: deletion removes S in steps 1-2, p = 1, 1/2, 0, 0, ...;
    # S last: S goes in steps 7-8, p = 1 (x7), 1/2, 0.
    np.testing.assert_allclose(result.deletion_curve[0], [1, 0.5, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_allclose(result.deletion_curve[1], [1, 1, 1, 1, 1, 1, 1, 0.5, 0])
    # Trapezoids of width 1/8 over [0, 1] (span 1): S first (0.75 + 0.25) / 8 = 0.125;
    # S last (6 x 1 + 0.75 + 0.25) / 8 = 0.875.
    np.testing.assert_allclose(result.deletion_auc, [0.125, 0.875])
    # Insertion from a zero substrate is the mirror image: S first 1 - 0.125, S last 1 - 0.875.
    np.testing.assert_allclose(result.insertion_curve[0], [0, 0.5, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(result.insertion_auc, [0.875, 0.125])


def test_auc_is_the_mean_height_over_the_span():
    # Over 0.2..0.8 the curve (1, 0, 0, 1) has trapezoid area 0.2 * (0.5 + 0 + 0.5) = 0.2; span 0.6: 1/3.
    assert normalised_auc(np.array([1.0, 0.0, 0.0, 1.0]), [0.2, 0.4, 0.6, 0.8]) == pytest.approx(1 / 3)


def test_ties_break_in_row_major_order_and_constant_maps_are_undefined():
    maps = np.array([[[1.0, 3.0], [3.0, 0.0]]])
    np.testing.assert_array_equal(pixel_order(maps), [[1, 2, 0, 3]])
    np.testing.assert_array_equal(pixel_order(maps, most_relevant_first=False), [[3, 0, 1, 2]])
    images = np.ones((2, 3, 4, 4), dtype=np.float32)
    result = deletion_insertion(mean_of_s, images, np.stack([_map(True), np.full((4, 4), 0.3)]), n_steps=4)
    assert np.isfinite(result.deletion_auc[0]) and np.isnan(result.deletion_auc[1])


def test_blur_substrate_and_batching_do_not_change_results():
    rng = np.random.default_rng(0)
    images = rng.random((3, 3, 6, 6)).astype(np.float32)
    maps = rng.random((3, 6, 6))
    whole = deletion_insertion(mean_of_s, images, maps, n_steps=6)
    single = deletion_insertion(mean_of_s, images, maps, n_steps=6, batch_size=1)
    np.testing.assert_allclose(whole.deletion_curve, single.deletion_curve, rtol=1e-12)
    np.testing.assert_allclose(whole.insertion_curve, single.insertion_curve, rtol=1e-12)
    # Insertion at fraction 0 sees the blurred image, at fraction 1 the image itself.
    assert not np.allclose(whole.insertion_curve[:, 0], mean_of_s(images))
    np.testing.assert_allclose(whole.insertion_curve[:, -1], mean_of_s(images), rtol=1e-6)


# ----- noisy linear imputation ------------------------------------------------------------------------------------


def test_imputation_reproduces_a_linear_ramp_without_noise():
    rows, cols = np.mgrid[0:8, 0:8]
    ramp = np.stack([0.1 * rows + 0.05 * cols + 0.2, 0.3 - 0.02 * rows + 0.04 * cols, 0.5 + 0 * rows])
    removed = np.zeros((8, 8), dtype=bool)
    removed[2:6, 1:7] = True  # interior: no removed pixel on the image edge
    removed[3, 3] = removed[1, 5] = True
    filled = noisy_linear_impute(ramp, removed, noise=0.0)
    np.testing.assert_allclose(filled, ramp, atol=1e-6)  # float32 output


def test_imputation_at_the_edge_by_hand():
    # A removed corner pixel has 3 in-image neighbours: right (1/6), below (1/6), diagonal (1/12); it becomes their
    # weighted mean: (a/6 + b/6 + d/12) / (5/12).
    image = np.zeros((1, 3, 3), dtype=np.float32)
    image[0, 0, 1], image[0, 1, 0], image[0, 1, 1] = 0.6, 0.3, 0.9
    removed = np.zeros((3, 3), dtype=bool)
    removed[0, 0] = True
    filled = noisy_linear_impute(image, removed, noise=0.0)
    assert filled[0, 0, 0] == pytest.approx((0.6 / 6 + 0.3 / 6 + 0.9 / 12) / (5 / 12))
    np.testing.assert_array_equal(filled[0][~removed], image[0][~removed])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside the reference code under NumPy 2
def test_imputation_matches_road_reference_code():
    """pytorch-grad-cam carries ROAD's reference imputer (metrics/road.py, from tleemann/road_evaluation); with
    noise 0 both solve the same system. Its mask is 1 for kept pixels, 0 for removed ones."""
    road_module = pytest.importorskip("pytorch_grad_cam.metrics.road")
    rng = np.random.default_rng(1)
    image = rng.random((3, 9, 7)).astype(np.float32)
    removed = rng.random((9, 7)) < 0.4
    reference = road_module.NoisyLinearImputer(noise=0.0)(torch.from_numpy(image),
                                                          torch.from_numpy((~removed).astype(np.float32)))
    np.testing.assert_allclose(noisy_linear_impute(image, removed, noise=0.0), reference.numpy(), atol=1e-5)


def test_imputation_noise_is_seeded():
    rng = np.random.default_rng(2)
    image = rng.random((3, 8, 8)).astype(np.float32)
    removed = rng.random((8, 8)) < 0.5
    quiet = noisy_linear_impute(image, removed, noise=0.0)
    a = noisy_linear_impute(image, removed, noise=0.01, rng=np.random.default_rng(7))
    b = noisy_linear_impute(image, removed, noise=0.01, rng=np.random.default_rng(7))
    c = noisy_linear_impute(image, removed, noise=0.01, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, ~removed], image[:, ~removed])  # kept pixels never get noise
    assert 0.005 < np.std(a[:, removed] - quiet[:, removed]) < 0.02
    with pytest.raises(ValueError, match="every pixel"):
        noisy_linear_impute(image, np.ones((8, 8), bool))


# ----- ROAD -------------------------------------------------------------------------------------------------------


def _block_case():
    # 8x8 black images with a bright 2x2 block; the "model" reads the block. The map is the image itself, so it
    # ranks the block first (ties among the zeros in row-major order).
    images = np.zeros((2, 3, 8, 8), dtype=np.float32)
    images[:, :, 3:5, 3:5] = 1.0
    return images, images[:, 0].astype(float), lambda x: x[:, :, 3:5, 3:5].mean(axis=(1, 2, 3))


def test_road_morf_and_lerf_on_a_known_case():
    images, maps, block = _block_case()
    result = road(block, images, maps, noise=0.0)
    # MoRF removes the block first (13 of 64 pixels at 0.2) and fills it from black neighbours: p = 0 exactly.
    np.testing.assert_array_equal(result.morf_curve, 0.0)
    # LeRF removes at most round(0.8 * 64) = 51 of the 60 black pixels: the block is never touched, p = 1.
    np.testing.assert_array_equal(result.lerf_curve, 1.0)
    np.testing.assert_array_equal(result.morf_auc, 0.0)
    np.testing.assert_array_equal(result.lerf_auc, 1.0)
    np.testing.assert_array_equal(result.combined, 0.5)
    # With the reference noise the ordering holds by far.
    noisy = road(block, images, maps, noise=0.01, seed=3)
    assert np.all(noisy.lerf_auc - noisy.morf_auc > 0.9)


def test_road_is_deterministic_and_independent_of_batching():
    rng = np.random.default_rng(4)
    images = rng.random((3, 3, 6, 6)).astype(np.float32)
    maps = rng.random((3, 6, 6))
    a = road(mean_of_s, images, maps, seed=1)
    b = road(mean_of_s, images, maps, seed=1, batch_size=1)
    c = road(mean_of_s, images, maps, seed=2)
    np.testing.assert_allclose(a.morf_curve, b.morf_curve, rtol=1e-12)
    np.testing.assert_allclose(a.lerf_curve, b.lerf_curve, rtol=1e-12)
    assert not np.array_equal(a.morf_curve, c.morf_curve)
    with pytest.raises(ValueError, match="fractions"):
        road(mean_of_s, images, maps, fractions=(0.5, 0.2))


def test_faithfulness_scores_collects_every_auc():
    images, maps, block = _block_case()
    scores = faithfulness_scores(block, images, maps, n_steps=8, noise=0.0)
    assert set(scores) == {"deletion_auc", "insertion_auc", "road_morf_auc", "road_lerf_auc", "road_combined"}
    # Deletion with a zero substrate removes the block in the first step (4 of 64 pixels < 8): p = 1, 0, 0, ...
    np.testing.assert_allclose(scores["deletion_auc"], 0.5 / 8)
    np.testing.assert_array_equal(scores["road_lerf_auc"], 1.0)
