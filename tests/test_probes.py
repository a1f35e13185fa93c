"""Shortcut probes without masks (audit.probes): hand-worked cases.

Tolerances for "near chance" are derived from the sample size, not tuned: the balanced accuracy of two
sources, BA = (r_a + r_b) / 2, with each recall a binomial proportion (variance <= 1 / (4 n)), has
SD <= sqrt((1/(4 n_a) + 1/(4 n_b)) / 4) under independence; the tests allow 4 SD, which leaves room for
the correlation between out-of-fold predictions of one fitted probe.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from auditbench.audit.metrics import METRICS, metric_names
from auditbench.audit.occlusion import fill_lung_median
from auditbench.audit.probes import balanced_accuracy, fill_lungs, lungs_removed_auc, outside_lung_probe, source_probe


def chance_tolerance(n_a: int, n_b: int) -> float:
    """4 binomial SDs of a two-source balanced accuracy at chance (module docstring)."""
    return 4 * math.sqrt((1 / (4 * n_a) + 1 / (4 * n_b)) / 4)


def test_balanced_accuracy_by_hand():
    true, predicted = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    assert balanced_accuracy(true, predicted, 3) == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)
    assert math.isnan(balanced_accuracy(np.array([0, 0]), np.array([0, 0]), 2))  # source 1 absent: undefined


def test_separable_source_within_each_class_scores_one():
    rng = np.random.default_rng(0)
    n = 60
    x = rng.normal(size=(2 * n + 3 * n, 8))
    labels = np.r_[np.zeros(2 * n, int), np.ones(3 * n, int)]
    sources = np.r_[np.repeat(["ieee", "kermany"], n), np.repeat(["ieee", "kermany", "external"], n)]
    # feature 0 puts each source of a class in its own interval, 8 units apart: linearly separable
    offsets = {"ieee": -8.0, "kermany": 0.0, "external": 8.0}
    x[:, 0] = rng.uniform(-1, 1, len(x)) + np.array([offsets[s] for s in sources])
    result = source_probe(x, sources, labels, np.arange(len(x)), seed=0, n_boot=200)
    zero, one = result.classes
    assert (zero.label, zero.sources, zero.chance) == (0, ("ieee", "kermany"), 0.5)
    assert (one.label, one.chance) == (1, pytest.approx(1 / 3))
    for row in (zero, one):
        assert row.reason == "" and row.n_folds == 5
        assert row.balanced_accuracy == 1.0 and row.adjusted == 1.0
        assert (row.ci_low, row.ci_high) == (1.0, 1.0) and row.fold_std == 0.0
    assert result.value == 1.0 and result.reason == ""
    assert list(result.table()["balanced_accuracy"]) == [1.0, 1.0]


def test_features_without_source_information_score_near_chance_not_the_majority_rate():
    rng = np.random.default_rng(1)
    n_a, n_b = 300, 100  # the majority source is 75% of the images: plain accuracy's chance level
    x = rng.normal(size=(n_a + n_b, 16))  # the same distribution for both sources
    sources = np.repeat(["a", "b"], [n_a, n_b])
    result = source_probe(x, sources, np.zeros(n_a + n_b, int), np.arange(n_a + n_b), seed=0, n_boot=200)
    row = result.classes[0]
    assert row.chance == 0.5
    assert abs(row.balanced_accuracy - 0.5) <= chance_tolerance(n_a, n_b)  # 0.115
    assert abs(result.value) <= 2 * chance_tolerance(n_a, n_b)  # adjusted = 2 (BA - 0.5)


def test_grouping_by_patient_prevents_leakage():
    # Each patient has a random 128-d feature signature and two near-identical images; the source is
    # drawn per patient and is unrelated to the signature. Split by image, a test image's twin is in the
    # training folds and the probe recognises the patient (and so its source); split by patient it cannot.
    rng = np.random.default_rng(2)
    n_patients, dim = 100, 128
    signature = rng.normal(size=(n_patients, dim))
    patient_source = np.where(rng.permutation(n_patients) < n_patients // 2, "a", "b")
    x = np.repeat(signature, 2, axis=0) + 0.1 * rng.normal(size=(2 * n_patients, dim))
    sources, patients = np.repeat(patient_source, 2), np.repeat(np.arange(n_patients), 2)
    labels = np.zeros(2 * n_patients, int)
    tolerance = chance_tolerance(n_patients // 2, n_patients // 2)  # patients, not images, are independent: 0.2
    leaky = source_probe(x, sources, labels, np.arange(2 * n_patients), seed=0, n_boot=0).classes[0]
    grouped = source_probe(x, sources, labels, patients, seed=0, n_boot=0).classes[0]
    assert leaky.balanced_accuracy > 0.5 + tolerance  # the construction does leak when split by image
    assert abs(grouped.balanced_accuracy - 0.5) <= tolerance
    assert math.isnan(grouped.ci_low)  # n_boot=0: no interval


def test_class_with_one_source_or_too_few_patients_is_nan_with_reason():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 4))
    labels = np.repeat([0, 1], 20)
    sources = np.r_[np.repeat(["a", "b"], 10), np.repeat(["a"], 20)]
    x[:10, 0] += 10  # class 0: source a far from source b
    result = source_probe(x, sources, labels, np.arange(40), n_boot=50)
    zero, one = result.classes
    assert zero.balanced_accuracy == 1.0
    assert math.isnan(one.balanced_accuracy) and math.isnan(one.adjusted) and "one source only (a)" in one.reason
    assert result.value == 1.0  # the mean over defined classes

    # class 0 again, but source b has 3 patients (images 10-19 of 3 patients): fewer than 5 folds
    groups = np.r_[np.arange(10), np.repeat([100, 101, 102], [4, 3, 3]), np.arange(200, 220)]
    result = source_probe(x, sources, labels, groups, n_boot=50)
    assert "fewer than 5 patients in source b (3)" in result.classes[0].reason
    assert math.isnan(result.value) and result.reason.startswith("no class has a defined probe")


def test_lungs_removed_auc_by_hand():
    labels = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    # positive-negative pairs: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4
    # patients A = images {0, 2}, B = {1, 3}: a resample AA or BB holds one pair, ordered right (AUC 1);
    # AB holds all four (0.75). Each has probability 1/2, so the 95% percentile interval is [0.75, 1].
    result = lungs_removed_auc(p, labels, groups=np.array(["A", "B", "A", "B"]), n_boot=1000, seed=0)
    assert result.auc == 0.75 and result.separation == 0.25
    assert (result.ci_low, result.ci_high) == (0.75, 1.0)
    assert (result.n_images, result.n_patients) == (4, 2)
    # ties count 1/2: 0.5>0.2, 0.5=0.5, 0.9>0.2, 0.9>0.5 -> 3.5 / 4; one patient: every resample is the data
    tied = lungs_removed_auc(np.array([0.2, 0.5, 0.5, 0.9]), labels, groups=np.zeros(4), n_boot=100)
    assert (tied.auc, tied.ci_low, tied.ci_high) == (0.875, 0.875, 0.875)
    # inverted: 0.25 is as far from 0.5 as 0.75
    assert lungs_removed_auc(1 - p, labels, n_boot=0).separation == 0.25
    # with the intact scores (AUC 1): the drop is 0.25, paired over the same resamples
    paired = lungs_removed_auc(p, labels, groups=np.zeros(4), p_intact=np.array([0.1, 0.2, 0.8, 0.9]), n_boot=10)
    assert (paired.intact_auc, paired.auc_drop, paired.drop_ci_low, paired.drop_ci_high) == (1.0, 0.25, 0.25, 0.25)
    one_class = lungs_removed_auc(p, np.ones(4, int), n_boot=10)
    assert math.isnan(one_class.auc) and "only class 1" in one_class.reason
    with pytest.raises(ValueError, match="0 and 1"):
        lungs_removed_auc(p, np.array([0, 1, 2, 1]))


def test_fill_lungs_equals_fill_lung_median_per_image():
    rng = np.random.default_rng(4)
    images = rng.random((3, 16, 16)).astype(np.float32)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 4:10, 3:7] = masks[1, 2:12, 9:14] = masks[2, 5:6, 5:6] = True
    footprints = masks.copy()
    footprints[:, :, 1:] |= masks[:, :, :-1]  # one pixel wider to the right
    filled = fill_lungs(images, masks, footprints)
    plain = fill_lungs(images, masks)
    for i in range(3):
        assert np.array_equal(filled[i], fill_lung_median(images[i], masks[i], footprints[i]))
        assert np.array_equal(plain[i], fill_lung_median(images[i], masks[i]))
        assert np.array_equal(filled[i][~footprints[i]], images[i][~footprints[i]])  # nothing else changes
    masks[1] = False
    with pytest.raises(ValueError, match="1 of 3 lung masks are empty"):
        fill_lungs(images, masks)


def test_probe_metrics_are_registered_with_directions():
    assert metric_names("probe") == ["lungs_removed_auc", "outside_lung_probe_accuracy", "source_probe_accuracy"]
    for name in metric_names("probe"):
        assert not METRICS.get(name).higher_is_better
    assert METRICS.get("lungs_removed_auc").detector
    assert not METRICS.get("source_probe_accuracy").detector


def test_phantoms_lung_source_is_removed_by_the_fill_and_border_source_is_not():
    """End to end on phantoms with a random resnet10t: three "sources" of one class, identical but for a
    lung texture (+-0.1 per pixel inside the lungs, median unchanged) or a brighter border band (+0.1).
    Intact, both are readable; lung-filled, the lung texture is gone and the border is not."""
    from auditbench.data.synthetic import SyntheticConfig, generate
    from auditbench.data.transforms import border_band
    from auditbench.models.backbones import build_backbone
    from auditbench.training.device import Accelerator
    from auditbench.training.features import extract_features

    n, size = 80, 48
    config = SyntheticConfig(n_images=3 * n, image_size=size, classes=("normal",), positive_class="normal",
                             base_artifact_rate=0.0, seed=0)
    samples = generate(config, 0.0).samples
    images = np.stack([s.image for s in samples]).astype(np.float32)
    lungs = np.stack([s.lung_mask for s in samples])
    sources = np.repeat(["plain", "lung_texture", "border_bright"], n)
    rng = np.random.default_rng(0)
    texture = sources == "lung_texture"
    noise = 0.1 * rng.choice([-1.0, 1.0], size=images[texture].shape)
    images[texture] = np.clip(images[texture] + np.where(lungs[texture], noise, 0.0), 0, 1)
    border = sources == "border_bright"
    images[border] = np.clip(images[border] + 0.1 * border_band((size, size), 0.12), 0, 1)

    torch.manual_seed(0)
    backbone = build_backbone("resnet10t", "none")
    accelerator = Accelerator(torch.device("cpu"), None)

    def pooled(x):
        return extract_features(backbone, x, backbone.data_config["mean"], backbone.data_config["std"],
                                accelerator).pooled.numpy()

    intact, filled = pooled(images), pooled(fill_lungs(images, lungs))
    labels, patients = np.zeros(3 * n, int), np.arange(3 * n)
    tolerance = chance_tolerance(n, n)  # 0.158
    for other, readable_without_lungs in (("lung_texture", False), ("border_bright", True)):
        keep = (sources == "plain") | (sources == other)
        args = (sources[keep], labels[keep], patients[keep])
        with_lungs = source_probe(intact[keep], *args, n_boot=0).classes[0].balanced_accuracy
        without = outside_lung_probe(filled[keep], *args, n_boot=0).classes[0].balanced_accuracy
        assert with_lungs > 0.5 + tolerance, other
        if readable_without_lungs:
            assert without > 0.5 + tolerance, other
        else:
            assert abs(without - 0.5) <= tolerance, other
