"""One geometry for images and regions: the occlusion fill against the clean twin of a phantom,
at every phantom size x model frame x crop setting users run (property test of issue "audit
numbers that hold on real images")."""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
from scipy import ndimage

from auditbench.audit.occlusion import border_fill_region, inpaint, occlude
from auditbench.data.prepare import ARTIFACT_IN_VIEW, ARTIFACT_OUT_OF_VIEW, to_frames
from auditbench.data.synthetic import SyntheticConfig, generate
from auditbench.data.transforms import FrameSpec, border_band, region_to_frame, resample

BAND = 0.12  # the generator's marker band and the default border band


@functools.lru_cache(maxsize=None)
def _twins(size: int, placement: str):
    config = SyntheticConfig(n_images=6, image_size=size, base_artifact_rate=1.0, artifact_placement=placement, seed=3)
    marked = generate(config, 0.0, "test").samples
    clean = generate(dataclasses.replace(config, base_artifact_rate=0.0), 0.0, "test").samples
    return marked, clean


@pytest.mark.parametrize("size", [128, 256, 448])
@pytest.mark.parametrize("input_size", [128, 224, 299])
@pytest.mark.parametrize("crop", [False, True])
def test_artifact_fill_removes_the_marker_at_every_size_and_frame(size, input_size, crop):
    # Uncropped frames show the border markers; cropped frames only markers inside the crop window.
    marked, clean = _twins(size, "inside_crop" if crop else "border")
    frame = FrameSpec(input_size, crop)
    with_marker, twin = to_frames(marked, frame, BAND), to_frames(clean, frame, BAND)
    assert (with_marker.artifact_status == ARTIFACT_IN_VIEW).all()
    occluded = occlude(with_marker.images, with_marker.lungs, with_marker.artifact_footprint)
    excess = residual = 0.0
    for row, i in enumerate(occluded.indices["artifact"]):
        footprint, filled = with_marker.artifact_footprint[i], occluded.filled["artifact"][row]
        # Outside its footprint the marker changes nothing, so the fill reads only the twin's pixels:
        np.testing.assert_array_equal(with_marker.images[i][~footprint], twin.images[i][~footprint])
        np.testing.assert_array_equal(filled, np.clip(inpaint(twin.images[i], footprint), 0, 1))
        # No new bright pixel: each component stays below the twin's maximum on its outer ring.
        labels, n = ndimage.label(footprint)
        for k in range(1, n + 1):
            component = labels == k
            ring = ndimage.binary_dilation(component) & ~footprint
            assert filled[component].max() <= twin.images[i][ring].max() + 1e-6
        excess += float((with_marker.images[i] - twin.images[i])[footprint].sum())
        residual += abs(float((filled - twin.images[i])[footprint].sum()))
    assert len(occluded.indices["artifact"]) == len(marked)
    # What is left differs from the twin only by the anatomy the fill cannot know.
    assert 1 - residual / excess >= 0.95


@pytest.mark.parametrize("size", [128, 256, 448])
@pytest.mark.parametrize("input_size", [128, 224, 299])
def test_the_crop_removes_border_markers_and_band_by_construction(size, input_size):
    marked, _ = _twins(size, "border")
    frames = to_frames(marked, FrameSpec(input_size, crop=True), BAND)
    assert (frames.artifact_status == ARTIFACT_OUT_OF_VIEW).all()
    assert not frames.artifact_footprint.any()
    assert not frames.border_footprint.any() and not frames.border.any()
    uncropped = to_frames(marked, FrameSpec(input_size, crop=False), BAND)
    assert uncropped.border.all(axis=0)[0].all()  # the top row is band in every image
    # Every marker pixel of an uncropped frame lies inside the band's footprint.
    assert not (uncropped.artifacts & ~uncropped.border_footprint).any()


def test_region_footprint_is_exactly_where_the_region_changes_the_frame():
    rng = np.random.default_rng(0)
    image = rng.random((50, 70)).astype(np.float32)
    region = np.zeros((50, 70), bool)
    region[10:13, 20:24] = True
    changed = image.copy()
    changed[region] = 5.0
    for frame in (FrameSpec(31, False), FrameSpec(96, False), FrameSpec(64, True)):
        mapped = region_to_frame(region, frame)
        difference = resample(changed, frame) != resample(image, frame)
        np.testing.assert_array_equal(difference, mapped.footprint)
        assert not (mapped.mask & ~mapped.footprint).any()


def test_inpaint_by_hand():
    # One unknown pixel between known 0.2 (left), 0.6 (right), 0.4 (above, below): their mean.
    image = np.array([[0.0, 0.4, 0.0], [0.2, 9.0, 0.6], [0.0, 0.4, 0.0]], np.float32)
    unknown = np.zeros((3, 3), bool)
    unknown[1, 1] = True
    assert inpaint(image, unknown)[1, 1] == pytest.approx(0.4)
    # Two unknowns side by side at the top edge (reflecting edge: only in-image neighbours count).
    image = np.array([[0.3, 9, 9, 0.9], [0.3, 0.3, 0.9, 0.9]], np.float32)
    unknown = np.zeros((2, 4), bool)
    unknown[0, 1:3] = True
    filled = inpaint(image, unknown)
    a, b = filled[0, 1], filled[0, 2]
    # a's neighbours: left 0.3, right b, below 0.3; b's: left a, right 0.9, below 0.9
    assert a == pytest.approx((0.3 + b + 0.3) / 3) and b == pytest.approx((a + 0.9 + 0.9) / 3)
    assert (a, b) == pytest.approx((0.45, 0.75))
    with pytest.raises(ValueError, match="whole image"):
        inpaint(image, np.ones((2, 4), bool))


def test_border_fill_takes_the_markers_it_touches():
    band = border_band((20, 20), 0.2)  # 4 px
    marker = np.zeros((20, 20), bool)
    marker[3:6, 8:10] = True  # straddles the band's inner edge
    inside = np.zeros((20, 20), bool)
    inside[10:12, 10:12] = True  # a marker well inside: not the border's business
    region = border_fill_region(band, marker | inside)
    assert region[band].all() and region[marker].all() and not region[inside].any()
