"""Stage 4a: predictions and explanation maps of one trained model on a set of frames."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from auditbench.data.prepare import Frames
from auditbench.data.transforms import normalise
from auditbench.explain.cam_base import explain_batch
from auditbench.explain.gradcam import upsample_cams
from auditbench.models.classifier import Classifier
from auditbench.pipeline.records import GroupInputs, ModelFold
from auditbench.protocol.schema import ExplainSpec
from auditbench.training.device import Accelerator
from auditbench.training.trainer import predict_logits


@dataclass
class Explained:
    """p(positive) of each frame and, per explanation method, its raw maps upsampled to the model
    frame and the side of the map it computed before upsampling. A method bounded by
    ``explain.expensive_images`` has maps for the leading rows only: ``heatmaps[name]`` is (n, S, S)
    with n <= len(p) (:func:`bounded_rows`)."""

    p: np.ndarray
    heatmaps: dict[str, np.ndarray]
    map_side: dict[str, int]


def bounded_rows(cam, is_primary: bool, first: int, count: int, bound: int) -> int:
    """How many of ``count`` images, numbers ``first``.. of their split, a method explains: all, or for
    a method registered as expensive (not the primary) those numbered below ``bound``."""
    if is_primary or not cam.expensive:
        return count
    return max(0, min(count, bound - first))


def predict_and_explain(model: ModelFold, inputs: GroupInputs, frames: Frames, maps: torch.Tensor | None,
                        cams: dict, explain: ExplainSpec, accelerator: Accelerator, first: int = 0,
                        expensive_images: int | None = None) -> Explained:
    """p(positive) and the raw maps of each method in ``cams`` (name -> registered method, the primary
    first) for ``explain.target`` (positive or predicted class) with ``explain.score`` at ``explain.layer``,
    upsampled to the model frame. One forward pass per batch serves every method.

    ``frames`` are images number ``first``.. of their split: an expensive method explains only those
    numbered below ``expensive_images`` (default ``explain.expensive_images``; :func:`bounded_rows`).
    p comes from the fp32 head on the backbone's map, exactly as for the occluded copies."""
    return explain_images(model.classifier, frames.images, inputs.mean, inputs.std, cams, explain, accelerator,
                          maps=maps if model.frozen else None, first=first, expensive_images=expensive_images)


def explain_images(classifier: Classifier, images: np.ndarray, mean, std, cams: dict, explain: ExplainSpec,
                   accelerator: Accelerator, maps: torch.Tensor | None = None, first: int = 0,
                   expensive_images: int | None = None) -> Explained:
    """:func:`predict_and_explain` on bare (N, S, S) images: ``maps`` are the backbone's cached feature
    maps of those images, valid only when the backbone is the shared pretrained one (a frozen model);
    None runs the backbone. The GPU benchmark times this same call."""
    device = accelerator.device
    bound = explain.expensive_images if expensive_images is None else expensive_images
    primary = next(iter(cams))
    head = accelerator.place(classifier.head).eval()
    size = tuple(images.shape[-2:])
    probabilities: list[torch.Tensor] = []
    heatmaps: dict[str, list[torch.Tensor]] = {name: [] for name in cams}
    map_side = dict.fromkeys(cams, 0)
    # Images are normalised only where needed: a frozen model explained at "last" by feature-level
    # methods runs its head on the cached map alone.
    needs_images = any(cam.needs_input for cam in cams.values()) or explain.layer != "last"
    backbone = accelerator.place(classifier.backbone).eval()
    cached = maps is not None
    for start in range(0, len(images), explain.batch_size):
        batch = slice(start, start + explain.batch_size)
        x = accelerator.batch(normalise(images[batch], mean, std)) if needs_images or not cached else None
        if cached:
            feature_map = maps[batch].to(device)
        else:
            with torch.no_grad(), accelerator.autocast():
                feature_map = backbone(x)
            feature_map = feature_map.float()
        with torch.no_grad():
            logits = head(feature_map)
        target = 1 if explain.target == "positive" else logits.argmax(dim=1)
        probabilities.append(torch.softmax(logits, dim=1)[:, 1].cpu())
        for name, cam in cams.items():
            rows = bounded_rows(cam, name == primary, first + start, len(feature_map), bound)
            if not rows:
                continue
            # Backbone passes (finer levels, input-level methods) under the run's precision; a head-only
            # map stays in fp32 (small weights times activations underflow in fp16).
            through_backbone = cam.needs_input or explain.layer != "last"
            with accelerator.autocast() if through_backbone else contextlib.nullcontext():
                raw = explain_batch(cam, backbone, head, None if x is None else x[:rows], feature_map[:rows],
                                    target if isinstance(target, int) else target[:rows], explain.score,
                                    explain.layer, batch_size=explain.batch_size)
            raw = raw.float()
            map_side[name] = raw.shape[-1]
            heatmaps[name].append(upsample_cams(raw, size).cpu())
    empty = np.zeros((0, *size), np.float32)
    return Explained(torch.cat(probabilities).numpy(),
                     {name: torch.cat(parts).numpy() if parts else empty for name, parts in heatmaps.items()}, map_side)


def probability_fn(model: ModelFold, inputs: GroupInputs, batch_size: int, accelerator: Accelerator):
    """p(positive) of images, the same precision path as :func:`predict_and_explain`."""

    def predict(images: np.ndarray) -> np.ndarray:
        logits = predict_logits(model.classifier, images, inputs.mean, inputs.std, batch_size, accelerator)
        return torch.softmax(logits, dim=1)[:, 1].numpy()

    return predict


def head_probability(model: ModelFold, pooled: torch.Tensor) -> np.ndarray:
    """p(positive) of a frozen model from cached pooled features: its head alone."""
    with torch.no_grad():
        logits = model.classifier.head.cpu().forward_pooled(pooled)
    return torch.softmax(logits, dim=1)[:, 1].numpy()
