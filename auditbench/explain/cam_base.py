"""The base of every CAM method: the registry, the score, the feature level, eval-mode checks, batching.

A method provides only its weights and weighted sum (a pre-ReLU map); this module owns the rest:

- **Score** (``score=``): ``"log_odds"`` (logit_t minus the logsumexp of the other logits: logit_t - logit_other
  for two classes) or ``"logit"`` (logit_t); see :mod:`auditbench.explain.gradcam`.
- **Level** (``layer=``, resolved by :meth:`FeatureBackbone.layer_info`): at ``"last"`` the backbone's output
  is cached or computed under ``torch.no_grad()`` and only the head is differentiated; at a finer level
  (``"stride16"``, ``"stride8"``) a forward hook makes the level's output a leaf, so only the blocks after it
  and the head are recorded (:class:`LeafAtLevel`).
- **Maps**: ReLU of the method's map, in float32, at the level's resolution; never min-max normalised.
  :func:`upsample_cams` brings them to the input size.

Two kinds of method, both registered in :data:`CAM_METHODS` by decorating the method's function (see
:mod:`auditbench.registry`), which becomes the registered method object:
``@CAM_METHODS.register("gradcam", title="Grad-CAM")`` on ``function(A, G)`` builds a :class:`FeatureCam`;
``@CAM_METHODS.register("scorecam", title="Score-CAM", needs_input=True, uses_gradients=False, batch_size=64,
expensive=True)`` on ``function(context)`` builds an :class:`InputCam` (:func:`cam_method` is the entry type).
``expensive``: the method costs many forward passes per image (Score-CAM: one per feature channel), so the
pipeline explains only a bounded number of images with it (``explain.expensive_images``).

- :class:`FeatureCam` (``needs_input = False``): needs only the head and the level's activations (and their
  gradients). Called as ``cam(head, features, target, score=...)`` on cached features at ``"last"``, or
  ``cam.explain(backbone, head, x, target, score=..., layer=...)`` at any level.
- :class:`InputCam` (``needs_input = True``): needs the backbone and the images (Score-CAM, pixel attributions).
  Called as ``cam(backbone, head, x, target, score=..., layer=..., features=..., batch_size=...)``.

:func:`explain_batch` calls either kind with one signature.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditbench.explain.cam_levels import (
    SCORES,
    LevelPass,
    Score,
    Target,
    check_eval,
    check_score,
    head_gradients,
    is_last_level,
    level_pass,
    scores,
)
from auditbench.registry import Registry

__all__ = [
    "CAM_METHODS", "SCORES", "CamFunction", "CamResult", "FeatureCam", "InputCam", "InputContext", "LevelPass",
    "Score", "Target", "cam_method", "explain_batch", "resolve_method", "upsample_cams",
]


class CamFunction(Protocol):
    """A feature-level CAM method: raw maps (B, h, w) of ``head`` at cached ``features`` (B, C, h, w)."""

    def __call__(self, head: nn.Module, features: Tensor, target: Target, *, score: Score = "log_odds") -> Tensor:
        ...


@dataclass(frozen=True)
class CamResult:
    """Maps (B, H, W) at the input size, logits and softmax probabilities (B, classes), targets (B,)."""

    maps: Tensor
    logits: Tensor
    probabilities: Tensor
    targets: Tensor


class _CamMethod:
    """What both kinds share: the registered name, a title for messages, the method's function and its docstring."""

    needs_input: bool
    uses_gradients: bool
    expensive: bool = False

    def __init__(self, name: str, function: Callable[..., Any], title: str):
        functools.update_wrapper(self, function, updated=())  # __doc__, __name__, __qualname__, __module__
        del self.__wrapped__  # inspect.signature shows the call signature, not the function's (A, G)
        self.name = name
        self.function = function
        self.title = title

    def __repr__(self) -> str:
        kind = "input" if self.needs_input else "feature"
        return f"<{kind}-level CAM method {self.title} ({self.__module__}.{self.__name__})>"


class FeatureCam(_CamMethod):
    """A method whose map is a function of the level's activations A (B, C, h, w) and, when
    ``uses_gradients``, of G = d score / d A: ``function(A, G) -> pre-ReLU map (B, h, w)``, both in float32."""

    needs_input = False

    def __init__(self, name: str, function: Callable[[Tensor, Optional[Tensor]], Tensor], title: str,
                 uses_gradients: bool = True):
        super().__init__(name, function, title)
        self.uses_gradients = uses_gradients

    def __call__(self, head: nn.Module, features: Tensor, target: Target, score: Score = "log_odds") -> Tensor:
        """Raw maps (B, h, w) of ``head`` at ``features`` (B, C, h, w), the backbone's output (layer ``"last"``).

        ``target``: a class index, a (B,) tensor of indices, or ``"predicted"`` (argmax). ``score``:
        ``"log_odds"`` or ``"logit"``. Only the head runs; it must be in eval mode.
        """
        check_score(score)
        check_eval(self.title, head=head)
        if self.uses_gradients:
            gradients, _, _ = head_gradients(head, features, target, score)
        else:
            gradients = None
        return self.map(features.detach(), gradients)

    def explain(
        self,
        backbone: nn.Module,
        head: nn.Module,
        x: Optional[Tensor],
        target: Target,
        *,
        score: Score = "log_odds",
        layer: str = "last",
        features: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Raw maps (B, h, w) at ``layer``'s resolution, logits (B, classes) and targets (B,) for images ``x``.

        At ``"last"``, cached ``features`` (the backbone's output for ``x``) replace the backbone pass; ``x`` may
        then be None. Backbone and head must be in eval mode.
        """
        run = level_pass(self.title, backbone, head, x, target, layer, score, self.uses_gradients, features)
        return self.map(run.activation, run.gradients), run.logits, run.targets

    def map(self, activation: Tensor, gradients: Optional[Tensor]) -> Tensor:
        # In float32 even where the backbone ran under autocast: small weights times activations underflow in fp16.
        gradients = None if gradients is None else gradients.float()
        return torch.relu(self.function(activation.float(), gradients))


@dataclass
class InputContext:
    """What an input-level method gets: the model, the images and the caller's choices, plus the level pass
    (:meth:`level`, no gradients, computed once) and :meth:`score_images` for whole-model forward passes."""

    title: str
    backbone: nn.Module
    head: nn.Module
    x: Tensor
    target: Target
    score: Score
    layer: str
    features: Optional[Tensor]
    batch_size: int
    _level: Optional[LevelPass] = None

    def level(self) -> LevelPass:
        """Activations (B, C, h, w) at ``layer`` with the logits and targets of ``x``; no graph."""
        if self._level is None:
            self._level = level_pass(
                self.title, self.backbone, self.head, self.x, self.target, self.layer, self.score, False, self.features
            )
        return self._level

    def score_images(self, images: Callable[[slice], Tensor], count: int, targets: Tensor) -> Tensor:
        """Scores (count,) of the whole model on ``count`` images made chunk by chunk (``images(chunk)`` gives the
        images of a slice of range(count)), ``batch_size`` at a time, under ``torch.no_grad()``."""
        values = []
        with torch.no_grad():
            for start in range(0, count, self.batch_size):
                chunk = slice(start, min(start + self.batch_size, count))
                # channels_last: 1.5-1.9x faster convolutions on a CPU (measured on lite0 and resnet10t at
                # 128 px), same values to float rounding; the backbone's own weights are left as they are.
                logits = self.head(self.backbone(images(chunk).contiguous(memory_format=torch.channels_last)))
                values.append(scores(logits.float(), targets[chunk], self.score))
        return torch.cat(values) if values else torch.zeros(0, device=self.x.device)


class InputCam(_CamMethod):
    """A method that needs the images and the whole model: ``function(context) -> (pre-ReLU map, logits, targets)``
    with an :class:`InputContext`."""

    needs_input = True

    def __init__(self, name: str, function: Callable[[InputContext], tuple[Tensor, Tensor, Tensor]], title: str,
                 uses_gradients: bool = True, batch_size: int = 64, expensive: bool = False):
        super().__init__(name, function, title)
        self.uses_gradients = uses_gradients
        self.batch_size = batch_size
        self.expensive = expensive

    def __call__(self, backbone: nn.Module, head: nn.Module, x: Tensor, target: Target, *, score: Score = "log_odds",
                 layer: str = "last", features: Optional[Tensor] = None, batch_size: Optional[int] = None) -> Tensor:
        """Raw maps (B, h, w) for images ``x`` (see :meth:`explain`)."""
        return self.explain(backbone, head, x, target, score=score, layer=layer, features=features,
                            batch_size=batch_size)[0]

    def explain(self, backbone: nn.Module, head: nn.Module, x: Tensor, target: Target, *, score: Score = "log_odds",
                layer: str = "last", features: Optional[Tensor] = None,
                batch_size: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Raw maps (B, h, w), logits (B, classes) and targets (B,) for images ``x`` (B, 3, H, W).

        ``features``: the cached backbone output for ``x`` (used at ``"last"`` instead of a backbone pass).
        ``batch_size``: images per forward pass of the method's extra passes (default: the method's).
        """
        check_score(score)
        check_eval(self.title, backbone=backbone, head=head)
        if x is None:
            raise ValueError(f"{self.title} needs the input images x")
        batch_size = self.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        context = InputContext(self.title, backbone, head, x, target, score, layer, features, batch_size)
        maps, logits, targets = self.function(context)
        return torch.relu(maps.float()), logits, targets


def cam_method(name: str, function: Callable[..., Any], *, title: str, needs_input: bool = False,
               uses_gradients: bool = True, batch_size: Optional[int] = None,
               expensive: bool = False) -> Union[FeatureCam, InputCam]:
    """The entry type of :data:`CAM_METHODS`: ``function(A, G) -> pre-ReLU map`` becomes a :class:`FeatureCam`;
    with ``needs_input=True``, ``function(context) -> (pre-ReLU map, logits, targets)`` becomes an
    :class:`InputCam` whose extra forward passes take ``batch_size`` images at a time (default 64);
    ``expensive=True`` (input-level only) marks a method whose images the pipeline bounds."""
    if needs_input:
        return InputCam(name, function, title, uses_gradients, 64 if batch_size is None else batch_size, expensive)
    if batch_size is not None or expensive:
        raise TypeError(f"CAM method {name!r}: batch_size and expensive are for input-level methods "
                        "(needs_input=True) only")
    return FeatureCam(name, function, title, uses_gradients)


# Entries are FeatureCam or InputCam objects; ``entry.needs_input`` tells the two kinds apart.
CAM_METHODS = Registry[Union[FeatureCam, InputCam]]("CAM method", entry=cam_method)


def resolve_method(method: Union[str, FeatureCam, InputCam]) -> Union[FeatureCam, InputCam]:
    """The registered method of a name (every method module is imported first), or the method itself."""
    if not isinstance(method, str):
        return method
    import auditbench.explain.gradcam  # noqa: F401  (the facade imports and so registers every method)

    return CAM_METHODS.get(method)


def explain_batch(
    method: Union[str, FeatureCam, InputCam],
    backbone: Optional[nn.Module],
    head: nn.Module,
    x: Optional[Tensor],
    features: Optional[Tensor],
    target: Target,
    score: Score = "log_odds",
    layer: str = "last",
    batch_size: Optional[int] = None,
) -> Tensor:
    """Raw maps (B, h, w) of any registered method, feature- or input-level, for one batch.

    Feature-level methods at ``"last"`` with cached ``features`` run the head only (``backbone`` and ``x`` may
    be None); at finer levels they need ``backbone`` and ``x``. Input-level methods (``needs_input``) always
    need ``backbone`` and ``x``; ``features`` (at ``"last"``) saves their backbone pass. ``batch_size`` bounds
    the extra forward passes of input-level methods (ignored by the others). Upsample with :func:`upsample_cams`.

    Example:
        >>> maps = explain_batch("scorecam", model.backbone, model.head, x, None, target=1, batch_size=32)
    """
    cam = resolve_method(method)
    if cam.needs_input:
        return cam(backbone, head, x, target, score=score, layer=layer, features=features, batch_size=batch_size)
    if features is not None and (layer == "last" or (backbone is not None and is_last_level(backbone, layer))):
        return cam(head, features, target, score=score)
    if backbone is None or x is None:
        raise ValueError(f"{cam.title} at layer {layer!r} needs the backbone and the images x (or cached features"
                         " at 'last')")
    return cam.explain(backbone, head, x, target, score=score, layer=layer)[0]


def upsample_cams(cams: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (``align_corners=False``) of maps (B, h, w) to (B, *size); ReLU maps stay >= 0."""
    return F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

