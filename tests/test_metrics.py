"""Audit metrics against values worked out by hand on tiny arrays."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import pytest

from auditbench.audit.metrics import (
    METRICS, MetricWarning, attention_metrics, border_band, classification_metrics, metric_names,
)
from auditbench.registry import UnknownNameError

# 4x4 map, total mass 8:      lungs = left two columns (area 8 of 16)
H = np.array([[0, 0, 0, 0],  # border band at fraction 0.25 = the outer ring of 1 px
              [0, 2, 1, 0],
              [0, 1, 0, 0],
              [0, 0, 0, 4]], dtype=np.float32)
LUNGS = np.zeros((4, 4), bool)
LUNGS[:, :2] = True


def _mask(*pixels):
    mask = np.zeros((4, 4), bool)
    for r, c in pixels:
        mask[r, c] = True
    return mask


@contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_registry_declares_directions_and_applicability():
    assert METRICS.get("lung_mass").higher_is_better
    assert not METRICS.get("border_mass").higher_is_better
    assert not METRICS.get("artifact_occlusion_effect").higher_is_better
    assert METRICS.get("lung_occlusion_effect").higher_is_better
    applicable = {n for n, m in METRICS.items() if m.not_applicable_when_undefined}
    assert applicable == {
        "artifact_mass", "artifact_enrichment", "artifact_iou", "artifact_occlusion_effect", "border_mass",
        "border_occlusion_effect", "shortcut_reliance"}
    assert metric_names("attention") == [
        "artifact_enrichment", "artifact_iou", "artifact_mass", "border_mass", "lung_enrichment", "lung_hit", "lung_iou",
        "lung_mass", "pointing_game"]
    assert metric_names("behaviour") == ["shortcut_accuracy_drop", "shortcut_reliance"]
    assert metric_names("occlusion") == [
        "artifact_occlusion_effect", "border_occlusion_effect", "lung_occlusion_effect"]
    assert "tp" not in METRICS  # counts are reported, never ranked
    with pytest.raises(UnknownNameError, match="did you mean 'lung_mass'"):
        METRICS.get("lung_mas")


def test_border_band_width_is_the_generators_floor_per_side():
    ring = [[1, 1, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    assert border_band((4, 4), 0.25).astype(int).tolist() == ring
    band = border_band((128, 128), 0.12)  # 15.36 -> 15 px per side, SyntheticConfig.band_px
    assert band[14, 60] and not band[15, 60] and band[60, 113] and not band[60, 112]
    band = border_band((10, 20), 0.25)  # rows 2.5 -> 2, columns 5 -> 5
    assert band.sum() == 10 * 20 - (10 - 4) * (20 - 10)
    assert not border_band((8, 8), 0.0).any()
    with pytest.raises(ValueError):
        border_band((8, 8), 0.5)


def test_attention_metrics_on_a_4x4_map():
    with _no_warnings():
        result = attention_metrics(H[None], LUNGS[None], _mask((3, 3))[None], border_band((4, 4), 0.25))
    v = {k: float(a[0]) for k, a in result.values.items()}
    assert v["lung_mass"] == pytest.approx(3 / 8)  # (1,1)=2 and (2,1)=1
    assert v["lung_enrichment"] == pytest.approx((3 / 8) / (8 / 16))
    assert v["border_mass"] == pytest.approx(4 / 8)  # only (3,3)=4 lies on the ring
    assert v["artifact_mass"] == pytest.approx(4 / 8)
    assert v["artifact_enrichment"] == pytest.approx((4 / 8) / (1 / 16))
    assert v["pointing_game"] == 0.0  # argmax (3,3) is outside the lungs
    assert result.nan_counts == {"zero_map": 0, "empty_lung_mask": 0, "no_artifact": 0, "no_border": 0}


def test_artifact_metrics_use_the_mask_dilated_by_one_map_cell():
    # 8x8 frame, map cell 2 px: the artifact pixel (0, 7) grows to rows 0-2, columns 5-7 (9 px).
    heat = np.zeros((1, 8, 8))
    heat[0, 2, 5] = 3.0  # inside the dilated mask, outside the artifact itself
    heat[0, 6, 1] = 1.0
    artifact = np.zeros((1, 8, 8), bool)
    artifact[0, 0, 7] = True
    lungs = np.zeros((1, 8, 8), bool)
    lungs[0, 4:8, 2:4] = True  # (6, 1) is one pixel from the lungs
    exact = attention_metrics(heat, lungs, artifact, cell_px=0).values
    cell = attention_metrics(heat, lungs, artifact, cell_px=2).values
    assert exact["artifact_mass"][0] == 0.0 and cell["artifact_mass"][0] == pytest.approx(3 / 4)
    assert cell["artifact_enrichment"][0] == pytest.approx((3 / 4) / (9 / 64))
    # pointing game: argmax (2, 5) is 2 columns and 2 rows from the lungs' corner (4, 3): sqrt(8) > 2
    assert cell["pointing_game"][0] == 0.0
    heat[0, 2, 5] = 0.5  # now the peak is (6, 1), one pixel left of the lungs: a hit within a cell
    assert attention_metrics(heat, lungs, artifact, cell_px=2).values["pointing_game"][0] == 1.0
    assert attention_metrics(heat, lungs, artifact, cell_px=0).values["pointing_game"][0] == 0.0


def test_mass_all_half_none_and_raw_maps_are_not_normalised():
    maps = np.zeros((3, 4, 4), np.float32)
    maps[0, 1, 1] = 5.0  # all inside
    maps[1, 1, 1] = maps[1, 1, 3] = 1.0  # half inside
    maps[2, 0, 3] = 2.0  # none inside
    lungs = np.broadcast_to(_mask((1, 1), (2, 1)), (3, 4, 4))
    values = attention_metrics(maps, lungs).values
    np.testing.assert_allclose(values["lung_mass"], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(values["lung_enrichment"], [8.0, 4.0, 0.0])  # lung area 2/16
    np.testing.assert_array_equal(values["pointing_game"], [1.0, 1.0, 0.0])  # tie (1,1)/(1,3): first wins
    # a constant offset changes the ratio (11/24, not 3/8): maps are used raw, never min-max scaled
    assert attention_metrics((H + 1)[None], LUNGS[None]).values["lung_mass"][0] == pytest.approx(11 / 24)
    # a uniform map has no preference for the lungs
    uniform = attention_metrics(np.ones((1, 4, 4)), LUNGS[None]).values
    assert uniform["lung_enrichment"][0] == pytest.approx(1.0)


def test_pointing_game_ties_go_to_first_maximum_in_row_major_order():
    heat = np.zeros((2, 4, 4))
    heat[:, 0, 1] = heat[:, 2, 0] = 3.0
    masks = np.stack([_mask((0, 1)), _mask((2, 0))])
    np.testing.assert_array_equal(attention_metrics(heat, masks).values["pointing_game"], [1.0, 0.0])


def test_zero_and_non_finite_maps_are_nan_with_a_counted_warning():
    maps = np.stack([H, np.zeros((4, 4)), np.full((4, 4), np.nan)])
    lungs = np.broadcast_to(LUNGS, (3, 4, 4))
    with pytest.warns(MetricWarning, match="2 of 3 heatmaps are all zero"):
        result = attention_metrics(maps, lungs, np.broadcast_to(_mask((3, 3)), (3, 4, 4)), border_band((4, 4), 0.25))
    for name, values in result.values.items():
        assert not np.isnan(values[0]), name
        assert np.isnan(values[1:]).all(), name
    assert result.nan_counts["zero_map"] == 2


def test_empty_lung_mask_is_nan_not_zero():
    lungs = np.stack([LUNGS, np.zeros((4, 4), bool)])
    with pytest.warns(MetricWarning, match="1 of 2 lung masks are empty"):
        result = attention_metrics(np.stack([H, H]), lungs, border_masks=border_band((4, 4), 0.25))
    for name in ("lung_mass", "lung_enrichment", "pointing_game"):
        assert np.isnan(result.values[name][1]) and not np.isnan(result.values[name][0])
    np.testing.assert_allclose(result.values["border_mass"], [0.5, 0.5])  # still defined
    assert result.nan_counts["empty_lung_mask"] == 1


def test_missing_artifacts_are_nan_counted_and_not_warned():
    maps, lungs = np.stack([H, H]), np.stack([LUNGS, LUNGS])
    with _no_warnings():
        absent = attention_metrics(maps, lungs, None)
        per_image = attention_metrics(maps, lungs, [None, _mask((1, 1))])
    assert np.isnan(absent.values["artifact_mass"]).all() and absent.nan_counts["no_artifact"] == 2
    np.testing.assert_allclose(per_image.values["artifact_mass"], [np.nan, 2 / 8])
    assert per_image.nan_counts["no_artifact"] == 1


def test_attention_metrics_rejects_negative_maps_and_bad_shapes():
    with pytest.raises(ValueError, match=">= 0"):
        attention_metrics(-H[None], LUNGS[None])
    with pytest.raises(ValueError, match="shape"):
        attention_metrics(H[None], np.ones((1, 3, 3), bool))


def test_classification_metrics_by_hand():
    # predictions at 0.5: [0, 1, 0, 1, 1] -> tn 1, fp 1, fn 1, tp 2
    m = classification_metrics(np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.4, 0.8, 0.9]))
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (1, 1, 1, 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx(7 / 12)
    assert m["roc_auc"] == pytest.approx(5 / 6)  # 5 of 6 positive-negative pairs ordered correctly
    # p exactly at the threshold is negative, as argmax of two equal softmax outputs
    assert classification_metrics(np.array([0, 1]), np.array([0.5, 0.7]))["accuracy"] == 1.0


def test_classification_metrics_with_one_class_are_nan_not_perfect():
    with pytest.warns(MetricWarning, match="only class 1"):
        m = classification_metrics(np.array([1, 1]), np.array([0.2, 0.9]))
    assert m["sensitivity"] == 0.5 and m["accuracy"] == 0.5
    assert np.isnan(m["specificity"]) and np.isnan(m["balanced_accuracy"]) and np.isnan(m["roc_auc"])
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 2]), np.array([0.2, 0.9]))
