"""Occlusion fills and effects with a fake model whose answer is known by hand."""
from __future__ import annotations

import numpy as np
import pytest

from auditbench.audit.metrics import MetricWarning, border_band
from auditbench.audit.occlusion import fill_lung_median, inpaint, occlusion_effects


def test_inpaint_restores_a_linear_background_around_a_marker():
    ramp = np.tile(np.linspace(0.1, 0.8, 16, dtype=np.float32), (16, 1))
    image = ramp.copy()
    marker = np.zeros((16, 16), bool)
    marker[5:8, 6:10] = True
    image[marker] = 1.0
    np.testing.assert_allclose(inpaint(image, marker), ramp, atol=1e-5)  # a ramp is harmonic


def test_inpaint_fills_the_border_band_from_inside_only():
    image = np.full((12, 12), 0.3, np.float32)
    band = border_band((12, 12), 0.25)  # 3 px
    image[band] = 1.0
    filled = inpaint(image, band)
    np.testing.assert_allclose(filled, 0.3, atol=1e-6)  # only the 0.3 interior is known
    np.testing.assert_array_equal(filled[~band], image[~band])


def test_inpaint_edge_cases():
    image = np.full((4, 4), 0.3, np.float32)
    np.testing.assert_array_equal(inpaint(image, np.zeros((4, 4), bool)), image)
    with pytest.raises(ValueError, match="whole image"):
        inpaint(image, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="shape"):
        inpaint(image, np.zeros((3, 4), bool))


def test_fill_lung_median():
    image = np.zeros((4, 4), np.float32)
    lungs = np.zeros((4, 4), bool)
    lungs[1:3, 1:3] = True
    image[1:3, 1:3] = [[0.1, 0.2], [0.3, 0.9]]
    filled = fill_lung_median(image, lungs)
    np.testing.assert_allclose(filled[lungs], 0.25)  # median of 0.1, 0.2, 0.3, 0.9
    np.testing.assert_array_equal(filled[~lungs], 0.0)
    footprint = np.zeros((4, 4), bool)
    footprint[1:4, 1:3] = True  # the resampling footprint reaches one row further
    np.testing.assert_allclose(fill_lung_median(image, lungs, footprint)[footprint], 0.25)
    with pytest.raises(ValueError, match="empty"):
        fill_lung_median(image, np.zeros((4, 4), bool))


class BoxModel:
    """p = 0.5 * mean(top 4 rows) + 0.5 * mean(rows 9-10, columns 8-9); counts images seen."""

    def __init__(self):
        self.seen = 0

    def __call__(self, x):
        self.seen += len(x)
        return 0.5 * x[:, 0:4, :].mean(axis=(1, 2)) + 0.5 * x[:, 9:11, 8:10].mean(axis=(1, 2))


BAND = border_band((16, 16), 0.25)  # the outer 4 px


def _phantoms():
    """16x16 images, background 0.2, border band 4 px (fraction 0.25)."""
    images = np.full((3, 16, 16), 0.2, np.float32)
    lungs = np.zeros((3, 16, 16), bool)
    artifacts = np.zeros((3, 16, 16), bool)
    # A: a 4x4 marker at 1.0 in the top band; lungs (rows 9-10, cols 6-9) half 0.2, half 1.0
    artifacts[0, 0:4, 4:8] = True
    images[0][artifacts[0]] = 1.0
    lungs[0, 9:11, 6:10] = True
    images[0, 9:11, 8:10] = 1.0
    # B: no artifact, the top band is brighter (0.5); uniform lungs
    images[1, 0:4, :] = 0.5
    lungs[1, 9:11, 6:10] = True
    # C: empty lung mask
    return images, lungs, artifacts


def test_occlusion_effects_by_hand():
    images, lungs, artifacts = _phantoms()
    model = BoxModel()
    with pytest.warns(MetricWarning, match="1 of 3 lung masks are empty"):
        effects = occlusion_effects(model, images, lungs, artifacts, border_footprints=BAND, batch_size=2)
    # A: p = 0.5 * (16 * 1.0 + 48 * 0.2) / 64 + 0.5 * 1.0 = 0.7
    #    marker inpainted from its 0.2 surroundings -> top 0.2 -> p 0.6; band filled from the 0.2
    #    inside it (the marker it touches too) -> p 0.6;
    #    lungs -> median 0.6, box 1.0 -> 0.6 -> p 0.5
    # B: p = 0.5 * 0.5 + 0.5 * 0.2 = 0.35; band filled -> p 0.2; uniform lungs do not change
    np.testing.assert_allclose(effects["artifact_occlusion_effect"], [0.1, np.nan, np.nan], atol=1e-6)
    np.testing.assert_allclose(effects["border_occlusion_effect"], [0.1, 0.15, 0.0], atol=1e-6)
    np.testing.assert_allclose(effects["lung_occlusion_effect"], [0.2, 0.0, np.nan], atol=1e-6)
    # p(x) for 3 images, then 1 artifact image, 3 border-filled and 2 lung-filled
    assert model.seen == 3 + 1 + 3 + 2


def test_occlusion_effects_reuses_p_original_and_accepts_missing_artifacts():
    images, lungs, _ = _phantoms()
    model = BoxModel()
    p = model(images)
    model.seen = 0
    with pytest.warns(MetricWarning):
        effects = occlusion_effects(model, images, lungs, None, border_footprints=BAND, p_original=p)
    assert np.isnan(effects["artifact_occlusion_effect"]).all()
    assert model.seen == 3 + 2  # border for all, lungs for the two with a mask; no p(x), no artifact pass


def test_occlusion_effects_rejects_bad_model_output():
    images, lungs, _ = _phantoms()
    with pytest.raises(ValueError, match="expected"):
        occlusion_effects(lambda x: np.zeros((len(x), 2)), images, lungs)
