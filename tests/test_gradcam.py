"""Grad-CAM: cases worked out by hand (logit and log-odds scores), raw scale, agreement with captum's
LayerGradCam and pytorch-grad-cam at the last and at finer feature levels, and a backward through the top
blocks only."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam
from pytorch_grad_cam import GradCAM as PytorchGradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from skimage import data

from auditbench.explain.gradcam import (
    CAM_METHODS,
    GradCAM,
    gradcam_from_features,
    layer_gradcam,
    upsample_cams,
)
from auditbench.models.backbones import build_backbone
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
    # score="logit": d logit_c / d A_k = W2[c, k] / 4.
    # Class 0: alpha = (1, -1) / 4 -> ReLU([[1, 0], [-0.5, -0.5]]).
    # Class 1: alpha = (0.5, 4) / 4 -> 0.125 A_0 + A_1 = [[0.5, 0], [2, 2]].
    features = hand_features.expand(2, -1, -1, -1)
    maps = gradcam_from_features(hand_head, features, torch.tensor([0, 1]), score="logit")
    torch.testing.assert_close(maps, torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.0], [2.0, 2.0]]]))
    # A hidden unit switched off by its ReLU passes no gradient: alpha = (0.5, 0) / 4.
    with torch.no_grad():
        hand_head.fc1.bias.copy_(torch.tensor([0.0, -2.0]))
    maps = gradcam_from_features(hand_head, hand_features, 1, score="logit")
    torch.testing.assert_close(maps, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))


def test_log_odds_by_hand(hand_head, hand_features):
    # score="log_odds" (the default): d (logit_t - logit_other) / d A_k = (W2[t, k] - W2[other, k]) / 4.
    # Class 1: alpha = ((0.5, 4) - (1, -1)) / 4 = (-0.125, 1.25) -> ReLU([[-0.5, 0], [2.5, 2.5]]).
    # Class 0: alpha = (0.125, -1.25) -> ReLU([[0.5, 0], [-2.5, -2.5]]).
    # The logit maps differ: [[0.5, 0], [2, 2]] for class 1, [[1, 0], [0, 0]] for class 0.
    features = hand_features.expand(2, -1, -1, -1)
    expected = torch.tensor([[[0.5, 0.0], [0.0, 0.0]], [[0.0, 0.0], [2.5, 2.5]]])
    torch.testing.assert_close(gradcam_from_features(hand_head, features, torch.tensor([0, 1])), expected)
    torch.testing.assert_close(
        gradcam_from_features(hand_head, features, torch.tensor([0, 1]), score="log_odds"), expected
    )
    # Adding the same amount to both logits changes no probability and no log-odds map.
    with torch.no_grad():
        hand_head.fc2.weight.add_(torch.tensor([[0.3, -0.7]]))
    torch.testing.assert_close(gradcam_from_features(hand_head, features, torch.tensor([0, 1])), expected)
    # ... while the class-1 logit map moves: alpha = (0.8, 3.3) / 4 -> [[0.8, 0], [1.65, 1.65]].
    torch.testing.assert_close(
        gradcam_from_features(hand_head, hand_features, 1, score="logit"), torch.tensor([[[0.8, 0.0], [1.65, 1.65]]])
    )


def test_log_odds_of_three_classes_by_hand(hand_features):
    # Pooled A = (1, 1), hidden = (1, 1): logits = row sums of W2 = (0, 4.5, 0). For t = 1 the two other
    # logits are equal, so d logsumexp / d A_k = (W2[0, k] + W2[2, k]) / 2 / 4 = (1.5, -1.5) / 4, and
    # alpha = ((0.5, 4) - (1.5, -1.5)) / 4 = (-0.25, 1.375) -> ReLU([[-1, 0], [2.75, 2.75]]).
    head = Head(in_features=2, hidden=2, dropout=0.0, num_classes=3).eval()
    with torch.no_grad():
        head.fc1.weight.copy_(torch.eye(2))
        head.fc1.bias.zero_()
        head.fc2.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 4.0], [2.0, -2.0]]))
        head.fc2.bias.zero_()
    maps = gradcam_from_features(head, hand_features, 1)
    torch.testing.assert_close(maps, torch.tensor([[[0.0, 0.0], [2.75, 2.75]]]))
    # It is the log-odds log(p_t / (1 - p_t)) of the softmax.
    features = hand_features.clone().requires_grad_()
    p = head(features).softmax(dim=1)[:, 1]
    (gradients,) = torch.autograd.grad(torch.log(p / (1 - p)).sum(), features)
    by_autograd = torch.relu((gradients.mean(dim=(2, 3), keepdim=True) * hand_features).sum(dim=1))
    torch.testing.assert_close(maps, by_autograd)


def test_log_odds_needs_two_logits_and_scores_are_checked(hand_features):
    single = Head(in_features=2, hidden=2, dropout=0.0, num_classes=1).eval()
    with pytest.raises(ValueError, match="two logits"):
        gradcam_from_features(single, hand_features, 0)
    assert gradcam_from_features(single, hand_features, 0, score="logit").shape == (1, 2, 2)
    with pytest.raises(ValueError, match="score"):
        gradcam_from_features(single, hand_features, 0, score="probability")


def test_maps_keep_their_scale(hand_head, hand_features):
    # The head is positively homogeneous here, so scaling A scales the map: nothing rescales it to [0, 1].
    maps = gradcam_from_features(hand_head, hand_features, 1)
    torch.testing.assert_close(gradcam_from_features(hand_head, 3 * hand_features, 1), 3 * maps)
    assert maps.max() == 2.5  # the log-odds map of test_log_odds_by_hand


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


def test_gradcam_is_registered(hand_head, hand_features):
    cam = CAM_METHODS.get("gradcam")
    assert cam is gradcam_from_features
    # The run calls it as cam(head, features, target); score is a keyword with the log-odds default.
    torch.testing.assert_close(cam(hand_head, hand_features, 1), cam(hand_head, hand_features, 1, score="log_odds"))


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
    # Captum backpropagates through the whole model to the backbone's output, the same layer. Its target
    # is a logit; for the log-odds its model outputs (logit_0 - logit_1, logit_1 - logit_0).
    difference = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    for score, forward in (("logit", model), ("log_odds", lambda images: model(images) @ difference)):
        _check_captum(LayerGradCam(forward, model.backbone), GradCAM(model, score=score), x, size)


def _check_captum(layer_gradcam, cam, x, size):
    shown_maps = 0
    for target in (0, 1):
        ours = cam(x, target=target).maps
        captum = layer_gradcam.attribute(x, target=target, relu_attributions=True)
        captum = LayerAttribution.interpolate(captum, (size, size), interpolate_mode="bilinear")[:, 0].detach()
        torch.testing.assert_close(ours, captum, rtol=1e-4, atol=1e-6 * float(ours.max()))
        # A map can be all zero (every weighted sum negative); compare the others after per-image scaling.
        shown = ours.amax(dim=(1, 2)) > 0
        shown_maps += int(shown.sum())
        ours, captum = ours[shown], captum[shown]
        difference = ours / ours.amax(dim=(1, 2), keepdim=True) - captum / captum.amax(dim=(1, 2), keepdim=True)
        if shown.any():
            assert difference.abs().max() < 1e-4
    # With the log-odds the two targets' maps are ReLU(S) and ReLU(-S): one of them shows.
    assert shown_maps > 0


# Finer levels: the maps of a feature_info level before the backbone's output.


def _old_gradcam(head, features, target):
    """auditbench's Grad-CAM before score and layer existed: the target logit at the backbone's output."""
    features = features.detach().requires_grad_()
    with torch.enable_grad():
        logits = head(features)
        (gradients,) = torch.autograd.grad(logits[:, target].sum(), features)
    return torch.relu((gradients.mean(dim=(2, 3), keepdim=True) * features.detach()).sum(dim=1))


def test_last_layer_is_the_maps_of_before(resnet):
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = resnet.backbone(x)
    for target in (0, 1):
        before = _old_gradcam(resnet.head, features, target)
        maps, logits = layer_gradcam(resnet.backbone, resnet.head, x, target, layer="last", score="logit")
        assert torch.equal(maps, before)
        assert torch.equal(GradCAM(resnet, score="logit")(x, target).maps, upsample_cams(before, (64, 64)))
        # "last" is the head-only Grad-CAM of the backbone's output, for either score: the run's cached path.
        for score in ("log_odds", "logit"):
            maps, logits = layer_gradcam(resnet.backbone, resnet.head, x, target, layer="last", score=score)
            assert torch.equal(maps, gradcam_from_features(resnet.head, features, target, score=score))
            assert torch.equal(logits, resnet.head(features))


def test_layer_names_resolve_to_feature_levels():
    expected = {
        "resnet10t": {"last": ("layer4", 32), "stride16": ("layer3", 16), "stride8": ("layer2", 8)},
        "mobilenetv3_small_050": {"last": ("blocks.5", 32), "stride16": ("blocks.3", 16), "stride8": ("blocks.1", 8)},
        "efficientnet_lite0": {"last": ("blocks.6", 32), "stride16": ("blocks.4", 16), "stride8": ("blocks.2", 8)},
        # VGG's map before the last max pool already has stride 16; FeatureListNet renames features.14 features_14.
        "vgg11": {"last": ("features.19", 16), "stride16": ("features.19", 16), "stride8": ("features.14", 8)},
        # FeatureHookNet: the whole model under body.
        "xception": {"last": ("act4", 32), "stride16": ("block12.rep.0", 16), "stride8": ("block3.rep.0", 8)},
    }
    for name, layers in expected.items():
        with torch.device("meta"):  # structure and shapes only
            backbone = build_backbone(name, weights="none")
        for layer, (module, reduction) in layers.items():
            level = backbone.layer_info(layer)
            assert (level["module"], level["reduction"]) == (module, reduction)
            assert set(level) >= {"module", "reduction", "num_chs", "index"}
            maps = []
            handle = backbone.layer_module(layer).register_forward_hook(lambda _m, _i, out: maps.append(out))
            with torch.no_grad(), torch.device("meta"):
                backbone(torch.zeros(1, 3, 64, 64))
            handle.remove()
            assert maps[0].shape == (1, level["num_chs"], 64 // reduction, 64 // reduction)
        assert backbone.layer_info("last") == backbone.cam_level


@pytest.mark.parametrize("backbone", ["vgg16", "xception"])
def test_finer_layers_of_study_backbones_at_224_on_meta(backbone):
    with torch.device("meta"):  # shapes only: no weights, no compute
        model = build_classifier(backbone, hidden=16, weights="none").eval()
        x = torch.zeros(2, 3, 224, 224)
        for layer, side in (("last", 7 if backbone == "xception" else 14), ("stride16", 14), ("stride8", 28)):
            maps, logits = layer_gradcam(model.backbone, model.head, x, 1, layer=layer)
            assert maps.shape == (2, side, side) and logits.shape == (2, 2)


@pytest.mark.parametrize("layer", ["layer3", "stride", "stride0", "Stride8", "stride1", "", 8])
def test_unknown_layer_names_raise(resnet, layer):
    with pytest.raises(ValueError, match="layer"):
        resnet.backbone.layer_info(layer)
    with pytest.raises(ValueError, match="layer"):
        GradCAM(resnet, layer=layer)
    with pytest.raises(ValueError, match="layer"):
        layer_gradcam(resnet.backbone, resnet.head, torch.zeros(1, 3, 64, 64), 1, layer=layer)


def test_finer_layer_result(resnet):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = resnet(x)
    for layer, side in (("stride16", 4), ("stride8", 8)):
        maps, layer_logits = layer_gradcam(resnet.backbone, resnet.head, x, "predicted", layer=layer)
        assert maps.shape == (2, side, side) and (maps >= 0).all() and maps.amax() > 0
        torch.testing.assert_close(layer_logits, logits)
        result = GradCAM(resnet, layer=layer)(x, target="predicted")
        torch.testing.assert_close(result.maps, upsample_cams(maps, (64, 64)))
        torch.testing.assert_close(result.probabilities, logits.softmax(dim=1))
        assert torch.equal(result.targets, logits.argmax(dim=1))
    assert all(parameter.grad is None for parameter in resnet.parameters())


@pytest.mark.parametrize(
    "backbone, weights, size, layer",
    [
        ("resnet10t", "none", 64, "stride16"),
        ("resnet10t", "none", 64, "stride8"),
        ("mobilenetv3_small_050", "none", 96, "stride16"),
        ("efficientnet_lite0", "imagenet", 96, "stride8"),
        ("vgg11", "none", 64, "stride8"),  # FeatureListNet with flattened Sequential: features.14 -> features_14
        ("xception", "none", 96, "stride16"),  # FeatureHookNet; the level is a ReLU the block's skip bypasses
    ],
)
def test_finer_layers_match_pytorch_grad_cam(backbone, weights, size, layer):
    torch.manual_seed(0)
    model = build_classifier(backbone, hidden=16, weights=weights).eval()
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    module = model.backbone.layer_module(layer)
    shown_maps = 0
    for score, target in (("log_odds", 1), ("logit", 0)):  # pytorch-grad-cam's full backward is the slow part
        ours, _ = layer_gradcam(model.backbone, model.head, x, target, layer=layer, score=score)
        if score == "logit":
            targets = [ClassifierOutputTarget(target)] * len(x)
        else:
            targets = [lambda out, t=target: out[t] - out[1 - t]] * len(x)
        # pytorch-grad-cam: forward with a graph through the whole model, backward() to the module's output.
        reference = PytorchGradCAM(model=model, target_layers=[module])
        try:
            scaled = reference(input_tensor=x, targets=targets)
            stored = reference.activations_and_grads
            activations, gradients = stored.activations[0].numpy(), stored.gradients[0].numpy()
            raw = reference.get_cam_image(x, module, targets, activations, gradients)
        finally:
            reference.activations_and_grads.release()
        # Raw maps: its channel weights and weighted sum, before its per-image min-max scaling and resize.
        raw = torch.from_numpy(np.maximum(raw, 0))
        torch.testing.assert_close(ours, raw, rtol=1e-4, atol=1e-5 * float(raw.max()))
        shown_maps += int((ours.amax(dim=(1, 2)) > 0).sum())
        # Its output: per-image min-max, cv2 resize to the input, min-max again; the same steps on ours.
        ours_scaled = scale_cam_image(scale_cam_image(ours.numpy(), (size, size)))
        np.testing.assert_allclose(ours_scaled, scaled, atol=1e-4)
    assert shown_maps > 0


def _leaves(root: torch.Tensor) -> list[torch.Tensor]:
    """The tensors whose gradients a backward from ``root`` would accumulate: the leaves of its graph."""
    leaves, seen, stack = [], set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


@pytest.mark.parametrize(
    "backbone, weights, layer, top",
    [
        ("resnet10t", "none", "stride8", ("layer3.", "layer4.")),
        ("mobilenetv3_small_050", "none", "stride16", ("blocks.4.", "blocks.5.")),
        ("efficientnet_lite0", "imagenet", "stride8", ("blocks.3.", "blocks.4.", "blocks.5.", "blocks.6.")),
    ],
)
def test_only_the_top_blocks_are_differentiated(backbone, weights, layer, top):
    torch.manual_seed(0)
    model = build_classifier(backbone, hidden=16, weights=weights).eval()
    parameters = dict(model.backbone.body.named_parameters())
    assert all(parameter.requires_grad for parameter in parameters.values())
    top_parameters = {id(p) for name, p in parameters.items() if name.startswith(top)}
    bottom_parameters = {id(p) for name, p in parameters.items() if not name.startswith(top)}
    assert top_parameters and bottom_parameters
    # Grad mode inside every backbone module's forward, and the head's output with its graph.
    grad_mode, head_outputs = {}, []

    def record_grad_mode(name):
        def hook(_module, _inputs):
            grad_mode.setdefault(name, torch.is_grad_enabled())

        return hook

    handles = [
        module.register_forward_pre_hook(record_grad_mode(name))
        for name, module in model.backbone.body.named_modules()
        if name
    ]
    handles.append(model.head.register_forward_hook(lambda _m, _i, out: head_outputs.append(out)))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    try:
        maps, _ = layer_gradcam(model.backbone, model.head, x, 1, layer=layer)
    finally:
        for handle in handles:
            handle.remove()
    level = model.backbone.layer_info(layer)
    # The graph reaches the top blocks' and the head's parameters and the level's map, nothing below.
    leaves = _leaves(head_outputs[0])
    reached = {id(leaf) for leaf in leaves}
    assert top_parameters <= reached and not bottom_parameters & reached
    head_parameters = {id(p) for p in model.head.parameters()}
    assert head_parameters <= reached
    (activation,) = [leaf for leaf in leaves if id(leaf) not in top_parameters | head_parameters]
    assert activation.shape == (2, level["num_chs"], *maps.shape[1:])
    # Bottom modules ran without grad mode, top ones with it; nothing got a .grad.
    for name, enabled in grad_mode.items():
        assert enabled == f"{name}.".startswith(top), name
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_grad_mode_and_hooks_are_restored_even_on_errors(resnet, grad_enabled):
    level_module = resnet.backbone.layer_module("stride8")
    x = torch.randn(1, 3, 64, 64)

    def fail(_module, _inputs, _output):
        raise RuntimeError("top block failed")

    with torch.set_grad_enabled(grad_enabled):
        maps, _ = layer_gradcam(resnet.backbone, resnet.head, x, 1, layer="stride8")
        assert torch.is_grad_enabled() == grad_enabled and not maps.requires_grad
        handle = resnet.backbone.body.layer3.register_forward_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="top block failed"):
                layer_gradcam(resnet.backbone, resnet.head, x, 1, layer="stride8")
        finally:
            handle.remove()
        assert torch.is_grad_enabled() == grad_enabled
    assert not level_module._forward_hooks


def test_layer_gradcam_needs_eval_mode(resnet):
    x = torch.randn(1, 3, 64, 64)
    for part in (resnet.backbone, resnet.head):
        part.train()
        try:
            with pytest.raises(ValueError, match="eval mode"):
                layer_gradcam(resnet.backbone, resnet.head, x, 1, layer="stride8")
        finally:
            part.eval()
