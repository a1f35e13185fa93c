"""The CAM family on one base: every method against pytorch-grad-cam (raw low-resolution maps, two random-init
timm backbones, the backbone's output and a finer level), against maps worked out by hand, Score-CAM's chunking,
the one calling convention (explain_batch, needs_input) and the eval-mode checks.

Definitional differences from pytorch-grad-cam, reconciled here (each method's docstring says the same):

- it min-max scales and resizes every map; we compare its raw map (``get_cam_image`` with
  ``eigen_smooth=False``, then its ReLU), before that scaling;
- Grad-CAM++: it adds eps = 1e-6 to alpha's denominator g^2 (2 + sum A g), which outweighs g^2 for small
  gradients; ours has none. It is fed A / c and G * c (c = 1e4): its alpha, weights and map are unchanged by
  that substitution except for the eps, which becomes negligible. XGrad-CAM: it adds 1e-7 to sum A, which
  matters for MobileNet channels summing to ~1e-5; it is fed A * c and G / c for the same reason;
- all methods share one recorded pass of pytorch-grad-cam (its hooks, forward and backward() through the whole
  model) and run their own formula (``get_cam_image``, which for Score-CAM runs its masked forward passes);
- Score-CAM: it upsamples with ``align_corners=True``, ours (and the authors' code) with ``align_corners=False``;
  its upsampler is patched to ours for the comparison;
- EigenCAM: the sign of an SVD's singular vector is arbitrary; ours is the one that makes sum_k v_1[k] >= 0, and
  its projection gets the same orientation before the ReLU.
"""
from __future__ import annotations

import math
import re
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torch import nn

from auditbench.explain.cam_base import FeatureCam, InputCam, explain_batch
from auditbench.explain.gradcam import CAM_METHODS, gradcam_from_features, layer_gradcam
from auditbench.models.classifier import Head, build_classifier

FEATURE_METHODS = ("gradcam", "hirescam", "gradcampp", "xgradcam", "layercam", "eigencam")
INPUT_METHODS = ("scorecam", "inputxgradient")
GRADIENT_METHODS = ("gradcam", "hirescam", "gradcampp", "xgradcam", "layercam")


# ----- by hand ----------------------------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """logits = W flatten(A): dS/dA for the class-1 logit is W[1] reshaped, different at every position."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.reshape(len(weight), -1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.flatten(1) @ self.weight.T


# A_0 = [[1, 1], [2, 0]], A_1 = [[0, 2], [1, 1]]: both channels sum to 4.
HAND_A = torch.tensor([[[[1.0, 1.0], [2.0, 0.0]], [[0.0, 2.0], [1.0, 1.0]]]])
# Class 1: g_0 = [[1, -1], [0.5, 0]], g_1 = [[-0.5, 0.25], [0, 1]]; class 0 has zero weights, so its logit is 0
# and the log-odds of class 1 equals its logit.
HAND_G = torch.tensor([[[1.0, -1.0], [0.5, 0.0]], [[-0.5, 0.25], [0.0, 1.0]]])
HAND_MAPS = {
    # alpha = mean g = ((1 - 1 + 0.5 + 0) / 4, (-0.5 + 0.25 + 0 + 1) / 4) = (0.125, 0.1875);
    # 0.125 A_0 + 0.1875 A_1 = [[0.125, 0.125 + 0.375], [0.25 + 0.1875, 0.1875]].
    "gradcam": [[0.125, 0.5], [0.4375, 0.1875]],
    # g_0 A_0 + g_1 A_1 = [[1 + 0, -1 + 0.5], [1 + 0, 0 + 1]] = [[1, -0.5], [1, 1]] -> ReLU.
    "hirescam": [[1.0, 0.0], [1.0, 1.0]],
    # alpha = 1 / (2 + 4 g) where g > 0: channel 0: g = 1 -> 1/6, g = 0.5 -> 1/4, w_0 = 1/6 + 0.5/4 = 7/24;
    # channel 1: g = 0.25 -> 1/3, g = 1 -> 1/6, w_1 = 0.25/3 + 1/6 = 1/4.
    # 7/24 A_0 + 1/4 A_1 = [[7/24, 7/24 + 12/24], [14/24 + 6/24, 6/24]].
    "gradcampp": [[7 / 24, 19 / 24], [20 / 24, 6 / 24]],
    # w_k = sum g_k A_k / sum A_k: w_0 = (1 - 1 + 1 + 0) / 4 = 0.25, w_1 = (0 + 0.5 + 0 + 1) / 4 = 0.375;
    # 0.25 A_0 + 0.375 A_1 = [[0.25, 0.25 + 0.75], [0.5 + 0.375, 0.375]].
    "xgradcam": [[0.25, 1.0], [0.875, 0.375]],
    # ReLU(g_0) A_0 + ReLU(g_1) A_1 = [[1 + 0, 0 + 0.5], [1 + 0, 0 + 1]].
    "layercam": [[1.0, 0.5], [1.0, 1.0]],
    # Identity backbone, so x = A and the attribution is x * W[1] summed over channels: HiResCAM's sum.
    "inputxgradient": [[1.0, 0.0], [1.0, 1.0]],
    # Masks (min-max of each channel, no resize at 2x2): H_0 = [[0.5, 0.5], [1, 0]], H_1 = [[0, 1], [0.5, 0.5]].
    # s_0 = W[1] . (x * H_0) = (0.5 - 0.5 + 1 + 0) + (0 + 0.25 + 0 + 0) = 1.25,
    # s_1 = W[1] . (x * H_1) = (0 - 1 + 0.5 + 0) + (0 + 0.5 + 0 + 0.5) = 0.5;
    # w = softmax(1.25, 0.5) = (sigmoid(0.75), sigmoid(-0.75)) = (0.6791787, 0.3208213);
    # w_0 A_0 + w_1 A_1 = [[w_0, w_0 + 2 w_1], [2 w_0 + w_1, w_1]].
    "scorecam": [[0.6791787, 1.3208213], [1.6791787, 0.3208213]],
}


@pytest.fixture
def hand_head() -> LinearHead:
    return LinearHead(torch.stack([torch.zeros(2, 2, 2), HAND_G])).eval()


@pytest.mark.parametrize("name", sorted(HAND_MAPS))
def test_maps_by_hand(name, hand_head):
    expected = torch.tensor([HAND_MAPS[name]])
    for score in ("logit", "log_odds"):
        maps = explain_batch(name, nn.Identity().eval(), hand_head, HAND_A, HAND_A, 1, score=score)
        torch.testing.assert_close(maps, expected)
    # The predicted class is 1: logit_1 = sum g A = 2.5 > logit_0 = 0.
    predicted = explain_batch(name, nn.Identity().eval(), hand_head, HAND_A, None, "predicted")
    torch.testing.assert_close(predicted, expected)


def test_eigencam_by_hand(hand_head):
    # Positions (A_0, A_1): (5, 5), (1, 1), (4, 2), (2, 4); centred: (2, 2), (-2, -2), (1, -1), (-1, 1).
    # M^T M = [[10, 6], [6, 10]]: v_1 = (1, 1) / sqrt(2) (eigenvalue 16; the other is 4), oriented so sum v_1 >= 0.
    # Projections M v_1 = (2 sqrt(2), -2 sqrt(2), 0, 0) -> ReLU. The opposite sign would light (0, 1) instead.
    features = torch.tensor([[[[5.0, 1.0], [4.0, 2.0]], [[5.0, 1.0], [2.0, 4.0]]]])
    expected = torch.tensor([[[2 * math.sqrt(2), 0.0], [0.0, 0.0]]])
    eigencam = CAM_METHODS.get("eigencam")
    torch.testing.assert_close(eigencam(hand_head, features, 1), expected)
    # Gradient-free and class-agnostic.
    torch.testing.assert_close(eigencam(hand_head, features, 0, score="logit"), expected)


def test_log_odds_is_the_logit_of_the_difference(hand_head):
    # For a two-logit head the log-odds of class 1 is logit_1 - logit_0: the logit of a head with W[1] - W[0].
    weight = torch.stack([torch.tensor([[[0.5, 0.0], [1.0, -2.0]], [[0.0, 1.0], [-1.0, 0.5]]]), HAND_G])
    head = LinearHead(weight).eval()
    difference = LinearHead(torch.stack([weight[0] - weight[1], weight[1] - weight[0]])).eval()
    for name in GRADIENT_METHODS + INPUT_METHODS:
        for target in (0, 1):
            maps = explain_batch(name, nn.Identity().eval(), head, HAND_A, HAND_A, target, score="log_odds")
            expected = explain_batch(name, nn.Identity().eval(), difference, HAND_A, HAND_A, target, score="logit")
            torch.testing.assert_close(maps, expected, msg=name)
        assert not torch.equal(
            explain_batch(name, nn.Identity().eval(), head, HAND_A, HAND_A, 1, score="logit"),
            explain_batch(name, nn.Identity().eval(), head, HAND_A, HAND_A, 1, score="log_odds"),
        ), name


# ----- the calling convention -------------------------------------------------------------------------------------


def test_every_method_is_registered_with_its_kind():
    assert set(CAM_METHODS.names()) == set(FEATURE_METHODS + INPUT_METHODS)
    for name in FEATURE_METHODS:
        assert isinstance(CAM_METHODS.get(name), FeatureCam) and CAM_METHODS.get(name).needs_input is False
    for name in INPUT_METHODS:
        assert isinstance(CAM_METHODS.get(name), InputCam) and CAM_METHODS.get(name).needs_input is True
    assert CAM_METHODS.get("gradcam") is gradcam_from_features
    for name, method in CAM_METHODS.items():
        # Each docstring cites its paper (authors and year) and states its formula.
        assert " 20" in method.__doc__ and "map" in method.__doc__, name


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("resnet10t", hidden=16, weights="none").eval()


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    """Few channels at its finer levels (24 at stride 16, 16 at stride 8): cheap Score-CAM passes."""
    torch.manual_seed(1)
    return build_classifier("mobilenetv3_small_050", hidden=16, weights="none").eval()


def test_explain_batch_paths_agree(mobilenet):
    x = _photos(64)[:2]
    backbone, head = mobilenet.backbone, mobilenet.head
    with torch.no_grad():
        features = backbone(x)
    for name in FEATURE_METHODS + INPUT_METHODS:
        method = CAM_METHODS.get(name)
        if name != "scorecam":  # 2 x 288 masked passes at "last": its cached path is checked by hand above
            cached = explain_batch(name, backbone, head, x, features, 1)
            torch.testing.assert_close(explain_batch(method, backbone, head, x, None, 1), cached, msg=name)
        if not method.needs_input:  # the cheap path: head and cached features only
            assert torch.equal(explain_batch(name, None, head, None, features, 1), cached)
            assert torch.equal(method(head, features, 1), cached)
        for layer in ("stride16", "stride8"):
            maps = explain_batch(name, backbone, head, x, features, 1, layer=layer)
            side = 64 if name == "inputxgradient" else 64 // backbone.layer_info(layer)["reduction"]
            assert maps.shape == (2, side, side) and (maps >= 0).all(), (name, layer)
            # MobileNetV3's blocks end without an activation (linear bottleneck): where A is mostly negative the
            # positive-weight methods (Score-CAM's softmax, Grad-CAM++) can give all-zero maps, as at blocks.3
            # (stride 16) of this random-init model; at blocks.1 (stride 8) every method shows something.
            assert layer == "stride16" or maps.amax() > 0, (name, layer)
    with pytest.raises(ValueError, match="needs the backbone"):
        explain_batch("hirescam", None, head, None, features, 1, layer="stride8")
    assert all(parameter.grad is None for parameter in mobilenet.parameters())
    assert torch.is_grad_enabled()


def test_scorecam_chunks_give_the_same_maps():
    # Any backbone module works at "last"; a small one keeps 2 x 32 masked passes one at a time cheap.
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=4, padding=1), nn.ReLU()).eval()
    head = Head(32, 8, dropout=0.0).eval()
    x = _photos(32)[:2]
    scorecam = CAM_METHODS.get("scorecam")
    maps = {size: scorecam(backbone, head, x, "predicted", batch_size=size)
            for size in (1, 7, 1000)}  # one at a time, chunks that do not divide 64, all at once
    assert maps[1].shape == (2, 4, 4) and maps[1].amax() > 0
    torch.testing.assert_close(maps[7], maps[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(maps[1000], maps[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="batch_size"):
        scorecam(backbone, head, x, 1, batch_size=0)


@pytest.mark.parametrize("name", FEATURE_METHODS + INPUT_METHODS)
def test_eval_mode_is_required(name, resnet):
    x = torch.randn(1, 3, 32, 32)
    method = CAM_METHODS.get(name)
    for part in (resnet.backbone, resnet.head):
        part.train()
        try:
            with pytest.raises(ValueError, match="eval mode"):
                explain_batch(name, resnet.backbone, resnet.head, x, None, 1, layer="stride8")
            if not method.needs_input and part is resnet.head:
                with pytest.raises(ValueError, match=re.escape(f"{method.title} needs the head in eval mode")):
                    method(resnet.head, torch.ones(1, 512, 1, 1), 1)
        finally:
            part.eval()


# ----- against pytorch-grad-cam -----------------------------------------------------------------------------------


def _photos(size: int) -> torch.Tensor:
    """Three natural images (B, 3, size, size), standardised: structured maps, unlike noise."""
    resized = []
    for image in (data.chelsea(), data.coffee(), data.astronaut()):
        image = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        resized.append(F.interpolate(image, size=(size, size), mode="bilinear", antialias=True))
    return (torch.cat(resized) - 0.5) / 0.25


REFERENCE_CLASSES = {
    "gradcam": "GradCAM", "hirescam": "HiResCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM",
    "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM",
}


def _captured(model, layer, x, targets):
    """The level's activations and gradients as pytorch-grad-cam records them: hooks on the level's module,
    forward and ``backward()`` through the whole model (once; every method's formula then reads them)."""
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    cam = pytorch_grad_cam.GradCAM(model=model, target_layers=[_module(model, layer)])
    try:
        cam(input_tensor=x, targets=targets)
        stored = cam.activations_and_grads
        return stored.activations[0].numpy(), stored.gradients[0].numpy()
    finally:
        cam.activations_and_grads.release()


def _reference(name, model, layer, x, targets, activations, gradients):
    """pytorch-grad-cam's raw map of method ``name`` (before its ReLU, min-max scaling and resize)."""
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    module = _module(model, layer)
    cam = getattr(pytorch_grad_cam, REFERENCE_CLASSES[name])(model=model, target_layers=[module])
    cam.batch_size = 256  # Score-CAM's masked images per forward pass
    # Its epsilons out of the way: A / c and G * c (Grad-CAM++), A * c and G / c (XGrad-CAM) leave alpha, w and
    # the map unchanged but shrink eps relative to the denominators g^2 (2 + sum A g) and sum A.
    scale = {"gradcampp": 1e4, "xgradcam": 1e-4}.get(name, 1.0)
    try:
        raw = cam.get_cam_image(x, module, targets, activations / scale, gradients * scale, eigen_smooth=False)
    finally:
        cam.activations_and_grads.release()
    if name == "eigencam":  # orient the projection as ours: non-negative covariance with the channel sum
        centred = activations - activations.mean(axis=(2, 3), keepdims=True)
        flip = (raw * centred.sum(axis=1)).sum(axis=(1, 2)) < 0
        raw = np.where(flip[:, None, None], -raw, raw)
    return torch.from_numpy(np.maximum(raw, 0))


def _module(model, layer):
    return model.backbone if layer == "last" else model.backbone.layer_module(layer)


def _align_corners_false(size):
    return partial(F.interpolate, size=size, mode="bilinear", align_corners=False)


CASES = [("resnet10t", "last"), ("resnet10t", "stride8"), ("mobilenetv3_small_050", "last"),
         ("mobilenetv3_small_050", "stride16")]


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    built = {}
    for backbone in ("resnet10t", "mobilenetv3_small_050"):
        torch.manual_seed(0)
        built[backbone] = build_classifier(backbone, hidden=16, weights="none").eval()
    return built


@pytest.mark.parametrize("backbone, layer", CASES)
def test_matches_pytorch_grad_cam(backbone, layer, models, monkeypatch):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = models[backbone]
    x = _photos(64)
    target = torch.tensor([0, 1, 1])  # its ClassifierOutputTarget(t) is our score="logit"
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    # Score-CAM at the finer levels only: C forward passes per image, 128 and 24 channels there, 512 and 288 at "last".
    methods = FEATURE_METHODS + (("scorecam",) if layer != "last" else ())
    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d", _align_corners_false)  # Score-CAM's upsampling
    activations, gradients = _captured(model, layer, x, targets)
    ours = {}
    for name in methods:
        ours[name] = explain_batch(name, model.backbone, model.head, x, None, target, score="logit", layer=layer,
                                   batch_size=256)
        reference = _reference(name, model, layer, x, targets, activations, gradients)
        scale = float(reference.max())
        assert scale > 0, name  # a comparison of all-zero maps would prove nothing
        torch.testing.assert_close(ours[name], reference, rtol=1e-4, atol=1e-5 * scale, msg=name)
    if layer != "last":
        # Where the gradient varies over the map the methods differ: a formula swapped for another fails.
        for first in methods:
            for second in methods:
                if first < second:
                    gap = (ours[first] / ours[first].amax() - ours[second] / ours[second].amax()).abs().amax()
                    assert gap > 0.05, (first, second)


def test_inputxgradient_matches_autograd(resnet):
    x = _photos(32)
    for score in ("log_odds", "logit"):
        ours = explain_batch("inputxgradient", resnet.backbone, resnet.head, x, None, "predicted", score=score,
                             batch_size=2)
        images = x.clone().requires_grad_()
        logits = resnet(images)
        chosen = logits[:, 1] - logits[:, 0] if score == "log_odds" else logits[:, 1]
        chosen = torch.where(logits.argmax(dim=1) == 1, chosen, -chosen if score == "log_odds" else logits[:, 0])
        (gradients,) = torch.autograd.grad(chosen.sum(), images)
        expected = torch.relu((images * gradients).sum(dim=1)).detach()
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6 * float(expected.max()))
        assert expected.amax() > 0


def test_grad_cam_keeps_its_numbers(resnet):
    # The family's base leaves Grad-CAM bit for bit as it was: the head-only map of the cached features.
    x = _photos(64)
    with torch.no_grad():
        features = resnet.backbone(x)
    maps, _ = layer_gradcam(resnet.backbone, resnet.head, x, 1, layer="last")
    assert torch.equal(maps, gradcam_from_features(resnet.head, features, 1))
    assert torch.equal(maps, explain_batch("gradcam", resnet.backbone, resnet.head, x, None, 1))
