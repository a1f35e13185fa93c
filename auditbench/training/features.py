"""Backbone features computed once per image, so frozen heads never re-run the backbone."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from auditbench.data.transforms import normalise
from auditbench.training.device import Accelerator


@dataclass
class CachedFeatures:
    """Pooled features for every image; the last spatial feature map where it was kept.

    The map is what Grad-CAM of a frozen model needs: with it, explaining runs only the head.
    """

    pooled: torch.Tensor  # (N, C) float32, on the CPU
    maps: torch.Tensor | None = None  # (N, C, h, w) float32, on the CPU

    def subset(self, index: np.ndarray) -> "CachedFeatures":
        idx = torch.as_tensor(index, dtype=torch.long)
        return CachedFeatures(self.pooled[idx], None if self.maps is None else self.maps[idx])


@torch.no_grad()
def extract_features(
    backbone: torch.nn.Module,
    frames: np.ndarray,
    mean,
    std,
    accelerator: Accelerator,
    batch_size: int = 32,
    keep_maps: bool = False,
) -> CachedFeatures:
    """Run the backbone once over ``frames`` (N, S, S) in [0, 1]."""
    accelerator.place(backbone.eval())
    pooled, maps = [], []
    for start in range(0, len(frames), batch_size):
        x = accelerator.batch(normalise(frames[start : start + batch_size], mean, std))
        with accelerator.autocast():
            feature_map = backbone(x)
        feature_map = feature_map.float()
        pooled.append(feature_map.mean(dim=(2, 3)).cpu())
        if keep_maps:
            maps.append(feature_map.cpu())
    return CachedFeatures(torch.cat(pooled), torch.cat(maps) if keep_maps else None)
