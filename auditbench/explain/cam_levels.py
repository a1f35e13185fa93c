"""Plumbing under every CAM method: scores, targets, eval-mode checks, and one pass to a feature level.

:func:`level_pass` gives the activations A (B, C, h, w) of a feature level for a batch, the logits and targets,
and, when asked, G = d score / d A, while differentiating as little as possible:

- at ``"last"`` (the backbone's output) the backbone runs under ``torch.no_grad()``, or its cached output is
  used, and only the head is differentiated: a batch costs about one inference pass;
- at a finer level a forward hook (:class:`LeafAtLevel`) makes the level's output a leaf that requires grad
  and turns grad mode on, so only the blocks after the level and the head are recorded; ``torch.autograd.grad``
  asks for the leaf's gradient only (no parameter gradient is computed or stored). Without gradients the hook
  only records the activation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Target = Union[int, Tensor, Literal["predicted"]]
Score = Literal["log_odds", "logit"]
SCORES: tuple[str, ...] = ("log_odds", "logit")


@dataclass(frozen=True)
class LevelPass:
    """Activations (B, C, h, w, detached), d score / d activations or None, logits (B, classes), targets (B,)."""

    activation: Tensor
    gradients: Optional[Tensor]
    logits: Tensor
    targets: Tensor


def level_pass(
    title: str,
    backbone: Optional[nn.Module],
    head: nn.Module,
    x: Optional[Tensor],
    target: Target,
    layer: str,
    score: Score,
    gradients: bool,
    features: Optional[Tensor] = None,
) -> LevelPass:
    """One pass of ``x`` to ``layer`` (see the module docstring); ``features`` is the cached backbone output at
    ``"last"``. ``title`` names the method in error messages."""
    check_score(score)
    check_eval(title, backbone=backbone, head=head)
    if layer == "last" or is_last_level(backbone, layer):
        if features is None:
            if backbone is None or x is None:
                raise ValueError(f"{title} needs the backbone and the images x, or cached features at 'last'")
            with torch.no_grad():
                features = backbone(x)
        if gradients:
            return LevelPass(features.detach(), *head_gradients(head, features, target, score))
        with torch.no_grad():
            logits = head(features)
        return LevelPass(features.detach(), None, logits, target_indices(target, logits))

    if backbone is None or x is None:
        raise ValueError(f"{title} at layer {layer!r} needs the backbone and the images x")
    level = backbone.layer_info(layer)
    leaf = LeafAtLevel(level["module"], title, requires_grad=gradients)
    # No graph below the level: grad mode is off until the hook turns it on at the level's output.
    # no_grad's exit restores the caller's grad mode whatever happened inside, and the hook goes either way.
    with torch.no_grad():
        handle = backbone.layer_module(layer).register_forward_hook(leaf)
        try:
            features = backbone(x)
        finally:
            handle.remove()
    if leaf.activation is None:
        raise RuntimeError(f"{title} layer {layer!r}: module {level['module']!r} did not run in the backbone's forward")
    if not gradients:
        with torch.no_grad():
            logits = head(features)
        return LevelPass(leaf.activation, None, logits, target_indices(target, logits))
    if not features.requires_grad:
        raise RuntimeError(
            f"{title} layer {layer!r}: the backbone's output does not depend on {level['module']!r} with a graph"
            " (does the backbone turn grad mode off after that module?)"
        )
    with torch.enable_grad():
        logits = head(features)
        targets = target_indices(target, logits)
        (grads,) = torch.autograd.grad(scores(logits, targets, score).sum(), leaf.activation)
    return LevelPass(leaf.activation.detach(), grads, logits.detach(), targets)


def head_gradients(head: nn.Module, features: Tensor, target: Target, score: Score) -> tuple[Tensor, Tensor, Tensor]:
    """d score / d features (B, C, h, w), logits (B, classes) and targets (B,): a backward through the head only."""
    features = features.detach().requires_grad_()
    with torch.enable_grad():
        logits = head(features)
        targets = target_indices(target, logits)
        # Images are independent, so the gradient of the summed scores gives every image its own gradient.
        (gradients,) = torch.autograd.grad(scores(logits, targets, score).sum(), features)
    return gradients, logits.detach(), targets


def is_last_level(backbone: Optional[nn.Module], layer: str) -> bool:
    """Whether ``layer`` is the backbone's output ("last", or a stride whose level is the last, as for VGG)."""
    if layer == "last":
        return True
    if backbone is None:
        return False
    return backbone.layer_info(layer)["index"] == backbone.cam_level["index"]  # fails here on an unknown name


class LeafAtLevel:
    """Forward hook recording the module's output as ``activation``. With ``requires_grad`` it is a leaf that
    requires grad and grad mode is on for the rest of the forward (the caller's ``no_grad`` context restores it)."""

    def __init__(self, name: str, title: str = "Grad-CAM", requires_grad: bool = True):
        self.name = name
        self.title = title
        self.requires_grad = requires_grad
        self.activation: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: object, output: object) -> Optional[Tensor]:
        if self.activation is not None:
            raise RuntimeError(
                f"{self.title} level module {self.name!r} ran twice in one forward: its map is ambiguous"
            )
        if not isinstance(output, Tensor) or output.ndim != 4:
            raise TypeError(
                f"{self.title} level module {self.name!r} must return a (B, C, h, w) tensor, got {type(output)}"
            )
        if not self.requires_grad:
            self.activation = output.detach().clone()  # a later in-place op must not change it
            return None
        self.activation = output.detach().requires_grad_()
        torch.set_grad_enabled(True)
        # A clone goes on, so an in-place op in the next block (e.g. ReLU(inplace=True)) changes neither the
        # leaf (autograd forbids that) nor the activation the map is made of.
        return self.activation.clone()


def scores(logits: Tensor, targets: Tensor, score: Score) -> Tensor:
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


def check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(map(repr, SCORES))}, got {score!r}")


def check_eval(title: str, **parts: Optional[nn.Module]) -> None:
    """Raise unless every given part is in eval mode: dropout would randomise the maps, batch norm would update
    its statistics."""
    for name, part in parts.items():
        if part is not None and part.training:
            raise ValueError(f"{title} needs the {name} in eval mode: call {name}.eval() first")


def target_indices(target: Target, logits: Tensor) -> Tensor:
    """(B,) class indices from an index, a tensor of indices or ``"predicted"`` (argmax of ``logits``)."""
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
