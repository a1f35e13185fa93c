"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV) at one of the backbone's feature maps.

For a score y and feature map A (C, h, w): alpha_k = mean_ij d y / d A_k[i, j], and the map is
L = ReLU(sum_k alpha_k A_k). Maps stay raw (never min-max normalised): their scale is the model's.

Score (``score=``):

- ``"log_odds"`` (default): y = logit_t - logit_other for a two-logit head; for K > 2 classes
  y = logit_t - logsumexp_{j != t} logit_j = log(p_t / (1 - p_t)), which is the same thing for K = 2.
  A softmax over two logits gives p(positive) = sigmoid(logit_1 - logit_0): it depends on the difference
  only, so the difference is the whole of the evidence for the decision. A single logit is not: adding
  the same amount to both logits changes it but leaves every probability unchanged, and the maps of
  logit_1 and of logit_1 - logit_0 correlate only 0.29-0.73 per image on the study's models.
- ``"logit"``: y = logit_t, the raw logit of the target class (what auditbench explained before, and
  what captum's ``LayerGradCam(target=t)`` and pytorch-grad-cam's ``ClassifierOutputTarget(t)`` explain).

Layer (``layer=``, resolved by :meth:`FeatureBackbone.layer_info`):

- ``"last"``: the backbone's output, its last non-pooling feature map (stride 32, or 16 for VGG). Only the
  head needs a graph: the backbone runs under ``torch.no_grad()`` (or its output is cached), so a batch of
  maps costs about one inference pass and inference-level memory.
- ``"stride16"`` / ``"stride8"``: a finer ``feature_info`` level, for maps of 14x14 / 28x28 at 224 px. The
  bottom of the backbone (up to and including the level's module) runs without an autograd graph; a
  forward hook on the level's module makes its output a leaf that requires grad and turns grad mode on,
  so only the top blocks after it and the head are recorded and differentiated
  (``torch.autograd.grad`` w.r.t. that leaf only: no parameter gradient is computed or stored).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditbench.models.backbones import FeatureBackbone
from auditbench.models.classifier import Classifier
from auditbench.registry import Registry

Target = Union[int, Tensor, Literal["predicted"]]
Score = Literal["log_odds", "logit"]
SCORES: tuple[str, ...] = ("log_odds", "logit")


class CamFunction(Protocol):
    """A registered CAM method: raw maps (B, h, w) of ``head`` at cached ``features`` (B, C, h, w)."""

    def __call__(self, head: nn.Module, features: Tensor, target: Target, *, score: Score = "log_odds") -> Tensor:
        ...


CAM_METHODS = Registry[CamFunction]("CAM method")


@dataclass(frozen=True)
class CamResult:
    """Maps (B, H, W) at the input size, logits and softmax probabilities (B, classes), targets (B,)."""

    maps: Tensor
    logits: Tensor
    probabilities: Tensor
    targets: Tensor


@CAM_METHODS.register("gradcam")
def gradcam_from_features(head: nn.Module, features: Tensor, target: Target, score: Score = "log_odds") -> Tensor:
    """Raw Grad-CAM maps (B, h, w) of ``head`` at ``features`` (B, C, h, w): layer ``"last"``.

    ``target`` is a class index for every image, a (B,) tensor of indices, or ``"predicted"`` (argmax).
    ``score`` is ``"log_odds"`` (logit_t minus the other logit; see the module docstring) or ``"logit"``.
    The head must be in eval mode (dropout would make the maps random).
    """
    _check_score(score)
    return _gradcam(head, features, target, score)[0]


def layer_gradcam(
    backbone: FeatureBackbone,
    head: nn.Module,
    x: Tensor,
    target: Target,
    layer: str = "last",
    score: Score = "log_odds",
) -> tuple[Tensor, Tensor]:
    """Raw Grad-CAM maps (B, h, w) at ``layer``'s resolution, and the logits (B, classes), for images ``x``.

    ``layer`` is ``"last"`` (the backbone's output: same maps as :func:`gradcam_from_features` on
    ``backbone(x)``), ``"stride16"`` or ``"stride8"`` (see :meth:`FeatureBackbone.layer_info`); only the
    blocks after the level and the head are differentiated. ``target`` and ``score`` as in
    :func:`gradcam_from_features`. Backbone and head must be in eval mode. Upsample with :func:`upsample_cams`.

    Example:
        >>> maps, logits = layer_gradcam(model.backbone, model.head, images, target=1, layer="stride8")
        >>> maps.shape  # (B, 28, 28) at 224 px
    """
    cams, logits, _ = _layer_gradcam(backbone, head, x, target, layer, score)
    return cams, logits


def upsample_cams(cams: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (``align_corners=False``) of maps (B, h, w) to (B, *size); ReLU maps stay >= 0."""
    return F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class GradCAM:
    """Batched Grad-CAM of a :class:`Classifier` at ``layer``, with its predictions.

    Example:
        >>> cam = GradCAM(model.eval(), layer="stride8")  # score="log_odds" by default
        >>> result = cam(images, target=1)  # positive class; or target="predicted"
        >>> result.maps.shape  # (B, H, W), raw, upsampled from the level's resolution
    """

    def __init__(self, model: Classifier, layer: str = "last", score: Score = "log_odds"):
        _check_score(score)
        self.level = model.backbone.layer_info(layer)  # fails here on an unknown layer name
        self.model = model
        self.layer = layer
        self.score = score

    def __call__(self, x: Tensor, target: Target) -> CamResult:
        if self.model.training:
            # Dropout would randomise the maps and batch norm would update its statistics.
            raise ValueError("GradCAM needs the model in eval mode: call model.eval() first")
        cams, logits, targets = _layer_gradcam(self.model.backbone, self.model.head, x, target, self.layer, self.score)
        return CamResult(upsample_cams(cams, tuple(x.shape[-2:])), logits, logits.softmax(dim=1), targets)


def _layer_gradcam(
    backbone: FeatureBackbone, head: nn.Module, x: Tensor, target: Target, layer: str, score: Score
) -> tuple[Tensor, Tensor, Tensor]:
    _check_score(score)
    level = backbone.layer_info(layer)
    if backbone.training:
        raise ValueError("Grad-CAM needs the backbone in eval mode: call backbone.eval() first")
    if head.training:
        raise ValueError("Grad-CAM needs the head in eval mode: call head.eval() first")
    if level["index"] == backbone.cam_level["index"]:  # "last", or a stride whose level is the last (VGG)
        with torch.no_grad():
            features = backbone(x)
        return _gradcam(head, features, target, score)

    leaf = _LeafAtLevel(level["module"])
    # No graph below the level: grad mode is off until the hook turns it on at the level's output.
    # no_grad's exit restores the caller's grad mode whatever happened inside, and the hook goes either way.
    with torch.no_grad():
        handle = backbone.layer_module(layer).register_forward_hook(leaf)
        try:
            features = backbone(x)
        finally:
            handle.remove()
    if leaf.activation is None:
        raise RuntimeError(f"Grad-CAM layer {layer!r}: module {level['module']!r} did not run in the backbone's forward")
    if not features.requires_grad:
        raise RuntimeError(
            f"Grad-CAM layer {layer!r}: the backbone's output does not depend on {level['module']!r} with a graph"
            " (does the backbone turn grad mode off after that module?)"
        )
    with torch.enable_grad():
        logits = head(features)
        targets = _target_indices(target, logits)
        (gradients,) = torch.autograd.grad(_scores(logits, targets, score).sum(), leaf.activation)
    return _weighted_map(leaf.activation.detach(), gradients), logits.detach(), targets


class _LeafAtLevel:
    """Forward hook: the module's output becomes ``activation``, a leaf that requires grad, and grad mode is on
    for the rest of the forward (the caller's ``no_grad`` context restores it)."""

    def __init__(self, name: str):
        self.name = name
        self.activation: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: object, output: object) -> Tensor:
        if self.activation is not None:
            raise RuntimeError(f"Grad-CAM level module {self.name!r} ran twice in one forward: its map is ambiguous")
        if not isinstance(output, Tensor) or output.ndim != 4:
            raise TypeError(f"Grad-CAM level module {self.name!r} must return a (B, C, h, w) tensor, got {type(output)}")
        self.activation = output.detach().requires_grad_()
        torch.set_grad_enabled(True)
        # A clone goes on, so an in-place op in the next block (e.g. ReLU(inplace=True)) changes neither the
        # leaf (autograd forbids that) nor the activation the map is made of.
        return self.activation.clone()


def _gradcam(head: nn.Module, features: Tensor, target: Target, score: Score) -> tuple[Tensor, Tensor, Tensor]:
    if head.training:
        raise ValueError("Grad-CAM needs the head in eval mode: call head.eval() first")
    features = features.detach().requires_grad_()
    with torch.enable_grad():
        logits = head(features)
        targets = _target_indices(target, logits)
        # Images are independent, so the gradient of the summed scores gives every image its own gradient.
        (gradients,) = torch.autograd.grad(_scores(logits, targets, score).sum(), features)
    return _weighted_map(features.detach(), gradients), logits.detach(), targets


def _weighted_map(activation: Tensor, gradients: Tensor) -> Tensor:
    # In float32 even where the backbone ran under autocast: small weights times activations underflow in fp16.
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activation.float()).sum(dim=1))


def _scores(logits: Tensor, targets: Tensor, score: Score) -> Tensor:
    """Per-image score (B,): logit_t, or logit_t - logsumexp of the other logits (logit_t - logit_other for two)."""
    chosen = logits.gather(1, targets[:, None])[:, 0]
    if score == "logit":
        return chosen
    classes = logits.shape[1]
    if classes < 2:
        raise ValueError(f"score='log_odds' needs at least two logits, the head has {classes}; use score='logit'")
    if classes == 2:
        return chosen - logits.gather(1, (1 - targets)[:, None])[:, 0]
    others = logits.masked_fill(F.one_hot(targets, classes).bool(), float("-inf"))
    return chosen - others.logsumexp(dim=1)


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")


def _target_indices(target: Target, logits: Tensor) -> Tensor:
    batch, classes = logits.shape
    if isinstance(target, str):
        if target != "predicted":
            raise ValueError(f"target must be a class index, a tensor of indices or 'predicted', got {target!r}")
        return logits.detach().argmax(dim=1)
    if isinstance(target, int) and not isinstance(target, bool):  # checked without reading a device tensor back
        if not 0 <= target < classes:
            raise ValueError(f"targets must be class indices in [0, {classes}) for {batch} images, got {target}")
        return torch.full((batch,), target, device=logits.device, dtype=torch.long)
    targets = torch.as_tensor(target, device=logits.device, dtype=torch.long)
    if targets.ndim == 0:
        targets = targets.expand(batch)
    if targets.shape != (batch,) or targets.min() < 0 or targets.max() >= classes:
        raise ValueError(f"targets must be class indices in [0, {classes}) for {batch} images, got {target}")
    return targets
