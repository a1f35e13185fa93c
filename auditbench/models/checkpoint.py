"""Classifier checkpoints: ``weights.safetensors`` plus ``config.json`` (architecture, classes, preprocessing).

A checkpoint folder is enough to rebuild the model for prediction and Grad-CAM without the protocol.
"""
from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

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
    fit_state_dict(model, state, f"checkpoint weights {weights_path} do not fit the model in {CONFIG_FILE}")
    return model.eval(), config


STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict (name -> tensor) from ``.safetensors``, or from ``.pth`` / ``.pt`` read with
    ``torch.load(weights_only=True)``: a file that needs pickle for anything but tensors (a whole
    model, a custom class) is refused, never unpickled. Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix.lower() not in STATE_DICT_SUFFIXES:
        raise CheckpointError(f"weights file {path}: expected {', '.join(STATE_DICT_SUFFIXES)}")
    try:
        if path.suffix.lower() == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page long; its one useful fact is the Python object it refused.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"weights file {path} holds pickled Python objects{what} that torch.load(weights_only=True) refuses; "
            "auditbench never unpickles a weights file: save the state dict alone "
            "(torch.save(model.state_dict(), path)) or as .safetensors"
        ) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"cannot read weights file {path}: {' '.join(str(err).split())}") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        nested = [k for k, v in state.items() if isinstance(v, Mapping)] if isinstance(state, Mapping) else []
        hint = f"; its key {nested[0]!r} holds a dict: save that dict alone" if nested else ""
        raise CheckpointError(f"weights file {path}: expected a state dict (parameter name -> tensor), "
                              f"found a {type(state).__name__}{hint}")
    return dict(state)


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` exactly (every key, every shape), or raise :class:`CheckpointError`
    ``"<what>: 2 missing (head.fc1.weight, head.fc1.bias); ..."`` on one line."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [f"{key} {tuple(state[key].shape)}, model {tuple(value.shape)}"
                for key, value in expected.items() if key in state and state[key].shape != value.shape]
    problems = [f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for kind, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped))
                if keys]
    if problems:
        raise CheckpointError(f"{what}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


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
