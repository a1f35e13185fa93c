"""Sanity checks of saliency maps (Adebayo et al. 2018; Arun et al. 2021): similarity worked out by hand, the
cascade's order, coverage and determinism, the verdict rule, label shuffling, and Grad-CAM end to end."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from auditbench.audit.metrics import MetricWarning
from auditbench.audit.uncertainty import mean_ci
from auditbench.explain.cam_base import explain_batch, upsample_cams
from auditbench.audit.sanity import (
    MapSimilarity, cascading_randomisation, map_similarity, random_pair_baseline, randomisation_units,
    randomisation_verdict, scale_to_unit_range, shuffled_labels, ssim_window,
)
from auditbench.models.classifier import Classifier, build_classifier

RAMP = np.arange(9, dtype=float).reshape(3, 3) / 8  # values 0, 1/8, ..., 1


# ----- similarity by hand -----------------------------------------------------------------------------------------


def test_identical_maps_score_one_and_scaling_is_per_image():
    # 3 x RAMP + 2 scales back to RAMP, so the pair is identical after scaling: Spearman 1, SSIM 1.
    result = map_similarity(RAMP, 3 * RAMP + 2)
    np.testing.assert_allclose(result.spearman, [1.0])
    np.testing.assert_allclose(result.ssim, [1.0])
    assert result.reasons == [""]


def test_reversed_ranks_by_hand():
    # Spearman: the ranks of 1 - RAMP are the reverse of RAMP's: -1.
    # SSIM at 3x3 uses one 3x3 window (skimage crops the half-window border), so it is the global formula with
    # sample (co)variances: mu = 0.5 for both; var = sum((k - 4)^2) / 64 / 8 = 60 / 512 = 0.1171875; cov = -var;
    # C1 = (0.01)^2, C2 = (0.03)^2 (data_range 1). The mean factors (2 mu^2 + C1) / (2 mu^2 + C1) cancel:
    # SSIM = (2 cov + C2) / (2 var + C2) = (-0.234375 + 0.0009) / (0.234375 + 0.0009).
    result = map_similarity(RAMP, 1 - RAMP)
    np.testing.assert_allclose(result.spearman, [-1.0])
    np.testing.assert_allclose(result.ssim, [(-0.234375 + 0.0009) / (0.234375 + 0.0009)], rtol=1e-12)


def test_constant_map_is_nan_with_a_reason():
    maps = np.stack([RAMP, RAMP])
    other = np.stack([RAMP.T, np.full((3, 3), 0.4)])
    with pytest.warns(MetricWarning, match="1 of 2"):
        result = map_similarity(maps, other)
    assert np.isfinite(result.spearman[0]) and np.isfinite(result.ssim[0])
    assert np.isnan(result.spearman[1]) and np.isnan(result.ssim[1])
    assert result.reasons == ["", "other map is constant or not finite"]
    assert np.isnan(scale_to_unit_range(np.full((1, 3, 3), np.inf))).all()


def test_ssim_window_fits_small_maps():
    assert ssim_window((64, 64)) == 7
    assert ssim_window((4, 5)) == 3
    assert ssim_window((6, 6)) == 5
    with pytest.raises(ValueError, match="too small"):
        ssim_window((2, 8))


def test_random_pair_baseline_draws_different_images():
    rng = np.random.default_rng(3)
    maps = rng.random((4, 5, 5))
    baseline = random_pair_baseline(maps, n_pairs=30, seed=7)
    first, second = baseline.pairs.T
    assert np.all(first != second)
    # The documented draw: i uniform, then j = (i + k) mod N with k in 1..N-1.
    draw = np.random.default_rng(7)
    expected_first = draw.integers(0, 4, size=30)
    np.testing.assert_array_equal(first, expected_first)
    np.testing.assert_array_equal(second, (expected_first + draw.integers(1, 4, size=30)) % 4)
    pairwise = map_similarity(maps[first], maps[second])
    assert baseline.mean_ssim == pytest.approx(pairwise.ssim.mean())
    assert baseline.mean_spearman == pytest.approx(pairwise.spearman.mean())
    with pytest.raises(ValueError, match="at least 2"):
        random_pair_baseline(maps[:1])


# ----- the verdict ------------------------------------------------------------------------------------------------


def _similarity(ssim: list[float]) -> MapSimilarity:
    values = np.array(ssim, dtype=float)
    return MapSimilarity(spearman=values.copy(), ssim=values, reasons=[""] * len(values))


def test_verdict_rule_by_its_definition():
    rng = np.random.default_rng(0)
    maps = rng.random((6, 7, 7))
    baseline = random_pair_baseline(maps, n_pairs=40, seed=1)  # SSIM of unrelated noise maps: near 0
    base_high = mean_ci(baseline.similarity.ssim, np.arange(40), 1000, 0)[1]

    unchanged = randomisation_verdict(_similarity([0.95, 0.9, 0.97, 0.92]), baseline)
    assert unchanged.passed is False
    assert unchanged.randomised_ci_high == pytest.approx(mean_ci(np.array([0.95, 0.9, 0.97, 0.92]),
                                                                 np.arange(4), 1000, 0)[1])
    assert unchanged.baseline_ci_high == pytest.approx(base_high)
    assert "above" in unchanged.reason

    low = base_high - 0.2
    fallen = randomisation_verdict(_similarity([low - 0.01, low, low + 0.01, low]), baseline)
    assert fallen.passed is True and fallen.randomised_ci_high <= fallen.baseline_ci_high

    # Patients: the interval on the randomised side resamples patients (groups), not images.
    grouped = randomisation_verdict(_similarity([0.0, 0.0, 0.5, 0.5]), baseline, groups=["a", "a", "b", "b"])
    assert grouped.randomised_ci_high == pytest.approx(mean_ci(np.array([0.0, 0.0, 0.5, 0.5]),
                                                               np.array(["a", "a", "b", "b"]), 1000, 0)[1])
    assert randomisation_verdict(_similarity([np.nan, np.nan]), baseline).passed is None


def test_a_model_independent_map_fails():
    # A "method" whose map is the image itself ignores the model: randomising the model leaves it unchanged
    # (similarity 1), far above the similarity of different images' maps.
    rng = np.random.default_rng(2)
    images = rng.random((8, 9, 9))
    verdict = randomisation_verdict(map_similarity(images, images.copy()), random_pair_baseline(images, 50, 0))
    assert verdict.passed is False and verdict.randomised_mean == pytest.approx(1.0)


# ----- the cascade ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = build_classifier("resnet10t", hidden=8, weights="none").eval()
    # Move every parameter and buffer off its initial value, so that any re-initialisation shows.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) + 0.5)
    return model


def _state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_units_are_top_down_and_partition_the_parameters(resnet):
    units = randomisation_units(resnet)
    assert [u.name for u in units] == ["head.fc2", "head.fc1", "backbone.layer4", "backbone.layer3",
                                       "backbone.layer2", "backbone.layer1", "backbone.conv1+bn1"]
    names = [p for u in units for p in u.parameters]
    assert sorted(names) == sorted(n for n, _ in resnet.named_parameters())  # each exactly once
    blocks = [u.name for u in randomisation_units(resnet, "block")]
    assert blocks[2:4] == ["backbone.layer4.0", "backbone.layer3.0"]  # resnet10t: one block per stage


@pytest.mark.parametrize("backbone, stages", [
    ("efficientnet_lite0", ["blocks.6", "blocks.5", "blocks.4", "blocks.3", "blocks.2", "blocks.1", "blocks.0",
                            "conv_stem+bn1"]),
    ("mobilenetv3_small_050", ["blocks.5", "blocks.4", "blocks.3", "blocks.2", "blocks.1", "blocks.0",
                               "conv_stem+bn1"]),
    # timm groups Inception with a function, not patterns: units are named by their modules' common prefix.
    ("inception_v3", ["Mixed_7c", "Mixed_7b", "Mixed_7a", "Mixed_6e", "Mixed_6d", "Mixed_6c", "Mixed_6b",
                      "Mixed_6a", "Mixed_5d", "Mixed_5c", "Mixed_5b", "Conv2d_3b_1x1+Conv2d_4a_3x3",
                      "Conv2d_1a_3x3+Conv2d_2a_3x3+Conv2d_2b_3x3"]),
])
def test_units_of_other_backbones(backbone, stages):
    with torch.device("meta"):  # only the parameter names are needed
        model = build_classifier(backbone, hidden=8, weights="none")
    units = randomisation_units(model)
    assert [u.name for u in units] == ["head.fc2", "head.fc1", *(f"backbone.{s}" for s in stages)]
    names = [p for u in units for p in u.parameters]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_cascade_resets_one_unit_more_at_each_step(resnet):
    before = _state(resnet)
    units = randomisation_units(resnet)
    previous = before
    reset_so_far: set[str] = set()
    steps = list(cascading_randomisation(resnet, seed=0))
    assert [s.unit for s in steps] == units
    for step in steps:
        state = _state(step.model)
        changed = {n for n in state if not torch.equal(state[n], previous[n])}
        owners = {p.rsplit(".", 1)[0] for p in step.unit.parameters}
        # This step changes the unit's parameters and its modules' buffers (BatchNorm statistics), nothing else.
        assert set(step.unit.parameters) <= changed
        assert all(n.rsplit(".", 1)[0] in owners for n in changed)
        reset_so_far |= changed
        differs = {n for n in state if not torch.equal(state[n], before[n])}
        assert differs == reset_so_far  # cumulative: earlier units stay randomised
        assert step.model.training is False and step.redrawn == ()
        previous = state
    after = _state(resnet)
    assert all(torch.equal(after[n], before[n]) for n in before)  # the input model is unchanged
    # BatchNorm returns to its initial statistics when its unit is reset.
    final = steps[-1].model.backbone.body.layer4[0].bn1
    assert torch.equal(final.running_mean, torch.zeros_like(final.running_mean))
    # Each step is its own copy: changing one does not change the next.
    with torch.no_grad():
        steps[0].model.head.fc2.weight.zero_()
    assert not torch.equal(steps[1].model.head.fc2.weight, steps[0].model.head.fc2.weight)


def test_cascade_is_deterministic_and_leaves_the_global_rng_alone(resnet):
    rng_state = torch.random.get_rng_state()
    first = [_state(s.model) for s in cascading_randomisation(resnet, seed=5)]
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    again = [_state(s.model) for s in cascading_randomisation((resnet.backbone, resnet.head), seed=5)]
    other = [_state(s.model) for s in cascading_randomisation(resnet, seed=6)]
    for a, b in zip(first, again):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(first[0]["head.fc2.weight"], other[0]["head.fc2.weight"])


class _Gain(nn.Module):
    """A layer with a parameter and no reset_parameters(), as ConvNeXt's layer scale."""

    def __init__(self, values: torch.Tensor):
        super().__init__()
        self.gain = nn.Parameter(values)

    def forward(self, x):
        return x * self.gain


class _GainHead(nn.Module):
    def __init__(self, channels: int, gain: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(channels, 2)
        self.scale = _Gain(gain)

    def forward(self, features):
        return self.scale(self.fc(features.mean(dim=(2, 3))))


def test_parameters_without_reset_are_redrawn_at_their_own_scale(resnet):
    gain = torch.linspace(0.5, 2.0, 2)
    model = Classifier(resnet.backbone, _GainHead(resnet.backbone.num_features, gain))
    assert [u.name for u in randomisation_units(model)][:2] == ["head.scale", "head.fc"]
    first = next(cascading_randomisation(model, seed=0))
    again = next(cascading_randomisation(model, seed=0))
    assert first.redrawn == ("head.scale.gain",)
    assert not torch.equal(first.model.head.scale.gain, gain)
    assert torch.equal(first.model.head.scale.gain, again.model.head.scale.gain)
    assert torch.equal(model.head.scale.gain, gain)
    scalar = Classifier(resnet.backbone, _GainHead(resnet.backbone.num_features, torch.tensor(1.5)))
    with pytest.raises(ValueError, match="scalar parameter"):
        next(cascading_randomisation(scalar))


def test_gradcam_maps_change_under_randomisation():
    torch.manual_seed(1)
    model = build_classifier("resnet10t", hidden=16, weights="none").eval()
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))

    def maps_of(m):  # stride 8: 8x8 maps at 64 px, upsampled to the frame as the audit does
        return upsample_cams(explain_batch("gradcam", m.backbone, m.head, images, None, 1, layer="stride8"), (64, 64))

    original = maps_of(model)
    steps = list(cascading_randomisation(model, seed=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)  # a random layer can zero a map: counted as NaN
        same = map_similarity(original, maps_of(model))
        head = map_similarity(original, maps_of(steps[0].model))
        full = map_similarity(original, maps_of(steps[-1].model))
    np.testing.assert_allclose(same.spearman, 1.0)  # control: the unrandomised model reproduces its maps
    assert np.isfinite(full.spearman).sum() >= 3
    assert np.nanmean(head.spearman) < 0.9
    assert np.nanmean(full.spearman) < 0.5 and np.nanmean(full.ssim) < 0.5


# ----- data randomisation -----------------------------------------------------------------------------------------


def test_shuffled_labels_keep_counts_and_are_deterministic():
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 0, 0, 1])
    shuffled = shuffled_labels(labels, seed=4)
    np.testing.assert_array_equal(shuffled, labels[np.random.default_rng(4).permutation(10)])
    np.testing.assert_array_equal(shuffled_labels(labels, seed=4), shuffled)
    folds = np.array([0, 1] * 5)
    within = shuffled_labels(labels, seed=4, strata=folds)
    for fold in (0, 1):
        assert sorted(within[folds == fold]) == sorted(labels[folds == fold])
    # Strata in sorted order, each permuted by the one generator in turn.
    draw = np.random.default_rng(4)
    expected = labels.copy()
    for fold in (0, 1):
        where = np.flatnonzero(folds == fold)
        expected[where] = labels[where[draw.permutation(len(where))]]
    np.testing.assert_array_equal(within, expected)


# ----- against Quantus --------------------------------------------------------------------------------------------


def test_against_quantus(resnet):
    """Cross-check with Quantus (Hedström et al., JMLR 2023; in the ``test`` extra, so CI runs it).

    Definitional differences: Quantus' ``ssim`` takes ``data_range`` from the two maps' joint range and does not
    scale them; ours scales each map to [0, 1] and states data_range = 1. On maps already scaled to [0, 1] (min 0,
    max 1 each) the two coincide, which is what is compared. Quantus' MPRT randomises one module at a time (every
    module with ``reset_parameters``, in reverse registration order, reseeding ``seed + 1`` before each, on one
    copy that it mutates); ours resets a timm layer group at a time and yields a copy per step. So the weights
    differ, but the order must agree: along Quantus' top-down sequence of modules, our unit index never decreases,
    and both cover the same modules.
    """
    from quantus.functions.similarity_func import correlation_spearman, ssim
    from quantus.helpers.model.pytorch_model import PyTorchModel

    rng = np.random.default_rng(0)
    a, b = scale_to_unit_range(rng.random((3, 9, 9))), scale_to_unit_range(rng.random((3, 9, 9)))
    ours = map_similarity(a, b)
    for i in range(3):
        assert ssim(a[i], b[i], win_size=7) == pytest.approx(ours.ssim[i], abs=1e-12)
        assert correlation_spearman(a[i].ravel(), b[i].ravel()) == pytest.approx(ours.spearman[i], abs=1e-12)

    unit_of = {p.rsplit(".", 1)[0]: k for k, u in enumerate(randomisation_units(resnet)) for p in u.parameters}
    wrapped = PyTorchModel(resnet, channel_first=True, softmax=False, device="cpu")
    names = [name for name, _ in wrapped.get_random_layer_generator(order="top_down", seed=0)]
    modules = dict(resnet.named_modules())
    # Modules Quantus resets that we do not own no parameter directly (none in this model).
    assert all(not list(modules[n].parameters(recurse=False)) for n in names if n not in unit_of)
    assert set(unit_of) <= set(names)
    sequence = [unit_of[n] for n in names if n in unit_of]
    assert sequence == sorted(sequence)
    assert set(sequence) == set(range(len(randomisation_units(resnet))))
