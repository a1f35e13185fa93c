"""Input-level methods: they need the images and the whole model, not only the head and cached features.

Called as ``method(backbone, head, x, target, score=..., layer=..., features=..., batch_size=...)`` or through
:func:`auditbench.explain.cam_base.explain_batch`; ``method.needs_input`` is True for them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from auditbench.explain.cam_base import CAM_METHODS, InputContext
from auditbench.explain.cam_levels import scores, target_indices


@CAM_METHODS.register("scorecam", title="Score-CAM", needs_input=True, uses_gradients=False, batch_size=64,
                      expensive=True)
def scorecam(context: InputContext) -> tuple[Tensor, Tensor, Tensor]:
    """Score-CAM (Wang, Wang, Du, Yang, Zhang, Ding, Mardziel & Hu 2020, "Score-CAM: Score-Weighted Visual
    Explanations for Convolutional Neural Networks", CVPR workshops): gradient-free channel weights from
    forward passes of masked images,

        H_k = (U_k - min U_k) / (max U_k - min U_k),  U_k = A_k upsampled bilinearly to the input size,
        s_k = S(x * H_k) (the whole model on the masked image),  w = softmax_k(s),
        map = ReLU(sum_k w_k A_k)

    (the paper's baseline score f(x_b) is the same for every k, so the softmax removes it). H_k = 0 for a
    constant channel (pytorch-grad-cam divides by max - min + 1e-8). Upsampling uses ``align_corners=False``
    like the authors' code and :func:`upsample_cams` (pytorch-grad-cam uses ``align_corners=True``).

    Cost: one pass to the level, then C forward passes of the whole model per image (C channels at the
    level: 512 for a ResNet-18 at ``"last"``, 128 at ``"stride8"``), ``batch_size`` masked images at a time;
    the masks are made chunk by chunk, so memory stays that of one ``batch_size`` forward pass.
    """
    level = context.level()
    activation = level.activation.float()
    batch, channels, height, width = activation.shape
    channel_maps = activation.reshape(batch * channels, 1, height, width)
    image_of = torch.arange(batch * channels, device=activation.device) // channels
    x = context.x

    def masked_images(chunk: slice) -> Tensor:
        upsampled = F.interpolate(channel_maps[chunk], size=x.shape[-2:], mode="bilinear", align_corners=False)
        low = upsampled.amin(dim=(2, 3), keepdim=True)
        span = upsampled.amax(dim=(2, 3), keepdim=True) - low
        masks = torch.where(span > 0, (upsampled - low) / torch.where(span > 0, span, 1), 0)
        return x[image_of[chunk]] * masks.to(x.dtype)

    channel_scores = context.score_images(masked_images, batch * channels, level.targets.repeat_interleave(channels))
    weights = channel_scores.view(batch, channels).float().softmax(dim=1)
    return (weights[:, :, None, None] * activation).sum(dim=1), level.logits, level.targets


@CAM_METHODS.register("inputxgradient", title="InputXGradient", needs_input=True, uses_gradients=True, batch_size=32)
def inputxgradient(context: InputContext) -> tuple[Tensor, Tensor, Tensor]:
    """Input x gradient (Shrikumar, Greenside, Shcherbina & Kundaje 2016, "Not Just a Black Box: Learning
    Important Features Through Propagating Activation Differences", arXiv:1605.01713), through captum's
    ``InputXGradient``: a pixel-level attribution for contrast with the CAMs,

        a_c[i, j] = x_c[i, j] dS/dx_c[i, j],   map[i, j] = ReLU(sum_c a_c[i, j])  (c: colour channels),

    at the input's resolution; ``layer`` is not used. x is the normalised input, so the reference point of
    the product is the mean image. Cost: a forward with a graph through the whole model and a backward to the
    input (about 3x inference), ``batch_size`` images at a time.
    """
    from captum.attr import InputXGradient

    backbone, head = context.backbone, context.head
    if context.layer != "last" and hasattr(backbone, "layer_info"):
        backbone.layer_info(context.layer)  # an unknown layer name fails as for the other methods
    maps, logits, targets = [], [], []
    for start in range(0, len(context.x), context.batch_size):
        x = context.x[start : start + context.batch_size].detach().clone().requires_grad_()
        target = context.target
        if isinstance(target, Tensor) and target.ndim == 1:
            target = target[start : start + context.batch_size]
        seen: dict[str, Tensor] = {}

        def score_of(images: Tensor, target=target, seen=seen) -> Tensor:
            chunk_logits = head(backbone(images))
            seen["logits"] = chunk_logits.detach()
            seen["targets"] = target_indices(target, chunk_logits)
            return scores(chunk_logits.float(), seen["targets"], context.score)

        attributions = InputXGradient(score_of).attribute(x)
        maps.append(attributions.detach().float().sum(dim=1))
        logits.append(seen["logits"])
        targets.append(seen["targets"])
    return torch.cat(maps), torch.cat(logits), torch.cat(targets)
