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

The other CAM methods share this plumbing (:mod:`auditbench.explain.cam_base`, :mod:`~.cam_levels`) and are
registered in the same :data:`CAM_METHODS` when this module is imported: HiResCAM, Grad-CAM++, XGrad-CAM,
LayerCAM and EigenCAM (:mod:`~.cam_methods`, feature level), Score-CAM and InputXGradient (:mod:`~.cam_input`,
they need the images). This module re-exports what callers import: ``CAM_METHODS``, ``explain_batch``,
``upsample_cams``, ``CamResult``, ``Target``, ``Score``.
"""
from __future__ import annotations

from torch import Tensor, nn

from auditbench.explain.cam_base import (
    CAM_METHODS,
    SCORES,
    CamFunction,
    CamResult,
    FeatureCam,
    InputCam,
    Score,
    Target,
    explain_batch,
    upsample_cams,
)
from auditbench.explain.cam_levels import LeafAtLevel as _LeafAtLevel  # noqa: F401  (the names of before)
from auditbench.explain.cam_levels import check_score as _check_score
from auditbench.explain.cam_levels import scores as _scores  # noqa: F401
from auditbench.explain.cam_levels import target_indices as _target_indices  # noqa: F401
from auditbench.models.backbones import FeatureBackbone
from auditbench.models.classifier import Classifier

__all__ = [
    "CAM_METHODS", "SCORES", "CamFunction", "CamResult", "FeatureCam", "GradCAM", "InputCam", "Score", "Target",
    "explain_batch", "gradcam_from_features", "layer_gradcam", "upsample_cams",
]


@CAM_METHODS.register("gradcam", title="Grad-CAM")
def gradcam_from_features(activation: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017, ICCV): alpha_k = mean_ij dS/dA_k[i, j], map = ReLU(sum_k alpha_k A_k).

    Called as ``gradcam_from_features(head, features, target, score="log_odds") -> (B, h, w)``: raw maps of
    ``head`` at ``features`` (B, C, h, w), layer ``"last"``. ``target`` is a class index for every image, a (B,)
    tensor of indices, or ``"predicted"`` (argmax). ``score`` is ``"log_odds"`` (logit_t minus the other logit;
    see the module docstring) or ``"logit"``. The head must be in eval mode (dropout would make the maps
    random). ``gradcam_from_features.explain(backbone, head, x, target, score=..., layer=...)`` works at any level.
    """
    return (gradients.mean(dim=(2, 3), keepdim=True) * activation).sum(dim=1)


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
    backbone.layer_info(layer)  # an unknown layer name fails first, as it always did
    return gradcam_from_features.explain(backbone, head, x, target, score=score, layer=layer)


def _gradcam(head: nn.Module, features: Tensor, target: Target, score: Score) -> tuple[Tensor, Tensor, Tensor]:
    """Grad-CAM maps, logits and targets of ``head`` at ``features`` (the cached path)."""
    return gradcam_from_features.explain(None, head, None, target, score=score, features=features)


def _weighted_map(activation: Tensor, gradients: Tensor) -> Tensor:
    return gradcam_from_features.map(activation, gradients)


# The other methods register themselves in CAM_METHODS on import: importing this module gives the full registry.
from auditbench.explain import cam_input, cam_methods  # noqa: E402,F401  (after CAM_METHODS' "gradcam")
