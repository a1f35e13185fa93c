"""Classifier checkpoints: ``weights.safetensors`` plus ``config.json`` (architecture, classes, preprocessing).

A checkpoint folder is enough to rebuild the model for prediction and Grad-CAM without the protocol.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError

from auditbench.models.classifier import Classifier, build_classifier

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
_REQUIRED_PREPROCESSING = ("input_size", "crop", "crop_ratio")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be written or read back; the message names the file."""


def save_checkpoint(model: Classifier, directory: Path, config: dict[str, Any]) -> None:
    """Write ``weights.safetensors`` and ``config.json`` into ``directory`` (created if needed).

    ``config`` must hold ``classes`` (one name per output) and ``preprocessing`` with ``input_size``,
    ``crop`` and ``crop_ratio``; mean, std and interpolation default to the backbone's data config.
    ``positive_class`` defaults to ``classes[1]``. Every other key is saved as given.
    """
    directory = Path(directory)
    head = model.head
    classes = list(config.get("classes") or [])
    if len(classes) != head.num_classes:
        raise CheckpointError(f"config['classes'] must name the model's {head.num_classes} classes, got {classes}")
    # Class index 1 is the positive class unless the config says otherwise.
    positive_class = config.get("positive_class", classes[1])
    if positive_class not in classes:
        raise CheckpointError(f"config['positive_class'] {positive_class!r} is not one of {classes}")
    preprocessing = dict(config.get("preprocessing") or {})
    missing = [key for key in _REQUIRED_PREPROCESSING if key not in preprocessing]
    if missing:
        raise CheckpointError(f"config['preprocessing'] lacks {missing}; needed to predict from the checkpoint alone")
    data_config = model.backbone.data_config
    preprocessing = {
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "interpolation": data_config["interpolation"],
        **preprocessing,
    }
    derived = {
        "backbone": model.backbone.name,
        "timm_name": model.backbone.timm_name,
        "hidden": head.hidden,
        "dropout": head.dropout,
        "num_classes": head.num_classes,
    }
    clashes = {key: (config[key], value) for key, value in derived.items() if key in config and config[key] != value}
    if clashes:
        raise CheckpointError(f"config disagrees with the model (config, model): {clashes}")
    record = {
        "format_version": FORMAT_VERSION,
        **derived,
        "classes": classes,
        "positive_class": positive_class,
        "preprocessing": preprocessing,
        **{key: value for key, value in config.items() if key not in ("classes", "positive_class", "preprocessing")},
    }
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    safetensors.torch.save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    # default=str: paths and similar values in the run config are saved as their text.
    (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")


def load_checkpoint(directory: Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild the classifier saved by :func:`save_checkpoint` (in eval mode) and return it with its config."""
    directory = Path(directory)
    config = _read_config(directory / CONFIG_FILE)
    model = build_classifier(config["backbone"], config["hidden"], "none", config["dropout"], config["num_classes"])
    if model.backbone.timm_name != config["timm_name"]:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: backbone {config['backbone']!r} now builds timm {model.backbone.timm_name!r},"
            f" the checkpoint holds {config['timm_name']!r}"
        )
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights missing: {weights_path}")
    try:
        state = safetensors.torch.load_file(weights_path)
    except SafetensorError as err:
        raise CheckpointError(f"cannot read checkpoint weights {weights_path}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint weights {weights_path} do not fit the model in {CONFIG_FILE}: {err}"
        ) from err
    return model.eval(), config


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint config missing: {path}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot parse checkpoint config {path}: {err}") from err
    required = ("backbone", "timm_name", "hidden", "dropout", "num_classes", "classes", "preprocessing")
    missing = [key for key in required if key not in config] if isinstance(config, dict) else list(required)
    if missing:
        raise CheckpointError(f"checkpoint config {path} lacks {missing}")
    return config
