"""Patient-level bootstrap: hand-checked resamples, the vectorised mean path, paired differences."""
import warnings

import numpy as np
import pytest

from auditbench.audit.uncertainty import (
    PairedDifference, bootstrap_ci, cluster_resamples, mean_ci, mean_cis, paired_bootstrap, percentile_ci,
)


def test_cluster_resamples_by_hand_against_default_rng():
    groups = np.array(["a", "a", "b"])  # patient a = images 0, 1; patient b = image 2
    resamples = cluster_resamples(groups, n_boot=3, seed=0)
    draws = np.random.default_rng(0).integers(0, 2, size=(3, 2))  # codes: a -> 0, b -> 1 (sorted ids)
    images = {0: [0, 1], 1: [2]}
    expected = [np.array(sum((images[p] for p in row), [])) for row in draws]
    assert len(resamples) == 3
    for got, want in zip(resamples, expected):
        np.testing.assert_array_equal(got, want)
    # numpy's PCG64 stream is fixed, so the draws [[1, 1], [1, 0], [0, 0]] give:
    np.testing.assert_array_equal(draws, [[1, 1], [1, 0], [0, 0]])
    np.testing.assert_array_equal(resamples[0], [2, 2])  # b drawn twice: its image twice
    np.testing.assert_array_equal(resamples[1], [2, 0, 1])
    np.testing.assert_array_equal(resamples[2], [0, 1, 0, 1])  # a drawn twice: both images twice


def test_cluster_resamples_are_multisets_of_whole_patients():
    rng = np.random.default_rng(5)
    groups = rng.integers(0, 30, size=200).astype(str)
    sizes = {g: int((groups == g).sum()) for g in np.unique(groups)}
    for index in cluster_resamples(groups, n_boot=50, seed=1):
        drawn = groups[index]
        times = {g: int((drawn == g).sum()) // sizes[g] for g in np.unique(drawn)}
        for g in np.unique(drawn):
            assert (drawn == g).sum() % sizes[g] == 0  # whole patients only
        assert sum(times.values()) == len(sizes)  # as many patients as there are
    assert cluster_resamples(groups, n_boot=0, seed=1) == []


def test_cluster_resamples_are_deterministic():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 600, size=2000)
    first = cluster_resamples(groups, n_boot=1000, seed=3)
    second = cluster_resamples(groups, n_boot=1000, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    other = cluster_resamples(groups, n_boot=1000, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_bootstrap_ci_constant_values_and_degenerate_cases():
    groups = np.array([0, 0, 1, 2, 2, 2])
    values = np.full(6, 0.7)
    assert bootstrap_ci(lambda i: values[i].mean(), groups, 200, seed=0) == pytest.approx((0.7, 0.7))
    assert bootstrap_ci(lambda i: values[i].max(), groups, 200, seed=0) == (0.7, 0.7)  # exact
    assert mean_ci(values, groups, 200, seed=0) == pytest.approx((0.7, 0.7))
    assert all(np.isnan(bootstrap_ci(lambda i: values[i].mean(), groups, 0, seed=0)))
    assert all(np.isnan(bootstrap_ci(lambda i: np.nan, groups, 50, seed=0)))  # all-NaN replicates
    assert all(np.isnan(mean_ci(np.full(6, np.nan), groups, 50, seed=0)))
    assert all(np.isnan(percentile_ci(np.array([]))))


def test_two_patients_replicate_means_lie_in_zero_half_one():
    values, groups = np.array([0.0, 1.0]), np.array(["p", "q"])
    seen = []

    def record(index):
        seen.append(values[index].mean())
        return seen[-1]

    low, high = bootstrap_ci(record, groups, n_boot=400, seed=2)
    assert set(seen) == {0.0, 0.5, 1.0}  # (p, p), (p, q) or (q, p), (q, q)
    assert (low, high) == (0.0, 1.0)  # P(0) = P(1) = 1/4 > 2.5%
    assert mean_ci(values, groups, n_boot=400, seed=2) == (0.0, 1.0)


def test_mean_ci_equals_bootstrap_ci_of_nanmean_for_the_same_seed():
    rng = np.random.default_rng(11)
    groups = rng.integers(0, 40, size=300)
    values = rng.random(300)
    values[rng.random(300) < 0.3] = np.nan  # undefined images are ignored by both
    for seed, level in [(0, 0.95), (7, 0.9)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN replicate
            slow = bootstrap_ci(lambda i: np.nanmean(values[i]), groups, 500, seed, level)
        fast = mean_ci(values, groups, 500, seed, level)
        assert fast == pytest.approx(slow, rel=1e-12, abs=1e-12)
    many = mean_cis(np.stack([values, 1 - values, values ** 2], axis=1), groups, 300, seed=1)
    assert many.shape == (3, 2)
    assert tuple(many[1]) == pytest.approx(mean_ci(1 - values, groups, 300, seed=1))


def test_paired_identical_models_are_not_distinguishable():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 3)
    correct = (rng.random(60) < 0.8).astype(float)  # per-image correctness: mean = accuracy
    result = paired_bootstrap(correct, correct.copy(), groups, n_boot=300, seed=0)
    assert isinstance(result, PairedDifference)
    assert (result.difference, result.ci_low, result.ci_high) == (0.0, 0.0, 0.0)
    assert not result.distinguishable


def test_paired_model_better_on_every_patient_is_distinguishable():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(15), 4)
    b = rng.random(60)
    a = b + 0.05 + 0.1 * rng.random(60)  # better on every image, so on every patient
    result = paired_bootstrap(a, b, groups, n_boot=500, seed=3)
    assert result.difference == pytest.approx(np.mean(a - b))
    assert 0 < result.ci_low <= result.difference <= result.ci_high
    assert result.distinguishable
    reverse = paired_bootstrap(b, a, groups, n_boot=500, seed=3)
    assert reverse.distinguishable and reverse.ci_high < 0
    assert (reverse.ci_low, reverse.ci_high) == pytest.approx((-result.ci_high, -result.ci_low))


def test_paired_callable_statistic_uses_the_same_resamples_and_skips_nan():
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 25, size=120)
    a, b = rng.random(120), rng.random(120)
    a[:10] = np.nan  # images 0..9 count for neither model
    by_mean = paired_bootstrap(a, b, groups, 400, seed=5)
    by_callable = paired_bootstrap(a, b, groups, 400, seed=5, statistic=np.mean)
    assert by_callable.difference == pytest.approx(np.mean(a[10:]) - np.mean(b[10:]))
    assert (by_callable.difference, by_callable.ci_low, by_callable.ci_high) == pytest.approx(
        (by_mean.difference, by_mean.ci_low, by_mean.ci_high), rel=1e-12)
    median = paired_bootstrap(a, b, groups, 200, seed=5, statistic=np.median)
    assert median.ci_low <= median.ci_high
    with pytest.raises(ValueError):
        paired_bootstrap(a, b[:-1], groups, 10, seed=0)
    with pytest.raises(ValueError):
        paired_bootstrap(a, b, groups, 10, seed=0, statistic="median")
