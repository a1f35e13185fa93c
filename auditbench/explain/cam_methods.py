"""Feature-level CAM methods: each is a function of the level's activations A (B, C, h, w) and, for the gradient
methods, G = dS/dA (S the score: log-odds or logit of the target class). The base (:mod:`.cam_base`) runs the
pass to the level, differentiates only what is above it, and applies the final ReLU; maps stay raw.

Notation: A_k[i, j] channel k at position (i, j), g_k[i, j] = dS/dA_k[i, j], sums over i, j run over the map.

With the study's head (global average pooling first), dS/dA_k[i, j] = dS/dpooled_k / (h w) is the same at every
position of the backbone's output, so at layer ``"last"`` HiResCAM and XGrad-CAM equal Grad-CAM and LayerCAM
is Grad-CAM with ReLU(alpha_k); they differ where the gradient varies over the map: at finer levels
(``"stride16"``, ``"stride8"``) or with a head that does not pool first.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from auditbench.explain.cam_base import CAM_METHODS


@CAM_METHODS.register("hirescam", title="HiResCAM")
def hirescam(activation: Tensor, gradients: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations of
    convolutional neural networks", arXiv:2011.08891): the elementwise product of gradient and activation,
    summed over channels: map[i, j] = ReLU(sum_k g_k[i, j] A_k[i, j]).

    Called like Grad-CAM: ``hirescam(head, features, target, score=...)`` or ``hirescam.explain(...)``.
    """
    return (gradients * activation).sum(dim=1)


@CAM_METHODS.register("gradcampp", title="Grad-CAM++")
def gradcampp(activation: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM++ (Chattopadhyay, Sarkar, Howlader & Balasubramanian 2018, "Grad-CAM++: Generalized
    Gradient-based Visual Explanations for Deep Convolutional Networks", WACV), closed form of its eq. 19.

    The paper explains Y = exp(S); with S piecewise linear in A (its higher derivatives vanish) the
    derivatives of Y are powers of g times exp(S), and

        alpha_k[i, j] = g^2 / (2 g^2 + sum_ab A_k[a, b] g^3) = 1 / (2 + sum_ab A_k[a, b] g_k[i, j])  (g != 0),
        w_k = sum_ij alpha_k[i, j] ReLU(g_k[i, j]),   map = ReLU(sum_k w_k A_k).

    The paper's w_k carries a factor exp(S) (dY/dA = exp(S) g), one positive number per image; it is left out,
    as pytorch-grad-cam does, so the map has Grad-CAM's units. Unlike pytorch-grad-cam, no epsilon is added to
    the denominator: with g ~ 1e-4 (a 7x7 map under a pooling head) its 1e-6 would outweigh g^2 and change the
    weights; alpha is 0 where g = 0 or the denominator is 0. For activations that are not >= 0 (a level
    without a final ReLU) the denominator can be negative: the formula is applied as it stands.
    """
    total = activation.sum(dim=(2, 3), keepdim=True)
    denominator = 2 + total * gradients
    defined = (gradients > 0) & (denominator != 0)  # only g > 0 reaches w_k through ReLU(g)
    alpha = torch.where(defined, 1 / torch.where(defined, denominator, 1), 0)
    weights = (alpha * gradients.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    return (weights * activation).sum(dim=1)


@CAM_METHODS.register("xgradcam", title="XGrad-CAM")
def xgradcam(activation: Tensor, gradients: Tensor) -> Tensor:
    """XGrad-CAM (Fu, Hu, Dong, Guo, Gao & Li 2020, "Axiom-based Grad-CAM: Towards Accurate Visualization and
    Explanation of CNNs", BMVC): activation-weighted gradients,

        w_k = sum_ij (A_k[i, j] / sum_ab A_k[a, b]) g_k[i, j],   map = ReLU(sum_k w_k A_k);

    w_k = 0 for a channel whose activations sum to 0 (pytorch-grad-cam adds 1e-7 to the sum instead).
    """
    total = activation.sum(dim=(2, 3), keepdim=True)
    share = torch.where(total != 0, activation / torch.where(total != 0, total, 1), 0)
    weights = (share * gradients).sum(dim=(2, 3), keepdim=True)
    return (weights * activation).sum(dim=1)


@CAM_METHODS.register("layercam", title="LayerCAM")
def layercam(activation: Tensor, gradients: Tensor) -> Tensor:
    """LayerCAM (Jiang, Zhang, Hou, Cheng & Wei 2021, "LayerCAM: Exploring Hierarchical Class Activation Maps
    for Localization", IEEE TIP 30): positive gradients as pixel weights,
    map[i, j] = ReLU(sum_k ReLU(g_k[i, j]) A_k[i, j]).
    """
    return (gradients.clamp(min=0) * activation).sum(dim=1)


@CAM_METHODS.register("eigencam", title="EigenCAM", uses_gradients=False)
def eigencam(activation: Tensor, gradients: Optional[Tensor]) -> Tensor:
    """EigenCAM (Muhammad & Yeasin 2020, "Eigen-CAM: Class Activation Map using Principal Components", IJCNN):
    gradient-free and class-agnostic (``target`` and ``score`` do not change it).

    Per image, M (h w, C) holds the activations, centred per channel over the positions (as pytorch-grad-cam
    does: principal components); with the SVD M = U S V^T the map is the projection on the first principal
    direction v_1: map = ReLU(M v_1) reshaped to (h, w). The sign of v_1 is not defined by the SVD; it is
    chosen so that sum_k v_1[k] >= 0, i.e. the map correlates non-negatively with the channel sum of the
    centred activations (pytorch-grad-cam keeps whatever sign its SVD returns).
    """
    batch, channels, height, width = activation.shape
    centred = activation.reshape(batch, channels, height * width).transpose(1, 2).double()
    centred = centred - centred.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    first = vh[:, 0, :]  # (B, C)
    first = torch.where(first.sum(dim=1, keepdim=True) < 0, -first, first)
    projection = (centred @ first[:, :, None])[:, :, 0]
    return projection.reshape(batch, height, width).to(activation.dtype)
