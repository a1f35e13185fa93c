"""The study's classifier: a timm feature backbone and a small dense head."""
from __future__ import annotations

from torch import Tensor, nn

from auditbench.models.backbones import FeatureBackbone, build_backbone


class Head(nn.Module):
    """Global average pool, then Linear(in, hidden) - ReLU - Dropout - Linear(hidden, classes), as in the study."""

    def __init__(self, in_features: int, hidden: int, dropout: float = 0.5, num_classes: int = 2):
        super().__init__()
        self.in_features = in_features
        self.hidden = hidden
        self.dropout = dropout
        self.num_classes = num_classes
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        """Logits (B, classes) from a feature map (B, C, h, w)."""
        return self.forward_pooled(features.mean(dim=(2, 3)))

    def forward_pooled(self, pooled: Tensor) -> Tensor:
        """Logits (B, classes) from pooled features (B, C), e.g. cached ones."""
        return self.fc2(self.drop(self.act(self.fc1(pooled))))


class Classifier(nn.Module):
    """``head(backbone(x))``; ``features(x)`` is the backbone's map A, the Grad-CAM layer."""

    def __init__(self, backbone: FeatureBackbone, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def build_classifier(
    backbone: str, hidden: int, weights: str = "imagenet", dropout: float = 0.5, num_classes: int = 2
) -> Classifier:
    """A :class:`Classifier` from a backbone name (see ``build_backbone``) and head sizes."""
    features = build_backbone(backbone, weights)
    return Classifier(features, Head(features.num_features, hidden, dropout, num_classes))
