"""Grad-CAM: a case worked out by hand, raw scale, and agreement with captum's LayerGradCam."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam

from skimage import data

from auditbench.explain.gradcam import CAM_METHODS, GradCAM, gradcam_from_features, upsample_cams
from auditbench.models.classifier import Head, build_classifier


@pytest.fixture
def hand_head() -> Head:
    """Identity first layer, no biases: d logit_c / d A_k[i, j] = W2[c, k] * [hidden_k > 0] / (h * w)."""
    head = Head(in_features=2, hidden=2, dropout=0.0, num_classes=2).eval()
    with torch.no_grad():
        head.fc1.weight.copy_(torch.eye(2))
        head.fc1.bias.zero_()
        head.fc2.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 4.0]]))
        head.fc2.bias.zero_()
    return head


@pytest.fixture
def hand_features() -> torch.Tensor:
    """A_0 = [[4, 0], [0, 0]], A_1 = [[0, 0], [2, 2]]: both channels pool to 1."""
    return torch.tensor([[[[4.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [2.0, 2.0]]]])


def test_gradcam_by_hand(hand_head, hand_features):
    # Class 0: alpha = (1, -1) / 4 -> ReLU([[1, 0], [-0.5, -0.5]]).
    # Class 1: alpha = (0.5, 4) / 4 -> 0.125 A_0 + A_1 = [[0.5, 0], [2, 2]].
    features = hand_features.expand(2, -1, -1, -1)
    maps = gradcam_from_features(hand_head, features, torch.tensor([0, 1]))
    torch.testing.assert_close(maps, torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.0], [2.0, 2.0]]]))
    # A hidden unit switched off by its ReLU passes no gradient: alpha = (0.5, 0) / 4.
    with torch.no_grad():
        hand_head.fc1.bias.copy_(torch.tensor([0.0, -2.0]))
    maps = gradcam_from_features(hand_head, hand_features, 1)
    torch.testing.assert_close(maps, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))


def test_maps_keep_their_scale(hand_head, hand_features):
    # The head is positively homogeneous here, so scaling A scales the map: nothing rescales it to [0, 1].
    maps = gradcam_from_features(hand_head, hand_features, 1)
    torch.testing.assert_close(gradcam_from_features(hand_head, 3 * hand_features, 1), 3 * maps)
    assert maps.max() == 2.0


def test_targets_int_tensor_and_predicted(hand_head, hand_features):
    features = torch.cat([hand_features, hand_features.flip(1)])
    per_image = gradcam_from_features(hand_head, features, torch.tensor([1, 0]))
    torch.testing.assert_close(per_image[0], gradcam_from_features(hand_head, features, 1)[0])
    torch.testing.assert_close(per_image[1], gradcam_from_features(hand_head, features, 0)[1])
    predicted = hand_head(features).argmax(dim=1)
    torch.testing.assert_close(
        gradcam_from_features(hand_head, features, "predicted"), gradcam_from_features(hand_head, features, predicted)
    )
    for bad in (2, torch.tensor([0, 1, 1]), "positive"):
        with pytest.raises(ValueError, match="target"):
            gradcam_from_features(hand_head, features, bad)


def test_gradcam_is_registered():
    assert CAM_METHODS.get("gradcam") is gradcam_from_features


def test_upsample_is_bilinear_without_corner_alignment():
    cams = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    # align_corners=False samples the 2-pixel row at x = -0.25, 0.25, 0.75, 1.25 (clamped at the edges).
    expected = torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4)
    torch.testing.assert_close(upsample_cams(cams, (4, 4))[0], expected)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_classifier("resnet10t", hidden=16, weights="none").eval()


def test_gradcam_result_and_no_backbone_gradients(resnet):
    x = torch.randn(2, 3, 64, 64)
    result = GradCAM(resnet)(x, target="predicted")
    assert result.maps.shape == (2, 64, 64) and (result.maps >= 0).all()
    with torch.no_grad():
        logits = resnet(x)
    torch.testing.assert_close(result.logits, logits)
    torch.testing.assert_close(result.probabilities, logits.softmax(dim=1))
    assert torch.equal(result.targets, logits.argmax(dim=1))
    assert all(parameter.grad is None for parameter in resnet.parameters())


def test_gradcam_refuses_training_mode(resnet):
    resnet.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            GradCAM(resnet)(torch.randn(1, 3, 64, 64), target=1)
    finally:
        resnet.eval()


def _photos(size: int) -> torch.Tensor:
    """Three natural images (B, 3, size, size), standardised: structured maps, unlike noise."""
    resized = []
    for image in (data.chelsea(), data.coffee(), data.astronaut()):  # of different sizes
        image = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        resized.append(F.interpolate(image, size=(size, size), mode="bilinear", antialias=True))
    return (torch.cat(resized) - 0.5) / 0.25


@pytest.mark.parametrize(
    "backbone, weights, size",
    [
        ("resnet18", "none", 96),
        ("efficientnet_lite0", "imagenet", 96),
        ("vgg11", "none", 64),  # VGG's stride-16 map before the last max pool
    ],
)
def test_matches_captum_layer_gradcam(backbone, weights, size):
    torch.manual_seed(0)
    model = build_classifier(backbone, hidden=16, weights=weights).eval()
    x = _photos(size)
    # Captum backpropagates through the whole model to the backbone's output, the same layer.
    layer_gradcam = LayerGradCam(model, model.backbone)
    for target in (0, 1):
        ours = GradCAM(model)(x, target=target).maps
        captum = layer_gradcam.attribute(x, target=target, relu_attributions=True)
        captum = LayerAttribution.interpolate(captum, (size, size), interpolate_mode="bilinear")[:, 0].detach()
        torch.testing.assert_close(ours, captum, rtol=1e-4, atol=1e-6 * float(ours.max()))
        # A map can be all zero (every weighted sum negative); compare the others after per-image scaling.
        shown = ours.amax(dim=(1, 2)) > 0
        assert shown.any()
        ours, captum = ours[shown], captum[shown]
        difference = ours / ours.amax(dim=(1, 2), keepdim=True) - captum / captum.amax(dim=(1, 2), keepdim=True)
        assert difference.abs().max() < 1e-4
