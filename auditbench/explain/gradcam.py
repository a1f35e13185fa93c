"""Grad-CAM (Selvaraju et al. 2017, "Grad-CAM: Visual Explanations from Deep Networks via
Gradient-based Localization", ICCV) at the backbone's last spatial feature map.

For class c and feature map A (C, h, w): alpha_k = mean_ij d y_c / d A_k[i, j], and the map is
L_c = ReLU(sum_k alpha_k A_k). Maps stay raw (never min-max normalised): their scale is the model's.

Only the head needs a graph: the backbone runs under ``torch.no_grad()``, so a batch of maps costs
about one inference pass and inference-level memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditbench.models.classifier import Classifier
from auditbench.registry import Registry

Target = Union[int, Tensor, Literal["predicted"]]
CamFunction = Callable[[nn.Module, Tensor, Target], Tensor]

CAM_METHODS = Registry[CamFunction]("CAM method")


@dataclass(frozen=True)
class CamResult:
    """Maps (B, H, W) at the input size, logits and softmax probabilities (B, classes), targets (B,)."""

    maps: Tensor
    logits: Tensor
    probabilities: Tensor
    targets: Tensor


@CAM_METHODS.register("gradcam")
def gradcam_from_features(head: nn.Module, features: Tensor, target: Target) -> Tensor:
    """Raw Grad-CAM maps (B, h, w) of ``head`` at ``features`` (B, C, h, w).

    ``target`` is a class index for every image, a (B,) tensor of indices, or ``"predicted"``.
    The head must be in eval mode (dropout would make the maps random).
    """
    return _gradcam(head, features, target)[0]


def upsample_cams(cams: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (``align_corners=False``) of maps (B, h, w) to (B, *size); ReLU maps stay >= 0."""
    return F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class GradCAM:
    """Batched Grad-CAM of a :class:`Classifier`, with its predictions.

    Example:
        >>> cam = GradCAM(model.eval())
        >>> result = cam(images, target=1)  # positive class; or target="predicted"
        >>> result.maps.shape  # (B, H, W), raw
    """

    def __init__(self, model: Classifier):
        self.model = model

    def __call__(self, x: Tensor, target: Target) -> CamResult:
        if self.model.training:
            # Dropout would randomise the maps and batch norm would update its statistics.
            raise ValueError("GradCAM needs the model in eval mode: call model.eval() first")
        with torch.no_grad():
            features = self.model.features(x)
        cams, logits, targets = _gradcam(self.model.head, features, target)
        return CamResult(upsample_cams(cams, tuple(x.shape[-2:])), logits, logits.softmax(dim=1), targets)


def _gradcam(head: nn.Module, features: Tensor, target: Target) -> tuple[Tensor, Tensor, Tensor]:
    if head.training:
        raise ValueError("Grad-CAM needs the head in eval mode: call head.eval() first")
    features = features.detach().requires_grad_()
    with torch.enable_grad():
        logits = head(features)
        targets = _target_indices(target, logits)
        # Images are independent, so the gradient of the summed scores gives every image its own gradient.
        score = logits.gather(1, targets[:, None]).sum()
        (gradients,) = torch.autograd.grad(score, features)
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * features.detach()).sum(dim=1))
    return cams, logits.detach(), targets


def _target_indices(target: Target, logits: Tensor) -> Tensor:
    batch, classes = logits.shape
    if isinstance(target, str):
        if target != "predicted":
            raise ValueError(f"target must be a class index, a tensor of indices or 'predicted', got {target!r}")
        return logits.detach().argmax(dim=1)
    targets = torch.as_tensor(target, device=logits.device, dtype=torch.long)
    if targets.ndim == 0:
        targets = targets.expand(batch)
    if targets.shape != (batch,) or targets.min() < 0 or targets.max() >= classes:
        raise ValueError(f"targets must be class indices in [0, {classes}) for {batch} images, got {target}")
    return targets
