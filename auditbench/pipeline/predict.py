"""Stage 4a: predictions and explanation maps of one trained model on a set of frames."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from auditbench.data.prepare import Frames
from auditbench.data.transforms import normalise
from auditbench.explain.cam_base import explain_batch
from auditbench.explain.gradcam import upsample_cams
from auditbench.pipeline.records import GroupInputs, ModelFold
from auditbench.protocol.schema import ExplainSpec
from auditbench.training.device import Accelerator
from auditbench.training.trainer import predict_logits


def predict_and_explain(model: ModelFold, inputs: GroupInputs, frames: Frames, maps: torch.Tensor | None,
                        cam, explain: ExplainSpec, accelerator: Accelerator):
    """p(positive) and the raw map of ``explain.method`` (``cam``) for ``explain.target`` (positive or
    predicted class) with ``explain.score`` at ``explain.layer``, upsampled to the model frame; and
    the map's side.

    p comes from the fp32 head on the backbone's map, exactly as for the occluded copies."""
    device = accelerator.device
    head = model.classifier.head.to(device).eval()
    size = frames.images.shape[-2:]
    probabilities, heatmaps, map_side = [], [], 0
    # Images are normalised only where needed: a frozen model explained at "last" by a feature-level
    # method runs its head on the cached map alone.
    needs_images = cam.needs_input or explain.layer != "last"
    backbone = model.classifier.backbone.to(device).eval()
    for start in range(0, len(frames), explain.batch_size):
        batch = slice(start, start + explain.batch_size)
        cached = model.frozen and maps is not None
        x = normalise(frames.images[batch], inputs.mean, inputs.std).to(device) if needs_images or not cached else None
        if cached:
            feature_map = maps[batch].to(device)
        else:
            with torch.no_grad(), accelerator.autocast():
                feature_map = backbone(x)
            feature_map = feature_map.float()
        with torch.no_grad():
            logits = head(feature_map)
        target = 1 if explain.target == "positive" else logits.argmax(dim=1)
        # Backbone passes (finer levels, input-level methods) under the run's precision; a head-only
        # map stays in fp32 (small weights times activations underflow in fp16).
        with accelerator.autocast() if needs_images else contextlib.nullcontext():
            cams = explain_batch(cam, backbone, head, x, feature_map, target, explain.score, explain.layer,
                                 batch_size=explain.batch_size)
        cams = cams.float()
        map_side = cams.shape[-1]
        probabilities.append(torch.softmax(logits, dim=1)[:, 1].cpu())
        heatmaps.append(upsample_cams(cams, tuple(size)).cpu())
    return torch.cat(probabilities).numpy(), torch.cat(heatmaps).numpy(), map_side


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
